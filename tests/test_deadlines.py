"""
Hostile input against every listener (issue 6): each slow, silent, foreign or oversized
client ends in a refusal that is counted in the metrics and harms no other connection.

- JSON-RPC servers (:mod:`epsproxy.net.jsonrpc`) over real TLS: the request deadline
  (``request_timeout``) against slow-loris headers and bodies, silent clients and
  unfinished TLS handshakes; keep-alive connections idle between requests are left to
  the idle timeout; ``<prefix>_http_refusals_total{reason}`` for every reason.
- The EPS peer listener (``eps_server``) and the EPS gateway (``jsonrpc_server``) of a
  running endpoint server: ``eps_peer_refusals_total{reason}`` and
  ``eps_http_refusals_total{reason}``.
- The public proxy's internal and TLS listeners: silent connections are closed at their
  deadline and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epsproxy.net import tls
from epsproxy.eps.links import wire
from epsproxy.eps.links.protocol import EPSConnection, EPSServerFactory
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import Dispatcher
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from epsproxy.net.metrics import HTTP_REFUSAL_REASONS, RPCMetrics
from tests.support.connections import ConnectionTracker
from tests.support.eps import Network, gateway_channel, server_channel
from tests.support.pki import pki
from tests.support.tls import tls_block

# ------------------------------------------------------------------------ helpers


def server_tls() -> dict[str, Any]:
    crt, key = pki().tls("sd-1")
    return {"ca_certificate_files": [str(pki().root)], "certificate_file": str(crt),
            "key_file": str(key)}


def client_tls() -> dict[str, Any]:
    crt, key = pki().tls("hd-1")
    return {"ca_certificate_files": [str(pki().root)], "certificate_file": str(crt),
            "key_file": str(key)}


def split_responses(data: bytes) -> list[tuple[int, bytes]]:
    """The complete HTTP responses (status, body) at the start of ``data``."""
    responses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        )
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        responses.append((int(lines[0].split()[1]), rest[:length]))
        data = rest[length:]
    return responses


def http_post(data: bytes, close: bool = False) -> bytes:
    lines = ["POST /jsonrpc HTTP/1.1", "Host: sd-1", "Content-Type: application/json",
             f"Content-Length: {len(data)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def call(method: str, id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": {}, "id": id}).encode()


class Peer(Protocol):
    """A client that records what it receives; ``lost`` fires when the connection ends."""

    def __init__(self, send: bytes = b"") -> None:
        self.send = send
        self.data = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        still = []
        for condition, d in self._waiting:
            if condition(self.data):
                d.callback(self.data)
            else:
                still.append((condition, d))
        self._waiting = still

    def wait_for(self, condition: Callable[[bytes], bool]) -> defer.Deferred[bytes]:
        """Fires once the received bytes meet ``condition`` (fails if the peer leaves)."""
        d: defer.Deferred[bytes] = defer.Deferred()
        if condition(self.data):
            d.callback(self.data)
        else:
            self._waiting.append((condition, d))
        return d

    def connectionLost(self, reason: Any) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"connection closed; received {self.data!r}"))
        self._waiting = []
        self.lost.callback(self.data)


def trickle(test: TestCase, peer: Any, data: bytes, every: float = 0.1) -> list[int]:
    """Write ``data`` one byte every ``every`` seconds while ``peer`` is connected."""
    sent = [0]

    def drip() -> None:
        if peer.transport is not None and peer.transport.connected and sent[0] < len(data):
            peer.transport.write(data[sent[0]:sent[0] + 1])
            sent[0] += 1

    loop = task.LoopingCall(drip)
    loop.start(every, now=False)
    test.addCleanup(lambda: loop.running and loop.stop())
    peer.lost.addBoth(lambda result: (loop.running and loop.stop(), result)[1])
    return sent


def after(seconds: float) -> defer.Deferred[None]:
    """A timer: the behaviour under test is time itself."""
    return task.deferLater(reactor, seconds, lambda: None)


# ------------------------------------------------------------------ JSON-RPC servers


class SettingsTests(SynchronousTestCase):
    def test_request_timeout_default_and_bounds(self) -> None:
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": ":0"})
        self.assertEqual(settings["request_timeout"], 10.0)
        self.assertEqual(
            JSONRPC_SERVER_SETTINGS.validate(
                {"bind_address": ":0", "request_timeout": 0.3})["request_timeout"], 0.3)
        from epsproxy.rules import forms

        for bad in (0, -1, "soon"):
            self.assertRaises(forms.FormError, JSONRPC_SERVER_SETTINGS.validate,
                              {"bind_address": ":0", "request_timeout": bad})

    def test_refusal_counters_start_at_zero(self) -> None:
        registry = CollectorRegistry()
        RPCMetrics(registry, "sd", lambda m: True)
        for reason in HTTP_REFUSAL_REASONS:
            self.assertEqual(
                registry.get_sample_value("sd_http_refusals_total", {"reason": reason}), 0.0)


class JSONRPCDeadlineTests(TestCase):
    """A JSON-RPC server over real mutual TLS, with short deadlines."""

    timeout = 20

    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.tracker = ConnectionTracker()

    async def serve(self, **extra: Any) -> int:
        dispatcher = Dispatcher()
        dispatcher.register("echo", None, lambda params, context: "ok")
        dispatcher.register(
            "slow", None, lambda params, context: after(0.5).addCallback(lambda _: "slow"))
        settings = JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": "127.0.0.1:0", "tls": server_tls(), **extra})
        metrics = RPCMetrics(self.registry, "test", dispatcher.__contains__)
        site = jsonrpc_site(dispatcher, settings, reactor=reactor, metrics=metrics)
        self.tracker.track(site)
        port = await listen_jsonrpc(reactor, site, settings)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.tracker.close_all)
        return port.getHost().port

    async def connect(self, port: int, send: bytes = b"", use_tls: bool = True) -> Peer:
        if use_tls:
            endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}", client_tls(),
                                           server_name="sd-1")
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        peer = Peer(send)
        await connectProtocol(endpoint, peer)
        self.addCleanup(lambda: peer.transport.connected and peer.transport.abortConnection())
        return peer

    def client(self, port: int) -> JSONRPCClient:
        client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
            "endpoint": f"https://127.0.0.1:{port}/jsonrpc", "server_name": "sd-1",
            "tls": client_tls(), "timeout": 5,
        }))
        self.addCleanup(client.close)
        return client

    def refusals(self, reason: str) -> float | None:
        return self.registry.get_sample_value("test_http_refusals_total", {"reason": reason})

    def counts(self) -> dict[str, float]:
        found = {r: self.refusals(r) or 0.0 for r in HTTP_REFUSAL_REASONS}
        return {r: n for r, n in found.items() if n}

    def assert408(self, data: bytes) -> None:
        [(status, body)] = split_responses(data)
        self.assertEqual(status, 408, data)
        error = json.loads(body)
        self.assertEqual((error["jsonrpc"], error["id"]), ("2.0", None))
        self.assertIn("not received within 0.3s", error["error"]["message"])

    @defer.inlineCallbacks
    def test_slowloris_headers_get_408_while_others_are_served(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=0.3, timeout=5))
        started = reactor.seconds()
        slow = yield defer.ensureDeferred(self.connect(port, b"POST /jsonrpc HTTP/1.1\r\n"))
        sent = trickle(self, slow, b"Host: sd-1\r\nX-Slow: " + b"a" * 200)
        # A legitimate client is answered while the slow one trickles.
        result = yield self.client(port).call("echo", {})
        self.assertEqual(result, "ok")
        data = yield slow.lost
        elapsed = reactor.seconds() - started
        self.assert408(data)
        self.assertGreaterEqual(sent[0], 1)  # bytes kept arriving: the idle timeout was reset
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 4)  # long before the idle timeout (5 s)
        self.assertEqual(self.counts(), {"request_timeout": 1.0})

    @defer.inlineCallbacks
    def test_silent_tls_client_closed(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=0.3, timeout=5))
        started = reactor.seconds()
        silent = yield defer.ensureDeferred(self.connect(port))
        data = yield silent.lost
        self.assert408(data)
        self.assertLess(reactor.seconds() - started, 4)
        self.assertEqual(self.counts(), {"request_timeout": 1.0})

    @defer.inlineCallbacks
    def test_unfinished_tls_handshake_cut(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=0.3, timeout=5))
        started = reactor.seconds()
        # Plain TCP: one silent, one trickling the header of a big TLS record.
        silent = yield defer.ensureDeferred(self.connect(port, use_tls=False))
        trickling = yield defer.ensureDeferred(self.connect(port, use_tls=False))
        trickle(self, trickling, b"\x16\x03\x01\x40\x00" + b"\x00" * 200)
        for peer in (silent, trickling):
            data = yield peer.lost
            self.assertEqual(data, b"")  # nothing can be said before the handshake
        self.assertLess(reactor.seconds() - started, 4)
        self.assertEqual(self.counts(), {"request_timeout": 2.0})

    @defer.inlineCallbacks
    def test_failed_tls_handshakes_counted(self):
        """Garbage instead of a ClientHello, and a client without a certificate."""
        port = yield defer.ensureDeferred(self.serve(request_timeout=5, timeout=5))
        garbage = yield defer.ensureDeferred(
            self.connect(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", use_tls=False))
        yield garbage.lost
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}",
                                       {"ca_certificate_files": [str(pki().root)]},
                                       server_name="sd-1")
        anonymous = Peer(http_post(call("echo")))
        yield connectProtocol(endpoint, anonymous)
        self.addCleanup(lambda: anonymous.transport.connected
                        and anonymous.transport.abortConnection())
        data = yield anonymous.lost
        self.assertEqual(split_responses(data), [])  # never answered
        yield defer.gatherResults(self.tracker.closed)
        self.assertEqual(self.counts(), {"handshake_failed": 2.0})

    @defer.inlineCallbacks
    def test_slow_body_gets_408(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=0.3, timeout=5))
        head = http_post(b"x" * 1000)[:-1000]
        slow = yield defer.ensureDeferred(self.connect(port, head))
        sent = trickle(self, slow, b"x" * 1000)
        data = yield slow.lost
        self.assert408(data)
        self.assertLess(sent[0], 1000)
        self.assertEqual(self.counts(), {"request_timeout": 1.0})

    @defer.inlineCallbacks
    def test_keep_alive_idle_between_requests_is_not_cut(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=0.3, timeout=5))
        peer = yield defer.ensureDeferred(self.connect(port, http_post(call("echo", 1))))
        yield peer.wait_for(lambda data: len(split_responses(data)) == 1)
        yield after(0.5)  # idle longer than request_timeout, shorter than timeout
        peer.transport.write(http_post(call("echo", 2)))
        data = yield peer.wait_for(lambda data: len(split_responses(data)) == 2)
        self.assertEqual([s for s, _ in split_responses(data)], [200, 200])
        self.assertEqual(json.loads(split_responses(data)[1][1])["id"], 2)
        self.assertEqual(self.counts(), {})

    @defer.inlineCallbacks
    def test_pipelined_bytes_do_not_start_the_deadline_early(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=0.3, timeout=5))
        # "slow" takes 0.5 s; the second request arrives while the first is handled
        # and waits in twisted.web's buffer longer than request_timeout.
        peer = yield defer.ensureDeferred(self.connect(port, http_post(call("slow", 1))))
        yield after(0.1)
        peer.transport.write(http_post(call("echo", 2)))
        data = yield peer.wait_for(lambda data: len(split_responses(data)) == 2)
        responses = split_responses(data)
        self.assertEqual([s for s, _ in responses], [200, 200])
        self.assertEqual([json.loads(b)["result"] for _, b in responses], ["slow", "ok"])
        self.assertEqual(self.counts(), {})

    @defer.inlineCallbacks
    def test_idle_timeout_counted(self):
        port = yield defer.ensureDeferred(self.serve(request_timeout=5, timeout=0.3))
        peer = yield defer.ensureDeferred(self.connect(port, http_post(call("echo"))))
        data = yield peer.lost
        self.assertEqual([s for s, _ in split_responses(data)], [200])
        self.assertEqual(self.counts(), {"idle_timeout": 1.0})

    @defer.inlineCallbacks
    def test_body_too_large_and_bad_requests_counted(self):
        port = yield defer.ensureDeferred(self.serve(max_body_bytes=100))
        big = yield defer.ensureDeferred(self.connect(port, http_post(b"x" * 101)))
        data = yield big.lost
        self.assertEqual(split_responses(data)[0][0], 413)
        garbage = yield defer.ensureDeferred(self.connect(port, b"NOT HTTP AT ALL\r\n\r\n"))
        data = yield garbage.lost
        self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data)
        # A line far over twisted.web's limit, never ended: a 400 too, not a silent close.
        long_line = yield defer.ensureDeferred(
            self.connect(port, b"POST /jsonrpc HTTP/1.1\r\nX-Long: " + b"a" * 40000))
        data = yield long_line.lost
        self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data)
        bad_header = yield defer.ensureDeferred(
            self.connect(port, b"POST /jsonrpc HTTP/1.1\r\nno colon here\r\n\r\n"))
        data = yield bad_header.lost
        self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data)
        self.assertEqual(self.counts(), {"body_too_large": 1.0, "bad_request": 3.0})
        # Still serving.
        self.assertEqual((yield self.client(port).call("echo", {})), "ok")

    @defer.inlineCallbacks
    def test_rate_limited_connections_counted(self):
        port = yield defer.ensureDeferred(
            self.serve(tcp_rate_limits=[{"type": "hour", "limit": 1}]))
        first = yield defer.ensureDeferred(
            self.connect(port, http_post(call("echo"), close=True)))
        data = yield first.lost
        self.assertEqual(split_responses(data)[0][0], 200)
        refused = yield defer.ensureDeferred(self.connect(port, use_tls=False))
        data = yield refused.lost
        self.assertEqual(data, b"")
        self.assertEqual(self.counts(), {"rate_limited": 1.0})


# ------------------------------------------------------------------ EPS listeners


class Raw(Protocol):
    """A bare TLS client that records what it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class EPSListenerTests(TestCase):
    """A running endpoint server's eps_server and jsonrpc_server listeners."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.net = Network(self)
        self.net.operator("hd-1", ["g"])
        self.net.operator("hd-2", ["g"])
        self.node = yield self.net.start("hd-2", [
            server_channel("hd-2", hello_timeout=0.3, max_line_bytes=1024),
            gateway_channel("hd-2", request_timeout=0.3, timeout=5),
        ])
        self.server = self.net.channel("hd-2", "eps_server")
        self.eps_port = self.server.port.getHost().port
        # The connections the listener accepts, to wait for their end.
        self.links: list[EPSConnection] = []
        factory = self.server.port.factory
        while not isinstance(factory, EPSServerFactory):
            factory = factory.wrappedFactory
        build = factory.buildProtocol

        def record(addr: Any) -> Any:
            link = build(addr)
            self.links.append(link)
            return link

        factory.buildProtocol = record

    def refusals(self) -> dict[str, float]:
        from epsproxy.eps.links.session import PEER_REFUSAL_REASONS

        found = {
            reason: self.node.registry.get_sample_value(
                "eps_peer_refusals_total", {"reason": reason})
            for reason in PEER_REFUSAL_REASONS
        }
        self.assertNotIn(None, found.values())  # every reason exported from the start
        return {r: n for r, n in found.items() if n}

    @defer.inlineCallbacks
    def connect(self, block: dict[str, Any] | None, protocol: Protocol) -> Any:
        if block is None:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.eps_port)
        else:
            endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{self.eps_port}", block,
                                           "hd-2")
        client = yield connectProtocol(endpoint, protocol)
        self.addCleanup(lambda: client.transport.connected
                        and client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def wait_links_closed(self):
        yield defer.gatherResults([link.when_closed() for link in self.links])

    @defer.inlineCallbacks
    def test_silent_tcp_connection_closed_within_hello_timeout(self):
        started = reactor.seconds()
        silent = yield self.connect(None, Raw())
        trickling = yield self.connect(None, Raw())
        trickle(self, trickling, b"\x16\x03\x01\x40\x00" + b"\x00" * 200)
        yield silent.lost
        yield trickling.lost
        yield self.wait_links_closed()
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual((silent.received, trickling.received), (b"", b""))
        self.assertEqual(self.refusals(), {"hello_timeout": 2.0})

    @defer.inlineCallbacks
    def test_silent_after_handshake_closed_within_hello_timeout(self):
        silent = yield self.connect(tls_block("hd-1"), Raw())
        yield silent.lost
        yield self.wait_links_closed()
        frames = [wire.parse_frame(json.loads(line)) for line in silent.received.splitlines()]
        self.assertEqual(frames[-1].code, wire.ERR_TIMEOUT)
        self.assertEqual(self.refusals(), {"hello_timeout": 1.0})

    @defer.inlineCallbacks
    def test_foreign_ca_and_garbage_are_handshake_failures(self):
        foreign = yield self.connect(tls_block("hd-1", source="foreign"), Raw())
        yield foreign.lost
        garbage = yield self.connect(None, Raw())
        garbage.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield garbage.lost
        yield self.wait_links_closed()
        self.assertEqual(self.refusals(), {"handshake_failed": 2.0})

    @defer.inlineCallbacks
    def test_unpinned_certificate_is_an_identity_refusal(self):
        unpinned = yield self.connect(tls_block("hd-1", alt=True), Raw())
        yield unpinned.lost
        yield self.wait_links_closed()
        frames = [wire.parse_frame(json.loads(line)) for line in unpinned.received.splitlines()]
        self.assertEqual(frames[-1].code, wire.ERR_IDENTITY)
        self.assertEqual(self.refusals(), {"identity": 1.0})

    @defer.inlineCallbacks
    def test_oversized_and_malformed_lines_counted(self):
        long = yield self.connect(tls_block("hd-1"), Raw())
        long.transport.write(wire.encode(wire.Hello(1, "hd-1")) + b'{"t":"req"' + b" " * 2000)
        yield long.lost
        bad = yield self.connect(tls_block("hd-1"), Raw())
        bad.transport.write(wire.encode(wire.Hello(1, "hd-1")) + b"{not json}\n")
        yield bad.lost
        yield self.wait_links_closed()
        codes = [wire.parse_frame(json.loads(line)).code
                 for peer in (long, bad) for line in peer.received.splitlines()[-1:]]
        self.assertEqual(codes, [wire.ERR_LINE_TOO_LONG, wire.ERR_MALFORMED])
        self.assertEqual(self.refusals(), {"line_too_long": 1.0, "malformed": 1.0})

    @defer.inlineCallbacks
    def test_gateway_slowloris_counted_in_the_eps_registry(self):
        gateway = self.net.channel("hd-2", "jsonrpc_server")
        endpoint = tls.client_endpoint(
            reactor, f"127.0.0.1:{gateway.port.getHost().port}", tls_block("hd-2"), "hd-2")
        slow = Peer(b"POST /jsonrpc HTTP/1.1\r\n")
        yield connectProtocol(endpoint, slow)
        self.addCleanup(lambda: slow.transport.connected and slow.transport.abortConnection())
        trickle(self, slow, b"Host: hd-2\r\nX-Slow: " + b"a" * 200)
        data = yield slow.lost
        self.assertEqual(split_responses(data)[0][0], 408)
        value = self.node.registry.get_sample_value(
            "eps_http_refusals_total", {"reason": "request_timeout"})
        self.assertEqual(value, 1.0)
        self.assertEqual(self.node.registry.get_sample_value(
            "eps_http_refusals_total", {"reason": "idle_timeout"}), 0.0)


class EPSRateLimitTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_rate_limited_peers_counted(self):
        net = Network(self)
        net.operator("hd-2", ["g"])
        node = yield net.start("hd-2", [server_channel(
            "hd-2", hello_timeout=0.3, tcp_rate_limits=[{"type": "hour", "limit": 1}])])
        port = net.channel("hd-2", "eps_server").port.getHost().port
        peers = []
        for _ in range(2):
            peer = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw())
            self.addCleanup(lambda p=peer: p.transport.connected
                            and p.transport.abortConnection())
            peers.append(peer)
        for peer in peers:
            yield peer.lost
        samples = {
            reason: node.registry.get_sample_value("eps_peer_refusals_total",
                                                   {"reason": reason})
            for reason in ("rate_limited", "hello_timeout")
        }
        self.assertEqual(samples, {"rate_limited": 1.0, "hello_timeout": 1.0})


# ------------------------------------------------------------------ public proxy


class PublicProxySilenceTests(TestCase):
    """Silent connections on the public proxy's internal and TLS listeners."""

    timeout = 30

    @defer.inlineCallbacks
    def test_silent_connections_closed_and_counted(self):
        from tests.support.proxies import public_section, write_settings
        from epsproxy.proxy.tap import Options, makeService

        folder = Path(self.mktemp()).absolute()
        section = public_section(folder, 9, read_timeout=0.3, hello_timeout=0.3,
                                 accept_timeout=5)
        options = Options()
        options.parseOptions(["--mode", "public", "--settings",
                              str(write_settings(folder, {"public": section}))])
        top = makeService(options, reactor, exit_on_failure=False)
        proxy = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield proxy.when_ready()
        registry = proxy.registry
        before_timeouts = registry.get_sample_value("proxy_timeouts_total")
        started = reactor.seconds()
        peers = []
        for listener in (ports.internal, ports.tls):
            peer = yield connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getHost().port), Raw())
            self.addCleanup(lambda p=peer: p.transport.connected
                            and p.transport.abortConnection())
            peers.append(peer)
        for peer in peers:
            yield peer.lost
            self.assertEqual(peer.received, b"")
        self.assertLess(reactor.seconds() - started, 4)
        self.assertEqual(registry.get_sample_value("proxy_timeouts_total"),
                         before_timeouts + 1)
        self.assertEqual(registry.get_sample_value("proxy_tls_connections_total",
                                                   {"outcome": "timeouts"}), 1.0)
        # The proxy's own JSON-RPC server has refusal counters too.
        self.assertEqual(registry.get_sample_value("proxy_http_refusals_total",
                                                   {"reason": "request_timeout"}), 0.0)


