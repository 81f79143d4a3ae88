"""
The public proxy's TLS listener (epsproxy.proxy.sni): the rules with a Clock and fake
transports (routing, no SNI, unknown names, garbage, slowloris, oversized hellos, a
failing or raising notify, a full table, PROXY v1/v2 headers and rate limits by the
address they carry), then real loopback sockets: pyOpenSSL, ``openssl s_client`` and
curl connect with SNI ``test.internal-server.local``; the test plays the private proxy —
it presents the token at a real rendezvous listener, receives the replayed ClientHello
and terminates TLS itself with the ``internal-server`` certificate, which the client
verifies end to end.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from epsproxy.net import tls
from epsproxy.net.token import token_tag
from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.net.admission import parse_networks
from epsproxy.proxy.sni import (
    MAX_PROXY_HEADER,
    ProxyHeaderError,
    ProxyHeaderReader,
    SNIFront,
)
from epsproxy.net.ratelimit import RateLimiter
from tests.support.clienthello import ext, hello_message, openssl_hello, records, sni_ext
from tests.support.pki import pki
from tests.support.haproxy import start_haproxy
from tests.support.splice import fake_connection
from tests.support.tls import tls_block

NAME = "test.internal-server.local"
OPERATOR = "hd-1"
ENDPOINT = "proxy.example:9999"


def v1(source: str = "192.0.2.10", family: str = "TCP4", dest: str = "198.51.100.1") -> bytes:
    return f"PROXY {family} {source} {dest} 40001 443\r\n".encode()


def v2(source: str | None = "2001:db8:1:2::7", command: int = 1, tlvs: bytes = b"") -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if source is None:
        block, family = b"", 0x00
    elif ":" in source:
        import ipaddress

        block = (ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address("2001:db8::1").packed
                 + struct.pack("!HH", 40002, 443))
        family = 0x21
    else:
        import ipaddress

        block = (ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("198.51.100.1").packed
                 + struct.pack("!HH", 40002, 443))
        family = 0x11
    block += tlvs
    return signature + bytes([0x20 | command, family]) + len(block).to_bytes(2, "big") + block


class Recorder:
    """``lookup`` and ``notify`` for tests: records calls; notify answers as told."""

    def __init__(self, routes: dict[str, str] | None = None) -> None:
        self.routes = {NAME: OPERATOR} if routes is None else routes
        self.looked_up: list[str] = []
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.answers: list[defer.Deferred] = []
        self.on_notify = None

    def lookup(self, name: str) -> str | None:
        self.looked_up.append(name)
        return self.routes.get(name)

    def notify(self, operator: str, params: dict[str, str]):
        self.calls.append((operator, params))
        if self.on_notify is not None:
            return self.on_notify(operator, params)
        d: defer.Deferred = defer.Deferred()
        self.answers.append(d)
        return d


class Events:
    """Log events seen during a test."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self) -> str:
        return repr(self.events)

    def peers(self) -> list[str]:
        """Client addresses logged by the front (the rendezvous logs the transport's)."""
        return [e["peer"] for e in self.events
                if "peer" in e and e.get("log_namespace") == "epsproxy.proxy.sni"]


# -- socket-free ---------------------------------------------------------------------


