"""
The splice's own reader (epsproxy.proxy.splice, issue 14 item 5), over real loopback
sockets through a :class:`Rendezvous`: between two reactor TCP transports the splice reads
each socket itself into one buffer shared by every splice, sizes reads to what the
receiver takes, and waits for a receiver that is behind to become writable.  Checked:
pairs streaming at once do not mix their bytes, a slow reader gets every byte while the
relay holds at most one read, half-close and cuts while a direction waits, a small send
buffer is read at its size (not waited for before each read), and a wrapper transport
keeps Twisted's own reader.
"""

from __future__ import annotations

import gc
import socket
import time
import weakref

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase

from epsproxy.net.admission import Admission, AdmissionEndpoint, ProcessBudget
from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.proxy.splice import DEFAULT_READ_BYTES
from tests.support.splice import Peer, connect, engine, listen, spliced_pair
from tests.support.splice_flow import Source, Throttled


class OwnReader(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.rv = Rendezvous(reactor)
        self.port = listen(self, self.rv)

    @defer.inlineCallbacks
    def test_tcp_pairs_are_read_by_the_splice_and_streams_stay_apart(self):
        # Three pairs stream both ways at once through the one shared read buffer.
        pairs = []
        for _ in range(3):
            a, b = yield spliced_pair(self, self.rv, self.port, keep=False, half_close=True)
            pairs.append((a, b))
        for s in self.rv.splices:
            self.assertTrue(s.own_reader)
        flows = []
        for i, (a, b) in enumerate(pairs):
            up = Source(a.transport, 24, seed=b"up%d" % i)
            down = Source(b.transport, 24, seed=b"down%d" % i)
            flows.append((a, b, up, down))
        for _, _, up, down in flows:
            up.resumeProducing()
            down.resumeProducing()
        yield defer.gatherResults([d for a, b, _, _ in flows for d in (a.eof, b.eof)])
        for a, b, up, down in flows:
            self.assertEqual(b.count, 1 + up.sent)
            self.assertEqual(b.sha.hexdigest(), up.digest(b"!"))
            self.assertEqual(a.count, 1 + down.sent)
            self.assertEqual(a.sha.hexdigest(), down.digest(b"?"))
        reasons = yield defer.gatherResults([p.closed for a, b, _, _ in flows for p in (a, b)])
        for reason in reasons:
            self.assertIsInstance(reason, ConnectionDone)

    @defer.inlineCallbacks
    def test_idle_pairs_are_closed_by_the_shared_sweep(self):
        # Real sockets through a Rendezvous: its splices share one idle sweep.
        rv = Rendezvous(reactor, idle_timeout=0.3)
        port = listen(self, rv)
        quiet = yield spliced_pair(self, rv, port)
        busy = yield spliced_pair(self, rv, port)
        self.assertEqual(len(rv._sweep), 2)
        started = time.monotonic()
        # One pair keeps relaying, the other is silent: only the silent one is closed.
        for n in range(1, 9):
            busy[0].transport.write(b"x")
            yield busy[1].wait_for(1 + n)
            if quiet[0].closed.called:
                break
        reasons = yield defer.gatherResults([quiet[0].closed, quiet[1].closed])
        self.assertGreaterEqual(time.monotonic() - started, 0.2)  # not before its timeout
        for reason in reasons:
            self.assertIsInstance(reason, ConnectionLost)  # aborted: cut, not ended
        self.assertFalse(busy[0].closed.called or busy[1].closed.called)
        self.assertEqual(len(rv._sweep), 1)
        (pair,) = rv.splices
        busy[0].transport.loseConnection()
        yield pair.done
        self.assertEqual((len(rv._sweep), rv._sweep._call), (0, None))  # timer stopped

    @defer.inlineCallbacks
    def test_a_closed_pair_is_freed_without_the_garbage_collector(self):
        # Its ends, transports and buffers go when the last reference does: no cycle is
        # left for the collector (each proxy connection used to leave some fifteen).
        gc.disable()
        self.addCleanup(gc.enable)
        a, b = yield spliced_pair(self, self.rv, self.port, keep=False)
        (s,) = self.rv.splices
        refs = [weakref.ref(x) for x in (s, s.left, s.right, s.left.transport,
                                         s.right.transport)]
        done = s.done
        del s
        a.transport.loseConnection()
        b.transport.loseConnection()
        yield done
        yield defer.gatherResults([a.closed, b.closed])
        yield task.deferLater(reactor, 0, lambda: None)  # the closing turn has ended
        self.assertEqual([ref() for ref in refs], [None] * len(refs))

    @defer.inlineCallbacks
    def test_a_slow_reader_gets_every_byte_and_the_relay_waits_for_it(self):
        token = self.rv.new_token()
        a = yield connect(self, self.port, Peer(token, keep=False))
        b = yield connect(self, self.port, Throttled(token, rate=20e6, keep=False))
        a.transport.write(b"!")
        yield b.wait_for(1)
        (s,) = self.rv.splices
        source = Source(a.transport, 48)  # 48 MiB at 20 MB/s
        source.resumeProducing()
        count = yield b.eof
        self.assertEqual(count, 1 + source.sent)
        self.assertEqual(b.sha.hexdigest(), source.digest(b"!"))
        # The relay read no more than the receiver's socket took: it waited for it
        # rather than keep copies, and never held more than one read.
        self.assertGreater(s.waits, 0)
        self.assertLessEqual(s.peak_unsent(), DEFAULT_READ_BYTES)

    @defer.inlineCallbacks
    def test_half_close_while_the_receiver_is_behind(self):
        token = self.rv.new_token()
        a = yield connect(self, self.port, Peer(token, keep=False, half_close=True))
        b = yield connect(self, self.port, Throttled(token, rate=40e6, keep=False,
                                                     half_close=True))
        a.transport.write(b"!")
        yield b.wait_for(1)
        source = Source(a.transport, 24)  # then end-of-stream from a
        source.resumeProducing()
        count = yield b.eof
        self.assertEqual(count, 1 + source.sent)
        self.assertEqual(b.sha.hexdigest(), source.digest(b"!"))
        self.assertFalse(a.closed.called)
        b.transport.write(b"the other way still works")
        yield a.wait_for(len(b"the other way still works"))
        b.transport.loseWriteConnection()
        reasons = yield defer.gatherResults([a.closed, b.closed])
        for reason in reasons:
            self.assertIsInstance(reason, ConnectionDone)

    @defer.inlineCallbacks
    def test_a_reset_mid_stream_cuts_the_other_side(self):
        a, b = yield spliced_pair(self, self.rv, self.port, keep=False)
        source = Source(a.transport, 1 << 12, close=False)  # far more than gets through
        source.resumeProducing()
        yield b.wait_for(8 << 20)  # bytes are flowing through the splice's reader
        a.transport.abortConnection()  # a reset, in the middle of the stream
        reason = yield b.closed
        self.assertNotIsInstance(reason, ConnectionDone)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.rv.active_splices, 0)

    @defer.inlineCallbacks
    def test_a_receiver_gone_while_its_sender_waits_cuts_the_sender(self):
        a, b = yield spliced_pair(self, self.rv, self.port, keep=False)
        (s,) = self.rv.splices
        b.transport.pauseProducing()  # b reads nothing: a's direction backs up
        source = Source(a.transport, 1 << 12, close=False)
        source.resumeProducing()
        # The relay has stopped reading a: it waits for b's socket, or holds a read for it.
        yield _until(lambda: source.paused and (s.waits > 0 or max(s.unsent()) > 0))
        b.transport.abortConnection()
        reason = yield a.closed
        self.assertNotIsInstance(reason, ConnectionDone)


