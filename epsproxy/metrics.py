"""
Prometheus metrics: a per-service registry served over plain HTTP.

Each program builds its own ``CollectorRegistry`` (never the global one, so tests can
run several services in one process) and serves it with :class:`MetricsResource` on
every path of ``metrics.bind_address``.  ``prometheus_client.twisted`` is avoided on
purpose: it grabs the global reactor.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from . import forms
from .tls import listen_endpoint

__all__ = ["METRICS_SETTINGS", "MetricsResource", "metrics_service"]

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
