"""
SNI benchmark (issue 14, item 4): new TLS connections through our public and private
proxies beside an HAProxy chain, in one run with interleaved rounds.

One TLS server, Debian's nginx (:mod:`bench.sni_network` says why and how), reached:

- **direct**: the load client's own ceiling;
- **ours, raw forward**: public proxy (TLS port, SNI routing, brokering over the EPS
  network) -> private proxy forwarding the TLS bytes -> nginx's HTTPS port;
- **ours, terminating**: the same, but the private proxy terminates TLS (same
  certificate) and forwards HTTP to nginx's plain port;
- **HAProxy chain**: an ``req.ssl_sni`` router -> a TCP hop -> nginx's HTTPS port, with
  default buffers and with ``tune.bufsize 1048576`` (issue 14's goals are against the
  better of these two, for both of our paths);
- **HAProxy chain, terminating**: the router -> a hop that terminates TLS with the same
  certificate and forwards HTTP to nginx's plain port: the like-for-like competitor of
  our terminating path, reported beside the goals (a passthrough chain never decrypts);
- **floor**: plain Python shaped like our two proxies on the pooled path, without their
  limits and checks (:mod:`bench.sni_floor`): how much of the gap to HAProxy is Python's.

All programs run as real processes (ours under ``twistd``) with settings written for the
run under ``run/bench-sni/`` and free ports.  Measured, per path:

1. **memory per idle connection**: RSS growth of the path's proxy processes (ours: the
   public + the private proxy; HAProxy: router + hop) while ``BENCH_SNI_IDLE`` (1,000)
   idle TLS connections are open through it, divided by that number.  Measured first,
   right after start and a 20-connection warm-up, so that no earlier load's freed heap
   hides growth.
2. **new TLS connections per second** at 1 and 16 concurrent clients
   (:mod:`bench.sni_client`: separate processes, each connection a TCP connect and a full
   verified TLS handshake with SNI, then close), ``BENCH_SNI_SECONDS`` (5) counted after
   a warm-up; p50/p99 of connect + handshake.
3. **one-stream throughput** (the files read once first, so that no path pays for
   filling the page cache): curl downloads ``BENCH_SNI_BYTES`` (1e9) from nginx through
   the path; MB/s from the request (after the handshake) to the last byte (the
   terminating private proxy's ``max_response_bytes`` is raised to the stream's size).

``BENCH_ROUNDS`` (3) rounds, the paths rotated each round; medians (min-max) and medians
of per-round ratios to the better HAProxy chain of the same round.  The public proxy's
``tcp_rate_limits`` are set far above the load (and the refusals counted), so that they
are not what is measured.  ``BENCH_SNI_QUICK=1`` (or ``python -m bench.sni --quick``)
makes a run of seconds; ``BENCH_SNI_ONLY=direct,ours-raw,haproxy`` limits the paths;
``BENCH_SNI_POOL_SIZE=0`` measures the brokered path (no pool) and
``BENCH_SNI_SPLICE_ENGINE=0`` our proxies with ``splice_engine: false``.
The raw results are kept in ``run/bench-sni/results.json``; ``python -m bench.sni
--report FILE`` prints the tables from such a file again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .common import (
    best_per_round,
    cell,
    cpu_seconds,
    goal,
    haproxy_binary,
    median,
    only_from_env,
    own_scores,
    print_load_before,
    print_saved_report,
    ratios,
    rotations,
    rss_bytes,
    save_results,
    step,
    stop_on_sigterm,
    table,
    times,
)
from .sni_network import (
    CERTS, RATE_LIMITS, RAW_DOMAIN, RUN_DIR, TERM_DOMAIN, Network, missing_tools,
)

__all__ = ["PATHS", "SniPath", "run", "report", "main"]

#: Goals of issue 14, against the better HAProxy chain of the same round.
RATE_GOAL = 0.8        # ours / chain, new TLS connections per second, at least
P99_GOAL = 1.5         # ours / chain, p99 connect + handshake, at most
THROUGHPUT_GOAL = 1.0  # ours / chain, one stream MB/s, at least
MEMORY_GOAL = 2.0      # ours / chain, RSS per idle connection, at most
CLIENTS = (1, 16)
IDLE_WARMUP = 20


@dataclass(frozen=True)
class SniPath:
    """One way from the client to nginx: its key, the label of its row and the name asked."""

    key: str
    label: str
    domain: str = RAW_DOMAIN


PATHS = (
    SniPath("direct", "direct to nginx (client ceiling)"),
    SniPath("ours-raw", "ours: public + private proxy, raw forward"),
    SniPath("ours-term", "ours: public + private proxy, terminating", TERM_DOMAIN),
    SniPath("haproxy", "HAProxy chain (SNI router + TCP hop), default buffers"),
    SniPath("haproxy-1m", "HAProxy chain, tune.bufsize 1048576"),
    SniPath("haproxy-term", "HAProxy chain, terminating (SNI router + TLS/HTTP hop)",
            TERM_DOMAIN),
    SniPath("floor", "floor: plain Python on the pooled path, no limits (bench/sni_floor.py)"),
)
BY_KEY = {path.key: path for path in PATHS}
CHAINS = ("haproxy", "haproxy-1m")  # the goals' competitors (TLS passthrough)
OURS = ("ours-raw", "ours-term")
#: Each of our paths' like-for-like HAProxy chain, reported beside the goals.
LIKE_FOR_LIKE = {"ours-term": "haproxy-term"}


def _client(mode: str, config: dict[str, Any], **kwargs: Any) -> subprocess.Popen:
    config = dict(config, cafile=str(CERTS / "root.crt"))
    return subprocess.Popen([sys.executable, "-m", "bench.sni_client", mode, json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def rate(net: Network, path: SniPath, clients: int, seconds: float,
         warmup: float) -> dict[str, Any]:
    """
    New TLS connections per second through ``path`` with ``clients`` clients, and the CPU
    seconds its proxies (``proxy_cpu``) and, for ours, the two endpoint servers that broker
    each connection (``broker_cpu``) used meanwhile.
    """
    proxies = net.pids(path.key)
    brokers = [pid for pid in net.pids(path.key, brokering=True) if pid not in proxies]
    ours = path.key in OURS
    pool_before = _pool_counts(net) if ours else None
    before = [sum(cpu_seconds(pid) for pid in pids) for pids in (proxies, brokers)]
    process = _client("rate", {"port": net.port(path.key), "sni": path.domain,
                               "clients": clients, "seconds": seconds, "warmup": warmup})
    out, err = process.communicate(timeout=120 + 3 * (seconds + warmup))
    after = [sum(cpu_seconds(pid) for pid in pids) for pids in (proxies, brokers)]
    if process.returncode != 0:
        raise RuntimeError(f"{path.key} load client failed:\n{err.decode()[-3000:]}")
    result = json.loads(out.splitlines()[-1])
    if not result["connections"]:
        raise RuntimeError(f"{path.key}: no connection completed ({result['error']})")
    result["proxy_cpu"], result["broker_cpu"] = (b - a for a, b in zip(before, after))
    if pool_before is not None:
        result["pool_hits"], result["pool_misses"] = (
            b - a for a, b in zip(pool_before, _pool_counts(net)))
    return result


def _pool_counts(net: Network) -> tuple[float, float]:
    """The public proxy's pool hits and misses so far (issue 14)."""
    return (net.metric("proxy_pool_requests_total", {"outcome": "hit"}),
            net.metric("proxy_pool_requests_total", {"outcome": "miss"}))