class WithClock(TestCase):

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.rv = Rendezvous(self.clock, accept_timeout=30, read_timeout=5, max_pending=3)
        self.r = Recorder()
        self.front = self.make()

    def make(self, **kwargs) -> SNIFront:
        kwargs.setdefault("internal_endpoint", ENDPOINT)
        return SNIFront(self.clock, self.rv, self.r.lookup, self.r.notify, **kwargs)

    def client(self, front: SNIFront | None = None, host: str = "203.0.113.77"):
        front = front or self.front
        p = front.factory().buildProtocol(IPv4Address("TCP", host, 40000))
        return p, fake_connection(p, host)

    def counts(self, front: SNIFront | None = None) -> dict[str, int]:
        f = front or self.front
        names = ("accepted", "no_sni", "malformed", "timeouts", "no_route", "full",
                 "abandoned", "bad_proxy_header", "rate_limited", "routed", "notified",
                 "notify_failed")
        return {n: getattr(f, n) for n in names if getattr(f, n)}

    def test_routes_a_fragmented_post_quantum_hello(self):
        data = openssl_hello(NAME.upper().encode())
        p, t = self.client()
        for i in range(0, len(data), 500):
            p.dataReceived(data[i:i + 500])
        self.assertEqual(self.r.looked_up, [NAME])
        [(operator, params)] = self.r.calls
        self.assertEqual(operator, OPERATOR)
        self.assertEqual(sorted(params), ["client_address", "domain", "endpoint",
                                          "server_address", "token"])
        self.assertEqual((params["domain"], params["endpoint"]), (NAME, ENDPOINT))
        # The client's own address travels on (the private proxy's PROXY v2 header).
        self.assertEqual(params["client_address"], "203.0.113.77:40000")
        token = base64.b64decode(params["token"], validate=True)
        self.assertEqual(len(token), 32)
        self.assertEqual(t.producerState, "paused")
        self.assertEqual((self.rv.pending, self.front.reading), (1, 0))
        self.assertFalse(t.disconnecting)
        self.r.answers[0].callback({"message": "ok"})
        self.assertEqual(self.counts(), {"accepted": 1, "routed": 1, "notified": 1})
        self.clock.advance(20)  # the hello deadline no longer applies
        self.assertFalse(t.disconnecting)
        # The private proxy presents the token: it gets the hello first, then the stream.
        private = self.rv.factory().buildProtocol(None)
        pt = fake_connection(private, "198.51.100.5")
        private.dataReceived(token + b"SERVERHELLO")
        self.assertEqual(pt.value(), data)
        self.assertEqual(t.value(), b"SERVERHELLO")
        self.assertEqual(t.producerState, "producing")
        self.assertEqual((self.rv.pending, self.rv.pairings), (0, 1))

    def test_bytes_after_the_hello_are_replayed_too(self):
        data = openssl_hello(NAME.encode()) + b"\x14\x03\x03\x00\x01\x01"
        p, t = self.client()
        p.dataReceived(data)
        token = base64.b64decode(self.r.calls[0][1]["token"])
        private = self.rv.factory().buildProtocol(None)
        pt = fake_connection(private)
        private.dataReceived(token)
        self.assertEqual(pt.value(), data)

    def test_no_sni_unknown_name_garbage(self):
        cases = [
            (openssl_hello(None), {"no_sni": 1}),
            (openssl_hello(b"other.example"), {"no_route": 1}),
            (b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n", {"malformed": 1}),
            (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", {"malformed": 1}),
        ]
        for data, expected in cases:
            front = self.make()
            p, t = self.client(front)
            p.dataReceived(data)
            self.assertTrue(t.disconnecting)
            self.assertEqual(self.counts(front), {"accepted": 1, **expected})
            self.assertEqual(front.reading, 0)
        self.assertEqual(self.r.calls, [])
        self.assertEqual(self.rv.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slowloris_is_closed_at_the_deadline_from_accept(self):
        data = openssl_hello(NAME.encode())
        p, t = self.client()
        for i in range(4):
            self.clock.advance(1)
            p.dataReceived(data[i:i + 1])
        self.clock.advance(0.99)
        self.assertFalse(t.disconnecting)
        p.dataReceived(data[4:5])
        self.clock.advance(0.01)
        self.assertTrue(t.aborted)
        self.assertEqual(self.counts(), {"accepted": 1, "timeouts": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.r.looked_up, [])

    def test_oversized_hello_is_refused_before_it_is_buffered(self):
        big = records(hello_message(ext(0, sni_ext(NAME.encode())) + ext(21, b"\0" * 9000)),
                      [16384])
        front = self.make(max_hello_bytes=4096)
        p, t = self.client(front)
        p.dataReceived(big[:9])
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.counts(front), {"accepted": 1, "malformed": 1})
        # a 64 KiB cap takes it
        front = self.make(max_hello_bytes=65536)
        p, t = self.client(front)
        p.dataReceived(big)
        self.assertEqual(self.counts(front), {"accepted": 1, "routed": 1})

    def test_notify_failing_or_raising_closes_the_client(self):
        data = openssl_hello(NAME.encode())
        p, t = self.client()
        p.dataReceived(data)
        self.r.answers[0].errback(Failure(RuntimeError("404 no matching connection found")))
        self.assertTrue(t.aborted)
        self.assertEqual(self.rv.pending, 0)

        def boom(operator, params):
            raise ValueError("no route to operator")

        self.r.on_notify = boom
        p2, t2 = self.client()
        p2.dataReceived(data)
        self.assertTrue(t2.aborted)
        self.assertEqual(self.rv.pending, 0)
        self.assertEqual(self.counts(), {"accepted": 2, "routed": 2, "notify_failed": 2})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_table_and_failing_lookup_close_the_client(self):
        for _ in range(3):
            self.rv.new_token()
        p, t = self.client()
        p.dataReceived(openssl_hello(NAME.encode()))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.counts(), {"accepted": 1, "full": 1})

        def broken(name):
            raise KeyError(name)

        front = SNIFront(self.clock, self.rv, broken, self.r.notify, internal_endpoint=ENDPOINT)
        p, t = self.client(front)
        p.dataReceived(openssl_hello(NAME.encode()))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.counts(front), {"accepted": 1, "no_route": 1})
        self.flushLoggedErrors(KeyError)
        self.assertEqual(self.r.calls, [])

    def test_client_leaving_and_close_all(self):
        p, t = self.client()
        p.dataReceived(b"\x16\x03")
        t.loseConnection()
        self.assertEqual(self.counts(), {"accepted": 1, "abandoned": 1})
        p2, t2 = self.client()
        p2.dataReceived(b"\x16")
        d = self.front.close_all()
        self.assertTrue(t2.aborted and d.called)
        self.assertIsNone(self.front.factory().buildProtocol(IPv4Address("TCP", "1.2.3.4", 5)))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_logs_carry_the_name_a_tag_and_truncated_addresses_only(self):
        events = Events(self)
        p, t = self.client(host="203.0.113.77")
        p.dataReceived(openssl_hello(NAME.encode()))
        token = base64.b64decode(self.r.calls[0][1]["token"])
        p, t = self.client(host="203.0.113.78")
        p.dataReceived(openssl_hello(b"unknown.example"))
        text = events.text()
        for needed in (NAME, "unknown.example", token_tag(token), "203.0.x.x"):
            self.assertIn(needed, text)
        for secret in ("203.0.113.77", "203.0.113.78", token.hex(), repr(token),
                       self.r.calls[0][1]["token"]):
            self.assertNotIn(secret, text)

    # -- PROXY protocol

    def test_proxy_v1_fragmented_and_v2_give_the_client_address(self):
        events = Events(self)
        limiter = RateLimiter([{"type": "hour", "limit": 1}], task.Clock())
        front = self.make(proxy_protocol=True, rate_limiter=limiter)
        data = openssl_hello(NAME.encode())
        p, t = self.client(front, host="10.0.0.1")  # the load balancer
        for b in v1():
            p.dataReceived(bytes([b]))
        p.dataReceived(data)
        self.assertEqual(p.address, IPv4Address("TCP", "192.0.2.10", 40001))
        p, t = self.client(front, host="10.0.0.1")
        p.dataReceived(v2() + data)  # header and hello in one read
        self.assertEqual(p.address, IPv6Address("TCP", "2001:db8:1:2::7", 40002))
        # The address the header named travels on to the private proxy, in brackets;
        # the load balancer's own connection is not the client's, so no server address.
        params = self.r.calls[-1][1]
        self.assertEqual(params["client_address"], "[2001:db8:1:2::7]:40002")
        self.assertNotIn("server_address", params)
        self.assertEqual(self.r.calls[0][1]["client_address"], "192.0.2.10:40001")
        self.assertEqual(self.counts(front), {"accepted": 2, "routed": 2})
        self.assertIn("192.0.x.x", events.peers())
        self.assertIn("2001:db8::/32", events.peers())
        self.assertNotIn("10.0.x.x", events.peers())
        # The limiter counts the client named in the header, not the balancer.
        p, t = self.client(front, host="10.0.0.1")
        p.dataReceived(v1())
        self.assertTrue(t.aborted)
        p, t = self.client(front, host="10.0.0.1")
        p.dataReceived(v1(source="192.0.2.11") + data)
        self.assertEqual(self.counts(front),
                         {"accepted": 4, "routed": 3, "rate_limited": 1})

    def test_proxy_headers_only_from_trusted_sources(self):
        data = openssl_hello(NAME.encode())
        trusted = parse_networks(["10.0.0.1/32"])
        front = self.make(proxy_protocol=True, proxy_trusted=trusted)
        p, t = self.client(front, host="10.0.0.1")  # the load balancer: its header is read
        p.dataReceived(v1() + data)
        self.assertEqual(p.address, IPv4Address("TCP", "192.0.2.10", 40001))
        p, t = self.client(front, host="203.0.113.9")  # anyone else: closed at accept
        self.assertTrue(t.disconnecting)
        self.assertEqual((front.untrusted_proxy_source, front.routed), (1, 1))
        # "data": the untrusted connection is a plain client with its own address, and a
        # header it sends is not a header (here: not a ClientHello either).
        front = self.make(proxy_protocol=True, proxy_trusted=trusted, proxy_untrusted="data")
        p, t = self.client(front, host="203.0.113.9")
        p.dataReceived(data)
        self.assertEqual(p.address.host, "203.0.113.9")
        p, t = self.client(front, host="203.0.113.9")
        p.dataReceived(v1() + data)
        self.assertTrue(t.disconnecting)
        self.assertEqual((front.untrusted_proxy_source, front.routed, front.malformed),
                         (2, 1, 1))

    def test_proxy_local_unknown_bad_and_missing_headers(self):
        front = self.make(proxy_protocol=True)
        data = openssl_hello(NAME.encode())
        for header in (v2(None, command=0), b"PROXY UNKNOWN\r\n"):
            p, t = self.client(front, host="10.0.0.1")
            p.dataReceived(header + data)
            self.assertEqual(p.address.host, "10.0.0.1")
        self.assertEqual(front.routed, 2)
        for bad in (data, b"PROXY TCP4 1.2.3.4\r\n", v2(command=2), b"GET / HTTP/1.0\r\n"):
            front = self.make(proxy_protocol=True)
            p, t = self.client(front)
            p.dataReceived(bad)
            self.assertTrue(t.disconnecting)
            self.assertEqual(self.counts(front), {"accepted": 1, "bad_proxy_header": 1})
        front = self.make(proxy_protocol=True)
        p, t = self.client(front)
        p.dataReceived(v1()[:10])
        self.clock.advance(5)
        self.assertEqual(self.counts(front), {"accepted": 1, "timeouts": 1})


class ProxyHeaders(TestCase):
    """ProxyHeaderReader on its own."""

    def read(self, data: bytes):
        return ProxyHeaderReader().feed(data)

    def test_v1_and_v2_at_every_split_point(self):
        for header, host in [(v1(), "192.0.2.10"),
                             (v1("2001:db8::5", "TCP6", "2001:db8::1"), "2001:db8::5"),
                             (v2(), "2001:db8:1:2::7"), (v2("192.0.2.99"), "192.0.2.99"),
                             (v2("192.0.2.99", tlvs=b"\x04\x00\x03abc"), "192.0.2.99")]:
            data = header + b"\x16rest"
            for i in range(len(data) + 1):
                reader = ProxyHeaderReader()
                got = reader.feed(data[:i])
                if got is None:
                    got = reader.feed(data[i:])
                    rest = got.rest
                else:
                    rest = got.rest + data[i:]
                self.assertEqual(got.source.host, host)
                self.assertEqual(rest, b"\x16rest")

    def test_bad_headers(self):
        long_tlv = b"\x04" + (MAX_PROXY_HEADER).to_bytes(2, "big")
        for data in [
            b"PROXY TCP4 192.0.2.1 198.51.100.1 1 65536\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.1 01 2\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2 3\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.1  198.51.100.1 1 2\r\n",
            b"PROXY " + b"1" * 120,
            b"PROXI",
            b"\r\n\r\n\x00\r\nQUIX\n",
            v2()[:12] + b"\x11" + v2()[13:],  # version 1
            v2()[:16 + 10],  # complete by its length? no: fed short, then judged below
            v2()[:14] + b"\x00\x08" + v2()[16:24],  # IPv6 block too short
            v2()[:13] + b"\x22" + v2()[14:],  # DGRAM
            v2()[:14] + (MAX_PROXY_HEADER).to_bytes(2, "big"),
            v2(tlvs=long_tlv),
        ]:
            reader = ProxyHeaderReader()
            with self.subTest(data=data):
                try:
                    got = reader.feed(data)
                except ProxyHeaderError:
                    continue
                self.assertIsNone(got, "accepted a bad header")
                # incomplete: must never be completed into an address by garbage
                self.assertLess(len(data), 107 + MAX_PROXY_HEADER)

    def test_local_and_unspecified_name_no_address(self):
        self.assertIsNone(self.read(v2(None, command=0)).source)
        self.assertIsNone(self.read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").source)


# -- real sockets ----------------------------------------------------------------------


class InternalServer(Protocol):
    """The internal TLS server behind the private proxy: answers one HTTP request."""

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            body = b'{"message": "success"}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            self.transport.loseConnection()


@implementer(IProtocolNegotiationFactory)
class InternalServerFactory(Factory):
    """
    Speaks HTTP/1.1 over ALPN.  (A Twisted TLS server whose factory names no ALPN
    protocols fails every client that offers ALPN, such as curl, with an alert: Twisted's
    ALPN callback answers b"" and pyOpenSSL 26 turns that into an error.)
    """

    protocol = InternalServer

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


class HTTPClient(Protocol):
    """Sends one request, collects the answer until the connection ends."""

    def __init__(self) -> None:
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET /jsonrpc HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:
        self.done.callback(self.received)


class HeaderFirst(TLSMemoryBIOProtocol):
    """A TLS client that writes a PROXY header in the clear before its ClientHello."""

    header = b""

    def makeConnection(self, transport) -> None:
        transport.write(self.header)
        super().makeConnection(transport)


class RealSockets(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.rv = Rendezvous(reactor, accept_timeout=5, read_timeout=5)
        internal = reactor.listenTCP(0, self.rv.factory(), interface="127.0.0.1")
        self.addCleanup(internal.stopListening)
        self.addCleanup(self.rv.close_all)
        self.internal_port = internal.getHost().port
        self.r = Recorder()
        self.private_links: list[Protocol] = []
        self.r.on_notify = self.play_private_proxy
        self.server_options = tls.server_options(
            {**tls_block("internal-server"), "verify_client": False}
        )
        self.root = Certificate.loadPEM(pki().root.read_bytes())

    def listen_front(self, **kwargs) -> tuple[SNIFront, int]:
        kwargs.setdefault("internal_endpoint", f"127.0.0.1:{self.internal_port}")
        front = SNIFront(reactor, self.rv, self.r.lookup, self.r.notify, **kwargs)
        port = reactor.listenTCP(0, front.factory(), interface="127.0.0.1")
        self.addCleanup(front.close_all)
        self.addCleanup(port.stopListening)
        return front, port.getHost().port

    @defer.inlineCallbacks
    def play_private_proxy(self, operator: str, params: dict[str, str]):
        """incomingConnection: dial the endpoint, write the token, terminate TLS."""
        self.assertEqual(operator, OPERATOR)
        host, port = params["endpoint"].rsplit(":", 1)
        factory = TLSMemoryBIOFactory(self.server_options, False, InternalServerFactory())
        link = factory.buildProtocol(None)
        yield connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), link)
        self.private_links.append(link)
        self.addCleanup(lambda: link.transport.connected and link.transport.abortConnection())
        link.transport.write(base64.b64decode(params["token"]))
        return {"message": "ok"}

    def tls_client(self, port: int, protocol_: Protocol, header: bytes = b""):
        options = optionsForClientTLS(NAME, trustRoot=self.root)
        if not header:
            endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
            return connectProtocol(endpoint, protocol_)
        factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: protocol_))
        factory.protocol = type("H", (HeaderFirst,), {"header": header})
        return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                               factory.buildProtocol(None))

    @defer.inlineCallbacks
    def test_pyopenssl_client_verifies_the_internal_server_end_to_end(self):
        front, port = self.listen_front()
        client = HTTPClient()
        yield self.tls_client(port, client)
        answer = yield client.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer[:100])
        self.assertTrue(answer.endswith(b'{"message": "success"}'))
        self.assertEqual((front.routed, front.notified, self.rv.pairings), (1, 1, 1))
        self.assertEqual(self.r.looked_up, [NAME])

    @defer.inlineCallbacks
    def test_proxy_v1_and_v2_headers_before_the_hello(self):
        events = Events(self)
        front, port = self.listen_front(proxy_protocol=True)
        for header, peer in ((v1(), "192.0.x.x"), (v2(), "2001:db8::/32")):
            client = HTTPClient()
            yield self.tls_client(port, client, header=header)
            answer = yield client.done
            self.assertTrue(answer.endswith(b'{"message": "success"}'))
            self.assertIn(peer, events.peers())
        self.assertNotIn("127.0.x.x", events.peers())
        self.assertEqual(front.notified, 2)

    @defer.inlineCallbacks
    def test_openssl_s_client_and_curl(self):
        front, port = self.listen_front()
        root = str(pki().root)
        ran = 0
        if shutil.which("openssl"):
            out = yield run(
                "openssl", ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", NAME,
                            "-CAfile", root, "-verify_return_error", "-verify_hostname", NAME,
                            "-quiet", "-ign_eof"],
                stdin=b"GET /jsonrpc HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            self.assertIn(b'{"message": "success"}', out[0], out[1][-500:])
            ran += 1
        if shutil.which("curl"):
            out = yield run(
                "curl", ["-sS", "--max-time", "10", "--cacert", root, "--resolve",
                         f"{NAME}:{port}:127.0.0.1", f"https://{NAME}:{port}/jsonrpc"],
            )
            self.assertEqual(out[0], b'{"message": "success"}', out[1][-500:])
            ran += 1
        if not ran:
            raise SkipTest("neither openssl nor curl is installed")
        self.assertEqual(front.notified, ran)

    @defer.inlineCallbacks
    def test_refusals_over_real_sockets(self):
        front, port = self.listen_front(hello_timeout=0.2, max_hello_bytes=4096)
        big = records(hello_message(ext(0, sni_ext(NAME.encode())) + ext(21, b"\0" * 9000)),
                      [16384])
        for data in (b"GET / HTTP/1.0\r\n\r\n", openssl_hello(None),
                     openssl_hello(b"unknown.example"), big):
            peer = yield connect_raw(self, port, data)
            yield peer.closed
        self.assertEqual((front.malformed, front.no_sni, front.no_route), (2, 1, 1))
        self.assertEqual(self.r.calls, [])

    @defer.inlineCallbacks
    def test_slowloris_closed_at_a_short_deadline(self):
        front, port = self.listen_front(hello_timeout=0.2)
        data = openssl_hello(NAME.encode())
        peer = yield connect_raw(self, port, b"")
        started = reactor.seconds()
        sent = [0]

        def drip():
            if peer.transport.connected and sent[0] < len(data):
                peer.transport.write(data[sent[0]:sent[0] + 1])
                sent[0] += 1

        loop = task.LoopingCall(drip)
        loop.start(0.02)
        self.addCleanup(lambda: loop.running and loop.stop())
        yield peer.closed
        self.assertGreaterEqual(reactor.seconds() - started, 0.15)
        self.assertEqual((front.timeouts, front.reading, self.rv.pending), (1, 0, 0))
        self.assertLess(sent[0], len(data))

    @defer.inlineCallbacks
    def test_notify_failing_closes_the_client(self):
        front, port = self.listen_front()
        self.r.on_notify = lambda operator, params: defer.fail(RuntimeError("404"))
        peer = yield connect_raw(self, port, openssl_hello(NAME.encode()))
        yield peer.closed
        self.assertEqual((front.notify_failed, self.rv.pending), (1, 0))

    @defer.inlineCallbacks
    def test_real_haproxy_in_front_with_send_proxy_v2(self):
        events = Events(self)
        front, port = self.listen_front(proxy_protocol=True)
        haproxy = start_haproxy(self, (
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s\n"
            "  timeout server 10s\n"
            "frontend tls\n  bind fd@3\n  default_backend sni\n"
            f"backend sni\n  server front 127.0.0.1:{port} send-proxy-v2\n"))
        client = HTTPClient()
        yield self.tls_client(haproxy.port, client)
        answer = yield client.done
        self.assertTrue(answer.endswith(b'{"message": "success"}'), haproxy.output[-500:])
        # HAProxy's header named the real client (loopback here), and it was used.
        self.assertIn("127.0.x.x", events.peers())
        self.assertEqual((front.notified, front.bad_proxy_header), (1, 0))


class RawPeer(Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed.callback(None)


@defer.inlineCallbacks
def connect_raw(test: TestCase, port: int, data: bytes):
    peer = RawPeer(data)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)

    def close():
        if peer.transport.connected:
            peer.transport.abortConnection()
            return peer.closed

    test.addCleanup(close)
    return peer


def run(executable: str, args: list[str], stdin: bytes = b"") -> defer.Deferred[tuple]:
    """Run a command, feed ``stdin`` and close it; fires with (stdout, stderr)."""
    done: defer.Deferred[tuple] = defer.Deferred()

    class Collect(protocol.ProcessProtocol):
        out = err = b""

        def connectionMade(self):
            if stdin:
                self.transport.write(stdin)
            self.transport.closeStdin()

        def outReceived(self, data):
            self.out += data

        def errReceived(self, data):
            self.err += data

        def processEnded(self, reason):
            done.callback((self.out, self.err))

    path = shutil.which(executable)
    reactor.spawnProcess(Collect(), path, [path, *args], env=dict(os.environ))
    return done
