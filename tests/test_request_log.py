"""
Request and handshake log lines (issue 12): one ``info`` line per handled JSON-RPC
request with the fields ``caller``, ``method``, ``outcome`` and ``duration``; one line
per failed TLS handshake with the blurred peer, the listener and the reason, rate
limited with a summary line; access log lines with blurred addresses.  Over real
loopback sockets, with log events captured from the global publisher.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from epsproxy.net import tls
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import Dispatcher, JSONRPCError
from epsproxy.net.jsonrpc.server import (
    JSONRPC_SERVER_SETTINGS,
    GuardedSite,
    JSONRPCListener,
    jsonrpc_site,
)
from tests.support.tls import ServerFactory, tls_block


class Captured:
    """Log events seen by the global publisher while a test runs."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for entry in list(self._waiting):
            if entry[0](event):
                self._waiting.remove(entry)
                entry[1].callback(event)

    def matching(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if text in (e.get("log_format") or "")]

    def wait_for(self, check: Callable[[dict[str, Any]], bool]) -> defer.Deferred:
        for event in self.events:
            if check(event):
                return defer.succeed(event)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((check, d))
        return d


def _handshake_line(event: dict[str, Any]) -> bool:
    return "failed TLS handshake on" in (event.get("log_format") or "")


class RequestLines(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def serve(self, **settings: Any) -> Any:
        dispatcher = Dispatcher()
        dispatcher.register("echo", None, lambda params, context: params)

        def refuse(params: Any, context: Any) -> Any:
            raise JSONRPCError(403, "no")

        dispatcher.register("refuse", None, refuse)
        validated = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0", **settings})
        site = jsonrpc_site(dispatcher, validated, reactor=reactor)
        port = yield JSONRPCListener(reactor, site, validated, name="test").listen()
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def client(self, url: str, **settings: Any) -> JSONRPCClient:
        client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(
            {"endpoint": url, "timeout": 5, **settings}))
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_one_info_line_per_request_with_the_callers_certificate_name(self):
        log = Captured(self)
        port = yield self.serve(tls=tls_block("sd-1"))
        client = self.client(f"https://127.0.0.1:{port}/jsonrpc", tls=tls_block("hd-2"),
                             server_name="sd-1")
        yield client.call("echo", {"a": 1})
        with self.assertRaises(JSONRPCError):
            yield client.call("refuse", {})
        lines = log.matching("JSON-RPC {method} from {caller}")
        self.assertEqual([(e["caller"], e["method"], e["outcome"]) for e in lines],
                         [("hd-2", "echo", "ok"), ("hd-2", "refuse", "error 403")])
        for event in lines:
            self.assertEqual(event["log_level"], LogLevel.info)
            self.assertIsInstance(event["duration"], float)
            self.assertGreaterEqual(event["duration"], 0)
        self.assertIn("JSON-RPC echo from hd-2: ok in", formatEvent(lines[0]))

    @defer.inlineCallbacks
    def test_without_a_client_certificate_the_caller_is_a_dash(self):
        log = Captured(self)
        port = yield self.serve()
        yield self.client(f"http://127.0.0.1:{port}/jsonrpc").call("echo", {})
        [line] = log.matching("JSON-RPC {method} from {caller}")
        self.assertEqual((line["caller"], line["method"], line["outcome"]), ("-", "echo", "ok"))

    def test_access_log_lines_of_any_guarded_site_blur_the_address(self):
        site = GuardedSite(Factory())  # the metrics listener's kind of site
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", "192.168.1.1", 40000)
        request.code, request.sentLength, request.clientproto = 200, 0, b"HTTP/1.1"
        line = site._logFormatter("[01/Jan/2026:00:00:00 +0000]", request)
        self.assertNotIn("192.168.1.1", line)
        self.assertIn('"192.168.x.x"', line)


