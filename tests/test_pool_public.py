"""
The public proxy's connection pool (issue 14, epsproxy.proxy.pool): the pool's rules with
a Clock and fake transports (tokens single-use and expiring, the per-operator cap, silent
idle connections, the sweep, take/release, when_idle, shutdown), then real sockets: a real
public proxy service with a fake own endpoint server, raw TCP connections playing the
private proxy (presenting pool tokens at the internal endpoint) and TLS clients at the
SNI listener.  A client served from the pool reaches the pooled connection as a PROXY v2
header (its address, the server name) and its ClientHello, and no ``incomingConnection``
is sent; with no idle connection the brokered path runs; the hostile cases are closed
and counted.
"""

from __future__ import annotations

import base64
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epsproxy.net import tls
from epsproxy.net.jsonrpc.envelope import INVALID_PARAMS, JSONRPCError
from epsproxy.net.proxy_protocol import ProxyHeader, ProxyHeaderReader
from epsproxy.net.token import TOKEN_BYTES
from epsproxy.proxy.pool import DEFAULT_MAX_PER_OPERATOR, ConnectionPool, PooledConnection
from epsproxy.proxy.pooling import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    MAX_POOL_HEADER,
    MAX_TOKENS_PER_REQUEST,
    REQUEST_POOL_TOKENS,
    token_cap,
)
from epsproxy.proxy.public import NO_ANNOUNCEMENT, NOT_AUTHORIZED
from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.proxy.settings import PROXY_SETTINGS
from epsproxy.proxy.sni import SNIFront
from epsproxy.proxy.status_page import pool_rows
from epsproxy.proxy.tap import Options, makeService
from epsproxy.rules import forms

from .support.clienthello import openssl_hello
from .support.pki import pki
from .support.proxies import FakeEPS, caller_client, client, public_section, write_settings
from .support.splice import fake_connection
from .support.tls import tls_block
from .support.waiting import until

NAME = "test.internal-server.local"
PRIVATE = "private-proxy-1.ga"


def rfc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Holder:
    """``holds_live`` for tests: the operators that hold a live announcement."""

    def __init__(self, *operators: str) -> None:
        self.live = set(operators)

    def __call__(self, operator: str) -> bool:
        return operator in self.live


class Presenter(Protocol):
    """Stands for a connection that has just presented its token at the endpoint."""


def presented(pool: ConnectionPool, token: bytes, rest: bytes = b""):
    """A fake connection offered to ``pool`` with ``token``: (adopted?, transport)."""
    p = Presenter()
    t = fake_connection(p, "198.51.100.7")
    return pool.adopt(p, token, rest), t


# ------------------------------------------------------------------------ with a Clock


