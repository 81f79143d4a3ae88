"""
Prometheus metrics: a per-service registry served over plain HTTP, with the health
endpoints next to it.

Each program builds its own ``CollectorRegistry`` (never the global one, so tests can
run several services in one process) and serves it on ``metrics.bind_address``:
``/metrics`` the exposition (:class:`MetricsResource`), ``/`` the program's read-only
status page (:mod:`epsproxy.net.pages`), ``/healthz`` and ``/readyz`` the health answers
(:mod:`epsproxy.net.health`), any other path 404 and any method but GET and HEAD 405
(:class:`ListenerResource`, the one routing table).  The listener is plain HTTP on a
loopback address; bound anywhere else it needs a ``tls`` block and then requires a
verified client certificate (mutual TLS), or the settings are refused.
:func:`metrics_service` also registers the process metrics and
``<program>_build_info{version}``, and turns off the ``_created`` series.
``prometheus_client.twisted`` is avoided on purpose: it grabs the global reactor.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from epsproxy import __version__
from epsproxy.rules import forms
from epsproxy.net.health import HealthResource, Readiness, ReadinessResource, readiness_report
from epsproxy.net.hostport import parse_host_port
from epsproxy.net.jsonrpc.server import REFUSAL_REASONS, GuardedSite, json_body
from epsproxy.net.pages import IntParameter, PageResource, Sampler, StatusPage, key_values, section
from epsproxy.net.reactor import IReactor
from epsproxy.net.tls import TLS_SETTINGS, listen_endpoint

log = Logger()

__all__ = [
    "METRICS_SETTINGS",
    "HTTP_REFUSAL_REASONS",
    "ListenerResource",
    "ListenerService",
    "MetricsResource",
    "PlainPage",
    "RPCMetrics",
    "build_info",
    "listener_resource",
    "http_refusals_counter",
    "is_loopback",
    "metrics_service",
]

#: A scrape's request must be whole within this many seconds (slowloris).
METRICS_REQUEST_TIMEOUT = 10.0
#: Keep-alive scrape connections idle this long are closed.
METRICS_IDLE_TIMEOUT = 60.0
#: Scrapes are GETs: any body over this is refused.
METRICS_MAX_BODY_BYTES = 4096


def is_loopback(bind_address: str) -> bool:
    """Whether ``bind_address`` (``host:port``) listens on a loopback address only."""
    host, _ = parse_host_port(bind_address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # all interfaces (""), or a name: not loopback


def _check_metrics(settings: dict[str, Any]) -> dict[str, Any]:
    try:
        loopback = is_loopback(settings["bind_address"])
    except ValueError as e:
        raise forms.FormError(str(e), ("bind_address",)) from None
    tls = settings.get("tls")
    if tls is not None and not tls["verify_client"]:
        raise forms.FormError("the metrics listener requires client certificates "
                              "(verify_client must stay true)", ("tls", "verify_client"))
    if not loopback and tls is None:
        raise forms.FormError(
            f"{settings['bind_address']!r} is not a loopback address: add a tls block "
            "(the status page and metrics then require a client certificate)",
            ("bind_address",))
    return settings


METRICS_SETTINGS = forms.Check(forms.Map(
    {
        "bind_address": forms.Required(
            forms.String(min_length=1),
            doc="host:port of the metrics, health and status page listener (loopback "
                "unless tls is given)"),
        "tls": forms.Optional(
            TLS_SETTINGS,
            doc="serve over mutual TLS (required when bind_address is not loopback)"),
    },
    strict=True,
), _check_metrics)


#: Default ``program`` of :func:`metrics_service` (the taps pass "sd", "eps", "proxy").
DEFAULT_PROGRAM = "epsproxy"

_METRIC_PREFIX = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class MetricsResource(Resource):
    """Serves the text exposition of one registry."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)

    render_HEAD = render_GET