def stream(net: Network, path: SniPath, size: int) -> dict[str, Any]:
    """
    One download of ``size`` bytes through ``path`` with curl: MB/s from the request sent
    (after the handshake) to the last byte, so that a proxy that buffers a response before
    sending its first byte is charged for it.
    """
    port = net.port(path.key)
    name = "stream-term" if path.domain == TERM_DOMAIN else "stream"
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", str(120 + size / 20e6),
         "--cacert", str(CERTS / "root.crt"), "--resolve", f"{path.domain}:{port}:127.0.0.1",
         "-w", "%{size_download} %{time_pretransfer} %{time_total}",
         f"https://{path.domain}:{port}/{name}"],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path.key}: curl failed ({done.returncode}): {done.stderr}")
    received, sent, total = done.stdout.split()
    if int(received) != size:
        raise RuntimeError(f"{path.key}: received {received} bytes, not {size}")
    return {"bytes": size, "seconds": max(float(total) - float(sent), 1e-6)}


def idle(net: Network, path: SniPath, count: int) -> dict[str, Any]:
    """RSS growth of ``path``'s proxies holding ``count`` idle TLS connections."""
    pids = net.pids(path.key)
    result: dict[str, Any] = {}
    for phase, n in (("warmup", IDLE_WARMUP), ("measured", count)):
        before = sum(rss_bytes(pid) for pid in pids)
        holder = _client("idle", {"port": net.port(path.key), "sni": path.domain, "count": n},
                         stdin=subprocess.PIPE)
        assert holder.stdin is not None and holder.stdout is not None
        line = holder.stdout.readline().decode().strip()
        held = sum(rss_bytes(pid) for pid in pids)
        holder.stdin.write(b"close\n")
        holder.stdin.flush()
        _out, err = holder.communicate(timeout=60)
        if line != "ready":
            raise RuntimeError(f"{path.key}: {n} idle connections: {line!r}\n"
                               f"{err.decode()[-3000:]}")
        result = {"before": before, "held": held, "count": n}
    return result


