"""
Helpers for tests that run whole endpoint servers (``EndpointServerService``) on
loopback: a json directory in a temp folder that tests extend as ports become known,
settings blocks from the test PKI, node start-up with cleanup, and a client of a node's
JSON-RPC gateway.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from itertools import count
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.eps.service import EndpointServerService
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from tests.support.pki import pki
from tests.support.tls import tls_block

CREATED_AT = "2024-01-01T00:00:00Z"


def record(name: str, section: str, data: Any) -> dict[str, Any]:
    return {"name": name, "section": section, "data": data, "created_at": CREATED_AT}


def calls(*groups: str) -> list[dict[str, Any]]:
    """Permissions granting ``call`` to ``groups``."""
    return [{"group": g, "rights": ["call"]} for g in groups]


def service(name: str, groups: tuple[str, ...], *methods: str) -> dict[str, Any]:
    return {
        "name": name,
        "permissions": calls(*groups),
        "methods": [{"name": m, "permissions": []} for m in methods],
    }


class Network:
    """
    A json directory folder shared by every node of a test.  Each call of
    :meth:`write` adds a file whose records are integrated after the earlier ones, so a
    node's channels can be published once its port is known.
    """

    def __init__(self, test: Any) -> None:
        self.test = test
        self.folder = Path(tempfile.mkdtemp(prefix="eps-net-"))
        test.addCleanup(shutil.rmtree, self.folder, ignore_errors=True)
        self._files = count(1)
        self.nodes: dict[str, EndpointServerService] = {}
        self.outputs: dict[str, io.StringIO] = {}

    def write(self, *records: dict[str, Any]) -> None:
        path = self.folder / f"{next(self._files):03d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"records": list(records)}))
        tmp.rename(path)

    def operator(
        self, name: str, groups: list[str], services: list[dict[str, Any]] = (),  # type: ignore[assignment]
    ) -> None:
        """Publish ``name``'s encryption pin, groups and services."""
        self.write(
            record(name, "certificates", [
                {"fingerprint": pki().fingerprints(name)["encryption"],
                 "key_usage": "encryption"},
            ]),
            record(name, "groups", groups),
            record(name, "services", list(services)),
        )

    def channels(self, name: str, *channels: dict[str, Any]) -> None:
        """Publish ``name``'s directory channels (replacing earlier ones)."""
        self.write(record(name, "channels", list(channels)))

    def server_address(self, name: str) -> str:
        """``127.0.0.1:<port>`` of ``name``'s running eps_server channel."""
        for channel in self.nodes[name].channels:
            if channel.type == "eps_server":
                return f"127.0.0.1:{channel.port.getHost().port}"
        raise LookupError(f"{name} has no eps_server channel")

    def gateway_url(self, name: str) -> str:
        for channel in self.nodes[name].channels:
            if channel.type == "jsonrpc_server":
                return f"https://127.0.0.1:{channel.port.getHost().port}/jsonrpc"
        raise LookupError(f"{name} has no jsonrpc_server channel")

    def channel(self, name: str, kind: str) -> Any:
        for channel in self.nodes[name].channels:
            if channel.type == kind:
                return channel
        raise LookupError(f"{name} has no {kind} channel")

    @defer.inlineCallbacks
    def start(self, name: str, channels: list[dict[str, Any]]) -> Any:
        """Start ``name``'s EPS with ``channels`` (settings dicts); fires with the service."""
        settings = EPS_SETTINGS.validate({
            "name": name,
            # Reload at once: tests publish channels as soon as ports are known.
            "directory": {"type": "json", "settings": {"path": str(self.folder),
                                                       "reload_interval": 0}},
            "channels": channels,
        })
        output = io.StringIO()
        node = EndpointServerService(reactor, settings, stdout=output)
        node.startService()
        self.test.addCleanup(self._stop, name, node)
        yield node.when_ready()
        self.nodes[name] = node
        self.outputs[name] = output
        return node

    def _stop(self, name: str, node: EndpointServerService) -> Any:
        self.nodes.pop(name, None)
        if node.running:
            return node.stopService()
        return None


def server_channel(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": "eps-server", "type": "eps_server",
            "settings": {"bind_address": "127.0.0.1:0", "tls": tls_block(name), **settings}}


def client_channel(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": "eps-client", "type": "eps_client",
            "settings": {"tls": tls_block(name), **settings}}


def gateway_channel(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": "gateway", "type": "jsonrpc_server",
            "settings": {"bind_address": "127.0.0.1:0", "tls": tls_block(name), **settings}}


def local_channel(endpoint: str, **settings: Any) -> dict[str, Any]:
    return {"name": "local", "type": "jsonrpc_client",
            "settings": {"endpoint": endpoint, "timeout": 5, **settings}}


def gateway_client(test: TestCase, url: str, name: str = "hd-1") -> JSONRPCClient:
    """A JSON-RPC client for an EPS gateway, with ``name``'s client certificate."""
    client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
        "endpoint": url, "tls": tls_block(name), "server_name": name, "timeout": 10,
    }))
    test.addCleanup(client.close)
    return client


def write_eps_settings(folder: Path, *, peers: int = 0, gateway: int = 0, metrics: int = 0,
                       peer_tls: dict[str, Any] | None = None) -> Path:
    """An endpoint server hd-1 with a json directory, peer and gateway channels, metrics."""
    (folder / "directory").mkdir(parents=True, exist_ok=True)
    (folder / "directory" / "001.json").write_text(json.dumps({"records": []}))
    settings = {
        "name": "hd-1",
        "directory": {"type": "json", "settings": {"path": str(folder / "directory")}},
        "channels": [
            {"name": "peers", "type": "eps_server", "settings": {
                "bind_address": f"127.0.0.1:{peers}", "tls": peer_tls or tls_block("hd-1")}},
            {"name": "gateway", "type": "jsonrpc_server", "settings": {
                "bind_address": f"127.0.0.1:{gateway}", "tls": tls_block("hd-1")}},
        ],
        "metrics": {"bind_address": f"127.0.0.1:{metrics}"},
    }
    (folder / "eps.yml").write_text(yaml.safe_dump(settings))
    return folder
