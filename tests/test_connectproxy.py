"""
Tests for epsproxy.net.connectproxy: choosing a proxy (``proxy_for``), reading hostile proxy
replies (StringTransport and a fake proxy over loopback), and real tunnels through
tinyproxy for the TLS line protocol endpoint and the JSON-RPC client.

tinyproxy comes from Debian (``apt-get install tinyproxy``; CI and ``make os-deps``
install it).  Without it the tinyproxy tests FAIL, on purpose: they are the only proof
that tunnels work against a real proxy.
"""

from __future__ import annotations

import base64
import socket
from typing import Any

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    NoProtocol,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from epsproxy.net import tls
from epsproxy.net.jsonrpc import server as jsonrpc
from epsproxy.net.connectproxy import (
    MAX_REPLY_BYTES,
    HTTPConnectEndpoint,
    ProxyAddress,
    ProxyError,
    _ReplyParser,
    parse_proxy_url,
    proxy_for,
)
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import TransportError
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS
from tests.support.connectproxy import Tinyproxy, clean_environment
from tests.support.pki import pki

def tls_block(name: str) -> dict:
    crt, key = pki().tls(name)
    return {"ca_certificate_files": [str(pki().root)], "certificate_file": str(crt),
            "key_file": str(key)}


# ------------------------------------------------------------------------ proxy_for


class ParseProxyURLTests(SynchronousTestCase):
    """Which proxy URLs are accepted, and how they read."""

    def test_forms(self) -> None:
        self.assertEqual(parse_proxy_url("http://proxy.example:3128"),
                         ProxyAddress("proxy.example", 3128))
        self.assertEqual(parse_proxy_url("HTTP://Proxy.Example:3128/"),
                         ProxyAddress("proxy.example", 3128))
        self.assertEqual(parse_proxy_url("proxy:8080"), ProxyAddress("proxy", 8080))
        self.assertEqual(parse_proxy_url("http://proxy"), ProxyAddress("proxy", 80))
        self.assertEqual(parse_proxy_url("http://[::1]:3128"), ProxyAddress("::1", 3128))
        self.assertEqual(str(parse_proxy_url("http://[::1]:3128")), "[::1]:3128")
        self.assertEqual(parse_proxy_url(" http://10.1.2.3:3128 "), ProxyAddress("10.1.2.3", 3128))

    def test_credentials(self) -> None:
        proxy = parse_proxy_url("http://us%20er:p%40ss:w@proxy:3128")
        self.assertEqual((proxy.username, proxy.password), ("us er", "p@ss:w"))
        self.assertEqual(proxy.authorization(),
                         b"Basic " + base64.b64encode(b"us er:p@ss:w"))
        self.assertEqual(parse_proxy_url("http://user@proxy:1").authorization(),
                         b"Basic " + base64.b64encode(b"user:"))
        self.assertIsNone(parse_proxy_url("http://proxy:1").authorization())
        for text in (str(proxy), repr(proxy)):
            self.assertNotIn("p@ss", text)
            self.assertNotIn("us er", text)

    def test_refused(self) -> None:
        cases = {
            "https://proxy:3128": "only http:// proxies",
            "socks5://proxy:1080": "only http:// proxies",
            "http://": "no host",
            "http://proxy:99999": "port",
            "http://proxy:abc": "port",
            "http://proxy:0": "port 0",
            "http://proxy:3128/path": "no path",
            "http://proxy:3128/?q=1": "no path",
            "http://pro xy:3128": "not a host name",
        }
        for url, message in cases.items():
            error = self.assertRaises(ValueError, parse_proxy_url, url)
            self.assertIn(message, str(error), url)
        error = self.assertRaises(ValueError, parse_proxy_url, "https://user:secret@proxy:1")
        self.assertNotIn("secret", str(error))
        self.assertRaises(ValueError, parse_proxy_url, None)