def run(rounds: int = 3, seconds: float = 5.0, stream_bytes: int = 1_000_000_000,
        idle_count: int = 1000, only: Sequence[str] | None = None,
        clients: Sequence[int] = CLIENTS, folder: Path = RUN_DIR,
        pool_size: int | None = None, splice_engine: bool = True) -> dict[str, Any]:
    """
    Every measurement for the paths of ``only`` (default: all).  Returns
    ``{"settings": {...}, "rate": {clients: {key: [round, ...]}}, "stream": {key: [...]},
    "idle": {key: result}, "rate_limited": n}``.  Settings, logs and data go to ``folder``
    (emptied first).
    """
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"the SNI benchmark needs {', '.join(missing)}")
    paths = [BY_KEY[k] for k in only] if only else list(PATHS)
    if haproxy_binary() is None:
        print("skipping the HAProxy chains: haproxy not installed (apt-get install haproxy)",
              flush=True)
        paths = [p for p in paths if p.key not in CHAINS]
    term_bytes = stream_bytes
    results: dict[str, Any] = {
        "settings": {"rounds": rounds, "seconds": seconds, "stream_bytes": stream_bytes,
                     "term_stream_bytes": term_bytes, "idle": idle_count,
                     "clients": list(clients), "paths": [p.key for p in paths],
                     "pool_size": pool_size, "splice_engine": splice_engine},
        "rate": {str(c): {} for c in clients}, "stream": {}, "idle": {}}
    warmup = min(1.0, seconds / 4)
    net = Network(stream_bytes, term_bytes, folder, pool_size, splice_engine)
    try:
        net.start([p.key for p in paths])
        net.warm_stream_files()
        for path in paths:
            if path.key != "direct":
                step(f"{idle_count} idle connections: {path.key}")
                results["idle"][path.key] = idle(net, path, idle_count)
        for index, order in enumerate(rotations(paths, rounds)):
            for path in order:
                for n in clients:
                    step(f"round {index + 1}/{rounds}: {path.key}, {n} client(s)")
                    results["rate"][str(n)].setdefault(path.key, []).append(
                        rate(net, path, n, seconds, warmup))
                size = term_bytes if path.domain == TERM_DOMAIN else stream_bytes
                step(f"round {index + 1}/{rounds}: {path.key}, one stream of {size:,} bytes")
                results["stream"].setdefault(path.key, []).append(stream(net, path, size))
        if any(p.key in OURS for p in paths):
            results["rate_limited"] = net.metric(
                'proxy_tls_connections_total{outcome="rate_limited"}') + net.metric(
                "proxy_internal_rate_limited_connections_total")
        # Kept with the run's logs, for `python -m bench.sni --report FILE`.
        save_results(results, folder)
        return results
    finally:
        net.stop()


# -- the report ------------------------------------------------------------------------