class AdmittedListener(TestCase):
    """
    Connections accepted by a capped listener (the public proxy's, a subclass of
    Twisted's TCP transport that counts itself in and out) are read by the splice too,
    and still give their slots back when the pair closes.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_admitted_connections_are_read_by_the_splice_and_release_their_slots(self):
        rv = Rendezvous(reactor)
        admission = Admission("internal", max_connections=10, budget=ProcessBudget())
        port = yield AdmissionEndpoint(reactor, 0, admission,
                                       interface="127.0.0.1").listen(rv.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(rv.close_all)
        a, b = yield spliced_pair(self, rv, port.getHost().port, keep=False,
                                  half_close=True)
        (s,) = rv.splices
        self.assertTrue(s.own_reader)
        self.assertEqual(admission.current, 2)
        up = Source(a.transport, 8, seed=b"up")
        up.resumeProducing()  # 8 MiB, then end-of-stream: a half-close through the splice
        yield b.eof
        self.assertEqual(b.count, 1 + up.sent)
        self.assertEqual(b.sha.hexdigest(), up.digest(b"!"))
        b.transport.write(b"after the half-close")
        yield a.wait_for(1 + len(b"after the half-close"))
        b.transport.loseWriteConnection()
        reasons = yield defer.gatherResults([a.closed, b.closed])
        for reason in reasons:
            self.assertIsInstance(reason, ConnectionDone)
        yield s.done
        self.assertEqual(admission.current, 0)


class WrappedTransport(TestCase):
    """A transport under a wrapper (a policies wrapper, TLS ...) keeps Twisted's reader."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_wrapper_keeps_twisteds_reader_and_relays_intact(self):
        rv = Rendezvous(reactor)
        port = reactor.listenTCP(0, WrappingFactory(rv.factory()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(rv.close_all)
        a, b = yield spliced_pair(self, rv, port.getHost().port, keep=False)
        (s,) = rv.splices
        self.assertFalse(s.own_reader)
        # No end-of-stream: a policies wrapper is not half-closeable, so an end of
        # stream from a would close its side (and cut the pair) rather than half-close.
        source = Source(a.transport, 16, close=False)
        source.resumeProducing()
        count = yield b.wait_for(1 + (16 << 20))
        self.assertEqual(count, 1 + source.sent)
        self.assertEqual(b.sha.hexdigest(), source.digest(b"!"))


def _until(condition) -> defer.Deferred[None]:
    """Fires once ``condition()`` holds, checked every 10 ms (a state without an event)."""
    d: defer.Deferred[None] = defer.Deferred()

    def check() -> None:
        if condition():
            loop.stop()

    loop = task.LoopingCall(check)
    loop.start(0.01).addCallback(lambda _: d.callback(None))
    return d


class SmallSendBuffer(TestCase):
    """A receiver whose socket has a small send buffer (set explicitly, no autotuning)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_small_send_buffer_is_read_at_its_size_not_waited_for_each_time(self):
        rv = Rendezvous(reactor)
        port = listen(self, rv)
        a, b = yield spliced_pair(self, rv, port, keep=False)
        (s,) = rv.splices
        # The relay's socket towards b: 64 KiB (the kernel doubles the 32 KiB asked).
        s.right.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        source = Source(a.transport, 16)
        source.resumeProducing()
        count = yield b.eof
        self.assertEqual(count, 1 + source.sent)
        self.assertEqual(b.sha.hexdigest(), source.digest(b"!"))
        # Reads follow the small buffer's room; a wait before each smallest read (one
        # per 16 KiB, what a fixed threshold for large buffers did) would be far more.
        self.assertLess(s.waits, source.sent // (24 * 1024))


class EngineOwnReader(OwnReader):
    """The same, relayed by the splice engine (C, epsproxy.proxy.splice_engine)."""

    def setUp(self) -> None:
        self.rv = Rendezvous(reactor, engine=engine())
        self.port = listen(self, self.rv)

    @defer.inlineCallbacks
    def test_idle_pairs_are_closed_by_the_shared_sweep(self):
        # The engine times idle pairs itself (not the Rendezvous' sweep): a silent pair
        # is cut after its timeout, a busy one is not.
        rv = Rendezvous(reactor, idle_timeout=0.3, engine=engine())
        port = listen(self, rv)
        quiet = yield spliced_pair(self, rv, port)
        busy = yield spliced_pair(self, rv, port)
        self.assertEqual(len(rv._sweep), 0)
        started = time.monotonic()
        for n in range(1, 200):
            busy[0].transport.write(b"x")
            yield busy[1].wait_for(1 + n)
            if quiet[0].closed.called:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)  # traffic, spread out
        reasons = yield defer.gatherResults([quiet[0].closed, quiet[1].closed])
        self.assertGreaterEqual(time.monotonic() - started, 0.25)  # not before its timeout
        for reason in reasons:
            self.assertIsInstance(reason, ConnectionLost)  # reset: cut, not ended
        self.assertFalse(busy[0].closed.called or busy[1].closed.called)
        (pair,) = rv.splices
        busy[0].transport.loseConnection()
        yield pair.done
