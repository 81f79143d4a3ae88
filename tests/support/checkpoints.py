"""Helpers for the checkpoint tests: SDs holding given chains, api directory settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from epsproxy.eps.settings import API_DIRECTORY_SETTINGS
from tests.support.pki import pki
from tests.support.sd import sd_client, start_sd, write_sd_settings


def api_settings(endpoints: list[str], **extra: Any) -> dict[str, Any]:
    """Raw api directory settings for hd-1's TLS identity (validate or embed them)."""
    p = pki()
    crt, key = p.tls("hd-1")
    raw = {
        "endpoints": endpoints,
        "server_names": ["sd-1"],
        "jsonrpc_client": {
            "tls": {"ca_certificate_files": [str(p.root)], "certificate_file": str(crt),
                    "key_file": str(key)},
            "timeout": 10,
        },
        "ca_certificate_files": [str(p.root)],
        "ca_intermediate_certificate_files": [str(p.intermediate)],
    }
    raw.update(extra)
    return raw


def validated_api_settings(endpoints: list[str], **extra: Any) -> dict[str, Any]:
    return API_DIRECTORY_SETTINGS.validate(api_settings(endpoints, **extra))


def url(port: int) -> str:
    return f"https://127.0.0.1:{port}/jsonrpc"


@inlineCallbacks
def sd_with(test: Any, chain: list[dict], checkpoint: bool = True,
            batches: list[list[dict]] | None = None) -> Any:
    """A started SD (stopped at cleanup) whose store holds ``chain`` (or ``batches``)."""
    folder = write_sd_settings(Path(test.mktemp()), checkpoint=checkpoint)
    running = yield start_sd(folder)
    test.addCleanup(running.stop)
    client = sd_client(running.port_number)
    try:
        for batch in batches if batches is not None else ([chain] if chain else []):
            yield client.call("submitRecords", {"records": batch})
    finally:
        yield client.close()
    return running


class SwitchClient:
    """A directory's SD client that sends to whichever real SD client ``target`` is."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.closing: list[Any] = [target]

    def switch(self, target: Any) -> None:
        self.target = target
        self.closing.append(target)

    def call(self, method: str, params: dict[str, Any]) -> Deferred[Any]:
        return self.target.call(method, params)

    def close(self) -> Deferred[None]:
        from twisted.internet.defer import gatherResults
        return gatherResults([c.close() for c in self.closing]).addCallback(lambda _: None)