@implementer(IStreamServerEndpoint)
class _Announced:
    """An endpoint that logs where the metrics listener listens once it does."""

    def __init__(self, endpoint: IStreamServerEndpoint, program: str) -> None:
        self.endpoint = endpoint
        self.program = program

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        def listening(port: Any) -> Any:
            address = port.getHost()
            log.info("{program} metrics listener on {host}:{port} (/, /metrics, /healthz,"
                     " /readyz)", program=self.program, host=address.host, port=address.port)
            return port

        return self.endpoint.listen(factory).addCallback(listening)


class ListenerService(StreamServerEndpointService):
    """
    A ``StreamServerEndpointService`` that, with ``fail_loudly`` (the default), lets a
    failure to listen raise out of ``startService``, so that ``twistd`` stops with the
    error (a port in use, a bad address) instead of logging it and running without the
    listener.  Twisted keeps this choice in an attribute it does not document as public;
    this class is the one place that sets it, on itself, at construction.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, *,
        fail_loudly: bool = True, companions: Sequence[IService] = (),
    ) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = fail_loudly
        #: Services living as long as the listener (the status page's sampler).
        self.companions = tuple(companions)

    def startService(self) -> None:
        super().startService()
        for companion in self.companions:
            companion.startService()

    def stopService(self) -> Deferred[None]:
        for companion in self.companions:
            if companion.running:
                companion.stopService()
        return super().stopService()


class ListenerResource(Resource):
    """
    The metrics listener's routes: exact paths (a query string is ignored) to the
    resources that answer them; any other path 404, any method but GET and HEAD 405.
    Answers say ``Cache-Control: no-store``: a probe must never see a stale answer.
    """

    isLeaf = True

    def __init__(self, routes: Mapping[bytes, Resource]) -> None:
        super().__init__()
        self.routes = dict(routes)

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        target = self.routes.get(request.path)
        if target is None:
            return json_body(request, 404, {"message": "not found"})
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return json_body(request, 405, {"message": "method not allowed, use GET"})
        return target.render(request)


class PlainPage:
    """The status page of a program that has none of its own: where to look instead."""

    parameters: Sequence[IntParameter] = ()
    sampler: Sampler | None = None

    def __init__(self, program: str) -> None:
        self.title = f"{program} status"

    def sections(self, parameters: Mapping[str, int]) -> list[Any]:
        return [section("This process", key_values([
            ("version", __version__), ("metrics", "/metrics (Prometheus text)")]))]


def listener_resource(
    registry: CollectorRegistry, readiness: Readiness | None = None,
    page: StatusPage | None = None, *, reactor: IReactor | None = None,
    program: str = DEFAULT_PROGRAM,
) -> ListenerResource:
    """
    The routes of the metrics listener (see :class:`ListenerResource`); ``page`` is the
    program's status page at ``/`` (:class:`PlainPage` if None), ``reactor`` its clock.
    """
    clock: Any = reactor
    if clock is None:
        from twisted.internet import reactor as clock  # the installed one (tests)
    metrics = MetricsResource(registry)
    return ListenerResource({
        b"/": PageResource(page or PlainPage(program), clock, readiness),
        b"/metrics": metrics,
        b"/healthz": HealthResource(),
        b"/readyz": ReadinessResource(readiness),
    })


def build_info(registry: CollectorRegistry, program: str) -> Gauge:
    """``<program>_build_info{version}`` = 1, with this package's version."""
    gauge = Gauge(f"{program}_build_info", "the running epsproxy version (always 1)",
                  ["version"], registry=registry)
    gauge.labels(__version__).set(1)
    return gauge


def ready_gauge(registry: CollectorRegistry, program: str,
                readiness: Readiness | None) -> Gauge:
    """``<program>_ready``: 1 while ``/readyz`` would answer 200, else 0 (read at scrape)."""
    gauge = Gauge(f"{program}_ready", "1 while /readyz answers 200 (ready), else 0",
                  registry=registry)
    gauge.set_function(lambda: 1.0 if readiness_report(readiness)[0] == 200 else 0.0)
    return gauge