class ProxyForTests(SynchronousTestCase):
    """The order of the settings and variables, and what NO_PROXY excludes."""

    P = ProxyAddress("proxy", 3128)

    def test_nothing_configured(self) -> None:
        self.assertIsNone(proxy_for("hd-2", 8889, environ={}))
        self.assertIsNone(proxy_for("hd-2", 8889, environ={"HTTPS_PROXY": "  "}))

    def test_explicit_wins(self) -> None:
        env = {"HTTPS_PROXY": "http://other:1", "https_proxy": "http://other:2"}
        self.assertEqual(proxy_for("hd-2", 1, "http://proxy:3128", env), self.P)
        for direct in ("", "direct", "DIRECT", " "):
            self.assertIsNone(proxy_for("hd-2", 1, direct, env))

    def test_environment_order(self) -> None:
        self.assertEqual(proxy_for("h", 1, environ={"HTTPS_PROXY": "proxy:3128"}), self.P)
        self.assertEqual(proxy_for("h", 1, environ={"https_proxy": "proxy:3128",
                                                     "HTTPS_PROXY": "other:1"}), self.P)
        self.assertEqual(proxy_for("h", 1, environ={"ALL_PROXY": "proxy:3128"}), self.P)
        self.assertEqual(proxy_for("h", 1, environ={"all_proxy": "proxy:3128",
                                                     "ALL_PROXY": "other:1"}), self.P)
        self.assertEqual(proxy_for("h", 1, environ={"https_proxy": "proxy:3128",
                                                     "all_proxy": "other:1"}), self.P)
        # HTTP_PROXY is deliberately not used (everything is a CONNECT tunnel; httpoxy).
        self.assertIsNone(proxy_for("h", 1, environ={"HTTP_PROXY": "proxy:3128",
                                                      "http_proxy": "proxy:3128"}))

    def test_reads_os_environ_by_default(self) -> None:
        clean_environment(self, HTTPS_PROXY="http://proxy:3128")
        self.assertEqual(proxy_for("h", 1), self.P)

    def test_bad_environment_url(self) -> None:
        self.assertRaises(ValueError, proxy_for, "h", 1, None, {"HTTPS_PROXY": "socks5://p:1"})

    def excluded(self, no_proxy: str, host: str, port: int = 443,
                 variable: str = "NO_PROXY") -> bool:
        env = {"HTTPS_PROXY": "proxy:3128", variable: no_proxy}
        return proxy_for(host, port, environ=env) is None

    def test_no_proxy_names(self) -> None:
        for entry in ("example.com", ".example.com", "*.example.com", "EXAMPLE.com."):
            self.assertTrue(self.excluded(entry, "example.com"), entry)
            self.assertTrue(self.excluded(entry, "a.b.Example.COM"), entry)
            self.assertTrue(self.excluded(entry, "a.example.com."), entry)
            self.assertFalse(self.excluded(entry, "badexample.com"), entry)
            self.assertFalse(self.excluded(entry, "example.com.evil"), entry)
        self.assertTrue(self.excluded("localhost", "localhost"))
        self.assertFalse(self.excluded("localhost", "127.0.0.1"))  # no DNS lookups

    def test_no_proxy_lists(self) -> None:
        self.assertTrue(self.excluded("a.example, b.example", "b.example"))
        self.assertTrue(self.excluded("a.example b.example\tc.example", "c.example"))
        self.assertTrue(self.excluded(",,b.example,", "b.example"))
        self.assertFalse(self.excluded(",, ,", "b.example"))
        self.assertTrue(self.excluded("*", "anything"))
        self.assertTrue(self.excluded("a.example,*", "anything"))

    def test_no_proxy_addresses(self) -> None:
        self.assertTrue(self.excluded("127.0.0.1", "127.0.0.1"))
        self.assertFalse(self.excluded("127.0.0.1", "127.0.0.2"))
        self.assertTrue(self.excluded("10.0.0.0/8", "10.200.3.4"))
        self.assertFalse(self.excluded("10.0.0.0/8", "11.0.0.1"))
        self.assertTrue(self.excluded("::1", "::1"))
        self.assertTrue(self.excluded("::1", "[::1]"))
        self.assertTrue(self.excluded("[::1]", "::1"))
        self.assertTrue(self.excluded("fd00::/8", "fd12::5"))
        self.assertFalse(self.excluded("fd00::/8", "fe80::1"))
        self.assertFalse(self.excluded("0.0.0.0/0", "::1"))  # families do not mix
        self.assertFalse(self.excluded("10.0.0.0/8", "ten.example"))

    def test_no_proxy_ports(self) -> None:
        self.assertTrue(self.excluded("example.com:443", "example.com", 443))
        self.assertFalse(self.excluded("example.com:443", "example.com", 8443))
        self.assertTrue(self.excluded("127.0.0.1:8889", "127.0.0.1", 8889))
        self.assertFalse(self.excluded("127.0.0.1:8889", "127.0.0.1", 8890))
        self.assertTrue(self.excluded("10.0.0.0/8:22", "10.1.1.1", 22))
        self.assertFalse(self.excluded("10.0.0.0/8:22", "10.1.1.1", 23))
        self.assertTrue(self.excluded("[::1]:3322", "::1", 3322))
        self.assertFalse(self.excluded("[::1]:3322", "::1", 3323))

    def test_no_proxy_spelling(self) -> None:
        self.assertTrue(self.excluded("example.com", "example.com", variable="no_proxy"))
        env = {"HTTPS_PROXY": "proxy:3128", "no_proxy": "a.example", "NO_PROXY": "b.example"}
        self.assertIsNone(proxy_for("a.example", 1, environ=env))
        self.assertEqual(proxy_for("b.example", 1, environ=env), self.P)  # lower case wins

    def test_no_proxy_applies_to_explicit_proxy(self) -> None:
        env = {"NO_PROXY": "127.0.0.1"}
        self.assertIsNone(proxy_for("127.0.0.1", 1, "http://proxy:3128", env))
        self.assertEqual(proxy_for("127.0.0.2", 1, "http://proxy:3128", env), self.P)

    labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
        lambda label: not label.startswith("-") and not label.endswith("-"))

    @hsettings(deadline=None, max_examples=150)
    @given(st.lists(labels, min_size=1, max_size=3), st.lists(labels, min_size=1, max_size=3),
           st.sampled_from(["", ".", "*."]))
    def test_domain_suffixes(self, prefix: list[str], domain: list[str], lead: str) -> None:
        name = ".".join(domain)
        self.assertTrue(self.excluded(lead + name, ".".join(prefix + domain)))
        self.assertTrue(self.excluded(lead + name, name))
        self.assertFalse(self.excluded(lead + name, "x" + name))

    @hsettings(deadline=None, max_examples=150)
    @given(st.ip_addresses(), st.ip_addresses(), st.integers(0, 128))
    def test_cidr_agrees_with_ipaddress(self, network: Any, address: Any, length: int) -> None:
        import ipaddress

        length = min(length, network.max_prefixlen)
        net = ipaddress.ip_network(f"{network}/{length}", strict=False)
        expected = address.version == net.version and address in net
        self.assertEqual(self.excluded(str(net), str(address)), expected)


