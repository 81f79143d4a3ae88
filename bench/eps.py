"""
EPS messaging benchmark: our EPS-to-EPS line protocol with the full broker path against
gRPC (issue 3, "Done means": ``make bench`` compares them).

Same run, same machine, loopback, one mutual-TLS connection with a fresh dev PKI, server
and client in separate processes (:mod:`bench.eps_peer`, :mod:`bench.grpc_echo`):

- **ours**: hd-1 calls ``hd-2.echo`` over an :class:`~epsproxy.eps.links.protocol.EPSConnection`;
  hd-2 hands every request to :class:`~epsproxy.eps.broker.Broker` (directory lookups,
  permission check, ``_client``) and an in-process echo channel answers;
- **gRPC unary**: ``grpc.aio``, the reference's proto (params as ``Struct``), one call per RPC;
- **gRPC stream**: the same messages on one bidirectional stream, matched by id.

Each variant: a warm-up, then ``BENCH_DURATION`` seconds (default 5) with 1 call in flight
and as long with 64; ``BENCH_ROUNDS`` (default 3) interleaved rounds; medians.  Server
CPU comes from ``/proc/<pid>/stat`` of the server process.  ``BENCH_CALLS=N`` runs N calls
per phase instead of a duration (the smoke test's tiny mode).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from epsproxy.dev.pki import create_pki

from .common import cell, median, step, table

__all__ = ["VARIANTS", "grpc_available", "run", "report", "main"]

ROOT = Path(__file__).resolve().parent.parent
BASE_DIRECTORY = ROOT / "conf" / "dev" / "directory" / "001_base.json"
IN_FLIGHT = (1, 64)
#: Goals of issue 3: ours at 64 in flight >= 3x the better gRPC variant; p99 at 1 in
#: flight <= 0.5x gRPC unary.
RATE_GOAL, P99_GOAL = 3.0, 0.5


@dataclass(frozen=True)
class Variant:
    """One thing measured: the label of its row, its server and its client module."""

    key: str
    label: str
    module: str


VARIANTS = (
    Variant("ours", "ours: EPS line protocol + full broker path", "bench.eps_peer"),
    Variant("unary", "gRPC unary, params as Struct (reference proto)", "bench.grpc_echo"),
    Variant("stream", "gRPC one bidi stream, Struct, matched by id", "bench.grpc_echo"),
)


def grpc_available() -> bool:
    """Whether grpcio and protobuf are installed (the ``bench`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("grpc", "google.protobuf"))



def make_directory(folder: Path) -> None:
    """
    The dev directory next to the PKI's ``002_certificates.json``: the base records plus
    hd-2's services with ``echo`` granted to ``health-departments`` (a services record
    replaces the section, so hd-2's existing services are repeated in it).
    """
    base = json.loads(BASE_DIRECTORY.read_text("utf-8"))
    (folder / BASE_DIRECTORY.name).write_text(json.dumps(base, indent=2))
    services = [r["data"] for r in base["records"]
                if r["name"] == "hd-2" and r["section"] == "services"]
    echo = {"name": "bench-echo",
            "permissions": [{"group": "health-departments", "rights": ["call"]}],
            "methods": [{"name": "echo", "permissions": []}]}
    record = {"name": "hd-2", "section": "services", "data": (services[-1] if services else [])
              + [echo], "created_at": "2021-05-17T10:00:01Z"}
    (folder / "003_bench_echo.json").write_text(json.dumps({"records": [record]}, indent=2))


class Servers:
    """The server processes, one per server module, started once and shared by rounds."""

    def __init__(self, base: Path, pki: Any, modules: Sequence[str]) -> None:
        self.base = base
        self.pki = pki
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        try:
            for module in dict.fromkeys(modules):
                self._start(module)
        except BaseException:
            self.stop()
            raise

    def _start(self, module: str) -> None:
        crt, key = self.pki.tls("hd-2")
        if module == "bench.eps_peer":
            config = {"root": str(self.pki.root), "crt": str(crt), "key": str(key),
                      "directory": str(self.base / "directory")}
            args = ["server", json.dumps(config)]
        else:
            args = ["server", str(self.pki.root), str(crt), str(key)]
        log = self.base / f"{module}.server.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self.processes[module] = process
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.match(rb"listening on (\d+)", line)
        if not match:
            process.wait(timeout=10)
            raise RuntimeError(f"{module} server did not start: {line!r}\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        self.ports[module] = int(match.group(1))

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def load(servers: Servers, variant: Variant, duration: float, calls: int | None,
         warmup: float) -> dict[str, Any]:
    """Run one client process of ``variant``; its phases, keyed by calls in flight."""
    crt, key = servers.pki.tls("hd-1")
    config = {
        "variant": variant.key, "port": servers.ports[variant.module],
        "server_pid": servers.processes[variant.module].pid, "root": str(servers.pki.root),
        "crt": str(crt), "key": str(key), "directory": str(servers.base / "directory"),
        "in_flight": list(IN_FLIGHT), "duration": duration, "calls": calls, "warmup": warmup,
    }
    budget = 120 + (warmup + duration * len(IN_FLIGHT)) * 3
    done = subprocess.run([sys.executable, "-m", variant.module, "client", json.dumps(config)],
                          cwd=ROOT, capture_output=True, timeout=budget)
    if done.returncode != 0:
        raise RuntimeError(f"{variant.key} client failed ({done.returncode}):\n"
                           f"{done.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(done.stdout)


def run(
    duration: float = 5.0,
    rounds: int = 3,
    calls: int | None = None,
    warmup: float = 1.0,
    variants: Sequence[Variant] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """
    Measure ``variants`` (default: ours, and gRPC's when it is installed) in ``rounds``
    interleaved rounds.  Returns ``{variant key: [phases of round 1, ...]}`` as
    :func:`bench.eps_peer.measure` gives them.
    """
    if variants is None:
        variants = VARIANTS if grpc_available() else VARIANTS[:1]
    base = Path(tempfile.mkdtemp(prefix="epsproxy-bench-eps-"))
    try:
        pki = create_pki(base / "certs", directory_dir=base / "directory")
        make_directory(base / "directory")
        servers = Servers(base, pki, [v.module for v in variants])
        try:
            results: dict[str, list[dict[str, Any]]] = {v.key: [] for v in variants}
            for index in range(rounds):
                # Rotate the order so no variant always runs first (or right after another).
                shift = index % len(variants)
                order = list(variants[shift:]) + list(variants[:shift])
                for variant in order:
                    step(f"round {index + 1}/{rounds}: {variant.key}")
                    results[variant.key].append(load(servers, variant, duration, calls, warmup))
            return results
        finally:
            servers.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _metrics(phases: dict[str, Any]) -> dict[str, float]:
    one, many = phases["1"], phases[str(IN_FLIGHT[-1])]
    return {
        "rate1": one["calls"] / one["seconds"],
        "rate64": many["calls"] / many["seconds"],
        "p50": one["p50_us"],
        "p99": one["p99_us"],
        "cpu64": many["server_cpu"] / many["calls"] * 1e6 if many["calls"] else float("nan"),
    }


def _ratio_row(label: str, ratios: list[float], goal: str, met: bool | None) -> list[str]:
    if not ratios:
        return [label, "n/a (gRPC not measured)", goal, ""]
    text = f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    return [label, text, goal, "PASS" if met else "MISS"]


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    """The tables: one row per variant (medians over rounds), then the goals."""
    metrics = {key: [_metrics(r) for r in rounds] for key, rounds in results.items()}
    rows = []
    for variant in VARIANTS:
        if variant.key not in metrics:
            continue
        m = metrics[variant.key]
        rows.append([
            variant.label,
            cell([x["rate1"] for x in m], spread=False),
            cell([x["rate64"] for x in m], spread=True),
            cell([x["p50"] for x in m], spread=False),
            cell([x["p99"] for x in m], spread=True),
            cell([x["cpu64"] for x in m], spread=False),
        ])
    rounds = len(next(iter(results.values()), []))
    out = [f"{rounds} round(s); medians (min-max); loopback, one mutual-TLS connection each\n",
           table(["variant", "calls/s @1", "calls/s @64", "p50 µs @1", "p99 µs @1",
                  "server CPU µs/call @64"], rows), ""]

    rate_ratios: list[float] = []
    p99_ratios: list[float] = []
    if "unary" in metrics and "stream" in metrics and "ours" in metrics:
        for ours, unary, stream in zip(metrics["ours"], metrics["unary"], metrics["stream"]):
            rate_ratios.append(ours["rate64"] / max(unary["rate64"], stream["rate64"]))
            p99_ratios.append(ours["p99"] / unary["p99"])
    out.append(table(["goal", "median ratio (min-max over rounds)", "target", "result"], [
        _ratio_row("ours calls/s @64 / better gRPC variant", rate_ratios, f">= {RATE_GOAL:g}x",
                   bool(rate_ratios) and median(rate_ratios) >= RATE_GOAL),
        _ratio_row("ours p99 @1 / gRPC unary p99 @1", p99_ratios, f"<= {P99_GOAL:g}x",
                   bool(p99_ratios) and median(p99_ratios) <= P99_GOAL),
    ]))
    return "\n".join(out)


def main() -> None:
    duration = float(os.environ.get("BENCH_DURATION", "5"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    calls = int(os.environ["BENCH_CALLS"]) if os.environ.get("BENCH_CALLS") else None
    if not grpc_available():
        print("grpcio/protobuf not installed (pip install -e '.[bench]'): measuring ours only")
    print(report(run(duration=duration, rounds=rounds, calls=calls)))