class PoolRules(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.live = Holder("op")
        self.pool = ConnectionPool(self.clock, self.live, token_lifetime=10,
                                   max_per_operator=4, idle_timeout=300)

    def test_tokens_are_fresh_single_use_and_expire(self) -> None:
        tokens = self.pool.issue("op", 2)
        self.assertEqual(len(tokens), 2)
        self.assertEqual({len(t) for t in tokens}, {TOKEN_BYTES})
        self.assertNotEqual(tokens[0], tokens[1])
        self.assertEqual(self.pool.state(), {"op": {"idle": 0, "in_use": 0, "tokens": 2}})
        adopted, t = presented(self.pool, tokens[0])
        self.assertTrue(adopted)
        self.assertFalse(t.disconnecting)
        self.assertEqual(self.pool.idle("op"), 1)
        self.assertIsInstance(t.protocol, PooledConnection)
        # used: not the pool's any more
        self.assertEqual(presented(self.pool, tokens[0])[0], False)
        # unknown
        self.assertEqual(presented(self.pool, os.urandom(TOKEN_BYTES))[0], False)
        # expired
        self.clock.advance(10)
        self.assertEqual(presented(self.pool, tokens[1])[0], False)
        self.assertEqual(self.pool.state(), {"op": {"idle": 1, "in_use": 0, "tokens": 0}})
        self.assertEqual((self.pool.issued, self.pool.adopted), (2, 1))

    def test_idle_connections_and_tokens_are_capped(self) -> None:
        # Unused tokens: at most token_cap of the cap on idle connections (4).
        self.assertEqual(token_cap(4), 128)
        first = self.pool.issue("op", 200)
        self.assertEqual(len(first), 128)
        self.assertEqual(self.pool.issue("op", 1), [])
        for token in first[:3]:
            self.assertTrue(presented(self.pool, token)[0])
        self.assertEqual(len(self.pool.issue("op", 5)), 3)  # 3 tokens spent: room again
        self.assertTrue(presented(self.pool, first[3])[0])
        # 4 idle: the cap on connections.  No token is issued, and a connection presenting
        # one it still holds is closed and counted, not pooled.
        self.assertEqual(self.pool.issue("op", 1), [])
        adopted, t = presented(self.pool, first[4])
        self.assertTrue(adopted)  # the pool's token: spent
        self.assertTrue(t.aborted)
        self.assertEqual((self.pool.idle("op"), self.pool.closed["over_cap"]), (4, 1))
        self.assertIsNotNone(self.pool.take("op"))  # in use: no longer counted
        self.assertTrue(presented(self.pool, first[5])[0])
        self.assertEqual(self.pool.idle("op"), 4)
        self.assertEqual(self.pool.state()["op"]["tokens"], 128 + 3 - 6)
        self.clock.advance(10)  # the tokens expire
        self.assertEqual(self.pool.state()["op"]["tokens"], 0)
        self.assertIsNotNone(self.pool.take("op"))
        self.assertEqual(len(self.pool.issue("op", 200)), 128)
        # Another operator has its own cap; 0 means no pool at all.
        self.assertEqual(len(self.pool.issue("other", 140)), 128)
        self.pool.max_per_operator = 0
        self.assertEqual(self.pool.issue("third", 1), [])

    def test_bytes_after_the_token_or_while_idle_close_and_count(self) -> None:
        a, b = self.pool.issue("op", 2)
        adopted, t = presented(self.pool, a, rest=b"GET /")
        self.assertTrue(adopted)  # the pool's token: spent, the connection closed
        self.assertTrue(t.aborted)
        adopted, t = presented(self.pool, b)
        self.assertEqual(self.pool.idle("op"), 1)
        t.protocol.dataReceived(b"x")
        self.assertTrue(t.aborted)
        self.assertEqual(self.pool.idle("op"), 0)
        self.assertEqual(self.pool.closed["bytes_while_idle"], 2)
        self.assertEqual(self.pool.closed["lost"], 0)  # not counted twice
        self.assertEqual(self.pool.state(), {})

    def test_a_connection_lost_while_idle_is_counted(self) -> None:
        [token] = self.pool.issue("op", 1)
        _, t = presented(self.pool, token)
        t.protocol.connectionLost(Failure(ConnectionError("reset")))
        self.assertEqual((self.pool.idle("op"), self.pool.closed["lost"]), (0, 1))

    def test_take_is_oldest_first_and_counts_hits_and_misses(self) -> None:
        self.assertIsNone(self.pool.take("op"))
        tokens = self.pool.issue("op", 2)
        transports = [presented(self.pool, t)[1] for t in tokens]
        first = self.pool.take("op")
        self.assertIs(first, transports[0].protocol)
        self.assertEqual(self.pool.state()["op"], {"idle": 1, "in_use": 1, "tokens": 0})
        self.assertIs(self.pool.take("op"), transports[1].protocol)
        self.assertIsNone(self.pool.take("op"))
        self.assertEqual((self.pool.hits, self.pool.misses), (2, 2))
        assert first is not None
        self.pool.release(first)
        self.assertEqual(self.pool.state()["op"]["in_use"], 1)

    def test_an_operator_without_live_announcements_loses_its_pool(self) -> None:
        tokens = self.pool.issue("op", 3)
        transports = [presented(self.pool, t)[1] for t in tokens[:2]]
        self.live.live.clear()
        # presenting a live token after the announcements went: closed at once
        adopted, late = presented(self.pool, tokens[2])
        self.assertTrue(adopted)
        self.assertTrue(late.aborted)
        self.pool.start()
        self.clock.advance(1)
        self.assertTrue(all(t.aborted for t in transports))
        self.assertEqual(self.pool.closed["announcement_expired"], 3)
        self.assertEqual(self.pool.state(), {})
        self.pool.stop()

    def test_sweep_closes_old_idle_connections_and_forgets_expired_tokens(self) -> None:
        self.pool.start()
        [old] = self.pool.issue("op", 1)
        _, t_old = presented(self.pool, old)
        self.clock.advance(200)
        [young, spare] = self.pool.issue("op", 2)
        _, t_young = presented(self.pool, young)
        self.clock.advance(100)  # old: 300 s idle; spare: expired
        self.assertTrue(t_old.aborted)
        self.assertFalse(t_young.aborted)
        self.assertEqual(self.pool.state(), {"op": {"idle": 1, "in_use": 0, "tokens": 0}})
        self.assertEqual(self.pool.closed["idle_timeout"], 1)
        self.assertEqual(presented(self.pool, spare)[0], False)
        self.pool.stop()
        self.clock.advance(1000)  # stopped: no sweep any more
        self.assertFalse(t_young.aborted)

    def test_a_failing_sweep_is_logged_and_goes_on(self) -> None:
        calls = []

        def broken(operator: str) -> bool:
            calls.append(operator)
            raise RuntimeError("boom")

        pool = ConnectionPool(self.clock, broken, token_lifetime=10)
        pool.issue("op", 1)
        pool.start()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(calls, ["op", "op"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        pool.stop()

    def test_when_idle_fires_at_the_count(self) -> None:
        fired: list[int] = []
        self.pool.when_idle("op", 2).addCallback(lambda _: fired.append(2))
        self.pool.when_idle("op", 0).addCallback(lambda _: fired.append(0))
        a, b = self.pool.issue("op", 2)
        presented(self.pool, a)
        self.assertEqual(fired, [0])
        presented(self.pool, b)
        self.assertEqual(fired, [0, 2])

    def test_close_all_closes_idle_and_forgets_tokens(self) -> None:
        a, b = self.pool.issue("op", 2)
        _, t = presented(self.pool, a)
        done = self.pool.close_all()
        self.assertTrue(t.aborted)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.pool.closed["shutdown"], 1)
        self.assertEqual(presented(self.pool, b)[0], False)
        self.assertEqual(self.pool.state(), {})

    def test_bad_construction(self) -> None:
        for kwargs in ({"token_lifetime": 0}, {"token_lifetime": 1, "max_per_operator": -1},
                       {"token_lifetime": 1, "idle_timeout": 0}):
            with self.assertRaises(ValueError):
                ConnectionPool(self.clock, self.live, **kwargs)


class RendezvousHandsOver(SynchronousTestCase):
    """The rendezvous offers unknown tokens to the pool, pairings stay its own."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = ConnectionPool(self.clock, Holder("op"), token_lifetime=10)
        self.forgiven: list[Any] = []
        self.rv = Rendezvous(self.clock, pool=self.pool, on_valid_token=self.forgiven.append)

    def party(self):
        p = self.rv.factory().buildProtocol(None)
        return p, fake_connection(p, "198.51.100.9")

    def test_pool_tokens_pairing_tokens_and_strangers(self) -> None:
        [pool_token] = self.pool.issue("op", 1)
        _, t = self.party()
        t.protocol.dataReceived(pool_token[:5])
        t.protocol.dataReceived(pool_token[5:])
        self.assertEqual(self.pool.idle("op"), 1)
        self.assertFalse(t.disconnecting)
        self.assertEqual(len(self.forgiven), 1)
        self.assertEqual((self.rv.refused, self.rv.pending), (0, 0))
        self.clock.advance(60)  # no read deadline once pooled
        self.assertFalse(t.disconnecting)
        # the same token again, and a stranger: refused by the rendezvous as before
        for token in (pool_token, os.urandom(TOKEN_BYTES)):
            _, other = self.party()
            other.protocol.dataReceived(token)
            self.assertTrue(other.disconnecting)
        self.assertEqual(self.rv.refused, 2)
        # a pairing token still pairs
        pairing = self.rv.new_token()
        _, a = self.party()
        a.protocol.dataReceived(pairing)
        self.assertEqual(self.rv.pending, 1)
        self.assertEqual(self.pool.idle("op"), 1)


class FrontTakesFromThePool(SynchronousTestCase):
    """The SNI front with a pool, on a Clock and fake transports."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = ConnectionPool(self.clock, Holder("op"), token_lifetime=10)
        self.rv = Rendezvous(self.clock, pool=self.pool)
        self.notified: list[Any] = []
        self.front = SNIFront(self.clock, self.rv, {NAME: "op"}.get,
                              lambda operator, params: self.notified.append(params),
                              internal_endpoint="proxy.example:9999", pool=self.pool)

    def pooled(self):
        [token] = self.pool.issue("op", 1)
        p = self.rv.factory().buildProtocol(None)
        t = fake_connection(p, "198.51.100.9")
        t.protocol.dataReceived(token)
        return t

    def hello(self):
        p = self.front.factory().buildProtocol(IPv4Address("TCP", "203.0.113.5", 40404))
        t = fake_connection(p, "203.0.113.5")
        hello = openssl_hello(NAME.encode())
        p.dataReceived(hello)
        return t, hello

    def test_header_and_hello_go_to_the_pooled_connection(self) -> None:
        private = self.pooled()
        client_transport, hello = self.hello()
        header = ProxyHeaderReader(MAX_POOL_HEADER).feed(private.value())
        assert header is not None
        self.assertEqual(header.authority, NAME)
        self.assertEqual(header.source, IPv4Address("TCP", "203.0.113.5", 40404))
        self.assertEqual(header.rest, hello)
        self.assertEqual(self.notified, [])
        self.assertEqual((self.front.pooled, self.front.pool_fallbacks, self.pool.hits),
                         (1, 0, 1))
        self.assertEqual(self.rv.active_splices, 1)
        # the second client finds the pool empty: brokered
        self.hello()
        self.assertEqual(len(self.notified), 1)
        self.assertEqual((self.front.pool_fallbacks, self.front.routed), (1, 1))

    def test_a_closing_rendezvous_closes_both(self) -> None:
        private = self.pooled()
        self.rv.close_all()
        client_transport, _ = self.hello()
        self.assertTrue(client_transport.disconnecting)
        self.assertTrue(private.disconnecting)
        self.assertEqual((self.front.full, self.front.pooled), (1, 0))
        self.assertEqual(self.pool.state(), {})


# --------------------------------------------------------------------- real sockets


class PoolSide(Protocol):
    """
    The private proxy's end of a pooled connection: presents a token (and ``after``),
    then reads the PROXY header; with ``tls_factory`` it then serves TLS on the rest.
    """

    def __init__(self, token: bytes, after: bytes = b"", tls_factory: Any = None) -> None:
        self.token = token
        self.after = after
        self.tls_factory = tls_factory
        self.reader = ProxyHeaderReader(MAX_POOL_HEADER)
        self.header: ProxyHeader | None = None
        self.received = b""
        self.got_header: defer.Deferred[ProxyHeader] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.tls: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.token + self.after)

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.dataReceived(data)
            return
        self.received += data
        if self.header is None:
            self.header = self.reader.feed(data)
            if self.header is None:
                return
            if self.tls_factory is not None:
                self.tls = self.tls_factory.buildProtocol(None)
                self.tls.makeConnection(self.transport)
                self.tls.dataReceived(self.header.rest)
            self.got_header.callback(self.header)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.tls is not None:
            self.tls.connectionLost(reason)
        self.lost.callback(None)


class RawClient(Protocol):
    """A TLS client's first flight only: writes ``data``, records what comes back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.local: Any = None
        self._waiting: list[tuple[int, defer.Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        self.local = self.transport.getHost()
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for item in list(self._waiting):
            if len(self.received) >= item[0]:
                self._waiting.remove(item)
                item[1].callback(self.received)

    def wait_for(self, size: int) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((size, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class InternalServer(Protocol):
    """The internal TLS server: answers one HTTP request, then closes."""

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
                                 b"Connection: close\r\n\r\nsuccess")
            self.transport.loseConnection()


class HTTPClient(Protocol):
    """Sends one request over TLS and collects the answer until the end."""

    def __init__(self) -> None:
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.local: Any = None

    def connectionMade(self) -> None:
        self.local = self.transport.getHost()
        self.transport.write(b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.received)


def connect(test: TestCase, port: int, protocol_: Protocol) -> defer.Deferred[Any]:
    def close() -> None:
        transport = protocol_.transport
        if transport is not None and transport.connected:
            transport.abortConnection()

    test.addCleanup(close)
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol_)


class ServedByARealPublicProxy(TestCase):
    """A real public proxy service; the test plays the private proxy and the clients."""

    timeout = 30

    @defer.inlineCallbacks
    def start_proxy(self, **changes: Any):
        self.fake = FakeEPS()
        self.fake.answer = lambda params: {}
        eps_port = yield self.fake.start(self)
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(folder, eps_port, **changes)}))])
        self.top = makeService(options, reactor, exit_on_failure=False)
        self.proxy = self.top.services[0]
        self.top.startService()
        self.addCleanup(self.top.stopService)
        ports = yield self.proxy.when_ready()
        self.internal_port = ports.internal.getHost().port
        self.tls_port = ports.tls.getHost().port
        endpoint = f"127.0.0.1:{self.internal_port}"
        self.proxy.proxy.internal_endpoint = self.proxy.front.internal_endpoint = endpoint
        self.rpc = caller_client(ports.jsonrpc.getHost().port)
        self.addCleanup(self.rpc.close)
        self.jsonrpc_port = ports.jsonrpc.getHost().port

    def announce(self, expires_at: str | None = None) -> defer.Deferred[Any]:
        item: dict[str, Any] = {"domain": NAME}
        if expires_at is not None:
            item["expires_at"] = expires_at
        return self.rpc.call("announceConnections",
                             {"connections": [item], "_client": client(PRIVATE)})

    def request_tokens(self, count: Any, **params: Any) -> defer.Deferred[Any]:
        params.setdefault("_client", client(PRIVATE))
        return self.rpc.call(REQUEST_POOL_TOKENS, {"count": count, **params})

    @defer.inlineCallbacks
    def fill(self, count: int, tls_factory: Any = None):
        """Ask for ``count`` tokens and dial one pooled connection per token."""
        answer = yield self.request_tokens(count)
        sides = []
        for text in answer["tokens"]:
            side = PoolSide(base64.b64decode(text), tls_factory=tls_factory)
            yield connect(self, self.internal_port, side)
            sides.append(side)
        yield self.proxy.pool.when_idle(PRIVATE, count)
        return sides

    def metrics(self) -> str:
        return generate_latest(self.proxy.registry).decode()

    def incoming_calls(self) -> list[Any]:
        return [c for c in self.fake.calls if c[0].endswith(".incomingConnection")]

    @defer.inlineCallbacks
    def test_a_client_is_served_from_the_pool_with_its_address(self):
        yield self.start_proxy()
        yield self.announce()
        answer = yield self.request_tokens(2)
        self.assertEqual(set(answer), {"tokens", "endpoint", "expires_in"})
        self.assertEqual(answer["endpoint"], f"127.0.0.1:{self.internal_port}")
        self.assertEqual(answer["expires_in"], 10.0)  # accept_timeout
        self.assertEqual(len(answer["tokens"]), 2)
        sides = []
        for text in answer["tokens"]:
            side = PoolSide(base64.b64decode(text, validate=True))
            yield connect(self, self.internal_port, side)
            sides.append(side)
        yield self.proxy.pool.when_idle(PRIVATE, 2)
        self.assertEqual(self.proxy.pool_state(),
                         {PRIVATE: {"idle": 2, "in_use": 0, "tokens": 0}})

        hello = openssl_hello(NAME.encode())
        tls_client = RawClient(hello)
        yield connect(self, self.tls_port, tls_client)
        header = yield sides[0].got_header  # the oldest idle connection serves it
        self.assertEqual(header.authority, NAME)
        self.assertEqual(header.source, IPv4Address("TCP", "127.0.0.1", tls_client.local.port))
        self.assertEqual(header.destination, IPv4Address("TCP", "127.0.0.1", self.tls_port))
        self.assertEqual(header.rest, hello)
        self.assertFalse(sides[1].got_header.called)
        # spliced both ways
        sides[0].transport.write(b"server flight")
        self.assertEqual((yield tls_client.wait_for(13)), b"server flight")
        self.assertEqual(self.incoming_calls(), [])
        self.assertEqual(self.proxy.pool_state(),
                         {PRIVATE: {"idle": 1, "in_use": 1, "tokens": 0}})
        self.assertEqual((self.proxy.front.pooled, self.proxy.front.routed), (1, 0))
        self.assertEqual(pool_rows(self.proxy.pool_state()),
                         [(PRIVATE, "idle: 1, in_use: 1, tokens: 0")])  # the status page
        self.assertEqual(self.proxy.rendezvous.active_splices, 1)
        metrics = self.metrics()
        for line in (
            f'proxy_pool_connections{{operator="{PRIVATE}",state="idle"}} 1.0',
            f'proxy_pool_connections{{operator="{PRIVATE}",state="in_use"}} 1.0',
            f'proxy_pool_tokens{{operator="{PRIVATE}"}} 0.0',
            'proxy_pool_requests_total{outcome="hit"} 1.0',
            'proxy_pool_requests_total{outcome="miss"} 0.0',
            "proxy_pool_fallbacks_total 0.0",
            'proxy_pool_closed_total{reason="bytes_while_idle"} 0.0',
            'proxy_tls_connections_total{outcome="pooled"} 1.0',
        ):
            self.assertIn(line, metrics)
        # the splice's end frees the connection's place
        [spliced] = self.proxy.rendezvous.splices
        tls_client.transport.loseConnection()
        yield sides[0].lost
        yield spliced.done
        self.assertEqual(self.proxy.pool_state(),
                         {PRIVATE: {"idle": 1, "in_use": 0, "tokens": 0}})
        yield self.top.stopService()
        yield sides[1].lost  # shutdown closes the idle one
        self.assertEqual(self.proxy.pool.closed["shutdown"], 1)

    @defer.inlineCallbacks
    def test_idle_pooled_connections_have_tcp_keepalive(self):
        # Set once on the internal listener, which its connections inherit (Linux).
        yield self.start_proxy()
        yield self.announce()
        yield self.fill(1)
        pooled = self.proxy.pool.take(PRIVATE)
        sock = pooled.transport.socket
        self.assertEqual(
            (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
             sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
             sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
             sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)),
            (1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES))

    @defer.inlineCallbacks
    def test_a_tls_client_verifies_the_internal_server_through_the_pool(self):
        yield self.start_proxy()
        yield self.announce()
        server = TLSMemoryBIOFactory(
            tls.server_options({**tls_block("internal-server"), "verify_client": False}),
            False, Factory.forProtocol(InternalServer))
        [side] = yield self.fill(1, tls_factory=server)
        http = HTTPClient()
        options = optionsForClientTLS(NAME, trustRoot=Certificate.loadPEM(
            pki().root.read_bytes()))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                             self.tls_port))
        yield connectProtocol(endpoint, http)
        answer = yield http.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer[:80])
        self.assertTrue(answer.endswith(b"success"))
        self.assertEqual(side.header.source.port, http.local.port)
        self.assertEqual(self.incoming_calls(), [])

    @defer.inlineCallbacks
    def test_fallback_to_brokering_when_the_pool_is_empty(self):
        yield self.start_proxy()
        yield self.announce()
        notified: defer.Deferred[None] = defer.Deferred()
        self.fake.answer = lambda params: notified.callback(None)
        tls_client = RawClient(openssl_hello(NAME.encode()))
        yield connect(self, self.tls_port, tls_client)
        yield notified
        [(method, params, _)] = self.incoming_calls()
        self.assertEqual(method, f"{PRIVATE}.incomingConnection")
        self.assertEqual(params["domain"], NAME)
        self.assertEqual(params["client_address"], f"127.0.0.1:{tls_client.local.port}")
        front = self.proxy.front
        self.assertEqual((front.pool_fallbacks, front.pooled, front.routed), (1, 0, 1))
        metrics = self.metrics()
        self.assertIn("proxy_pool_fallbacks_total 1.0", metrics)
        self.assertIn('proxy_pool_requests_total{outcome="miss"} 1.0', metrics)

    @defer.inlineCallbacks
    def test_a_pooled_connection_that_dies_is_forgotten(self):
        yield self.start_proxy()
        yield self.announce()
        [side] = yield self.fill(1)
        side.transport.loseConnection()
        yield side.lost
        yield until(lambda: self.proxy.pool.idle(PRIVATE) == 0, limit=5, step=0.01)
        self.assertEqual(self.proxy.pool.closed["lost"], 1)
        self.assertEqual(self.proxy.pool_state(), {})
        # the next client is brokered
        notified: defer.Deferred[None] = defer.Deferred()
        self.fake.answer = lambda params: notified.callback(None)
        yield connect(self, self.tls_port, RawClient(openssl_hello(NAME.encode())))
        yield notified
        self.assertEqual((self.proxy.pool.misses, self.proxy.front.pool_fallbacks), (1, 1))

    @defer.inlineCallbacks
    def test_expired_announcements_close_the_operators_idle_connections(self):
        yield self.start_proxy()
        yield self.announce()
        sides = yield self.fill(2)
        yield self.announce(expires_at=rfc(reactor.seconds() - 60))  # withdrawn
        yield defer.gatherResults([s.lost for s in sides])  # by the sweep, within 1 s
        self.assertEqual(self.proxy.pool.closed["announcement_expired"], 2)
        self.assertEqual(self.proxy.pool_state(), {})
        self.assertIn('proxy_pool_closed_total{reason="announcement_expired"} 2.0',
                      self.metrics())
        yield self.assertFailure(self.request_tokens(1), JSONRPCError)
        # and a TLS client for the name is no longer routed at all
        tls_client = RawClient(openssl_hello(NAME.encode()))
        yield connect(self, self.tls_port, tls_client)
        yield tls_client.lost
        self.assertEqual(self.proxy.front.no_route, 1)

    @defer.inlineCallbacks
    def test_hostile_pooled_connections_are_closed_and_counted(self):
        yield self.start_proxy()
        yield self.announce()
        answer = yield self.request_tokens(3)
        a, b, c = (base64.b64decode(t) for t in answer["tokens"])
        # bytes after the token
        eager = PoolSide(a, after=b"\x16\x03\x01")
        yield connect(self, self.internal_port, eager)
        yield eager.lost
        # bytes while idle
        chatty = PoolSide(b)
        yield connect(self, self.internal_port, chatty)
        yield self.proxy.pool.when_idle(PRIVATE, 1)
        chatty.transport.write(b"ping")
        yield chatty.lost
        self.assertEqual(self.proxy.pool.closed["bytes_while_idle"], 2)
        # a used token, then an unknown one: refused by the rendezvous as before
        refused = self.proxy.rendezvous.refused
        for token in (a, os.urandom(TOKEN_BYTES)):
            stranger = PoolSide(token)
            yield connect(self, self.internal_port, stranger)
            yield stranger.lost
        self.assertEqual(self.proxy.rendezvous.refused, refused + 2)
        # the last good token still works
        good = PoolSide(c)
        yield connect(self, self.internal_port, good)
        yield self.proxy.pool.when_idle(PRIVATE, 1)
        self.assertIn('proxy_pool_closed_total{reason="bytes_while_idle"} 2.0', self.metrics())
        self.assertIn("proxy_refusals_total 2.0", self.metrics())

    @defer.inlineCallbacks
    def test_never_more_than_the_cap_per_operator(self):
        yield self.start_proxy(pool_max_per_operator=3)
        yield self.announce()
        # unused tokens: at most token_cap of the cap (96)
        answer = yield self.request_tokens(90)
        self.assertEqual(len(answer["tokens"]), 90)
        self.assertEqual(len((yield self.request_tokens(10))["tokens"]), 6)
        self.assertEqual((yield self.request_tokens(5))["tokens"], [])
        tokens = [base64.b64decode(text) for text in answer["tokens"]]
        for token in tokens[:3]:
            yield connect(self, self.internal_port, PoolSide(token))
        yield self.proxy.pool.when_idle(PRIVATE, 3)
        # idle connections at the cap: no token, and one more connection is closed
        self.assertEqual((yield self.request_tokens(1))["tokens"], [])
        over = PoolSide(tokens[3])
        yield connect(self, self.internal_port, over)
        yield over.lost
        self.assertEqual(self.proxy.pool_state(),
                         {PRIVATE: {"idle": 3, "in_use": 0, "tokens": 96 - 4}})
        metrics = self.metrics()
        self.assertIn(f'proxy_pool_connections{{operator="{PRIVATE}",state="idle"}} 3.0',
                      metrics)
        self.assertIn('proxy_pool_closed_total{reason="over_cap"} 1.0', metrics)
        # a reload applies a new cap and idle timeout; 0 turns the pool off
        changed = dict(self.proxy.settings, pool_max_per_operator=0, pool_idle_timeout=60)
        self.proxy.reload(PROXY_SETTINGS.validate({"public": changed})["public"])
        self.assertEqual((self.proxy.pool.max_per_operator, self.proxy.pool.idle_timeout),
                         (0, 60.0))
        self.assertEqual((yield self.request_tokens(1))["tokens"], [])

    @defer.inlineCallbacks
    def test_a_call_hands_out_up_to_its_maximum_and_the_default_cap_holds(self):
        # A busy private proxy asks for many tokens per call (issue 14: the calls, not
        # their size, held up clients); the default cap on one operator's unused tokens
        # is token_cap(64) = 2,048, two full calls.
        yield self.start_proxy()
        yield self.announce()
        tokens = set()
        for _ in range(2):
            answer = yield self.request_tokens(MAX_TOKENS_PER_REQUEST)
            self.assertEqual(len(answer["tokens"]), MAX_TOKENS_PER_REQUEST)
            tokens.update(base64.b64decode(text) for text in answer["tokens"])
        self.assertEqual(len(tokens), 2 * MAX_TOKENS_PER_REQUEST)  # all distinct
        self.assertEqual({len(t) for t in tokens}, {TOKEN_BYTES})
        self.assertEqual(token_cap(DEFAULT_MAX_PER_OPERATOR), 2 * MAX_TOKENS_PER_REQUEST)
        self.assertEqual((yield self.request_tokens(1))["tokens"], [])
        self.assertEqual(self.proxy.pool_state()[PRIVATE]["tokens"], 2048)
        # Each one still pools a connection.
        side = PoolSide(tokens.pop())
        yield connect(self, self.internal_port, side)
        yield self.proxy.pool.when_idle(PRIVATE, 1)

    @defer.inlineCallbacks
    def test_refused_requests(self):
        yield self.start_proxy()
        # no live announcement
        error = yield self.assertFailure(self.request_tokens(1), JSONRPCError)
        self.assertEqual(error.code, NO_ANNOUNCEMENT)
        self.assertEqual(error.message, f"no live announcement for {PRIVATE} at this proxy")
        yield self.announce()
        # another operator holds nothing here
        error = yield self.assertFailure(self.request_tokens(1, _client=client("hd-9")),
                                         JSONRPCError)
        self.assertEqual(error.code, NO_ANNOUNCEMENT)
        # not through the own endpoint server: no _client, or another caller
        error = yield self.assertFailure(self.rpc.call(REQUEST_POOL_TOKENS, {"count": 1}),
                                         JSONRPCError)
        self.assertEqual(error.code, NOT_AUTHORIZED)
        other = caller_client(self.jsonrpc_port, name="hd-1")
        self.addCleanup(other.close)
        error = yield self.assertFailure(
            other.call(REQUEST_POOL_TOKENS, {"count": 1, "_client": client(PRIVATE)}),
            JSONRPCError)
        self.assertEqual(error.code, NOT_AUTHORIZED)
        # bad counts
        for count in (0, -1, MAX_TOKENS_PER_REQUEST + 1, 1.5, "2", None, [1], 10**30):
            error = yield self.assertFailure(self.request_tokens(count), JSONRPCError)
            self.assertEqual(error.code, INVALID_PARAMS, count)
        error = yield self.assertFailure(self.rpc.call(REQUEST_POOL_TOKENS, {
            "_client": client(PRIVATE)}), JSONRPCError)
        self.assertEqual(error.code, INVALID_PARAMS)
        self.assertEqual(self.proxy.pool_state(), {})
        self.assertEqual(len((yield self.request_tokens(64))["tokens"]), 64)


class ExpiredTokensOverSockets(TestCase):
    """A real internal listener whose rendezvous and pool run on a Clock."""

    @defer.inlineCallbacks
    def test_an_expired_pool_token_is_refused(self):
        clock = task.Clock()
        pool = ConnectionPool(clock, Holder("op"), token_lifetime=5)
        rv = Rendezvous(clock, pool=pool)
        port = reactor.listenTCP(0, rv.factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(rv.close_all)
        self.addCleanup(pool.close_all)
        [expired, fresh] = pool.issue("op", 2)
        clock.advance(5)
        late = PoolSide(expired)
        yield connect(self, port.getHost().port, late)
        yield late.lost
        self.assertEqual((rv.refused, pool.idle("op")), (1, 0))
        self.assertEqual(presented(pool, fresh)[0], False)  # expired as well


class Settings(SynchronousTestCase):
    def validate(self, **changes: Any) -> dict[str, Any]:
        public = public_section(Path("/nonexistent"), 1, **changes)
        return PROXY_SETTINGS.validate({"public": public})["public"]

    def test_defaults_and_bad_values(self) -> None:
        public = self.validate()
        self.assertEqual((public["pool_max_per_operator"], public["pool_idle_timeout"]),
                         (64, 300.0))
        for key, value in (("pool_max_per_operator", -1), ("pool_max_per_operator", 1.5),
                           ("pool_max_per_operator", "64"), ("pool_idle_timeout", 0),
                           ("pool_idle_timeout", "soon"), ("pool_idle_timeout", True)):
            with self.assertRaises(forms.FormError, msg=(key, value)) as caught:
                self.validate(**{key: value})
            self.assertIn(key, str(caught.exception))