def metrics_service(
    reactor: IReactor, settings: dict, registry: CollectorRegistry, *,
    program: str = DEFAULT_PROGRAM, readiness: Readiness | None = None,
    page: StatusPage | None = None,
) -> IService:
    """
    A service listening on ``settings["bind_address"]`` (plain HTTP, or mutual TLS with a
    ``tls`` block) for scrapes, health probes and the status page ``page`` (see the
    module docstring; its sampler runs while the listener does); ``readiness()`` says
    what is not ready (None: ready whenever the process answers).  Registers the process metrics
    (``process_*``: memory, open files, CPU, start time) and ``<program>_build_info``
    into ``registry``.  The listener has the JSON-RPC servers' deadlines (a request must
    arrive within :data:`METRICS_REQUEST_TIMEOUT` seconds, idle connections close after
    :data:`METRICS_IDLE_TIMEOUT`), counts what it refused in
    ``metrics_http_refusals_total{reason}``, and its access log lines carry the client
    address cut to its network part (as :class:`GuardedSite` does on every listener).

    :raises ValueError: ``program`` cannot prefix a metric name.
    """
    if not _METRIC_PREFIX.match(program):
        raise ValueError(f"program {program[:50]!r} cannot prefix a metric name")
    # A process-wide switch of prometheus_client: without it every counter and
    # histogram adds a ``_created`` series, which nobody reads.
    disable_created_metrics()
    ProcessCollector(registry=registry)
    build_info(registry, program)
    ready_gauge(registry, program, readiness)
    endpoint = _Announced(listen_endpoint(reactor, settings["bind_address"], settings.get("tls"),
                                          name="metrics listener"), program)
    site = GuardedSite(
        listener_resource(registry, readiness, page, reactor=reactor, program=program),
        timeout=METRICS_IDLE_TIMEOUT, reactor=reactor,
    )
    site.noisy = False
    site.request_timeout = METRICS_REQUEST_TIMEOUT
    site.max_body_bytes = METRICS_MAX_BODY_BYTES
    refusals = http_refusals_counter(registry, "metrics")
    site.refusals = lambda reason: refusals.labels(reason).inc()
    sampler = None if page is None else page.sampler
    return ListenerService(endpoint, site, companions=() if sampler is None else (sampler,))


#: The ``reason`` label values of ``<prefix>_http_refusals_total`` (see
#: :data:`epsproxy.net.jsonrpc.REFUSAL_REASONS`, which says what each one means).
HTTP_REFUSAL_REASONS = REFUSAL_REASONS


def http_refusals_counter(registry: CollectorRegistry, prefix: str) -> Counter:
    """
    ``<prefix>_http_refusals_total{reason}``: connections a JSON-RPC server refused, with
    every reason of :data:`HTTP_REFUSAL_REASONS` present from the start (at 0).
    """
    counter = Counter(
        f"{prefix}_http_refusals", "HTTP connections refused by the JSON-RPC server, by reason",
        ["reason"], registry=registry,
    )
    for reason in HTTP_REFUSAL_REASONS:
        counter.labels(reason)
    return counter


class RPCMetrics:
    """
    Counts and times the calls of one JSON-RPC server, and counts the connections it
    refused (:meth:`refused`, which :func:`epsproxy.net.jsonrpc.jsonrpc_site` calls).

    Method names become label values only when ``known`` says they are ours, so a client
    sending random method names cannot grow the registry without bound.
    """

    def __init__(
        self, registry: CollectorRegistry, prefix: str, known: Callable[[str], bool]
    ) -> None:
        self.known = known
        self.requests = Counter(
            f"{prefix}_jsonrpc_requests", "JSON-RPC requests by method and outcome",
            ["method", "outcome"], registry=registry,
        )
        self.latency = Histogram(
            f"{prefix}_jsonrpc_request_seconds", "JSON-RPC request handling time",
            ["method"], registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10),
        )
        self.http_refusals = http_refusals_counter(registry, prefix)

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        label = method if self.known(method) else "other"
        self.requests.labels(label, outcome).inc()
        self.latency.labels(label).observe(seconds)

    def refused(self, reason: str) -> None:
        """Count a refused connection (``reason``: one of :data:`HTTP_REFUSAL_REASONS`)."""
        self.http_refusals.labels(reason).inc()
