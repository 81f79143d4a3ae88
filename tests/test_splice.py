"""
Splicing (epsproxy.proxy.splice), over real loopback sockets through a
:class:`Rendezvous` (the path the proxy ships) and with a Clock for the idle timeout:
relaying both ways, half-close each way, a cut stream is cut on the other side too,
1 GiB with the same SHA-256 at both ends, a receiver that does not read holds the
proxy's buffers bounded, and no read deadline once spliced.
"""

from __future__ import annotations

import hashlib
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.proxy.splice import (
    DEFAULT_READ_BYTES,
    SWEEP_SECONDS,
    IdleSweep,
    retarget,
    splice,
)
from tests.support.splice import engine, fake_connection, listen, spliced_pair
from tests.support.splice_flow import Source

# -- tests


class RealSockets(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.rv = Rendezvous(reactor)
        self.port = listen(self, self.rv)

    @defer.inlineCallbacks
    def test_relays_both_ways_in_order(self):
        a, b = yield spliced_pair(self, self.rv, self.port)
        for i in range(20):
            a.transport.write(b"a%d," % i)
            b.transport.write(b"b%d," % i)
        expected_a = b"!" + b"".join(b"a%d," % i for i in range(20))
        expected_b = b"?" + b"".join(b"b%d," % i for i in range(20))
        yield b.wait_for(len(expected_a))
        yield a.wait_for(len(expected_b))
        self.assertEqual(bytes(b.received), expected_a)
        self.assertEqual(bytes(a.received), expected_b)
        self.assertEqual(self.rv.active_splices, 1)
        self.assertEqual(self.rv.bytes_spliced, len(expected_a) + len(expected_b))

    @defer.inlineCallbacks
    def test_half_close_each_way(self):
        a, b = yield spliced_pair(self, self.rv, self.port, half_close=True)
        (pair,) = self.rv.splices
        a.transport.write(b"request")
        a.transport.loseWriteConnection()
        count = yield b.eof  # b sees everything, then end-of-stream ...
        self.assertEqual(bytes(b.received), b"!request")
        self.assertEqual(count, 8)
        self.assertFalse(a.closed.called)
        # ... and the other direction keeps working.
        b.transport.write(b"response, long after the EOF")
        yield a.wait_for(1 + 28)
        self.assertEqual(bytes(a.received), b"?response, long after the EOF")
        self.assertEqual(self.rv.active_splices, 1)
        b.transport.loseWriteConnection()
        yield a.eof
        reasons = yield defer.gatherResults([a.closed, b.closed])
        for reason in reasons:  # both directions finished: a clean close for both
            self.assertIsInstance(reason, ConnectionDone)
        # Both peers may close before the relay has closed its two sockets (with the
        # splice engine, its report reaches the reactor a little later): wait for that.
        yield pair.done
        self.assertEqual(self.rv.active_splices, 0)
        self.assertEqual(self.rv.pending, 0)

    @defer.inlineCallbacks
    def test_a_cut_stream_is_cut_on_the_other_side(self):
        a, b = yield spliced_pair(self, self.rv, self.port)
        a.transport.abortConnection()
        reason = yield b.closed
        self.assertNotIsInstance(reason, ConnectionDone)  # a cut must not look clean
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.rv.active_splices, 0)

    @defer.inlineCallbacks
    def test_one_gibibyte_arrives_with_the_same_sha256(self):
        a, b = yield spliced_pair(self, self.rv, self.port, keep=False)
        chunks = 1024
        source = Source(a.transport, chunks)
        source.resumeProducing()
        count = yield b.eof
        self.assertEqual(count, 1 + chunks * (1 << 20))
        self.assertEqual(source.sent, chunks * (1 << 20))
        # b hashed the marker byte a sent first, then the stream.
        self.assertEqual(b.sha.hexdigest(), _prefixed_digest(b"!", source))

    @defer.inlineCallbacks
    def test_a_receiver_that_does_not_read_keeps_the_proxy_bounded(self):
        a, b = yield spliced_pair(self, self.rv, self.port, keep=False)
        (s,) = self.rv.splices
        b.transport.pauseProducing()  # b reads nothing from now on
        total = 50 * (1 << 20)
        source = Source(a.transport, total >> 20)
        source.resumeProducing()
        # Wait until the whole path is stalled: the sender stays paused and the proxy
        # sends nothing more (polling the state, the flow itself has no event for it).
        yield _stalled(source, s)
        bound = self.rv.buffer_bytes + DEFAULT_READ_BYTES
        self.assertLess(source.sent, total, "nothing pushed back on the sender")
        self.assertLessEqual(max(s.unsent()), bound)
        self.assertLessEqual(s.peak_unsent(), bound)
        b.transport.resumeProducing()
        count = yield b.eof
        self.assertEqual(count, 1 + total)
        self.assertEqual(b.sha.hexdigest(), _prefixed_digest(b"!", source))
        self.assertLessEqual(s.peak_unsent(), bound)