# ------------------------------------------------------------------ metrics listener


class MetricsListenerTests(TestCase):
    """The plain-HTTP metrics listener had only twisted.web's 12-hour idle timeout."""

    @defer.inlineCallbacks
    def test_slowloris_scrape_gets_408_and_is_counted_while_scrapes_are_served(self):
        from epsproxy.net import metrics

        self.patch(metrics, "METRICS_REQUEST_TIMEOUT", 0.3)
        registry = CollectorRegistry()
        service = metrics.metrics_service(reactor, {"bind_address": "127.0.0.1:0"}, registry)
        service.startService()
        self.addCleanup(service.stopService)
        listening: defer.Deferred[Any] = defer.Deferred()
        # (the service needs its Deferred's result, the port, to stop it: do not consume it)
        service._waitingForPort.addCallback(lambda port: (listening.callback(port), port)[1])
        port = (yield listening).getHost().port
        started = reactor.seconds()
        slow = Peer(b"GET /metrics HTTP/1.1\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), slow)
        self.addCleanup(lambda: slow.transport.connected and slow.transport.abortConnection())
        trickle(self, slow, b"Host: x\r\nX-Slow: " + b"a" * 200)
        # a real scrape is answered meanwhile
        scrape = Peer(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), scrape)
        answer = yield scrape.lost
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:80])
        self.assertIn(b"metrics_http_refusals_total", answer)
        data = yield slow.lost
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data[:80])
        self.assertLess(reactor.seconds() - started, 4)
        self.assertEqual(registry.get_sample_value(
            "metrics_http_refusals_total", {"reason": "request_timeout"}), 1.0)

    def test_a_port_in_use_stops_the_service_from_starting(self):
        from twisted.internet.error import CannotListenError
        from twisted.internet.protocol import Factory

        from epsproxy.net import metrics

        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        address = f"127.0.0.1:{taken.getHost().port}"
        service = metrics.metrics_service(reactor, {"bind_address": address}, CollectorRegistry())
        self.assertRaises(CannotListenError, service.startService)
