"""
Whole programs built exactly as ``twistd`` builds them (``Options`` -> ``makeService``),
started in the test's process with their metrics listener on a free loopback port: an
SD, an endpoint server, a public and a private proxy, each scraped like Prometheus
would.  Settings come from the other helpers (test PKI, loopback port 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.net.metrics import ListenerService
from tests.support.eps import write_eps_settings
from tests.support.metrics import request
from tests.support.proxies import (
    FakeEPS,
    private_section,
    public_section,
    write_settings,
)
from tests.support.pki import pki
from tests.support.sd import write_sd_settings
from tests.support.tls import tls_block

#: The loopback metrics listener every program here gets.
METRICS = {"bind_address": "127.0.0.1:0"}


@dataclass
class RunningProgram:
    """A started program: its service tree and the port of its metrics listener."""

    name: str
    service: Any
    metrics_port: int

    @defer.inlineCallbacks
    def scrape(self) -> Any:
        """``GET /metrics``: fires with the exposition (bytes); fails unless 200."""
        answer = yield request(self.metrics_port, "/metrics")
        if answer.status != 200:
            raise AssertionError(f"{self.name}: /metrics answered {answer.status}")
        return answer.body


def _add_metrics(settings_file: Path) -> None:
    settings = yaml.safe_load(settings_file.read_text())
    settings["metrics"] = dict(METRICS)
    settings_file.write_text(yaml.safe_dump(settings))


@defer.inlineCallbacks
def start_program(test: TestCase, name: str, tap: Any, arguments: list[str]) -> Any:
    """
    Build ``tap.makeService`` from ``tap.Options().parseOptions(arguments)`` (no process
    management: a failed start fails the test, never the test process), start it, wait
    for its main service and its metrics listener; fires with a :class:`RunningProgram`.
    """
    options = tap.Options()
    options.parseOptions(arguments)
    top = tap.makeService(options, reactor, exit_on_failure=False)
    top.startService()
    test.addCleanup(top.stopService)
    yield top.main.when_ready()
    listeners = [s for s in top if isinstance(s, ListenerService)]
    if len(listeners) != 1:
        raise AssertionError(f"{name}: {len(listeners)} metrics listeners")
    port = yield listeners[0]._waitingForPort
    # (the listener keeps that Deferred's result to stop later: it is the port again)
    listeners[0]._waitingForPort = defer.succeed(port)
    return RunningProgram(name, top, port.getHost().port)


@defer.inlineCallbacks
def start_sd_program(test: TestCase, folder: Path) -> Any:
    """``twistd sd`` with the test PKI and metrics."""
    from epsproxy.sd import tap

    write_sd_settings(folder)
    _add_metrics(folder / "sd.yml")
    program = yield start_program(test, "sd", tap, ["--settings", str(folder)])
    return program


@defer.inlineCallbacks
def start_eps_program(test: TestCase, folder: Path, sd: RunningProgram | None = None) -> Any:
    """
    ``twistd eps`` as hd-1 (peer and gateway listeners, metrics); its directory from the
    running ``sd`` (an ``api`` directory, as in production: checkpoints and gossip too),
    else a json directory.
    """
    from epsproxy.eps import tap

    write_eps_settings(folder, metrics=0)
    if sd is not None:
        settings_file = folder / "eps.yml"
        settings = yaml.safe_load(settings_file.read_text())
        sd_port = sd.service.main.port.getHost().port
        settings["directory"] = {"type": "api", "settings": {
            "endpoints": [f"https://127.0.0.1:{sd_port}/jsonrpc"],
            "server_names": ["sd-1"],
            "jsonrpc_client": {"tls": tls_block("hd-1"), "timeout": 5},
            "ca_certificate_files": [str(pki().root)],
            "ca_intermediate_certificate_files": [str(pki().intermediate)],
            "cache_file": str(folder / "directory-cache.json"),
        }}
        settings_file.write_text(yaml.safe_dump(settings))
    program = yield start_program(test, "eps", tap, ["--settings", str(folder)])
    return program


@defer.inlineCallbacks
def start_proxy_program(test: TestCase, folder: Path, mode: str) -> Any:
    """``twistd proxy --mode public|private`` with its own endpoint server faked."""
    from epsproxy.proxy import tap

    own_eps = FakeEPS()
    eps_port = yield own_eps.start(test)
    section = (public_section if mode == "public" else private_section)(folder, eps_port)
    write_settings(folder, {mode: section, "metrics": dict(METRICS)})
    program = yield start_program(test, f"proxy --mode {mode}", tap,
                                  ["--mode", mode, "--settings", str(folder)])
    return program


@dataclass(frozen=True)
class Family:
    """One metric family of an exposition, as its ``# TYPE`` line declares it."""

    name: str
    type: str
    help: str


_TYPE = re.compile(r"# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)\s*$")
_HELP = re.compile(r"# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s")


def families(exposition: bytes) -> dict[str, Family]:
    """Every family an exposition declares (also those with no sample yet)."""
    helps: dict[str, str] = {}
    found: dict[str, Family] = {}
    for line in exposition.decode("utf-8").splitlines():
        if (match := _HELP.match(line)) is not None:
            helps[match.group(1)] = match.group(2)
        elif (match := _TYPE.match(line)) is not None:
            name = match.group(1)
            found[name] = Family(name, match.group(2), helps.get(name, ""))
    return found


def series_names(exposition: bytes) -> set[str]:
    """
    Every series name a query may use: each sample's name, each declared family (a
    counter's is declared with its ``_total``), and a histogram's or summary's
    ``_bucket``/``_sum``/``_count`` even before its first observation.
    """
    names = set()
    for family in families(exposition).values():
        names.add(family.name)
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(family.name + suffix for suffix in ("_sum", "_count"))
    for line in exposition.decode("utf-8").splitlines():
        if line and not line.startswith("#") and (match := _SAMPLE.match(line)):
            names.add(match.group(1))
    return names
