"""
What the soak run measures and how it is reported: per-stream counters (requests, bytes,
mismatches, errors by class, latencies), per-process samples of resident memory and open
file descriptors read from ``/proc``, and the markdown tables of ``docs/robustness.md``.

Everything here is plain data and pure functions so it can be tested without a network.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "EXPLAINED",
    "ProcessSample",
    "ProcessSeries",
    "StreamStats",
    "classify",
    "digest",
    "fds_back",
    "percentile",
    "process_table",
    "read_process",
    "stream_table",
    "unexplained",
]

#: Error classes that are not defects, with why.  A keep-alive connection the server
#: closed while idle, before the next request was written, is the ordinary HTTP/1.1
#: race; the client reconnects and the request is sent again (counted, not lost).
EXPLAINED: dict[str, str] = {
    "keepalive_closed": "server closed an idle keep-alive connection before the request "
                        "was sent; sent again on a new connection",
    "connect_reset (max_connections)": "the private proxy refused the client at its "
                                       "max_connections (1000 in conf/dev) or "
                                       "max_connections_per_client (250) while a "
                                       "reconnecting client's old connection was still "
                                       "open there (incomingConnection 503, or the pooled "
                                       "connection closed); as many refusals are in its log",
}


def digest(data: bytes) -> str:
    """The SHA-256 of ``data`` (hex): what both ends of a check compare."""
    return hashlib.sha256(data).hexdigest()


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = math.ceil(q * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def classify(error: BaseException, phase: str) -> str:
    """
    The class of a failed request: ``phase`` is where it failed (``connect``,
    ``handshake``, ``request``, ``response``); the exception says how.
    """
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return f"{phase}_timeout"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{phase}_certificate"
    if isinstance(error, ConnectionRefusedError):
        return f"{phase}_refused"
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return f"{phase}_reset"
    if isinstance(error, (asyncio.IncompleteReadError, EOFError)):
        return f"{phase}_eof"
    if isinstance(error, ssl.SSLError):
        return f"{phase}_tls"
    if isinstance(error, HTTPStatus):
        return f"http_{error.status}"
    if isinstance(error, OSError):
        return f"{phase}_oserror"
    return f"{phase}_{type(error).__name__}"


class HTTPStatus(Exception):
    """An answer with a status other than 200."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}: {body[:80]!r}")
        self.status = status


@dataclass
class StreamStats:
    """The counters of one stream (one load process, or several merged)."""

    name: str
    requests: int = 0
    ok: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    mismatches: int = 0
    connections: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, text[:200])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "requests": self.requests, "ok": self.ok,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "mismatches": self.mismatches, "connections": self.connections,
                "errors": dict(self.errors), "examples": self.examples,
                "latencies": [round(x, 6) for x in self.latencies]}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "StreamStats":
        stats = cls(value["name"])
        stats.merge(value)
        return stats

    def merge(self, value: dict[str, Any]) -> None:
        for key in ("requests", "ok", "bytes_sent", "bytes_received", "mismatches",
                    "connections"):
            setattr(self, key, getattr(self, key) + int(value.get(key, 0)))
        self.errors.update(value.get("errors", {}))
        for kind, text in value.get("examples", {}).items():
            self.examples.setdefault(kind, text)
        self.latencies.extend(value.get("latencies", []))


def unexplained(stats: StreamStats) -> int:
    """Errors of ``stats`` that :data:`EXPLAINED` does not account for."""
    return sum(n for kind, n in stats.errors.items() if kind not in EXPLAINED)


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f}"


def stream_table(streams: list[StreamStats], seconds: float) -> str:
    """Requests, bytes, mismatches, errors (classified) and latency per stream."""
    lines = [
        "| stream | requests | ok | req/s | MiB sent | MiB received | connections | "
        "mismatches | errors (class: count) | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in streams:
        errors = ", ".join(f"{k}: {v}" + (" (explained)" if k in EXPLAINED else "")
                           for k, v in s.errors.most_common()) or "0"
        rate = s.ok / seconds if seconds > 0 else 0.0
        lines.append(
            f"| {s.name} | {s.requests} | {s.ok} | {rate:.0f} | {_mib(s.bytes_sent)} | "
            f"{_mib(s.bytes_received)} | {s.connections} | {s.mismatches} | {errors} | "
            f"{percentile(s.latencies, 0.5) * 1000:.0f} | "
            f"{percentile(s.latencies, 0.99) * 1000:.0f} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ProcessSample:
    """One look at a process: seconds since the start of the run, RSS in KiB, open fds."""

    t: float
    rss_kib: int
    fds: int


def read_process(pid: int, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(VmRSS in KiB, number of open fds) of ``pid``, or None if it is gone."""
    try:
        rss = 0
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
        fds = len(os.listdir(proc / str(pid) / "fd"))
    except (OSError, ValueError, IndexError):
        return None
    return rss, fds


@dataclass
class ProcessSeries:
    """The samples of one dev-network process, and the marks the report needs."""

    name: str
    pid: int
    samples: list[ProcessSample] = field(default_factory=list)
    #: fds before the load started (median of the samples taken then).
    fd_baseline: int | None = None
    #: fds at the first sample after the load in which every process was back.
    fds_after: int | None = None
    gone: bool = False

    def add(self, t: float, proc: Path = Path("/proc")) -> ProcessSample | None:
        value = read_process(self.pid, proc)
        if value is None:
            self.gone = True
            return None
        sample = ProcessSample(t, *value)
        self.samples.append(sample)
        return sample

    def rss(self) -> tuple[int, int, int]:
        """(start, peak, end) RSS in KiB."""
        if not self.samples:
            return 0, 0, 0
        values = [s.rss_kib for s in self.samples]
        return values[0], max(values), values[-1]

    def fd_peak(self) -> int:
        return max((s.fds for s in self.samples), default=0)


def fds_back(series: list[ProcessSeries], tolerance: int,
             pooled: Mapping[str, int] | None = None) -> bool:
    """
    True when every live process's last fd count is within ``tolerance`` of its baseline
    plus ``pooled[name]``: the idle pooled connections it holds beyond those it held at
    the baseline (issue 14's pool grows under load, one descriptor at each proxy per
    connection, and shrinks back only as its connections are used or idle out).
    """
    pooled = pooled or {}
    for s in series:
        if s.gone or s.fd_baseline is None or not s.samples:
            return False
        if abs(s.samples[-1].fds - s.fd_baseline - pooled.get(s.name, 0)) > tolerance:
            return False
    return True


def process_table(series: list[ProcessSeries]) -> str:
    """RSS start/peak/end and fds baseline/peak/after per process."""
    lines = [
        "| process | pid | RSS start MiB | RSS peak MiB | RSS end MiB | fds baseline | "
        "fds peak | fds after | fds end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in series:
        start, peak, end = s.rss()
        after = "GONE" if s.gone else ("not back" if s.fds_after is None else str(s.fds_after))
        lines.append(
            f"| {s.name} | {s.pid} | {start / 1024:.1f} | {peak / 1024:.1f} | "
            f"{end / 1024:.1f} | {s.fd_baseline} | {s.fd_peak()} | {after} | "
            f"{s.samples[-1].fds if s.samples else '-'} |")
    return "\n".join(lines)
