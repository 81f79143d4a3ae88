"""
Helpers for tests of the status pages: serve a page on a metrics listener bound to a
free loopback port, and load it in real headless Chromium (``--dump-dom``,
``--screenshot``) run as a subprocess without blocking the reactor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import SkipTest

from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from epsproxy.net.metrics import metrics_service
from tests.support.metrics import start_listener

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@defer.inlineCallbacks
def serve_page(test: Any, registry: CollectorRegistry, page: Any, readiness: Any = None,
               program: str = "eps") -> Any:
    """A metrics listener on 127.0.0.1:0 serving ``page`` at ``/``; fires with its port."""
    service = metrics_service(reactor, {"bind_address": "127.0.0.1:0"}, registry,
                              program=program, readiness=readiness, page=page)
    port = yield start_listener(test, service)
    return port


def _chromium_args(test: Any, *extra: str) -> list[str]:
    if CHROMIUM is None:
        raise SkipTest("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    test.addCleanup(shutil.rmtree, profile, True)
    return ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile}", *extra]


@defer.inlineCallbacks
def dump_dom(test: Any, url: str) -> Any:
    """The DOM Chromium built from ``url`` (its serialisation), as text."""
    args = _chromium_args(test, "--dump-dom", url)
    out, err, code = yield utils.getProcessOutputAndValue(
        CHROMIUM, args, env=dict(os.environ), reactor=reactor)
    if code != 0:
        raise AssertionError(f"chromium failed ({code}): {err.decode(errors='replace')[-500:]}")
    return out.decode("utf-8")


@defer.inlineCallbacks
def screenshot(test: Any, url: str, path: str, size: str = "1000,1400") -> Any:
    """Save Chromium's rendering of ``url`` to ``path`` (PNG); fires with its size."""
    args = _chromium_args(test, f"--screenshot={path}", f"--window-size={size}",
                          "--hide-scrollbars", url)
    out, err, code = yield utils.getProcessOutputAndValue(
        CHROMIUM, args, env=dict(os.environ), reactor=reactor)
    if code != 0 or not os.path.exists(path):
        raise AssertionError(f"chromium failed ({code}): {err.decode(errors='replace')[-500:]}")
    return os.path.getsize(path)


class AnsweringEPS:
    """
    A private proxy's own endpoint server over plain HTTP that accepts every
    announcement (``announceConnections`` answers one None per connection) and counts them.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.port: Any = None

    def handle(self, method: str, params: dict[str, Any], context: Any) -> Any:
        self.calls += 1
        return [None] * len(params.get("connections") or [])

    @defer.inlineCallbacks
    def start(self, test: Any) -> Any:
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        self.port = yield listen_jsonrpc(reactor, jsonrpc_site(self, settings, reactor=reactor),
                                         settings)
        test.addCleanup(self.port.stopListening)
        return self.port.getHost().port
