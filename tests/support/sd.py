"""Helpers for tests that run a real service directory on a loopback port."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks

from epsproxy.rules import records
from epsproxy.rules.certificates import load_certificates_file, load_private_key_file, to_pem
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.sd.tap import Options, makeService

from tests.support.pki import pki


def write_sd_settings(
    folder: Path,
    datastore: dict[str, Any] | None = None,
    jsonrpc_server: dict[str, Any] | None = None,
    checkpoint: bool = False,
) -> Path:
    """
    Write an SD role folder for the test PKI, listening on 127.0.0.1:0; ``checkpoint``
    signs checkpoints with sd-1's signing key (pin it with :func:`checkpoint_pin`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    p = pki()
    crt, key = p.tls("sd-1")
    server = {
        "bind_address": "127.0.0.1:0",
        "tls": {
            "ca_certificate_files": [str(p.root)],
            "certificate_file": str(crt),
            "key_file": str(key),
        },
    }
    server.update(jsonrpc_server or {})
    settings = {
        "jsonrpc_server": server,
        "directory": {
            "datastore": datastore
            or {"type": "embedded", "settings": {"path": str(folder / "records.sqlite")}},
            "ca_certificate_files": [str(p.root)],
            "ca_intermediate_certificate_files": [str(p.intermediate)],
        },
    }
    if checkpoint:
        sign_crt, sign_key = p.signing("sd-1")
        settings["checkpoint"] = {"name": "sd-1", "certificate_file": str(sign_crt),
                                  "key_file": str(sign_key)}
    (folder / "sd.yml").write_text(yaml.safe_dump(settings))
    return folder


def checkpoint_pin(name: str = "sd-1", created_at: str = "2025-01-01T10:00:00Z") -> dict:
    """The certificates change that pins ``name``'s signing key (a checkpoint signer's)."""
    return change(name, "certificates", [
        {"fingerprint": pki().fingerprints(name)["signing"], "key_usage": "signing"}],
        created_at)


class RunningSD:
    """A started SD service tree and the port it listens on."""

    def __init__(self, service: Any, port: Any) -> None:
        self.service = service
        self.port = port
        self.sd = service.services[0]

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    def stop(self) -> Deferred[None]:
        return self.service.stopService()


@inlineCallbacks
def start_sd(folder: Path):
    """Build the SD exactly as twistd does (Options → makeService) and start it."""
    options = Options()
    options.parseOptions(["--settings", str(folder)])
    service = makeService(options, reactor, exit_on_failure=False)
    service.startService()
    port = yield service.services[0].when_ready()
    return RunningSD(service, port)


def sd_client(port: int, name: str = "hd-1", foreign: bool = False) -> JSONRPCClient:
    """A JSON-RPC client for the SD with ``name``'s TLS client certificate."""
    p = pki("foreign") if foreign else pki()
    crt, key = p.tls(name)
    settings = JSONRPC_CLIENT_SETTINGS.validate(
        {
            "endpoint": f"https://127.0.0.1:{port}/jsonrpc",
            "server_name": "sd-1",
            "timeout": 10,
            "tls": {
                "ca_certificate_files": [str(pki().root)],
                "certificate_file": str(crt),
                "key_file": str(key),
            },
        }
    )
    return JSONRPCClient(reactor, settings)


def signer(name: str = "hd-1", alt: bool = False, foreign: bool = False):
    """(private key, leaf PEM) of a signing identity of the test PKI."""
    p = pki("foreign") if foreign else pki()
    crt, key = p.signing(name, alt=alt)
    return load_private_key_file(key), to_pem(load_certificates_file(crt)[0])


def sign_chain(
    changes: list[dict], parent_hash: str = "", name: str = "hd-1", **kwargs: Any
) -> list[dict]:
    """Sign change records one after another, each chained onto the previous."""
    key, pem = signer(name, **kwargs)
    signed = []
    for change in changes:
        record = records.sign_record(change, parent_hash, key, pem)
        signed.append(record)
        parent_hash = record["hash"]
    return signed


def change(name: str, section: str, data: Any, created_at: str = "2025-01-01T10:00:00Z") -> dict:
    return {"name": name, "section": section, "data": data, "created_at": created_at}


def base_changes(created_at: str = "2025-01-01T10:00:00Z") -> list[dict]:
    """A small directory: hd-1 (sd-admin, pinned), hd-2, and their groups."""
    p = pki()
    return [
        change("hd-1", "certificates", [
            {"fingerprint": p.fingerprints("hd-1")["signing"], "key_usage": "signing"},
            {"fingerprint": p.fingerprints("hd-1")["encryption"], "key_usage": "encryption"},
        ], created_at),
        change("hd-1", "groups", ["health-departments"], created_at),
        change("hd-2", "groups", ["health-departments"], created_at),
        change("hd-2", "channels", [{"type": "eps_server", "settings": {"address": "localhost:8889"}}],
               created_at),
    ]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