# ---------------------------------------------------------------- the reply parser


class ReplyParserTests(SynchronousTestCase):
    """The sans-IO reply reader on its own."""

    REPLY = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n"

    def test_whole_and_rest(self) -> None:
        self.assertEqual(_ReplyParser().feed(self.REPLY + b"tunnel"),
                         (200, "Connection established", b"tunnel"))
        self.assertEqual(_ReplyParser().feed(b"HTTP/1.0 200\r\n\r\n"), (200, "", b""))
        self.assertEqual(_ReplyParser().feed(b"HTTP/1.0 200 OK\n\nx"), (200, "OK", b"x"))

    @hsettings(deadline=None, max_examples=100)
    @given(st.lists(st.integers(1, 80), max_size=40), st.binary(max_size=50))
    def test_any_split(self, sizes: list[int], rest: bytes) -> None:
        data = b"HTTP/1.1 100 Continue\r\n\r\n" + self.REPLY + rest
        parser = _ReplyParser()
        result = None
        chunks, at = [], 0
        for size in sizes:
            chunks.append(data[at:at + size])
            at += size
        chunks.append(data[at:])
        collected = b""
        for chunk in chunks:
            if result is None:
                result = parser.feed(chunk)
            else:
                collected += chunk
        self.assertIsNotNone(result)
        status, reason, first = result
        self.assertEqual((status, reason, first + collected),
                         (200, "Connection established", rest))

    def test_garbage(self) -> None:
        for data in (b"SSH-2.0-OpenSSH_9.2\r\n", b"GARBAGE", b"HTTP/2 200\r\n\r\n",
                     b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 20 OK\r\n\r\n",
                     b"HTTP/1.1 200 O\x00K\r\n\r\n", b"\r\n\r\n", b"http/1.1 200 OK\r\n\r\n"):
            error = self.assertRaises(Exception, _ReplyParser().feed, data)
            self.assertIn("not an HTTP reply", str(error), data)

    def test_cap(self) -> None:
        parser = _ReplyParser()
        parser.feed(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"y" * 88 + b"\r\n"
        fed = 17
        with self.assertRaises(Exception) as caught:
            while fed <= MAX_REPLY_BYTES + len(line):
                parser.feed(line)
                fed += len(line)
        self.assertIn(f"reply headers over {MAX_REPLY_BYTES} bytes", str(caught.exception))
        # Exactly at the cap is fine.
        head = b"HTTP/1.1 200 OK\r\nX: "
        exact = head + b"y" * (MAX_REPLY_BYTES - len(head))
        self.assertEqual(_ReplyParser().feed(exact + b"\r\n\r\n")[0], 200)
        self.assertRaises(Exception, _ReplyParser().feed, exact + b"y\r\n\r\n")

    def test_interim_replies_count_against_the_cap(self) -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        parser = _ReplyParser()
        with self.assertRaises(Exception):
            for _ in range(MAX_REPLY_BYTES // len(interim) + 2):
                parser.feed(interim)


# ----------------------------------------------------------- endpoint, no sockets


@implementer(IStreamClientEndpoint)
class StringEndpoint:
    """Reaches the 'proxy' over a StringTransport; ``pending`` keeps the connect waiting."""

    def __init__(self, pending: bool = False, switchable: bool = False) -> None:
        self.pending = pending
        self.switchable = switchable
        self.cancelled = False
        self.transport: Any = None
        self.protocol: Any = None

    def connect(self, factory: Any) -> Deferred:
        if self.pending:
            def cancel(d: Deferred) -> None:
                self.cancelled = True
                d.errback(ConnectingCancelledError(None))
            return Deferred(cancel)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3128))
        if self.switchable:
            self.transport = StringTransportWithDisconnection()
            self.transport.protocol = self.protocol
        else:
            self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class Recorder(Protocol):
    """The protocol that wanted the target: records what reaches it."""

    def __init__(self) -> None:
        self.data = b""
        self.made = 0
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class EndpointTests(SynchronousTestCase):
    """HTTPConnectEndpoint driven through StringTransport and a fake clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.recorder = Recorder()

    def connect(self, proxy: ProxyAddress = ProxyAddress("proxy", 3128), host: str = "hd-2",
                port: int = 8889, **kw: Any) -> tuple[Deferred, StringEndpoint]:
        fake = StringEndpoint(**kw)
        endpoint = HTTPConnectEndpoint(self.clock, proxy, host, port, proxy_endpoint=fake)
        d = endpoint.connect(Factory.forProtocol(lambda: self.recorder))
        return d, fake

    def failure(self, d: Deferred, kind: type = ProxyError) -> Any:
        return self.failureResultOf(d, kind).value

    def test_request(self) -> None:
        d, fake = self.connect()
        self.assertEqual(fake.transport.value(),
                         b"CONNECT hd-2:8889 HTTP/1.1\r\nHost: hd-2:8889\r\n\r\n")
        self.assertNoResult(d)
        proxy = ProxyAddress("proxy", 3128, "us er", "p@ss")
        _, fake = self.connect(proxy, "::1", 443)
        self.assertEqual(
            fake.transport.value(),
            b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic "
            + base64.b64encode(b"us er:p@ss") + b"\r\n\r\n")
        _, fake = self.connect(host="[::1]", port=443)
        self.assertTrue(fake.transport.value().startswith(b"CONNECT [::1]:443 HTTP/1.1\r\n"))

    def test_refuses_unsafe_targets(self) -> None:
        for host, port in (("hd-2\r\nX-Evil: 1", 1), ("hd 2", 1), ("", 1), ("hd-2", 0),
                           ("hd-2", 65536)):
            self.assertRaises(ValueError, HTTPConnectEndpoint, self.clock,
                              ProxyAddress("p", 1), host, port)

    def test_byte_by_byte_then_data(self) -> None:
        d, fake = self.connect()
        reply = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 proxy\r\n\r\nHELLO"
        for i in range(len(reply)):
            fake.protocol.dataReceived(reply[i:i + 1])
            if i < reply.index(b"\r\n\r\n") + 3:
                self.assertNoResult(d)
        self.assertIs(self.successResultOf(d), self.recorder)
        self.assertEqual(self.recorder.made, 1)
        self.assertIs(self.recorder.transport, fake.transport)  # the raw transport
        self.assertEqual(self.recorder.data, b"HELLO")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        fake.protocol.connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(self.recorder.lost)

    def test_data_in_the_same_chunk(self) -> None:
        d, fake = self.connect(switchable=True)
        fake.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n\x16\x03\x01hello")
        self.assertIs(self.successResultOf(d), self.recorder)
        self.assertEqual(self.recorder.data, b"\x16\x03\x01hello")
        self.assertIs(fake.transport.protocol, self.recorder)  # switched like startTLS

    def test_interim_reply_skipped(self) -> None:
        d, fake = self.connect()
        fake.protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_failures_with_a_transport_that_reports_loss_at_once(self) -> None:
        for reply, status in ((b"HTTP/1.1 403 Forbidden\r\n\r\n", 403), (b"junk\n", None)):
            d, fake = self.connect(switchable=True)
            fake.protocol.dataReceived(reply)
            self.assertEqual(self.failure(d).status, status)  # not "closed before answering"
            self.assertTrue(fake.transport.disconnected)

    def test_refused(self) -> None:
        d, fake = self.connect()
        fake.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        error = self.failure(d)
        self.assertEqual(str(error), "proxy proxy:3128 refused CONNECT to hd-2:8889: 403 Forbidden")
        self.assertEqual((error.status, error.reason), (403, "Forbidden"))
        self.assertTrue(fake.transport.disconnecting)
        self.assertEqual(self.recorder.made, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_auth_required_does_not_show_credentials(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d, fake = self.connect(ProxyAddress("proxy", 3128, "alice", "s3cret"))
        fake.protocol.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        error = self.failure(d)
        self.assertEqual(error.status, 407)
        texts = [str(error), repr(error)] + [formatEvent(e) for e in events]
        texts += [repr(e) for e in events]
        for text in texts:
            self.assertNotIn("s3cret", text)
            self.assertNotIn("alice", text)

    def test_garbage_status_line(self) -> None:
        d, fake = self.connect()
        fake.protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        error = self.failure(d)
        self.assertIn("proxy proxy:3128 sent a bad reply to CONNECT hd-2:8889: not an HTTP",
                      str(error))
        self.assertTrue(fake.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbage_fails_before_a_newline(self) -> None:
        d, fake = self.connect()
        fake.protocol.dataReceived(b"\x00\x01binary")
        self.failure(d)

    def test_endless_headers(self) -> None:
        d, fake = self.connect()
        fake.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        sent = 0
        while not d.called:
            fake.protocol.dataReceived(b"X-Filler: " + b"y" * 1000 + b"\r\n")
            sent += 1012
            self.assertLess(sent, 2 * MAX_REPLY_BYTES, "no cap")
        self.assertIn(f"reply headers over {MAX_REPLY_BYTES} bytes", str(self.failure(d)))
        self.assertTrue(fake.transport.disconnecting)
        fake.protocol.dataReceived(b"more\r\n\r\n")  # ignored after failing
        self.assertEqual(self.recorder.made, 0)

    def test_early_close(self) -> None:
        for partial in (b"", b"HTTP/1.1 200 OK\r\n"):
            d, fake = self.connect()
            if partial:
                fake.protocol.dataReceived(partial)
            fake.protocol.connectionLost(Failure(ConnectionRefusedError()))
            self.assertEqual(str(self.failure(d)), "proxy proxy:3128 closed the connection"
                             " before answering CONNECT to hd-2:8889")
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        d, fake = self.connect()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        fake.protocol.dataReceived(b"HTTP/1.1 200")  # a partial reply does not help
        self.clock.advance(0.2)
        self.assertEqual(str(self.failure(d)),
                         "no reply from proxy proxy:3128 to CONNECT hd-2:8889 within 10 s")
        self.assertTrue(fake.transport.disconnected)

    def test_cancel_while_waiting_for_the_reply(self) -> None:
        d, fake = self.connect(switchable=True)
        d.cancel()
        self.failure(d, ConnectingCancelledError)
        self.assertTrue(fake.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.recorder.made, 0)

    def test_cancel_while_connecting_to_the_proxy(self) -> None:
        d, fake = self.connect(pending=True)
        d.cancel()
        self.failure(d, ConnectingCancelledError)
        self.assertTrue(fake.cancelled)

    def test_no_protocol(self) -> None:
        fake = StringEndpoint()
        endpoint = HTTPConnectEndpoint(self.clock, ProxyAddress("p", 1), "hd-2", 1,
                                       proxy_endpoint=fake)
        class Refusing(Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        d = endpoint.connect(Refusing())
        fake.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.failureResultOf(d, NoProtocol)
        self.assertTrue(fake.transport.disconnected)

    def test_factory_error(self) -> None:
        class Broken(Factory):
            def buildProtocol(self, addr: Any) -> None:
                raise RuntimeError("no protocol today")

        d, fake = self.connect(switchable=True)
        fake.protocol._factory = Broken()
        fake.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.failureResultOf(d, RuntimeError)
        self.assertTrue(fake.transport.disconnected)

    def test_proxy_unreachable(self) -> None:
        @implementer(IStreamClientEndpoint)
        class Refusing:
            def connect(self, factory: Any) -> Deferred:
                return defer.fail(ConnectionRefusedError("nobody there"))

        endpoint = HTTPConnectEndpoint(self.clock, ProxyAddress("p", 1), "hd-2", 1,
                                       proxy_endpoint=Refusing())
        d = endpoint.connect(Factory.forProtocol(Recorder))
        error = self.failure(d)
        self.assertIn("cannot connect to proxy p:1 (for hd-2:1):", str(error))
        self.assertIn("nobody there", str(error))


# ------------------------------------------------- endpoint, fake proxy on loopback


class FakeProxy(Protocol):
    """Answers the CONNECT with ``factory.reply`` in one write, then echoes."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.tunnel = False
        self.factory.seen.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.tunnel = True
            self.transport.write(self.factory.reply)

    def connectionLost(self, reason: Any) -> None:
        self.factory.lost.append(reason)


