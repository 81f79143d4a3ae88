"""
Helpers for tests of the metrics listener (``epsproxy.net.metrics.metrics_service``):
start it on a free loopback port, send it plain HTTP requests, read an exposition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers


@dataclass
class Answer:
    """One HTTP answer of the metrics listener."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if not values else values[0].decode("latin-1")

    def json(self) -> Any:
        return json.loads(self.body)


@defer.inlineCallbacks
def start_listener(test: Any, service: Any) -> Any:
    """Start a ``metrics_service`` (bound to port 0); fires with its port number."""
    service.startService()
    test.addCleanup(service.stopService)
    listening: defer.Deferred[Any] = defer.Deferred()
    # The service keeps its Deferred's result (the port) to stop it: do not consume it.
    service._waitingForPort.addCallback(lambda port: (listening.callback(port), port)[1])
    port = yield listening
    return port.getHost().port


@defer.inlineCallbacks
def request(port: int, path: str, method: bytes = b"GET") -> Any:
    """Send ``method path`` to the listener on ``port``; fires with an :class:`Answer`."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    response = yield agent.request(method, f"http://127.0.0.1:{port}{path}".encode())
    body = yield readBody(response)
    return Answer(response.code, response.headers, body)


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition: ``{(name, sorted labels): value}``."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def names(exposition: bytes) -> set[str]:
    """The sample names of a text exposition (``process_open_fds``, ``x_total``...)."""
    return {name for name, _ in samples(exposition)}