def report(results: dict[str, Any]) -> str:
    s = results["settings"]
    keys = [k for k in s["paths"]]
    rates = {n: {k: [r["connections"] / r["seconds"] for r in v] for k, v in by.items()}
             for n, by in results["rate"].items()}
    p50 = {n: {k: [r["p50_ms"] for r in v] for k, v in by.items()}
           for n, by in results["rate"].items()}
    p99 = {n: {k: [r["p99_ms"] for r in v] for k, v in by.items()}
           for n, by in results["rate"].items()}
    mbps = {k: [r["bytes"] / r["seconds"] / 1e6 for r in v] for k, v in results["stream"].items()}
    per_conn = {k: (r["held"] - r["before"]) / r["count"] for k, r in results["idle"].items()}
    chain_rate = {n: best_per_round(by, CHAINS, max) for n, by in rates.items()}
    chain_p99 = {n: best_per_round(by, CHAINS, min) for n, by in p99.items()}
    chain_mbps = best_per_round(mbps, CHAINS, max)
    # Below a page per connection, too few idle connections were held to tell growth.
    chain_mem = min((per_conn[k] for k in CHAINS if k in per_conn), default=0.0)
    chain_mem = chain_mem if chain_mem > 0 else None

    def vs(mine: list[float], theirs: list[float], key: str) -> str:
        if key.startswith("haproxy") or key == "direct" or not theirs:
            return "-"
        found = ratios(mine, theirs)
        return times(found) if found else "-"

    rows = []
    for key in keys:
        row: list[str] = [BY_KEY[key].label]
        for n in s["clients"]:
            mine = rates[str(n)].get(key, [])
            row += [cell(mine), vs(mine, chain_rate[str(n)], key),
                    f"{median(p50[str(n)].get(key, [])):.2f} / "
                    f"{median(p99[str(n)].get(key, [])):.2f}"]
        busiest = results["rate"][str(s["clients"][-1])].get(key, [])
        cpu = [r["cpu"] / r["seconds"] for r in busiest]
        row.append(f"{median(cpu) * 100:.0f}%" if cpu else "-")
        if key == "direct" or not busiest:
            row.append("-")
        else:
            per = median([r["proxy_cpu"] / r["completed"] * 1e6 for r in busiest])
            brokering = median([r["broker_cpu"] / r["completed"] * 1e6 for r in busiest])
            row.append(f"{per:,.0f}" + (f" + {brokering:,.0f}" if key in OURS else ""))
        row += [cell(mbps.get(key, [])), vs(mbps.get(key, []), chain_mbps, key)]
        if key in per_conn:
            mem = f"{per_conn[key] / 1e3:.1f}"
            if not key.startswith("haproxy") and chain_mem:
                mem += f" ({per_conn[key] / chain_mem:.2f}x)"
        else:
            mem = "-"
        row.append(mem)
        rows.append(row)
    headers = ["path"]
    for n in s["clients"]:
        headers += [f"conn/s @{n}", "x HAProxy", f"p50 / p99 ms @{n}"]
    headers += [f"client CPU % wall @{s['clients'][-1]}",
                f"proxies' CPU µs/conn @{s['clients'][-1]} (ours: + both EPS)",
                "MB/s, one stream", "x HAProxy", "KB per idle conn"]
    term = (f" ({s['term_stream_bytes']:,} through the terminating proxy)"
            if "ours-term" in keys and s["term_stream_bytes"] != s["stream_bytes"] else "")
    out = [f"{s['rounds']} interleaved round(s), paths rotated; {s['seconds']:g} s per "
           f"connection-rate run; one stream of {s['stream_bytes']:,} bytes{term}; "
           f"{s['idle']:,} idle connections for memory.  Medians (min-max); "
           "'x HAProxy' = median of the per-round ratios to the better HAProxy chain of "
           "that round.\n", table(headers, rows), ""]

    goals = []
    for key in OURS:
        if key not in keys:
            continue
        short = "raw" if key == "ours-raw" else "terminating"
        for n in s["clients"]:
            goals.append(goal(f"{short}: conn/s @{n} / HAProxy chain's",
                               ratios(rates[str(n)].get(key, []), chain_rate[str(n)]),
                               f">= {RATE_GOAL:g}x", lambda v: v >= RATE_GOAL))
        for n in s["clients"]:
            goals.append(goal(f"{short}: p99 connect+handshake @{n} / HAProxy chain's",
                               ratios(p99[str(n)].get(key, []), chain_p99[str(n)]),
                               f"<= {P99_GOAL:g}x", lambda v: v <= P99_GOAL))
        goals.append(goal(f"{short}: one-stream MB/s / HAProxy chain's",
                           ratios(mbps.get(key, []), chain_mbps),
                           f">= {THROUGHPUT_GOAL:g}x", lambda v: v >= THROUGHPUT_GOAL))
        goals.append(goal(f"{short}: RSS per idle connection / HAProxy chain's",
                           [per_conn[key] / chain_mem] if key in per_conn and chain_mem else [],
                           f"<= {MEMORY_GOAL:g}x", lambda v: v <= MEMORY_GOAL))
    alike = []
    for key, theirs in LIKE_FOR_LIKE.items():
        if key not in keys or theirs not in keys:
            continue
        row = [f"{BY_KEY[key].label} / {BY_KEY[theirs].label}"]
        for n in s["clients"]:
            row.append(times(ratios(rates[str(n)].get(key, []), rates[str(n)].get(theirs, []))))
        for n in s["clients"]:
            row.append(times(ratios(p99[str(n)].get(key, []), p99[str(n)].get(theirs, []))))
        row.append(times(ratios(mbps.get(key, []), mbps.get(theirs, []))))
        row.append(f"{per_conn[key] / per_conn[theirs]:.2f}x"
                   if per_conn.get(key) and per_conn.get(theirs, 0) > 0 else "-")
        alike.append(row)
    if alike:
        out.append("Like for like (beside the goals, which are against the passthrough "
                   "chains): medians of per-round ratios to the HAProxy chain that does the "
                   "same work.\n")
        out.append(table(["ours / HAProxy"] + [f"conn/s @{n}" for n in s["clients"]]
                         + [f"p99 @{n}" for n in s["clients"]]
                         + ["MB/s, one stream", "KB per idle conn"], alike) + "\n")
    # Best rounds on both sides: on a busy machine one slow direct round must not read as
    # a low ceiling.
    direct = {n: max(rates[str(n)]["direct"]) for n in s["clients"]
              if rates[str(n)].get("direct")}
    fastest = {n: max((max(v) for k, v in rates[str(n)].items() if k != "direct" and v),
                      default=0.0) for n in direct}
    if direct and all(fastest.values()):
        top = max(direct)
        out.append("The load client's own ceiling (direct to nginx, best round): "
                   + ", ".join(f"{direct[n]:,.0f} conn/s at {n} client{'s' if n > 1 else ''}"
                               for n in direct)
                   + "; the fastest proxied path's best round reaches "
                   + ", ".join(f"{fastest[n] / direct[n]:.2f}" for n in direct)
                   + " of it.  At 1 client every path runs one handshake after another, so "
                     "the client's own time per handshake is in every path's latency alike; "
                   + (f"at {top} clients the proxied paths stay well below the ceiling: the "
                      "client is not what limits them.\n"
                      if fastest[top] / direct[top] <= 0.8 else
                      f"at {top} clients a proxied path comes close to the ceiling: the client "
                      "may be part of the limit (see its CPU % wall).\n"))
    if goals:
        out.append(table(["goal (issue 14)", "median (min-max over rounds)", "target",
                          "result"], [[g[0], g[1], g[2], "met" if g[3] == "PASS" else
                                       "not met" if g[3] == "MISS" else g[3]] for g in goals]))
    own = [(f"conn/s @{n}", own_scores(by, CHAINS, max)) for n, by in rates.items()]
    own += [(f"p99 @{n}", own_scores(by, CHAINS, min)) for n, by in p99.items()]
    own.append(("one-stream MB/s", own_scores(mbps, CHAINS, max)))
    if all(len(scores) > 1 for _, scores in own):
        out.append("\nThe same per-round statistic for the HAProxy chains themselves (each "
                   "against the better chain of its round; a path at par with them reads "
                   "under 1.0x, or over it for p99, in most runs): " + "; ".join(
                       f"{BY_KEY[key].label}: " + ", ".join(
                           f"{what} {times(scores[key])}" for what, scores in own)
                       for key in CHAINS) + ".")
    pooled = []
    for key in OURS:
        runs = {n: results["rate"][str(n)].get(key, []) for n in s["clients"]}
        if not all("pool_hits" in r for v in runs.values() for r in v):
            continue
        parts = []
        for n, v in runs.items():
            hits = sum(r["pool_hits"] for r in v)
            total = hits + sum(r["pool_misses"] for r in v)
            if total:
                parts.append(f"{hits / total:.0%} at {n} client{'s' if n > 1 else ''}")
        if parts:
            pooled.append(f"{BY_KEY[key].label}: {', '.join(parts)}")
    if pooled:
        size = s.get("pool_size")
        out.append("\nConnections served from the private proxy's pool of pre-dialled "
                   "connections (the rest were brokered; private proxy pool_size "
                   f"{'default' if size is None else size}): " + "; ".join(pooled) + ".")
    if any(key in OURS for key in s.get("paths", [])):
        engine = s.get("splice_engine", True)
        out.append("\nOur proxies' splice_engine: " + (
            "true (spliced TCP pairs relayed in C; the terminating private proxy's TLS "
            "connections in Python)" if engine else
            "false (every pair relayed in Python; BENCH_SNI_SPLICE_ENGINE=0)") + ".")
    if "rate_limited" in results:
        limits = ", ".join(f"{r['limit']:,} a {r['type']}" for r in RATE_LIMITS)
        out.append(f"\nThe public proxy's tcp_rate_limits for this run: {limits} per "
                   f"address (the dev role allows 1,000 a minute); connections refused by "
                   f"rate limits during the run: {results['rate_limited']:.0f}.")
    return "\n".join(out)


