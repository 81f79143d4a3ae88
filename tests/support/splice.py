"""
Parties for splice and rendezvous tests: a ``Peer`` that presents a token and records or
hashes what it receives, a rendezvous listening on loopback, two parties known to be
spliced, and a fake transport whose close reaches its protocol (for Clock-driven tests).
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from epsproxy.proxy.rendezvous_server import Rendezvous


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


def engine() -> Any:
    """The process's splice engine (epsproxy.proxy.splice_engine), for tests that run the
    real-socket cases with the engine relaying; fails where its C part is not built."""
    from twisted.internet import reactor

    from epsproxy.proxy.splice_engine import SpliceEngine

    found = SpliceEngine.shared(reactor)
    if found is None:
        # make venv builds it (setup.py) wherever a C compiler and the Python headers
        # are: the proxies would splice in Python without it, and the tests say so.
        raise AssertionError("the splice engine's C part is not built: install a C "
                             "compiler (gcc) and the Python headers, then make venv")
    return found