def _prefixed_digest(prefix: bytes, source: Source) -> str:
    """The SHA-256 of ``prefix`` followed by everything ``source`` sent."""
    sha = hashlib.sha256(prefix)
    for left in range(source.sent // len(source.block) - 1, -1, -1):
        sha.update(struct.pack(">Q", left) + source.block[8:])
    return sha.hexdigest()


def _stalled(source: Source, s) -> defer.Deferred[None]:
    """Fires when ``source`` has been paused, with no progress, for five polls in a row
    (or has sent everything, which the caller's assertions then reject)."""
    d: defer.Deferred[None] = defer.Deferred()
    state = {"last": None, "quiet": 0}

    def poll():
        now = (source.sent, s.bytes_relayed)
        if source.paused and now == state["last"]:
            state["quiet"] += 1
        else:
            state["quiet"] = 0
        state["last"] = now
        if state["quiet"] >= 5 or source.left < 0:  # stalled, or (failing) all sent
            loop.stop()

    loop = task.LoopingCall(poll)
    loop.start(0.05).addCallback(lambda _: d.callback(None))
    return d


class EngineRealSockets(RealSockets):
    """The same, relayed by the splice engine (C, epsproxy.proxy.splice_engine)."""

    def setUp(self) -> None:
        self.rv = Rendezvous(reactor, engine=engine())
        self.port = listen(self, self.rv)

    @defer.inlineCallbacks
    def test_pairs_are_relayed_by_the_engine_and_leave_the_reactor(self):
        a, b = yield spliced_pair(self, self.rv, self.port)
        (s,) = self.rv.splices
        self.assertIsNotNone(s.engine_handle)
        # Neither socket is the reactor's any more: the engine reads and writes both.
        readers = {r for r in reactor.getReaders() if hasattr(r, "fileno")}
        for transport in (s.left.transport, s.right.transport):
            self.assertNotIn(transport, readers)
        a.transport.write(b"ping")
        yield b.wait_for(1 + 4)
        self.assertEqual(bytes(b.received), b"!ping")
        self.assertEqual(s.bytes_relayed, 1 + 1 + 4)
        a.transport.loseConnection()
        b.transport.loseConnection()
        yield s.done
        self.assertIsNone(s.engine_handle)
        self.assertEqual(s.bytes_relayed, 1 + 1 + 4)  # the final count, from the report
        self.assertEqual(len(engine()), 0)


class Unit(TestCase):
    """Without sockets: the generic (non-reactor-transport) path and the idle timeout."""

    def make(self, clock, **kwargs):
        left, right = Protocol(), Protocol()
        lt, rt = fake_connection(left), fake_connection(right)
        lt.pauseProducing()
        rt.pauseProducing()
        s = splice(clock, left, right, **kwargs)
        return s, lt, rt

    def test_bytes_read_earlier_go_first_and_eof_is_relayed(self):
        clock = task.Clock()
        s, lt, rt = self.make(clock, to_left=b"early-for-left", to_right=b"early-for-right",
                              left_eof=True)
        self.assertEqual(lt.value(), b"early-for-left")
        self.assertEqual(rt.value(), b"early-for-right")
        # left had already ended: right's write side is closed, left is not resumed
        self.assertTrue(rt.disconnecting)  # no loseWriteConnection on this transport
        self.assertEqual(lt.producerState, "paused")
        self.assertEqual(s.bytes_relayed, len(b"early-for-left") + len(b"early-for-right"))

    def test_events_go_to_the_splice_and_both_ways(self):
        clock = task.Clock()
        s, lt, rt = self.make(clock)
        self.assertEqual((lt.producerState, rt.producerState), ("producing", "producing"))
        lt.protocol.dataReceived(b"to right")
        rt.protocol.dataReceived(b"to left")
        self.assertEqual((lt.value(), rt.value()), (b"to left", b"to right"))
        # backpressure by the generic path: the consumer pauses its producer
        rt.producer.pauseProducing()
        self.assertEqual(lt.producerState, "paused")
        rt.producer.resumeProducing()
        self.assertEqual(lt.producerState, "producing")

    def test_idle_timeout_only_without_traffic(self):
        clock = task.Clock()
        s, lt, rt = self.make(clock, idle_timeout=100)
        clock.advance(60)
        lt.protocol.dataReceived(b"x")  # activity moves the deadline
        clock.advance(60)
        self.assertFalse(lt.aborted or rt.aborted)
        clock.advance(39)
        self.assertFalse(lt.aborted or rt.aborted)
        clock.advance(1)
        self.assertTrue(lt.aborted and rt.aborted)
        self.assertTrue(s.done.called)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_shared_sweep_times_many_splices_on_one_timer(self):
        clock = task.Clock()
        sweep = IdleSweep(clock)
        made = [self.make(clock, idle_timeout=100, sweep=sweep) for _ in range(50)]
        short, slt, srt = self.make(clock, idle_timeout=2, sweep=sweep)
        self.assertEqual(len(sweep), 51)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # one timer, not 51
        # the short one: closed within a quarter of its timeout after it
        clock.advance(1.9)
        self.assertFalse(slt.aborted)
        clock.advance(0.6)
        self.assertTrue(slt.aborted and srt.aborted and short.done.called)
        self.assertEqual(len(sweep), 50)
        # activity moves a pair's deadline; the others close within SWEEP_SECONDS of it
        clock.advance(60)
        made[0][1].protocol.dataReceived(b"x")
        clock.advance(100 - 62.5 - 1)
        self.assertFalse(any(lt.aborted for _, lt, _ in made))
        clock.advance(1 + SWEEP_SECONDS)
        self.assertEqual([lt.aborted for _, lt, _ in made], [False] + [True] * 49)
        self.assertEqual(len(sweep), 1)
        # a pair that closes leaves the sweep; the timer stops with the last one
        made[0][1].loseConnection()
        self.assertEqual((len(sweep), clock.getDelayedCalls()), (0, []))
        # and starts again for a new pair
        self.make(clock, idle_timeout=10, sweep=sweep)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_close_of_one_side_aborts_the_other(self):
        clock = task.Clock()
        s, lt, rt = self.make(clock)
        lt.loseConnection()
        self.assertTrue(rt.aborted)
        self.assertTrue(s.done.called)
        self.assertFalse(s.finished)

    def test_a_foreign_connection_cannot_be_taken_over(self):
        p = Protocol()
        t = StringTransport()
        p.makeConnection(t)  # t has no .protocol pointing at p
        with self.assertRaises(TypeError):
            retarget(t, p, Protocol())