#: The knobs: (environment variable, default, quick default, smallest, largest).
KNOBS = {
    "rounds": ("BENCH_ROUNDS", "3", "1", 1, 100),
    "seconds": ("BENCH_SNI_SECONDS", "5", "1", 0.1, 600),
    "stream_bytes": ("BENCH_SNI_BYTES", "1e9", "2e8", 1e6, 1e11),
    # HAProxy's maxconn for the run is 8,000: each idle connection is two there.
    "idle_count": ("BENCH_SNI_IDLE", "1000", "300", 1, 4000),
}


def _settings(quick: bool) -> dict[str, Any]:
    """The run's settings from the environment; a bad value stops with its name."""
    quick = quick or os.environ.get("BENCH_SNI_QUICK", "") not in ("", "0")
    settings: dict[str, Any] = {}
    for key, (name, default, short, low, high) in KNOBS.items():
        text = os.environ.get(name, short if quick else default)
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # also false for nan
            raise SystemExit(f"{name}: {text[:40]!r} is not a number from {low:g} to {high:g}")
        settings[key] = value if key == "seconds" else int(value)
    pool = os.environ.get("BENCH_SNI_POOL_SIZE", "")
    if pool:
        if not pool.isdigit() or int(pool) > 1000:
            raise SystemExit(f"BENCH_SNI_POOL_SIZE: {pool[:40]!r} is not a number from 0 to 1000")
        settings["pool_size"] = int(pool)
    engine = os.environ.get("BENCH_SNI_SPLICE_ENGINE", "1")
    if engine not in ("0", "1"):
        raise SystemExit(f"BENCH_SNI_SPLICE_ENGINE: {engine[:40]!r} is not 0 or 1")
    settings["splice_engine"] = engine == "1"
    return settings


def main(quick: bool = False) -> None:
    """Run the benchmark as configured by the environment (``quick``: a run of seconds)."""
    settings = _settings(quick)
    only = only_from_env("BENCH_SNI_ONLY", list(BY_KEY), "path(s)")
    stop_on_sigterm()
    print_load_before("rates")
    started = time.monotonic()
    results = run(only=only or None, **settings)
    print(report(results))
    print(f"load average after the run: {os.getloadavg()[0]:.2f}; "
          f"{time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"] and len(sys.argv) == 3:
        # The tables again from a run's results.json (run/bench-sni/results.json).
        sys.exit(print_saved_report(report, sys.argv[2]))
    else:
        main("--quick" in sys.argv[1:])