class EchoClient(Protocol):
    """Sends ``ping`` once connected and fires ``got`` with what came back."""

    def __init__(self, expect: bytes) -> None:
        self.expect = expect
        self.data = b""
        self.got: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= len(self.expect) and not self.got.called:
            self.got.callback(self.data)


class LoopbackFakeProxyTests(TestCase):
    """A hand-written proxy over real loopback sockets."""

    timeout = 30

    async def start(self, reply: bytes) -> tuple[int, Factory]:
        factory = Factory.forProtocol(FakeProxy)
        factory.reply = reply  # type: ignore[attr-defined]
        factory.seen = []  # type: ignore[attr-defined]
        factory.lost = []  # type: ignore[attr-defined]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)

        def close_all() -> None:
            for protocol in factory.seen:  # type: ignore[attr-defined]
                protocol.transport.abortConnection()

        self.addCleanup(close_all)
        return port.getHost().port, factory

    def endpoint(self, port: int) -> HTTPConnectEndpoint:
        return HTTPConnectEndpoint(reactor, ProxyAddress("127.0.0.1", port), "hd-2", 8889,
                                   timeout=5)

    @defer.inlineCallbacks
    def test_data_after_headers_and_switch(self):
        port, factory = yield defer.ensureDeferred(
            self.start(b"HTTP/1.1 200 Connection established\r\n\r\nwelcome"))
        client = EchoClient(b"welcome")
        protocol = yield self.endpoint(port).connect(Factory.forProtocol(lambda: client))
        self.assertIs(protocol, client)
        self.assertEqual((yield client.got), b"welcome")
        self.assertIs(client.transport.protocol, client)  # the TCP transport was switched
        client.data, client.expect, client.got = b"", b"ping", Deferred()
        client.transport.write(b"ping")
        self.assertEqual((yield client.got), b"ping")
        self.assertEqual(factory.seen[0].buffer,
                         b"CONNECT hd-2:8889 HTTP/1.1\r\nHost: hd-2:8889\r\n\r\n")
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_hostile_endless_headers(self):
        port, factory = yield defer.ensureDeferred(
            self.start(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10000))
        error = yield self.assertFailure(
            self.endpoint(port).connect(Factory.forProtocol(Recorder)), ProxyError)
        self.assertIn("over 16384 bytes", str(error))
        if not factory.lost:
            lost = Deferred()
            factory.seen[0].connectionLost = lambda reason: lost.callback(None)
            yield lost  # the proxy connection was closed by us


