"""
A paired A/B of one of our SNI paths (raw by default): this tree against another
checkout, loaded in turn.

``python -m bench.sni_ab OTHER [--rounds 8] [--seconds 3] [--clients 1,16] [--path ours-term]``

``python -m bench.sni_ab OTHER --stream 500e6 [--rounds 8] [--path ours-term]``

On this machine two full runs of ``python -m bench sni`` minutes apart differ by more
than most changes to the proxies' code move them (a run's HAProxy chain itself moves by
a fifth).  A change is measured instead by two copies of the path (public proxy,
private proxy, their endpoint servers and nginx, as :mod:`bench.sni_network` starts
them), one running this tree's code and one ``OTHER``'s (through ``PYTHONPATH``), up at
the same time and loaded one after the other, the order swapped every round: each
round's ratio compares two runs seconds apart.  Printed: per round the connection rates,
p99 and the proxies' CPU per connection of each; then the medians, and the median (min-max)
of the per-round ratios this / other.  With ``--stream BYTES`` each round is one download
of that many bytes through each copy (curl, as in the benchmark's one stream) instead:
MB/s and the proxies' CPU per GB.

``OTHER`` is a checkout of the project with its C extension built in place, e.g.
(from this tree, with its venv)::

    git worktree add /tmp/before HEAD~3
    (cd /tmp/before && $OLDPWD/.venv/bin/python setup.py build_ext --inplace)
    .venv/bin/python -m bench.sni_ab /tmp/before

Both copies run with this tree's venv, settings, certificates and load client; only the
``epsproxy`` package differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .common import cpu_seconds, print_load_before, stop_on_sigterm
from .sni import BY_KEY, OURS, rate, stream
from .sni_network import RUN_DIR, Network, missing_tools

__all__ = ["compare", "compare_streams", "main"]

PATHS = OURS


def _network(folder: Path, pythonpath: str | None, key: str,
             stream_bytes: int = 10_000_000) -> Network:
    """Path ``key``'s processes, started with ``PYTHONPATH`` set to ``pythonpath``."""
    saved = os.environ.get("PYTHONPATH")
    if pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = pythonpath
    network = Network(stream_bytes, stream_bytes, folder)
    try:
        network.start([key])
        network.warm_stream_files()
    except BaseException:
        network.stop()  # what did start, before the caller hears of the failure
        raise
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return network


@contextmanager
def _both(other: Path, folder: Path, key: str,
          stream_bytes: int = 10_000_000) -> Iterator[dict[str, Network]]:
    """Path ``key`` twice, ``"this"`` tree's and ``other``'s, up until the block ends."""
    if not (other / "epsproxy" / "__init__.py").is_file():
        raise SystemExit(f"{other} is not a checkout of this project (no epsproxy/)")
    networks: dict[str, Network] = {}
    try:
        networks["this"] = _network(folder / "this", None, key, stream_bytes)
        networks["other"] = _network(folder / "other", str(other), key, stream_bytes)
        yield networks
    finally:
        for network in networks.values():
            network.stop()


def _order(round_index: int) -> list[str]:
    """Which copy is loaded first: swapped every round."""
    return ["this", "other"] if round_index % 2 == 0 else ["other", "this"]


def compare(other: Path, rounds: int, seconds: float, clients: list[int],
            folder: Path = RUN_DIR / "ab", key: str = "ours-raw") -> dict[str, Any]:
    """
    The paired runs of path ``key`` (see the module docstring): ``{"rounds": {clients:
    [(this, other), ...]}}`` with each run as ``rate()`` returns it.
    """
    path = BY_KEY[key]
    results: dict[int, list[tuple[dict[str, Any], dict[str, Any]]]] = {c: [] for c in clients}
    with _both(other, folder, key) as networks:
        for r in range(rounds):
            for n in clients:
                got = {name: rate(networks[name], path, n, seconds, 0.5) for name in _order(r)}
                results[n].append((got["this"], got["other"]))
                print(f"round {r + 1}/{rounds} @{n}: "
                      + " | ".join(f"{name} {_line(got[name])}" for name in ("this", "other")),
                      flush=True)
    return {"rounds": results}


