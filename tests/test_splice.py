"""
Splicing (epsproxy.proxy.splice), over real loopback sockets through a
:class:`Rendezvous` (the path the proxy ships) and with a Clock for the idle timeout:
relaying both ways, half-close each way, a cut stream is cut on the other side too,
1 GiB with the same SHA-256 at both ends, a receiver that does not read holds the
proxy's buffers bounded, and no read deadline once spliced.
"""

from __future__ import annotations

import hashlib
import os
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.proxy.splice import DEFAULT_READ_BYTES, retarget, splice

# -- helpers shared with test_rendezvous_server


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    A test party: writes ``prefix`` (a token) on connect, records or hashes bytes.
    End-of-stream closes it unless ``half_close``, then only both directions shut do.
    """

    def __init__(self, prefix: bytes = b"", keep: bool = True, half_close: bool = False) -> None:
        self.prefix = prefix
        self.half_close = half_close
        self.keep = keep
        self.received = bytearray()
        self.count = 0
        self.write_closed = False
        self.sha = hashlib.sha256()
        self.closed: defer.Deferred[BaseException] = defer.Deferred()  # the reason
        self.eof: defer.Deferred[int] = defer.Deferred()
        self._waiting: list[tuple[int, defer.Deferred[int]]] = []

    def connectionMade(self) -> None:
        if self.prefix:
            self.transport.write(self.prefix)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.received += data
        else:
            self.sha.update(data)
        ready = [d for n, d in self._waiting if self.count >= n]
        self._waiting = [(n, d) for n, d in self._waiting if self.count < n]
        for d in ready:
            d.callback(self.count)

    def wait_for(self, n: int) -> defer.Deferred[int]:
        """Fires once ``n`` bytes in all have arrived."""
        d: defer.Deferred[int] = defer.Deferred()
        if self.count >= n:
            d.callback(self.count)
        else:
            self._waiting.append((n, d))
        return d

    def readConnectionLost(self) -> None:
        if not self.eof.called:
            self.eof.callback(self.count)
        if not self.half_close:
            self.transport.loseConnection()
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        # Half-closeable: with both directions shut, closing is up to us.
        if self.eof.called and self.write_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(reason)
        if not self.eof.called:
            self.eof.callback(self.count)
        self.closed.callback(reason.value)


def listen(test: TestCase, rv: Rendezvous) -> int:
    """The rendezvous' internal listener on a free loopback port; its port number."""
    port = reactor.listenTCP(0, rv.factory(), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    test.addCleanup(rv.close_all)
    return port.getHost().port


@defer.inlineCallbacks
def connect(test: TestCase, port: int, peer: Protocol):
    """Connect ``peer`` to ``port``; aborted at cleanup if still open."""
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)

    def close():
        if peer.transport.connected:
            peer.transport.abortConnection()
            return peer.closed if isinstance(peer, Peer) else None

    test.addCleanup(close)
    return peer


@defer.inlineCallbacks
def spliced_pair(test: TestCase, rv: Rendezvous, port: int, **peer_kwargs):
    """Two parties connected through ``rv`` with a fresh token, known to be spliced."""
    token = rv.new_token()
    a = yield connect(test, port, Peer(token, **peer_kwargs))
    b = yield connect(test, port, Peer(token, **peer_kwargs))
    # A byte each way proves the pair is spliced (and the splice exists in rv).
    a.transport.write(b"!")
    b.transport.write(b"?")
    yield a.wait_for(1)
    yield b.wait_for(1)
    return a, b


class FakeTransport(StringTransport):
    """A StringTransport whose close reaches its protocol (for Clock-driven tests)."""

    def __init__(self, host: str = "203.0.113.77") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000), lenient=True)
        self.protocol: Protocol | None = None
        self.aborted = False

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def fake_connection(protocol: Protocol, host: str = "203.0.113.77") -> FakeTransport:
    t = FakeTransport(host)
    t.protocol = protocol
    protocol.makeConnection(t)
    return t


@implementer(IPushProducer)
class Source:
    """Streams ``chunks`` generated 1 MiB blocks (numbered, so order matters) to a
    transport as its streaming producer, hashing what it sends; half-closes at the end."""

    def __init__(self, transport, chunks: int, chunk_size: int = 1 << 20) -> None:
        self.transport = transport
        self.left = chunks
        self.block = os.urandom(chunk_size)
        self.sha = hashlib.sha256()
        self.sent = 0
        self.paused = False
        self.producing = False
        transport.registerProducer(self, True)

    def resumeProducing(self) -> None:
        self.paused = False
        if self.producing:
            return
        self.producing = True
        try:
            while not self.paused and self.left > 0:
                self.left -= 1
                chunk = struct.pack(">Q", self.left) + self.block[8:]
                self.sha.update(chunk)
                self.sent += len(chunk)
                self.transport.write(chunk)
            if self.left == 0 and not self.paused:
                self.left = -1
                self.transport.unregisterProducer()
                self.transport.loseWriteConnection()
        finally:
            self.producing = False

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self.left = -1


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
        yield task.deferLater(reactor, 0, lambda: None)
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