# ----------------------------------------------------------------------- tinyproxy


class EchoServer(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class TinyproxyTestCase(TestCase):
    """Starts tinyproxy and TLS/JSON-RPC servers for one test; tears everything down."""

    timeout = 30

    connect_ports: tuple[int, ...] = ()

    async def _setUp(self) -> None:
        clean_environment(self)
        self.proxy = Tinyproxy(self, self.connect_ports)
        await self.proxy.start()

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._setUp())

    async def tls_echo(self) -> int:
        factory = Factory.forProtocol(EchoServer)
        factory.connections = []  # type: ignore[attr-defined]
        endpoint = tls.listen_endpoint(reactor, "127.0.0.1:0", tls_block("sd-1"))
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)

        def close_all() -> None:
            for protocol in factory.connections:  # type: ignore[attr-defined]
                protocol.transport.abortConnection()

        self.addCleanup(close_all)
        return port.getHost().port

    async def exchange(self, port: int, **kw: Any) -> EchoClient:
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}", tls_block("hd-1"),
                                       "sd-1", timeout=5, **kw)
        client = EchoClient(b"ping over tls")
        await connectProtocol(endpoint, client)
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"ping over tls")
        self.assertEqual(await client.got, b"ping over tls")
        return client

    async def jsonrpc_server(self, use_tls: bool) -> tuple[int, list]:
        contexts: list = []

        class Handler:
            def handle(self, method: str, params: dict, context: Any) -> Any:
                contexts.append(context)
                return params

        settings = {"bind_address": "127.0.0.1:0"}
        if use_tls:
            settings["tls"] = tls_block("sd-1")  # type: ignore[assignment]
        settings = JSONRPC_SERVER_SETTINGS.validate(settings)
        site = jsonrpc.jsonrpc_site(Handler(), settings, reactor=reactor)
        port = await jsonrpc.listen_jsonrpc(reactor, site, settings)
        self.addCleanup(port.stopListening)
        return port.getHost().port, contexts

    def client(self, port: int, use_tls: bool = True, **extra: Any) -> JSONRPCClient:
        scheme = "https" if use_tls else "http"
        settings: dict = {"endpoint": f"{scheme}://127.0.0.1:{port}/jsonrpc",
                          "server_name": "sd-1", "timeout": 10, **extra}
        if use_tls:
            settings["tls"] = tls_block("hd-1")
        client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(settings))
        self.addCleanup(client.close)
        return client