class HandshakeLines(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def listen(self, failures: tls.HandshakeFailures | None = None) -> Any:
        tcp = tls.listen_endpoint(reactor, "127.0.0.1:0", None)
        endpoint = tls.TLSServerEndpoint(
            tcp, tls.ReloadableServerOptions(tls_block("sd-1")),
            failures=failures, name="test-listener", clock=reactor)
        port = yield endpoint.listen(ServerFactory())
        self.addCleanup(port.stopListening)
        self.port = port
        return f"127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def tls_client(self, address: str, block: dict[str, Any]) -> Any:
        endpoint = tls.client_endpoint(reactor, address, block, "sd-1")
        protocol = yield endpoint.connect(Factory.forProtocol(Protocol))
        self.addCleanup(protocol.transport.abortConnection)

    @defer.inlineCallbacks
    def garbage(self, address: str) -> Any:
        port = int(address.rsplit(":", 1)[1])
        protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Protocol))
        protocol.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.addCleanup(protocol.transport.abortConnection)

    @defer.inlineCallbacks
    def test_no_client_certificate(self):
        log = Captured(self)
        address = yield self.listen()
        yield self.tls_client(address, tls_block(None))
        event = yield log.wait_for(_handshake_line)
        self.assertEqual(
            (event["listener"], event["peer"], event["reason"]),
            ("test-listener", "127.0.x.x", "no client certificate"))

    @defer.inlineCallbacks
    def test_certificate_from_another_ca(self):
        log = Captured(self)
        address = yield self.listen()
        block = tls_block("hd-1", source="foreign")
        block["ca_certificate_files"] = tls_block()["ca_certificate_files"]
        yield self.tls_client(address, block)
        event = yield log.wait_for(_handshake_line)
        self.assertEqual(event["reason"], "unknown CA")

    @defer.inlineCallbacks
    def test_not_tls(self):
        log = Captured(self)
        address = yield self.listen()
        yield self.garbage(address)
        event = yield log.wait_for(_handshake_line)
        self.assertEqual(event["reason"], "not TLS or an unsupported TLS version")
        self.assertEqual(event["peer"], "127.0.x.x")
        self.assertIn("failed TLS handshake on test-listener from 127.0.x.x",
                      formatEvent(event))

    @defer.inlineCallbacks
    def test_a_flood_is_summarised(self):
        log = Captured(self)
        done: defer.Deferred = defer.Deferred()

        class Counting(tls.HandshakeFailures):
            def failed(self, peer: str, reason: str) -> None:
                super().failed(peer, reason)
                if self.count == 6 and not done.called:
                    done.callback(None)

        address = yield self.listen(Counting(reactor, "test-listener", limit=2))
        for _ in range(6):
            yield self.garbage(address)
        yield done
        self.assertEqual(len([e for e in log.events if _handshake_line(e)]), 2)
        yield self.port.stopListening()  # the listener stops: the summary is written now
        [summary] = log.matching("... and {count} more")
        self.assertEqual((summary["count"], summary["listener"]), (4, "test-listener"))


class HandshakeRateLimit(TestCase):
    """The rate limit of the lines, on a Clock."""

    def test_limit_per_period_then_one_summary_then_a_new_period(self):
        log = Captured(self)
        clock = Clock()
        failures = tls.HandshakeFailures(clock, "peers", limit=3, period=60)
        for _ in range(10):
            failures.failed("192.0.2.7", "not TLS")
        lines = [e for e in log.events if _handshake_line(e)]
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[0]["peer"], "192.0.x.x")
        self.assertEqual(log.matching("... and {count} more"), [])
        clock.advance(60)
        [summary] = log.matching("... and {count} more")
        self.assertEqual(summary["count"], 7)
        self.assertIn("... and 7 more in the last 60 s", formatEvent(summary))
        failures.failed("2001:db8::1", "unknown CA")
        lines = [e for e in log.events if _handshake_line(e)]
        self.assertEqual((len(lines), lines[-1]["peer"]), (4, "2001:db8::/32"))
        self.assertEqual(failures.count, 11)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reasons_from_openssl_errors(self):
        from OpenSSL import SSL
        from twisted.python.failure import Failure

        def reason(text: str) -> str:
            error = SSL.Error([("SSL routines", "", text)])
            return tls.handshake_failure_reason(Failure(error), True)

        self.assertEqual(reason("peer did not return a certificate"), "no client certificate")
        self.assertEqual(reason("tlsv13 alert certificate required"), "no client certificate")
        self.assertEqual(reason("certificate verify failed"), "unknown CA")
        self.assertEqual(reason("wrong version number"), "not TLS or an unsupported TLS version")
        self.assertEqual(reason("no shared cipher"), "no shared cipher")
        self.assertEqual(reason("something new"), "TLS error: something new")
        self.assertEqual(reason("x" * 500), "TLS error: " + "x" * 189)
        self.assertEqual(tls.handshake_failure_reason(None, False),
                         "closed before sending anything")
        self.assertEqual(tls.handshake_failure_reason(Failure(ValueError("odd")), True),
                         "closed during the handshake")
        # Hostile shapes of an SSL.Error do not break the reason.
        self.assertEqual(tls.handshake_failure_reason(Failure(SSL.Error()), True), "TLS error")
        self.assertEqual(tls.handshake_failure_reason(Failure(SSL.Error(["odd"])), True),
                         "TLS error")
