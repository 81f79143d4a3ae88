"""
``/healthz`` and ``/readyz`` on the metrics listener (issue 12, item 4), over real
loopback sockets: the answers of a fake readiness, the routes (404, 405, HEAD), a
readiness that raises, and a real endpoint server whose ``/readyz`` goes from 503 to
200 as it starts.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from epsproxy.eps.service import EndpointServerService
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.net.health import readiness_report
from epsproxy.net.metrics import metrics_service
from tests.support.eps import Network, gateway_channel, server_channel
from tests.support.metrics import request, start_listener

JSON = "application/json; charset=utf-8"


class FakeReadiness:
    """A readiness that answers what the test sets, or raises ``error``."""

    def __init__(self) -> None:
        self.checks: dict[str, str] = {}
        self.error: Exception | None = None
        self.asked = 0

    def __call__(self) -> dict[str, str]:
        self.asked += 1
        if self.error is not None:
            raise self.error
        return dict(self.checks)


class HealthEndpoints(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self) -> None:
        self.readiness = FakeReadiness()
        self.registry = CollectorRegistry()
        service = metrics_service(reactor, {"bind_address": "127.0.0.1:0"}, self.registry,
                                  program="eps", readiness=self.readiness)
        self.port = yield start_listener(self, service)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    @defer.inlineCallbacks
    def test_healthz_is_ok_even_when_not_ready(self):
        self.readiness.checks = {"start": "starting"}
        answer = yield request(self.port, "/healthz")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header(b"content-type"), JSON)
        self.assertEqual(answer.json(), {"status": "ok"})

    @defer.inlineCallbacks
    def test_readyz_is_503_with_the_checks_then_200(self):
        self.readiness.checks = {"start": "starting", "directory": "no entry for hd-1"}
        answer = yield request(self.port, "/readyz")
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.header(b"content-type"), JSON)
        self.assertEqual(answer.header(b"cache-control"), "no-store")
        self.assertEqual(answer.json(), {
            "status": "not ready",
            "checks": {"start": "starting", "directory": "no entry for hd-1"},
        })
        self.readiness.checks = {}
        answer = yield request(self.port, "/readyz")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.json(), {"status": "ready", "checks": {}})
        # asked afresh on every probe, never cached
        self.assertEqual(self.readiness.asked, 2)

    @defer.inlineCallbacks
    def test_a_query_string_does_not_change_the_route(self):
        answer = yield request(self.port, "/readyz?verbose=1")
        self.assertEqual(answer.status, 200)

    @defer.inlineCallbacks
    def test_a_readiness_that_raises_is_a_failed_check_logged_once(self):
        self.readiness.error = RuntimeError("store handle is gone")
        for _ in range(3):
            answer = yield request(self.port, "/readyz")
            self.assertEqual(answer.status, 503)
            self.assertEqual(answer.json(), {
                "status": "not ready",
                "checks": {"readiness": "RuntimeError: store handle is gone"},
            })
        lines = [e for e in self.logged
                 if e.get("log_format", "").startswith("the readiness check failed")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["error"], "RuntimeError: store handle is gone")
        # recovers
        self.readiness.error = None
        answer = yield request(self.port, "/readyz")
        self.assertEqual(answer.status, 200)

    @defer.inlineCallbacks
    def test_access_log_lines_blur_the_client_address(self):
        yield request(self.port, "/healthz")
        lines = [formatEvent(e) for e in self.logged]
        access = [line for line in lines if '"GET /healthz HTTP/1.1" 200' in line]
        self.assertEqual(len(access), 1, lines)
        self.assertIn('"127.0.x.x"', access[0])
        self.assertNotIn("127.0.0.1", access[0])

    @defer.inlineCallbacks
    def test_metrics_on_metrics_and_a_status_page_at_the_root(self):
        answer = yield request(self.port, "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.header(b"content-type").startswith("text/plain"))
        self.assertIn(b"eps_build_info", answer.body)
        self.readiness.checks = {"start": "starting"}
        answer = yield request(self.port, "/")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header(b"content-type"), "text/html; charset=utf-8")
        self.assertEqual(answer.header(b"cache-control"), "no-store")
        self.assertIn("default-src 'none'", answer.header(b"content-security-policy"))
        self.assertTrue(answer.body.startswith(b"<!DOCTYPE html>"))
        self.assertIn(b"eps status", answer.body)
        self.assertIn(b"not ready", answer.body)  # the readiness, asked afresh
        self.assertIn(b"starting", answer.body)
        self.assertNotIn(b"eps_build_info", answer.body)

    @defer.inlineCallbacks
    def test_bad_page_parameters_are_400(self):
        for query in ("refresh=x", "refresh=-1", "refresh=3601", "refresh=1&refresh=2",
                      "nosuch=1", "refresh=", "refresh=99999999999", "refresh=" + "1" * 300,
                      "%3Cscript%3E=1"):
            answer = yield request(self.port, "/?" + query)
            self.assertEqual(answer.status, 400, query)
            self.assertEqual(answer.header(b"content-type"), "text/plain; charset=utf-8")
            self.assertTrue(answer.body.startswith(b"bad page parameter: ")
                            or b"query string longer" in answer.body, query)
        answer = yield request(self.port, "/?refresh=10")
        self.assertEqual(answer.status, 200)
        self.assertIn(b'<meta http-equiv="refresh" content="10"', answer.body)

    @defer.inlineCallbacks
    def test_other_paths_are_404(self):
        for path in ("/metricsx", "/healthz/", "/readyz/x", "/metrics/", "/favicon.ico",
                     "/%2e%2e/healthz", "//healthz"):
            answer = yield request(self.port, path)
            self.assertEqual(answer.status, 404, path)
            self.assertEqual(answer.json(), {"message": "not found"}, path)

    @defer.inlineCallbacks
    def test_other_methods_are_405(self):
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
            for path in ("/readyz", "/metrics"):
                answer = yield request(self.port, path, method)
                self.assertEqual(answer.status, 405, (method, path))
                self.assertEqual(answer.header(b"allow"), "GET, HEAD")
        self.assertEqual(self.readiness.asked, 0)  # a refused method asks nothing

    @defer.inlineCallbacks
    def test_head_has_the_status_and_length_without_a_body(self):
        self.readiness.checks = {"start": "starting"}
        get = yield request(self.port, "/readyz")
        head = yield request(self.port, "/readyz", b"HEAD")
        self.assertEqual((head.status, head.body), (503, b""))
        self.assertEqual(head.header(b"content-length"), str(len(get.body)))
        head = yield request(self.port, "/healthz", b"HEAD")
        self.assertEqual((head.status, head.body), (200, b""))
        head = yield request(self.port, "/metrics", b"HEAD")
        self.assertEqual((head.status, head.body), (200, b""))


class ReadinessReport(TestCase):
    """The report itself, for answers a real service would not give."""

    def test_no_readiness_is_ready(self):
        self.assertEqual(readiness_report(None),
                         (200, {"status": "ready", "checks": {}}, None))

    def test_not_a_mapping_is_a_failed_check(self):
        status, body, error = readiness_report(lambda: ["start"])  # type: ignore[arg-type,return-value]  # hostile answer on purpose
        self.assertEqual(status, 503)
        self.assertEqual(error, "TypeError: readiness() returned list, not a mapping")
        self.assertEqual(body["checks"], {"readiness": error})

    def test_huge_answers_are_cut(self):
        checks = {f"check-{i}" * 100: "x" * 10_000 for i in range(500)}
        status, body, _ = readiness_report(lambda: checks)
        self.assertEqual(status, 503)
        self.assertEqual(len(body["checks"]), 50)
        self.assertTrue(all(len(k) <= 500 and len(v) <= 500
                            for k, v in body["checks"].items()))

    def test_values_that_are_not_text_become_text(self):
        status, body, _ = readiness_report(lambda: {"store": 3})  # type: ignore[dict-item]  # hostile answer on purpose
        self.assertEqual((status, body["checks"]), (503, {"store": "3"}))


class EndpointServerReadiness(TestCase):
    """A real endpoint server's readiness, served by the metrics listener."""

    timeout = 30

    @defer.inlineCallbacks
    def test_readyz_goes_from_503_to_200_as_the_node_starts(self):
        net = Network(self)
        net.operator("hd-1", ["health-departments"])
        settings = EPS_SETTINGS.validate({
            "name": "hd-1",
            "directory": {"type": "json", "settings": {"path": str(net.folder),
                                                       "reload_interval": 0}},
            "channels": [server_channel("hd-1"), gateway_channel("hd-1")],
        })
        registry = CollectorRegistry()
        node = EndpointServerService(reactor, settings, registry)
        port = yield start_listener(self, metrics_service(
            reactor, {"bind_address": "127.0.0.1:0"}, registry, program="eps",
            readiness=node.readiness,
        ))
        answer = yield request(port, "/readyz")
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.json()["checks"].get("start"), "starting")
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        yield node.when_ready()
        answer = yield request(port, "/readyz")
        self.assertEqual((answer.status, answer.json()),
                         (200, {"status": "ready", "checks": {}}))
        yield node.stopService()
        answer = yield request(port, "/readyz")
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.json()["checks"].get("stop"), "stopping")
