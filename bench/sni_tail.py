"""
Where the latency tail of one client is (issue 14's p99 goal at one client).

``python -m bench.sni_tail [--rounds 6] [--seconds 4] [--ours ours-term] [--chain haproxy]``

One client, in this process, makes TLS connections one after the other (a TCP connect
and a handshake with SNI that verifies the server's certificate, then a close, as
``bench/sni_client.py`` does) through our raw path and through the HAProxy chain with
1 MiB buffers, both up at the same time (:mod:`bench.sni_network`) and loaded in turn,
the order swapped every round. Printed per path: the latency percentiles over all rounds
(p50 to p99.9 and the maximum) and ours against the chain's. Then, for ours, its
slowest 2% of connections: how far apart they came (in connections). Slow connections that come at a steady distance point at something
periodic: on 2026-12-04 the private proxy's ``requestPoolTokens`` calls, which came every
~190 connections and held up two each, were what set our p99 at one client.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .common import haproxy_binary, median, percentile, print_load_before, stop_on_sigterm
from .sni import BY_KEY, CHAINS, LIKE_FOR_LIKE
from .sni import OURS as OUR_PATHS
from .sni_client import connect, context
from .sni_network import CERTS, RUN_DIR, Network, missing_tools

__all__ = ["measure", "report", "main"]

OURS, CHAIN = "ours-raw", "haproxy-1m"
#: The percentiles printed.
FRACTIONS = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
#: Ours' connections slower than this percentile of ours are looked at for a period.
SLOWEST = 0.98
#: Connections made before each round's counting starts.
WARMUP = 20


def _round(net: Network, key: str, seconds: float) -> list[float]:
    """Latencies (seconds) of one client's connections through ``key``, in order."""
    ctx = context(str(CERTS / "root.crt"))
    port, sni = net.port(key), BY_KEY[key].domain
    for _ in range(WARMUP):
        connect(ctx, port, sni).close()
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while True:
        began = time.monotonic()
        if began >= end:
            return latencies
        connect(ctx, port, sni).close()
        latencies.append(time.monotonic() - began)


def measure(rounds: int, seconds: float, folder: Path = RUN_DIR / "tail",
            ours: str = OURS, chain: str = CHAIN) -> dict[str, Any]:
    """
    ``{"rounds": {path: [[latency, ...] per round]}, "ours": key, "chain": key}`` (see the
    module docstring); ``ours`` and ``chain`` are keys of :data:`bench.sni.PATHS`.
    """
    results: dict[str, list[list[float]]] = {ours: [], chain: []}
    net = Network(10_000_000, 10_000_000, folder)
    try:
        net.start([ours, chain])
        for r in range(rounds):
            for key in ((ours, chain) if r % 2 == 0 else (chain, ours)):
                results[key].append(_round(net, key, seconds))
                print(f"round {r + 1}/{rounds} {key}: {len(results[key][-1])} connections",
                      flush=True)
    finally:
        net.stop()
    return {"rounds": results, "ours": ours, "chain": chain}


def report(results: dict[str, Any]) -> str:
    """The percentiles of both paths, their ratios, and how ours' slowest connections came."""
    rounds = results["rounds"]
    ours, chain = results.get("ours", OURS), results.get("chain", CHAIN)
    every = {key: [v for one in runs for v in one] for key, runs in rounds.items()}
    if not every[ours] or not every[chain]:
        return "no connection measured"
    head = "| path | connections | " + " | ".join(f"p{f * 100:g}" for f in FRACTIONS) + " | max |"
    lines = [head, "|" + "---|" * (len(FRACTIONS) + 3)]
    for key in (ours, chain):
        cells = [f"{percentile(every[key], f) * 1e3:.2f}" for f in FRACTIONS]
        lines.append(f"| {BY_KEY[key].key} | {len(every[key])} | " + " | ".join(cells)
                     + f" | {max(every[key]) * 1e3:.1f} |")
    ratios = [percentile(every[ours], f) / percentile(every[chain], f) for f in FRACTIONS]
    lines.append("| ours / chain | | " + " | ".join(f"{r:.2f}x" for r in ratios) + " | |")
    limit = percentile(every[ours], SLOWEST)
    gaps: Counter[int] = Counter()
    slow = 0
    for one in rounds[ours]:
        positions = [i for i, v in enumerate(one) if v > limit]
        slow += len(positions)
        gaps.update(b - a for a, b in zip(positions, positions[1:]))
    share = slow / len(every[ours])
    common = ", ".join(f"{gap} ({count}x)" for gap, count in gaps.most_common(8))
    lines.append("")
    lines.append(f"ours: {slow} of {len(every[ours])} connections ({share:.1%}) slower than "
                 f"our p{SLOWEST * 100:g} ({limit * 1e3:.2f} ms); the most common distances "
                 f"between them, in connections: {common or '-'}")
    if gaps:
        lines.append(f"median distance {median(list(gaps.elements())):g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sni_tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--ours", choices=OUR_PATHS, default=OURS)
    parser.add_argument("--chain", choices=(*CHAINS, *LIKE_FOR_LIKE.values()), default=CHAIN)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    missing = missing_tools() + ([] if haproxy_binary() else ["haproxy"])
    if missing:
        print(f"the SNI benchmark needs {', '.join(missing)}", file=sys.stderr)
        return 1
    stop_on_sigterm()
    print_load_before("latencies")
    print(report(measure(args.rounds, args.seconds, ours=args.ours, chain=args.chain)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
