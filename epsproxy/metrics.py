"""
Prometheus metrics: a per-service registry served over plain HTTP.

Each program builds its own ``CollectorRegistry`` (never the global one, so tests can
run several services in one process) and serves it with :class:`MetricsResource` on
every path of ``metrics.bind_address``.  ``prometheus_client.twisted`` is avoided on
purpose: it grabs the global reactor.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from . import forms
from .tls import listen_endpoint

__all__ = ["METRICS_SETTINGS", "MetricsResource", "RPCMetrics", "metrics_service"]

METRICS_SETTINGS = forms.Map(
    {"bind_address": forms.Required(forms.String(min_length=1))}, strict=True
)


class MetricsResource(Resource):
    """Serves the text exposition of one registry on every path (as the reference does)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)

    render_HEAD = render_GET


def metrics_service(
    reactor: IReactorCore, settings: dict, registry: CollectorRegistry
) -> IService:
    """A service listening on ``settings["bind_address"]`` (plain HTTP) for scrapes."""
    endpoint = listen_endpoint(reactor, settings["bind_address"], None)
    site = Site(MetricsResource(registry))
    site.noisy = False
    service = StreamServerEndpointService(endpoint, site)
    service._raiseSynchronously = True
    return service


class RPCMetrics:
    """
    Counts and times the calls of one JSON-RPC server.

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

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        label = method if self.known(method) else "other"
        self.requests.labels(label, outcome).inc()
        self.latency.labels(label).observe(seconds)
