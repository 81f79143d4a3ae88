"""
epsproxy's reactor (epsproxy.net.reactor.EPollReactor): Twisted's epoll reactor whose
poll hands each ready descriptor straight to Twisted's read/write/hang-up handling.
Driven here one poll at a time over real socket pairs, on a reactor of its own (not
installed, not running); a real program running on it is in tests/test_program.py.
"""

from __future__ import annotations

import socket

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial import unittest

from epsproxy.net.reactor import EPollReactor


class Boom(Exception):
    pass


class _End(FileDescriptor):
    """One end of a socket pair, recording what the reactor does with it."""

    def __init__(self, reactor: EPollReactor, sock: socket.socket, *, fail_read: bool = False,
                 fail_lost: bool = False, fail_write: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        sock.setblocking(False)
        self.fail_read = fail_read
        self.fail_lost = fail_lost
        self.fail_write = fail_write
        self.read: list[bytes] = []
        self.lost: list[Failure] = []
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def doWrite(self):
        self.writable = getattr(self, "writable", 0) + 1
        if self.fail_write:
            raise Boom("doWrite failed")
        self.reactor.removeWriter(self)
        return None

    def doRead(self):
        if self.fail_read:
            raise Boom("doRead failed")
        data = self.sock.recv(65536)
        if not data:
            return ConnectionDone()
        self.read.append(data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self.sock.close()
        if self.fail_lost:
            raise Boom("connectionLost failed")


class Dispatch(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.addCleanup(self.reactor.waker.connectionLost, None)

    def pair(self, **kwargs) -> tuple[_End, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        end = _End(self.reactor, ours, **kwargs)
        self.addCleanup(lambda: end.sock.close())
        self.reactor.addReader(end)
        return end, theirs

    def test_readable_descriptors_are_read(self):
        a, a_peer = self.pair()
        b, b_peer = self.pair()
        a_peer.sendall(b"to a")
        b_peer.sendall(b"to b")
        self.reactor.doPoll(1)
        self.assertEqual((a.read, b.read), ([b"to a"], [b"to b"]))

    def test_end_of_stream_closes_the_descriptor(self):
        a, a_peer = self.pair()
        a_peer.close()
        self.reactor.doPoll(1)
        (reason,) = a.lost
        self.assertIsInstance(reason.value, ConnectionDone)
        self.assertNotIn(a, self.reactor.getReaders())

    def test_a_failing_read_is_logged_and_closes_only_its_descriptor(self):
        bad, bad_peer = self.pair(fail_read=True)
        good, good_peer = self.pair()
        bad_peer.sendall(b"x")
        good_peer.sendall(b"y")
        self.reactor.doPoll(1)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        (reason,) = bad.lost
        self.assertIsInstance(reason.value, Boom)
        self.assertEqual(good.read, [b"y"])
        self.assertEqual(good.lost, [])

    def test_a_failing_close_is_logged_and_the_batch_goes_on(self):
        bad, bad_peer = self.pair(fail_lost=True)
        good, good_peer = self.pair()
        bad_peer.close()
        good_peer.sendall(b"still served")
        self.reactor.doPoll(1)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(good.read, [b"still served"])

    def test_a_descriptor_closed_earlier_in_the_batch_is_skipped(self):
        first, first_peer = self.pair()
        second, second_peer = self.pair()

        def read_and_close_the_other(end: _End = first, other: _End = second):
            other.connectionLost(Failure(ConnectionLost("closed by its neighbour")))
            return _End.doRead(end)

        def read_and_close_the_first(end: _End = second, other: _End = first):
            other.connectionLost(Failure(ConnectionLost("closed by its neighbour")))
            return _End.doRead(end)

        first.doRead = read_and_close_the_other  # type: ignore[method-assign]
        second.doRead = read_and_close_the_first  # type: ignore[method-assign]
        first_peer.sendall(b"1")
        second_peer.sendall(b"2")
        self.reactor.doPoll(1)
        # Whichever came first in the batch read and closed the other, which was not
        # dispatched afterwards (its descriptor is gone).
        self.assertEqual(len(first.read) + len(second.read), 1)
        self.assertEqual(len(first.lost) + len(second.lost), 1)

    def test_writable_descriptors_are_written(self):
        a, _ = self.pair()
        self.reactor.removeReader(a)
        self.reactor.addWriter(a)
        self.reactor.doPoll(1)
        self.assertEqual(a.writable, 1)
        self.assertEqual(a.lost, [])

    def test_a_failing_write_is_logged_and_closes_only_its_descriptor(self):
        bad, _ = self.pair(fail_write=True)
        self.reactor.removeReader(bad)
        self.reactor.addWriter(bad)
        good, good_peer = self.pair()
        good_peer.sendall(b"z")
        self.reactor.doPoll(1)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        (reason,) = bad.lost
        self.assertIsInstance(reason.value, Boom)
        self.assertEqual(good.read, [b"z"])

    def test_no_event_within_the_timeout_returns(self):
        a, _ = self.pair()
        self.reactor.doPoll(0.01)
        self.assertEqual((a.read, a.lost), ([], []))


class Registration(unittest.TestCase):
    """Adding and removing readers and writers, in every order, as Twisted's reactor does."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.addCleanup(self.reactor.waker.connectionLost, None)
        ours, self.theirs = socket.socketpair()
        self.addCleanup(self.theirs.close)
        self.end = _End(self.reactor, ours)
        self.addCleanup(ours.close)

    def state(self) -> tuple[bool, bool]:
        return (self.end in self.reactor.getReaders(), self.end in self.reactor.getWriters())

    def test_reading_and_writing_in_every_order(self):
        r = self.reactor
        r.addReader(self.end)
        r.addReader(self.end)  # twice: no change
        self.assertEqual(self.state(), (True, False))
        r.addWriter(self.end)
        self.assertEqual(self.state(), (True, True))
        r.removeReader(self.end)
        self.assertEqual(self.state(), (False, True))
        r.removeReader(self.end)  # not reading: nothing happens
        self.assertEqual(self.state(), (False, True))
        r.addReader(self.end)
        r.removeWriter(self.end)
        self.assertEqual(self.state(), (True, False))
        r.removeReader(self.end)
        self.assertEqual(self.state(), (False, False))
        self.assertNotIn(self.end.fileno(), r._selectables)

    def test_the_poller_reports_what_is_registered(self):
        r = self.reactor
        r.addWriter(self.end)
        r.addReader(self.end)
        self.theirs.sendall(b"x")
        r.doPoll(1)  # readable and writable at once: both handled
        self.assertEqual(self.end.read, [b"x"])
        self.assertEqual(getattr(self.end, "writable", 0), 1)
        r.removeReader(self.end)
        self.theirs.sendall(b"y")
        r.doPoll(0)
        self.assertEqual(self.end.read, [b"x"])  # no longer read

    def test_a_descriptor_epoll_cannot_watch_is_polled_continuously(self):
        import tempfile

        with tempfile.TemporaryFile() as f:
            class File(FileDescriptor):
                def fileno(self) -> int:
                    return f.fileno()

                def doRead(self) -> None:
                    return None

            file = File(self.reactor)
            self.reactor.addReader(file)
            self.assertIn(file, self.reactor.getReaders())
            self.assertIn(file, self.reactor._continuousPolling._readers)
            self.reactor.removeReader(file)
            self.assertNotIn(file, self.reactor.getReaders())
            self.reactor.addWriter(file)
            self.assertIn(file, self.reactor.getWriters())
            self.reactor.removeWriter(file)
            self.assertNotIn(file, self.reactor.getWriters())


class MainLoop(unittest.TestCase):
    """The main loop, run for real (not installed, no signal handlers)."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()

    def run_reactor(self) -> None:
        # Twisted closes the poller and the waker when the reactor is collected; what a
        # test leaves open is closed by the reactor's own shutdown.
        self.reactor.callLater(10, self.fail, "the reactor did not stop")  # a bound, not a wait
        self.reactor.run(installSignalHandlers=False)

    def test_timed_calls_run_in_order_of_their_time(self):
        ran: list[str] = []
        self.reactor.callLater(0.02, ran.append, "second")
        self.reactor.callLater(0, ran.append, "first")
        later = self.reactor.callLater(0.01, ran.append, "cancelled")
        later.cancel()
        self.reactor.callLater(0.03, self.reactor.stop)
        self.run_reactor()
        self.assertEqual(ran, ["first", "second"])

    def test_it_sleeps_until_the_next_timed_call_and_no_longer(self):
        timeouts: list[float | None] = []
        poll = self.reactor.doPoll

        def recording(timeout: float | None) -> None:
            timeouts.append(timeout)
            poll(timeout)

        self.reactor.doPoll = self.reactor.doIteration = recording  # type: ignore[method-assign]
        self.reactor.callLater(0.05, self.reactor.stop)
        self.run_reactor()
        # Each sleep lasted until the stop was due (not a fixed tick, not forever) and
        # the last one, after stop, did not wait.
        self.assertTrue(all(t is not None and t <= 0.05 for t in timeouts), timeouts)
        self.assertGreater(max(t for t in timeouts if t is not None), 0.0)
        self.assertEqual(timeouts[-1], 0.0)

    def test_the_timed_call_machinery_runs_only_when_something_is_due(self):
        turns = {"polls": 0, "timed": 0}
        poll, timed = self.reactor.doPoll, self.reactor.runUntilCurrent

        def counting_poll(timeout: float | None) -> None:
            turns["polls"] += 1
            poll(timeout)

        def counting_timed() -> None:
            turns["timed"] += 1
            timed()

        self.reactor.doPoll = self.reactor.doIteration = counting_poll  # type: ignore[method-assign]
        self.reactor.runUntilCurrent = counting_timed  # type: ignore[method-assign]
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        end = _End(self.reactor, ours)
        self.reactor.addReader(end)
        chunks = 50

        def on_read() -> None:
            # Each chunk read asks for the next: many turns, no timed call due.
            if len(end.read) < chunks:
                theirs.sendall(b"x")
            else:
                self.reactor.stop()

        original = end.doRead

        def read():
            result = original()
            on_read()
            return result

        end.doRead = read  # type: ignore[method-assign]
        self.reactor.callWhenRunning(theirs.sendall, b"x")
        self.run_reactor()
        self.assertEqual(len(end.read), chunks)
        self.assertGreaterEqual(turns["polls"], chunks)
        # callWhenRunning's turn, and the stop's: not one per poll.
        self.assertLessEqual(turns["timed"], 4)
        self.reactor.removeReader(end)
        end.sock.close()

    def test_calls_from_threads_are_run(self):
        import threading

        ran: list[str] = []

        def from_thread() -> None:
            self.reactor.callFromThread(ran.append, "from a thread")
            self.reactor.callFromThread(self.reactor.stop)

        self.reactor.callWhenRunning(lambda: threading.Thread(target=from_thread).start())
        self.run_reactor()
        self.assertEqual(ran, ["from a thread"])

    def test_stop_fires_the_shutdown_triggers(self):
        fired: list[str] = []
        self.reactor.addSystemEventTrigger("before", "shutdown", fired.append, "before")
        self.reactor.addSystemEventTrigger("after", "shutdown", fired.append, "after")
        self.reactor.callWhenRunning(self.reactor.stop)
        self.run_reactor()
        self.assertEqual(fired, ["before", "after"])

    def test_an_error_escaping_a_timed_call_is_logged_and_the_loop_goes_on(self):
        ran: list[str] = []

        def boom() -> None:
            raise Boom("timed call failed")

        self.reactor.callLater(0, boom)
        self.reactor.callLater(0.01, ran.append, "after the error")
        self.reactor.callLater(0.02, self.reactor.stop)
        self.run_reactor()
        self.assertEqual(ran, ["after the error"])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)

    def test_an_error_escaping_a_turn_is_logged_and_the_loop_goes_on(self):
        ran: list[str] = []
        timed = self.reactor.runUntilCurrent
        failed = []

        def failing_once() -> None:
            if not failed:
                failed.append(True)
                raise Boom("the turn failed")
            timed()

        self.reactor.runUntilCurrent = failing_once  # type: ignore[method-assign]
        self.reactor.callLater(0, ran.append, "ran on a later turn")
        self.reactor.callLater(0.01, self.reactor.stop)
        self.run_reactor()
        self.assertEqual(ran, ["ran on a later turn"])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
