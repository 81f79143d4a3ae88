"""
Helpers for tests that run the public or the private proxy: settings sections and the
role folder, a fake own endpoint server for the public proxy, a client of the proxy's
JSON-RPC server, and the ``_client`` value an endpoint server adds to a call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import CallContext
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from tests.support.tls import tls_block

PUBLIC_PROXY = "public-proxy-1.ga"
PRIVATE_PROXY = "private-proxy-1.ga"


def write_settings(folder: Path, settings: dict[str, Any]) -> Path:
    """Write ``settings`` as the ``proxy.yml`` of role folder ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "proxy.yml").write_text(yaml.safe_dump(settings))
    return folder


def public_section(folder: Path, eps_port: int, **changes: Any) -> dict[str, Any]:
    """A ``public`` section on loopback port 0, calling a (fake) own EPS on ``eps_port``."""
    section: dict[str, Any] = {
        "name": PUBLIC_PROXY,
        "datastore": {"type": "embedded",
                      "settings": {"path": str(folder / "announcements.sqlite")}},
        "tls_bind_address": "127.0.0.1:0",
        "internal_bind_address": "127.0.0.1:0",
        "internal_endpoint": "127.0.0.1:9",  # replaced once the port is known
        "shutdown_grace": 0,  # tests that drain set their own
        "jsonrpc_server": {"bind_address": "127.0.0.1:0", "tls": tls_block(PUBLIC_PROXY)},
        "jsonrpc_client": {
            "endpoint": f"https://127.0.0.1:{eps_port}/jsonrpc",
            "server_name": PUBLIC_PROXY,
            "timeout": 5,
            "tls": tls_block(PUBLIC_PROXY),
        },
    }
    section.update(changes)
    return section


def private_section(folder: Path, eps_port: int, **changes: Any) -> dict[str, Any]:
    """A ``private`` section on loopback port 0, calling its own EPS over plain HTTP."""
    section: dict[str, Any] = {
        "name": PRIVATE_PROXY,
        "datastore": {"type": "embedded",
                      "settings": {"path": str(folder / "announcements.sqlite")}},
        "jsonrpc_server": {"bind_address": "127.0.0.1:0"},
        "jsonrpc_client": {"endpoint": f"http://127.0.0.1:{eps_port}/jsonrpc", "timeout": 5},
        "shutdown_grace": 0,  # tests that drain set their own
    }
    section.update(changes)
    return section


class FakeEPS:
    """
    The public proxy's own endpoint server, as far as the proxy sees it: a JSON-RPC server
    over mutual TLS.  ``answer(params)`` decides each ``_connectionRequest``'s reply (a
    value, a Deferred, or raise); every call is recorded as ``(method, params, context)``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], CallContext]] = []
        self.answer: Callable[[dict[str, Any]], Any] = lambda params: {}
        self.port: Any = None

    def handle(self, method: str, params: dict[str, Any], context: CallContext) -> Any:
        self.calls.append((method, params, context))
        return self.answer(params)

    @inlineCallbacks
    def start(self, test: TestCase):
        settings = JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": "127.0.0.1:0", "tls": tls_block(PUBLIC_PROXY)})
        site = jsonrpc_site(self, settings, reactor=reactor)
        self.port = yield listen_jsonrpc(reactor, site, settings)
        test.addCleanup(self.port.stopListening)
        return self.port.getHost().port


def caller_client(port: int, name: str = PUBLIC_PROXY) -> JSONRPCClient:
    """A client of the proxy's JSON-RPC server with ``name``'s certificate (the own EPS's)."""
    return JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
        "endpoint": f"https://127.0.0.1:{port}/jsonrpc",
        "server_name": PUBLIC_PROXY,
        "timeout": 10,
        "tls": tls_block(name),
    }))


def client(name: str = "hd-1", allowed: Any = (".internal-server.local",),
           operator: str = "") -> dict[str, Any]:
    """``_client`` whose entry allows ``allowed`` (None: no proxy settings at all)."""
    entry: dict[str, Any] = {"name": name}
    if allowed is not None:
        item: dict[str, Any] = {"service": "proxy", "settings": {
            "allowed_domains": list(allowed) if isinstance(allowed, tuple) else allowed}}
        if operator:
            item["operator"] = operator
        entry["settings"] = [{"service": "other", "settings": {}}, item]
    return {"name": name, "entry": entry}


class Collect(Protocol):
    """Writes ``send`` once connected; ``done`` fires with everything received at the end."""

    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.send)  # type: ignore[union-attr]  # connected

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)
