"""Helpers shared by the benchmarks: tables, medians and goals, percentiles, process CPU,
free ports, progress lines, finding HAProxy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def stop_on_sigterm() -> None:
    """
    Let SIGTERM (``timeout``, a CI job cancelled, ``kill``) end a run as Ctrl-C does: as
    SystemExit where the run is, so that every ``finally`` stops the processes it started.
    They run in sessions of their own, so that a signal to the terminal reaches the run
    alone; without this they would outlive a terminated run, holding ports and CPU.
    """
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (so results paste straight into notes and docs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
              for row in cells[1:]]
    return "\n".join(lines)


def step(text: str) -> None:
    print(f"  ... {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (without connecting to it)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as lines:
        return any(f[1] == wanted and f[3] == "0A"
                   for f in (line.split() for line in lines) if len(f) > 3)


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None)


def rotations(relays: Sequence[Any], rounds: int) -> list[list[Any]]:
    """``rounds`` orders of ``relays``, each shifted by one, so none always runs first."""
    if not relays:
        return []
    return [list(relays[i % len(relays):]) + list(relays[:i % len(relays)])
            for i in range(rounds)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cell(values: Sequence[float], fmt: str = ",.0f", spread: bool = True) -> str:
    if not values:
        return "n/a"
    text = format(median(values), fmt)
    if spread and len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def ratios(mine: Sequence[float], theirs: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(mine, theirs) if b]


def best_per_round(values: Mapping[str, Sequence[float]], keys: Sequence[str],
                   better: Callable[..., float]) -> list[float]:
    """
    Per round, the better of the competitors ``keys`` (``better``: ``max`` for rates,
    ``min`` for costs): what the goals compare ours with.  Empty when none was measured.
    """
    found = [values[key] for key in keys if key in values]
    return [better(round_) for round_ in zip(*found)] if found else []


def own_scores(values: Mapping[str, Sequence[float]], keys: Sequence[str],
               better: Callable[..., float]) -> dict[str, list[float]]:
    """
    Each competitor of ``keys`` scored as the goals score ours: against the better of
    them in the same round.  Each reads at most 1.0x (at least, for a cost), and less
    in every round another one wins: chance alone makes the better of two equals beat
    each of them.  So a path at par with the competitors reads under 1.0x in most runs
    as well; printed beside the goals so that a ratio near 1.0x is read for what it is.
    """
    best = best_per_round(values, keys, better)
    return {key: ratios(values[key], best) for key in keys if key in values and best}


def save_results(results: dict[str, Any], folder: Path) -> Path:
    """Keep a run's raw results as ``folder/results.json`` (for ``--report``); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def print_saved_report(report: Callable[[dict[str, Any]], str], path: str) -> int:
    """
    Print ``report`` of the results a run kept at ``path`` (its ``results.json``); 0, or
    2 with one line on standard error when the file cannot be read or is not a run's.
    """
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        print(f"cannot read a run's results from {path}: {e}", file=sys.stderr)
        return 2
    try:
        text = report(results)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError,
            ZeroDivisionError) as e:
        print(f"{path} does not hold a run's results (missing or wrong: "
              f"{type(e).__name__} {e})", file=sys.stderr)
        return 2
    print(text)
    return 0


def times(values: Sequence[float]) -> str:
    """A median ratio and, over more than one value, its spread: ``0.90x (0.80-1.00)``."""
    if not values:
        return "n/a"
    text = f"{median(values):.2f}x"
    return text + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def goal(label: str, values: list[float], target: str, met: Callable[[float], bool],
          fmt: str = ".2f", unit: str = "x") -> list[str]:
    if not values:
        return [label, "n/a (not measured)", target, ""]
    text = f"{format(median(values), fmt)}{unit}"
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return [label, text, target, "PASS" if met(median(values)) else "MISS"]


def only_from_env(variable: str, known: Sequence[str], what: str) -> list[str]:
    """
    The keys listed in the environment variable ``variable`` (comma-separated; empty:
    none); an unknown one stops the run naming ``what`` it should have been.
    """
    only = [k for k in os.environ.get(variable, "").split(",") if k]
    unknown = [k for k in only if k not in known]
    if unknown:
        raise SystemExit(f"{variable}: unknown {what} {unknown}; known: {list(known)}")
    return only


def print_load_before(what_suffers: str) -> None:
    """The load average before a run, with a warning naming ``what_suffers`` if busy."""
    busy = os.getloadavg()[0]
    print(f"load average before the run: {busy:.2f} on {os.cpu_count()} CPUs"
          + (f" -- other work is running: {what_suffers} will read worse than on an idle "
             "machine" if busy > 0.5 else ""), flush=True)
