"""
The status pages' machinery (epsproxy.net.pages) on plain values and a Clock: query
parameters (malformed, oversized, repeated, hostile), the ring buffer and the sampler,
sparklines, escaping, a failing section; and the metrics listener's settings (loopback
only without tls) and its mutual TLS over real sockets.
"""

from __future__ import annotations

from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.template import tags

from epsproxy.net import tls
from epsproxy.net.metrics import METRICS_SETTINGS, is_loopback, metrics_service
from epsproxy.net.pages import (
    REFRESH,
    IntParameter,
    PageElement,
    PageError,
    RecentEvents,
    RingBuffer,
    Sampler,
    Series,
    counter_by,
    counter_total,
    format_age,
    parse_parameters,
    render_page,
    section,
    sparkline,
    table,
)
from epsproxy.rules import forms
from tests.support.metrics import request, start_listener
from tests.support.pages import serve_page
from tests.support.tls import tls_block

PAGE = IntParameter("page", 1, 100, 1)


class Parameters(TestCase):
    def parse(self, **args: Any) -> dict[str, int]:
        raw = {k.encode(): [v.encode() if isinstance(v, str) else v for v in values]
               for k, values in args.items()}
        return parse_parameters(raw, [REFRESH, PAGE])

    def test_defaults_and_values(self):
        self.assertEqual(self.parse(), {"refresh": 0, "page": 1})
        self.assertEqual(self.parse(page=["7"], refresh=["60"]), {"refresh": 60, "page": 7})
        self.assertEqual(self.parse(page=["0100"]), {"refresh": 0, "page": 100})

    def test_bad_values(self):
        for value in ("0", "101", "-1", "+1", "1.0", "1e2", "", " 1", "x", "１",
                      "9" * 10, "<script>"):
            with self.assertRaises(PageError, msg=value) as e:
                self.parse(page=[value])
            self.assertNotIn("<", str(e.exception))

    def test_unknown_and_repeated(self):
        with self.assertRaises(PageError) as e:
            parse_parameters({b"<>": [b"1"]}, [PAGE])
        self.assertEqual(str(e.exception), "unknown parameter '\\x3c\\x3e' (accepted: page)")
        with self.assertRaisesRegex(PageError, "accepted: page"):
            parse_parameters({b"pages": [b"1"]}, [PAGE])
        with self.assertRaisesRegex(PageError, "given 2 times"):
            self.parse(page=["1", "2"])
        with self.assertRaisesRegex(PageError, r"\.\.\.'"):
            parse_parameters({b"a" * 1000: [b"1"]}, [PAGE])


class History(TestCase):
    def test_ring_buffer_keeps_the_last(self):
        ring = RingBuffer(3)
        for v in range(5):
            ring.append(float(v))
        self.assertEqual(ring.values(), [2.0, 3.0, 4.0])
        self.assertEqual(len(ring), 3)
        with self.assertRaises(ValueError):
            RingBuffer(0)

    def test_sampler_rates_gauges_failures_and_stop(self):
        clock = Clock()
        state = {"count": 0.0, "gauge": 5.0}

        def broken() -> float:
            raise RuntimeError("gone")

        sampler = Sampler(clock, [
            Series("rate", lambda: state["count"], counter=True),
            Series("gauge", lambda: state["gauge"]),
            Series("broken", broken),
        ], interval=10, history=30)
        sampler.startService()
        self.assertEqual(sampler.values("rate"), [])  # a rate needs two samples
        self.assertEqual(sampler.values("gauge"), [5.0])
        state["count"] = 50.0
        clock.advance(10)
        self.assertEqual(sampler.values("rate"), [5.0])
        state["count"] = 20.0  # a counter reset is not a negative rate
        clock.advance(10)
        self.assertEqual(sampler.values("rate"), [5.0, 0.0])
        for _ in range(5):
            clock.advance(10)
        self.assertEqual(len(sampler.values("gauge")), 3)  # an hour of 10 s is 360; here 3
        self.assertEqual(sampler.values("broken"), [0.0, 0.0, 0.0])
        self.assertEqual(sampler.values("nonesuch"), [])
        sampler.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        self.assertEqual(len(sampler.values("gauge")), 3)

    def test_recent_events_are_bounded_and_cut(self):
        clock = Clock()
        events = RecentEvents(clock, size=2)
        for name in ("a", "b", "c" * 1000):
            clock.advance(1)
            events.add(name)
        newest = events.newest_first()
        self.assertEqual([e.at for e in newest], [3.0, 2.0])
        self.assertEqual(len(newest[0].what), 303)