class TunnelTests(TinyproxyTestCase):
    """Real tunnels through tinyproxy."""

    async def _tls_with_setting(self) -> None:
        port = await self.tls_echo()
        client = await self.exchange(port, proxy_url=self.proxy.url)
        peer = tls.peer_certificate(client.transport)
        self.assertIsNotNone(peer)  # TLS end to end: the server's certificate, verified
        self.assertEqual(self.proxy.requests(), [f"CONNECT 127.0.0.1:{port} HTTP/1.1"])

    def test_tls_with_setting(self):
        return Deferred.fromCoroutine(self._tls_with_setting())

    async def _tls_with_environment(self) -> None:
        clean_environment(self, HTTPS_PROXY=self.proxy.url, NO_PROXY="elsewhere.example")
        port = await self.tls_echo()
        await self.exchange(port)
        self.assertEqual(self.proxy.requests(), [f"CONNECT 127.0.0.1:{port} HTTP/1.1"])

    def test_tls_with_environment(self):
        return Deferred.fromCoroutine(self._tls_with_environment())

    async def _no_proxy_goes_direct(self) -> None:
        clean_environment(self, https_proxy=self.proxy.url, no_proxy="localhost,127.0.0.1")
        port = await self.tls_echo()
        client = await self.exchange(port)
        self.assertEqual(client.transport.getPeer().port, port)
        await self.exchange(port, proxy_url=self.proxy.url)  # NO_PROXY applies here too
        self.assertEqual(self.proxy.requests(), [])

    def test_no_proxy_goes_direct(self):
        return Deferred.fromCoroutine(self._no_proxy_goes_direct())

    async def _direct_setting_overrides_environment(self) -> None:
        clean_environment(self, HTTPS_PROXY=self.proxy.url)
        port = await self.tls_echo()
        await self.exchange(port, proxy_url="direct")
        await self.exchange(port, proxy_url="")
        self.assertEqual(self.proxy.requests(), [])

    def test_direct_setting_overrides_environment(self):
        return Deferred.fromCoroutine(self._direct_setting_overrides_environment())

    async def _target_down(self) -> None:
        closed = socket.socket()  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        self.addCleanup(closed.close)
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{closed.getsockname()[1]}",
                                       tls_block("hd-1"), "sd-1", proxy_url=self.proxy.url)
        error = await self.assertFailure(connectProtocol(endpoint, Recorder()), ProxyError)
        self.assertEqual(error.status, 500)
        self.assertIn(f"proxy {self.proxy.url[7:]} refused CONNECT", str(error))

    def test_target_down(self):
        return Deferred.fromCoroutine(self._target_down())

    async def _jsonrpc(self, use_tls: bool) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port, contexts = await self.jsonrpc_server(use_tls)
        proxy_url = self.proxy.url.replace("http://", "http://user:pw-secret@")
        client = self.client(port, use_tls, proxy_url=proxy_url)
        self.assertEqual(await client.call("echo", {"a": 1}), {"a": 1})
        self.assertEqual(await client.call("echo", {"b": 2}), {"b": 2})
        # One tunnel for both calls: the persistent pool keeps it.
        self.assertEqual(self.proxy.requests(), [f"CONNECT 127.0.0.1:{port} HTTP/1.1"])
        if use_tls:
            self.assertIsNotNone(contexts[0].peer_certificate)  # mutual TLS through it
        texts = [formatEvent(e) for e in events]
        self.assertIn(f"JSON-RPC calls to 127.0.0.1:{port} go through the proxy"
                      f" 127.0.0.1:{self.proxy.port}", texts)
        self.assertFalse([t for t in texts + [repr(e) for e in events] if "pw-secret" in t])

    def test_jsonrpc_https(self):
        return Deferred.fromCoroutine(self._jsonrpc(True))

    def test_jsonrpc_http(self):
        return Deferred.fromCoroutine(self._jsonrpc(False))

    async def _jsonrpc_environment_and_no_proxy(self) -> None:
        port, _ = await self.jsonrpc_server(True)
        clean_environment(self, HTTPS_PROXY=self.proxy.url)
        self.assertEqual(await self.client(port).call("echo", {}), {})
        self.assertEqual(len(self.proxy.requests()), 1)
        clean_environment(self, HTTPS_PROXY=self.proxy.url, NO_PROXY=f"127.0.0.1:{port}")
        self.assertEqual(await self.client(port).call("echo", {}), {})
        self.assertEqual(len(self.proxy.requests()), 1)

    def test_jsonrpc_environment_and_no_proxy(self):
        return Deferred.fromCoroutine(self._jsonrpc_environment_and_no_proxy())


