"""
Health and readiness for supervisors, served on the metrics listener
(:func:`epsproxy.net.metrics.metrics_service`):

- ``/healthz``: 200 ``{"status": "ok"}`` whenever the process answers at all (a liveness
  probe: restart the process if this stops answering);
- ``/readyz``: 200 ``{"status": "ready", "checks": {}}`` when the service's
  ``readiness()`` names nothing, else 503 ``{"status": "not ready", "checks": {name:
  reason}}`` (a readiness probe: send no traffic while it is 503).  A ``readiness``
  that raises, or answers something other than a mapping, is itself a failed check
  (``"readiness"``), logged once per distinct error rather than once per probe.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from epsproxy.net.jsonrpc.server import json_body

__all__ = [
    "READY",
    "NOT_READY",
    "Readiness",
    "HealthResource",
    "ReadinessResource",
    "readiness_report",
]

log = Logger()

#: What a service says is not ready: ``{check name: reason}``; empty means ready.
Readiness = Callable[[], Mapping[str, str]]

READY = "ready"
NOT_READY = "not ready"

#: Check names and reasons are cut to this many characters, and at most
#: :data:`_MAX_CHECKS` checks are reported: a probe body stays small whatever a
#: service's readiness says.
_MAX_TEXT = 500
_MAX_CHECKS = 50


def _text(value: Any) -> str:
    return str(value)[:_MAX_TEXT]


def readiness_report(readiness: Readiness | None) -> tuple[int, dict[str, Any], str | None]:
    """
    ``(HTTP status, body, error)`` for ``/readyz``: ``readiness`` asked once; no
    ``readiness`` means ready.  ``error`` is the text of a failing ``readiness`` (also
    in the body's ``checks["readiness"]``), else None.
    """
    error: str | None = None
    checks: dict[str, str] = {}
    if readiness is not None:
        try:
            answer = readiness()
            if not isinstance(answer, Mapping):
                raise TypeError(f"readiness() returned {type(answer).__name__}, not a mapping")
            for name, reason in list(answer.items())[:_MAX_CHECKS]:
                checks[_text(name)] = _text(reason)
        except Exception as e:
            error = _text(f"{type(e).__name__}: {e}")
            checks = {"readiness": error}
    if checks:
        return 503, {"status": NOT_READY, "checks": checks}, error
    return 200, {"status": READY, "checks": {}}, None


class HealthResource(Resource):
    """``/healthz``: the process is up and its reactor turns."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return json_body(request, 200, {"status": "ok"})

    render_HEAD = render_GET


class ReadinessResource(Resource):
    """``/readyz``: 200 or 503 with the checks that are not ready (:func:`readiness_report`)."""

    isLeaf = True

    def __init__(self, readiness: Readiness | None) -> None:
        super().__init__()
        self.readiness = readiness
        self._logged_error: str | None = None

    def render_GET(self, request: Request) -> bytes:
        status, body, error = readiness_report(self.readiness)
        if error is not None and error != self._logged_error:
            log.error("the readiness check failed: {error}", error=error)
        self._logged_error = error
        request.setHeader(b"cache-control", b"no-store")
        return json_body(request, status, body)

    render_HEAD = render_GET