class Pieces(TestCase):
    def flat(self, tag: Any) -> str:
        element = PageElement("t", [tag], readiness=None, now=0)
        return render_page(element).decode()

    def test_text_is_escaped_everywhere(self):
        html = self.flat(section("<h2>", table(("<th>",), [("<script>x</script>", None)]),
                                 tags.p("a & b", title='"quoted"')))
        self.assertNotIn("<script>", html)
        self.assertIn("&lt;script&gt;x&lt;/script&gt;", html)
        self.assertIn("&lt;th&gt;", html)
        self.assertIn("a &amp; b", html)
        self.assertIn('title="&quot;quoted&quot;"', html)
        self.assertIn("<td>-</td>", html)  # None

    def test_long_cells_are_cut(self):
        html = self.flat(table(("h",), [("x" * 5000,)]))
        self.assertIn("x" * 300 + "...", html)
        self.assertNotIn("x" * 301, html)

    def test_empty_table(self):
        self.assertIn('<p class="empty">nothing here</p>',
                      self.flat(table(("h",), [], empty="nothing here")))

    def test_layout(self):
        def readiness() -> Mapping[str, str]:
            return {"<store>": "down"}

        html = render_page(PageElement("Title <x>", [], readiness=readiness, now=0,
                                       refresh=30)).decode()
        self.assertTrue(html.startswith("<!DOCTYPE html>"))
        self.assertIn('<meta name="viewport" content="width=device-width, initial-scale=1"',
                      html)
        self.assertIn('<meta http-equiv="refresh" content="30"', html)
        self.assertIn("<title>Title &lt;x&gt;</title>", html)
        self.assertIn("not ready", html)
        self.assertIn("&lt;store&gt;", html)
        self.assertIn("@media print", html)
        self.assertIn("1970-01-01 00:00:00 UTC", html)

    def test_sparkline(self):
        empty = self.flat(sparkline([], label="calls"))
        self.assertIn('aria-label="calls"', empty)
        self.assertNotIn("polyline", empty)
        line = self.flat(sparkline([0, 5, 10], width=100, height=20))
        self.assertIn('<polyline points="0.0,18.0 50.0,10.0 100.0,2.0"', line)
        flat = self.flat(sparkline([0, 0]))
        self.assertIn("polyline", flat)

    def test_format_age(self):
        self.assertEqual([format_age(s) for s in (None, 5, 130, 7300, 200000, -5)],
                         ["-", "5 s", "2 min", "2 h", "2 d", "in 5 s"])

    def test_counters_of_a_registry(self):
        registry = CollectorRegistry()
        c = Counter("x_calls", "calls", ["outcome"], registry=registry)
        c.labels("ok").inc(3)
        c.labels("denied").inc(2)
        self.assertEqual(counter_total(registry, "x_calls_total"), 5)
        self.assertEqual(counter_total(registry, "x_calls_total",
                                       lambda labels: labels["outcome"] != "ok"), 2)
        self.assertEqual(counter_by(registry, "x_calls_total", "outcome"),
                         {"ok": 3, "denied": 2})
        self.assertEqual(counter_total(registry, "nothing_total"), 0)


class _Failing:
    title = "failing"
    parameters = ()
    sampler = None

    def sections(self, parameters: Mapping[str, int]) -> list[Any]:
        raise RuntimeError("secret detail")