class RefusingProxyTests(TinyproxyTestCase):
    """tinyproxy allowing CONNECT to port 1 only: everything else gets 403."""

    connect_ports = (1,)

    async def _tls_refused(self) -> None:
        port = await self.tls_echo()
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}", tls_block("hd-1"),
                                       "sd-1", proxy_url=self.proxy.url)
        error = await self.assertFailure(connectProtocol(endpoint, Recorder()), ProxyError)
        self.assertEqual(error.status, 403)
        self.assertEqual(str(error), f"proxy 127.0.0.1:{self.proxy.port} refused CONNECT to"
                                     f" 127.0.0.1:{port}: 403 Access violation")

    def test_tls_refused(self):
        return Deferred.fromCoroutine(self._tls_refused())

    async def _jsonrpc_refused(self) -> None:
        port, contexts = await self.jsonrpc_server(True)
        client = self.client(port, proxy_url=self.proxy.url)
        error = await self.assertFailure(client.call("echo", {}), TransportError)
        self.assertIn("403 Access violation", str(error))
        self.assertEqual(contexts, [])

    def test_jsonrpc_refused(self):
        return Deferred.fromCoroutine(self._jsonrpc_refused())


class NoProxyRunningTests(TestCase):
    """A proxy_url where nothing listens: a clear connect error, not a hang."""

    timeout = 30

    def setUp(self) -> None:
        clean_environment(self)
        self.closed = socket.socket()  # bound, never listening: connections are refused
        self.closed.bind(("127.0.0.1", 0))
        self.addCleanup(self.closed.close)
        self.url = f"http://127.0.0.1:{self.closed.getsockname()[1]}"

    @defer.inlineCallbacks
    def test_endpoint(self):
        endpoint = tls.client_endpoint(reactor, "127.0.0.1:9", tls_block("hd-1"), "sd-1",
                                       proxy_url=self.url)
        error = yield self.assertFailure(connectProtocol(endpoint, Recorder()), ProxyError)
        self.assertIn(f"cannot connect to proxy {self.url[7:]} (for 127.0.0.1:9)", str(error))
        self.assertIn("refused", str(error))

    @defer.inlineCallbacks
    def test_jsonrpc(self):
        settings = JSONRPC_CLIENT_SETTINGS.validate(
            {"endpoint": "https://127.0.0.1:9/jsonrpc", "tls": tls_block("hd-1"),
             "server_name": "sd-1", "proxy_url": self.url})
        client = JSONRPCClient(reactor, settings)
        self.addCleanup(client.close)
        error = yield self.assertFailure(client.call("echo", {}), TransportError)
        self.assertIn("cannot connect to https://127.0.0.1:9/jsonrpc: cannot connect to proxy",
                      str(error))

    def test_bad_proxy_url_fails_at_start(self):
        settings = JSONRPC_CLIENT_SETTINGS.validate(
            {"endpoint": "http://127.0.0.1:9/jsonrpc", "proxy_url": "socks5://127.0.0.1:1"})
        self.assertRaises(ValueError, JSONRPCClient, reactor, settings)
        self.assertRaises(ValueError, tls.client_endpoint, reactor, "127.0.0.1:9", None,
                          proxy_url="https://127.0.0.1:1")