def compare_streams(other: Path, rounds: int, size: int,
                    folder: Path = RUN_DIR / "ab", key: str = "ours-raw") -> dict[str, Any]:
    """
    Paired downloads of ``size`` bytes through path ``key``: ``{"streams": [(this,
    other), ...]}``, each ``{"mb_per_s", "cpu_s_per_gb"}`` (the CPU of the path's
    proxies and their endpoint servers while the download ran).
    """
    path = BY_KEY[key]
    pairs: list[tuple[dict[str, float], dict[str, float]]] = []
    with _both(other, folder, key, size) as networks:
        for r in range(rounds):
            got = {}
            for name in _order(r):
                pids = networks[name].pids(key)
                before = sum(map(cpu_seconds, pids))
                run = stream(networks[name], path, size)
                used = sum(map(cpu_seconds, pids)) - before
                got[name] = {"mb_per_s": size / run["seconds"] / 1e6,
                             "cpu_s_per_gb": used / (size / 1e9)}
            pairs.append((got["this"], got["other"]))
            print(f"round {r + 1}/{rounds}: " + " | ".join(
                f"{name} {got[name]['mb_per_s']:.0f} MB/s, proxies "
                f"{got[name]['cpu_s_per_gb']:.2f} s/GB" for name in ("this", "other")),
                flush=True)
    return {"streams": pairs}


def report_streams(results: dict[str, Any]) -> str:
    """Medians of each side, and of the per-round ratios this / other."""
    pairs = results["streams"]
    lines = []
    for side, i in (("this", 0), ("other", 1)):
        runs = [pair[i] for pair in pairs]
        lines.append(f"{side}: {statistics.median(r['mb_per_s'] for r in runs):.0f} MB/s, "
                     f"proxies {statistics.median(r['cpu_s_per_gb'] for r in runs):.2f} s/GB")
    rates = [a["mb_per_s"] / b["mb_per_s"] for a, b in pairs]
    cpus = [a["cpu_s_per_gb"] / b["cpu_s_per_gb"] for a, b in pairs if b["cpu_s_per_gb"] > 0]
    cpu = (f"{statistics.median(cpus):.3f} ({min(cpus):.2f}-{max(cpus):.2f})"
           if cpus else "n/a (no CPU tick counted)")
    lines.append(f"this / other: MB/s {statistics.median(rates):.3f} "
                 f"({min(rates):.2f}-{max(rates):.2f}), proxies' CPU per GB {cpu}")
    return "\n".join(lines)


def _per_second(run: dict[str, Any]) -> float:
    return float(run["connections"]) / float(run["seconds"])


def _cpu_us(run: dict[str, Any]) -> float:
    return float(run["proxy_cpu"]) / float(run["connections"]) * 1e6


def _line(run: dict[str, Any]) -> str:
    return (f"{_per_second(run):.0f}/s p99 {run['p99_ms']:.2f} ms "
            f"proxies {_cpu_us(run):.0f} µs/conn")


def report(results: dict[str, Any]) -> str:
    """Medians of each side, and of the per-round ratios this / other."""
    lines = []
    for n, pairs in results["rounds"].items():
        if not pairs:
            continue
        rates = [_per_second(a) / _per_second(b) for a, b in pairs]
        cpus = [_cpu_us(a) / _cpu_us(b) for a, b in pairs if _cpu_us(b) > 0]
        for side, i in (("this", 0), ("other", 1)):
            runs = [pair[i] for pair in pairs]
            lines.append(f"@{n} {side}: {statistics.median(map(_per_second, runs)):.0f} conn/s, "
                         f"p99 {statistics.median(r['p99_ms'] for r in runs):.2f} ms, "
                         f"proxies {statistics.median(map(_cpu_us, runs)):.0f} µs/conn")
        cpu = (f"{statistics.median(cpus):.3f} ({min(cpus):.2f}-{max(cpus):.2f})"
               if cpus else "n/a (no CPU tick counted)")
        lines.append(f"@{n} this / other: rate {statistics.median(rates):.3f} "
                     f"({min(rates):.2f}-{max(rates):.2f}), proxies' CPU per connection {cpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sni_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (extension built)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--path", choices=PATHS, default="ours-raw",
                        help="which of our paths (default ours-raw)")
    parser.add_argument("--stream", type=float, metavar="BYTES",
                        help="compare one download of BYTES per round (e.g. 500e6) "
                        "instead of connection rates")
    args = parser.parse_args(argv)
    if args.stream is not None and not 1 <= args.stream <= 100e9:
        parser.error("--stream: a number of bytes from 1 to 100e9")
    missing = missing_tools()
    if missing:
        print(f"the SNI benchmark needs {', '.join(missing)}", file=sys.stderr)
        return 1
    clients = [int(c) for c in args.clients.split(",")]
    stop_on_sigterm()
    if args.stream is not None:
        print_load_before("streams")
        print(report_streams(compare_streams(args.other.resolve(), args.rounds,
                                             int(args.stream), key=args.path)))
        return 0
    print_load_before("rates")
    results = compare(args.other.resolve(), args.rounds, args.seconds, clients,
                      key=args.path)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