class PageOverSockets(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_a_failing_page_is_a_500_without_details(self):
        port = yield serve_page(self, CollectorRegistry(), _Failing())
        answer = yield request(port, "/")
        self.assertEqual(answer.status, 500)
        self.assertNotIn(b"secret", answer.body)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_oversized_query_is_400(self):
        port = yield serve_page(self, CollectorRegistry(), _Failing())
        answer = yield request(port, "/?refresh=1&" + "a" * 300)
        self.assertEqual(answer.status, 400)
        self.assertIn(b"longer than", answer.body)


class MetricsSettings(TestCase):
    def test_loopback(self):
        for address in ("localhost:2112", "127.0.0.1:0", "127.1.2.3:9", "[::1]:2112"):
            self.assertTrue(is_loopback(address), address)
        for address in (":2112", "0.0.0.0:2112", "10.0.0.1:2112", "[::]:2112",
                        "example.com:2112"):
            self.assertFalse(is_loopback(address), address)

    def test_off_loopback_needs_mutual_tls(self):
        self.assertEqual(METRICS_SETTINGS.validate({"bind_address": "localhost:2112"}),
                         {"bind_address": "localhost:2112"})
        with self.assertRaises(forms.FormError) as e:
            METRICS_SETTINGS.validate({"bind_address": "0.0.0.0:2112"})
        self.assertEqual(str(e.exception).count("\n"), 0)
        self.assertIn("not a loopback address: add a tls block", str(e.exception))
        with self.assertRaisesRegex(forms.FormError, "verify_client must stay true"):
            METRICS_SETTINGS.validate({"bind_address": "0.0.0.0:2112",
                                       "tls": tls_block("hd-1", verify_client=False)})
        with self.assertRaisesRegex(forms.FormError, "bind_address"):
            METRICS_SETTINGS.validate({"bind_address": "no port"})
        with self.assertRaises(forms.FormError):
            METRICS_SETTINGS.validate({"bind_address": "localhost:1", "tls": {"x": 1}})
        settings = METRICS_SETTINGS.validate({"bind_address": "0.0.0.0:2112",
                                              "tls": tls_block("hd-1")})
        self.assertTrue(settings["tls"]["verify_client"])


class _Get(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


class MutualTLSListener(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        settings = METRICS_SETTINGS.validate({"bind_address": "127.0.0.1:0",
                                              "tls": tls_block("hd-1")})
        service = metrics_service(reactor, settings, CollectorRegistry(), program="eps")
        self.port = yield start_listener(self, service)

    @defer.inlineCallbacks
    def get(self, client_tls: dict[str, Any]) -> Any:
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{self.port}", client_tls, "hd-1")
        protocol = yield endpoint.connect(Factory.forProtocol(_Get))
        received = yield protocol.done
        return received

    @defer.inlineCallbacks
    def test_page_over_mutual_tls(self):
        received = yield self.get(tls_block("hd-2"))
        self.assertTrue(received.startswith(b"HTTP/1.0 200"), received[:100])
        self.assertIn(b"eps status", received)

    @defer.inlineCallbacks
    def test_no_client_certificate_gets_nothing(self):
        received = yield self.get(tls_block(None))
        self.assertEqual(received, b"")


class DemoURLs(TestCase):
    def test_every_dev_role_has_its_page_url(self):
        from epsproxy.dev.demo import page_urls

        urls = dict(page_urls())
        self.assertEqual(urls["hd-1"], "http://localhost:2112/")
        self.assertEqual(urls["sd-1"], "http://localhost:2111/")
        self.assertEqual(len(urls), 8)


class _Sampled:
    title = "sampled"
    parameters = ()

    def __init__(self) -> None:
        self.sampler = Sampler(reactor, [Series("n", lambda: 1.0)], interval=3600)

    def sections(self, parameters: Mapping[str, int]) -> list[Any]:
        return [self.sampler.sparklines()]


class SamplerLivesWithTheListener(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_started_and_stopped_with_the_metrics_listener(self):
        page = _Sampled()
        service = metrics_service(reactor, {"bind_address": "127.0.0.1:0"},
                                  CollectorRegistry(), page=page)
        self.assertFalse(page.sampler.running)
        port = yield start_listener(self, service)
        self.assertTrue(page.sampler.running)
        self.assertEqual(page.sampler.values("n"), [1.0])  # sampled at start
        answer = yield request(port, "/")
        self.assertIn(b"n: 1 (peak 1)", answer.body)
        yield service.stopService()
        self.assertFalse(page.sampler.running)
        self.assertIsNone(page.sampler._loop)
