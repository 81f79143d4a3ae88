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
                 fail_lost: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        sock.setblocking(False)
        self.fail_read = fail_read
        self.fail_lost = fail_lost
        self.read: list[bytes] = []
        self.lost: list[Failure] = []
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

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

    def test_no_event_within_the_timeout_returns(self):
        a, _ = self.pair()
        self.reactor.doPoll(0.01)
        self.assertEqual((a.read, a.lost), ([], []))
