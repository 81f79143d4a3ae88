"""
The distributed attack of ``make attack`` (issue 17): slow connections from 250 loopback
source addresses per target, together about twice a listener's cap, against the public
proxy's TLS (SNI) and internal endpoints and hd-2's peer listener at once, while the
checked legitimate traffic runs.

The targets' descriptor limit is first lowered to :data:`LIMIT` with ``prlimit`` (an
operator's tool; the processes read their limit live), so that the caps *derived from
it* (no cap is configured in conf/dev) are small enough for one attacking process to
overrun on a shared machine: process cap = limit - max(64, limit/10), a listener a
quarter of that, an address a quarter of a listener's.

Measured: what the attacker held and how fast it could reconnect (its own ceiling), the
listeners' connection gauges (sampled each second), whether any process ever hit
``EMFILE`` (its accept-error metric, its log), the legitimate traffic's failures,
latency and rate at rest, during the attack and after, and how long the listeners took
to come back down once the attacker left.
"""

from __future__ import annotations

import json
import re
import resource
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chaos.traffic import Outcome, Traffic
from epsproxy.dev import demo
from epsproxy.net import admission

from .clients import client_hello, fd_count

#: Soft and hard descriptor limit given to the attacked processes.
LIMIT = 2048
ADDRESSES = 250
PER_ADDRESS = 4
#: One more address per target opens this many: over the per-address cap.
GREEDY = 200
REST_SECONDS = 20.0
ATTACK_SECONDS = 45.0
RECOVERY_SECONDS = 20.0

#: Streams whose calls must all succeed (operators' calls, the existing P2P link).
MUST_NOT_FAIL = ("p2p", "ls", "add", "dir")


@dataclass(frozen=True)
class Target:
    label: str
    port: int
    role: str  # the process (demo role) that owns the listener
    metrics: int
    listener: str  # label of <prefix>_listener_connections
    prefix: str
    payload: bytes
    first: str


def targets() -> list[Target]:
    return [
        Target("public proxy TLS (SNI) :4433", 4433, "public-proxy-1", 2114, "public.tls",
               "proxy", client_hello(demo.SNI_DOMAIN), "127.10.0.1"),
        Target("public proxy internal :9999", 9999, "public-proxy-1", 2114, "public.internal",
               "proxy", secrets.token_bytes(32), "127.11.0.1"),
        Target("hd-2 eps_server :8889", 8889, "hd-2", 2113, "channels[eps-server]", "eps",
               client_hello("hd-2"), "127.12.0.1"),
    ]


def expected_caps() -> tuple[int, int, int]:
    """(process cap, listener cap, per-address cap) the targets derive from :data:`LIMIT`."""
    process = LIMIT - admission.reserved_for(LIMIT)
    listener = admission.default_listener_cap(process)
    return process, listener, admission.default_per_address_cap(listener)


@dataclass
class Sampler:
    """Samples gauges and descriptor counts once a second in a thread."""

    scrape: Callable[[int], dict[str, float]]
    pids: dict[str, int]
    series: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="attack-sampler").start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample: dict[str, float] = {}
            for port in (2113, 2114):
                for name, value in self.scrape(port).items():
                    if re.match(r"(proxy|eps)_(listener_connections|connections|accept_errors)", name):
                        sample[f"{port} {name}"] = value
            for role, pid in self.pids.items():
                try:
                    sample[f"fd {role}"] = fd_count(pid)
                except OSError:
                    pass
            self.series.append((time.monotonic(), sample))
            self._stop.wait(1.0)

    def peak(self, key: str, start: float, end: float) -> float:
        values = [s.get(key, 0.0) for t, s in self.series if start <= t <= end]
        return max(values) if values else float("nan")

    def settled(self, key: str, after: float, below: float) -> float | None:
        """Seconds after ``after`` until ``key`` was first below ``below``."""
        for t, s in self.series:
            if t >= after and s.get(key, below) < below:
                return t - after
        return None


def stream_figures(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    durations = sorted(o.end - o.start for o in outcomes)
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    return {
        "calls": len(outcomes), "failed": len(failed),
        "p50": durations[len(durations) // 2] * 1000 if durations else float("nan"),
        "p99": durations[int(len(durations) * 0.99)] * 1000 if durations else float("nan"),
        "rate": len(ok) / seconds if seconds else 0.0,
        "example": failed[0].error if failed else "",
    }


def lower_limits(pids: dict[str, int]) -> dict[str, str]:
    result = {}
    for role, pid in pids.items():
        before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
        result[role] = f"{before[0]}→{LIMIT}"
    return result


def log_mentions_emfile(run_dir: Path) -> list[str]:
    hits = []
    for path in sorted(run_dir.glob("*.log")) + sorted(run_dir.glob("*.out")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        count = len(re.findall(r"EMFILE|Too many open files", text))
        if count:
            hits.append(f"{path.name}: {count}")
    return hits


def run_distributed(run_dir: Path, traffic: Traffic, pids: dict[str, int],
                    scrape: Callable[[int], dict[str, float]],
                    scrape_all: Callable[[], dict[int, dict[str, float]]]) -> tuple[str, bool]:
    """Run the distributed attack; returns (the report's section in Markdown, held)."""
    chosen = targets()
    roles = {t.role for t in chosen}
    attacked = {role: pids[role] for role in roles}
    limits = lower_limits(attacked)
    process_cap, listener_cap, per_address_cap = expected_caps()
    print(f"attack: distributed: targets' descriptor limit {limits}; derived caps: process "
          f"{process_cap}, listener {listener_cap}, per address {per_address_cap}", flush=True)
    before = scrape_all()
    sampler = Sampler(scrape, attacked)
    sampler.start()
    rest_start = time.monotonic()
    time.sleep(REST_SECONDS)
    config = {"seconds": ATTACK_SECONDS, "targets": [
        {"name": t.label, "port": t.port, "payload": t.payload.hex(), "addresses": ADDRESSES,
         "per_address": PER_ADDRESS, "greedy": GREEDY, "first": t.first, "interval": 2.0}
        for t in chosen]}
    print(f"attack: distributed: {len(chosen)} targets x {ADDRESSES} addresses x "
          f"{PER_ADDRESS} slow connections (+{GREEDY} from one address) for "
          f"{ATTACK_SECONDS:.0f} s ...", flush=True)
    attack_start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "attack.swarm", json.dumps(config)],
                          capture_output=True, text=True, timeout=ATTACK_SECONDS + 120,
                          cwd=Path(__file__).resolve().parent.parent)
    attack_end = time.monotonic()
    try:
        swarm = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        swarm = {"seconds": 0, "targets": []}
        print(f"attack: distributed: the attacker failed: {done.stderr[-500:]}", flush=True)
    time.sleep(RECOVERY_SECONDS)
    recovery_end = time.monotonic()
    sampler.stop()
    after = scrape_all()

    # -- figures
    rest = {s: stream_figures(traffic.window(rest_start, attack_start, s), attack_start - rest_start)
            for s in {st.name for st in traffic.streams}}
    during = {s: stream_figures(traffic.window(attack_start, attack_end, s), attack_end - attack_start)
              for s in rest}
    later = {s: stream_figures(traffic.window(attack_end, recovery_end, s), recovery_end - attack_end)
             for s in rest}
    emfile_metric = {
        port: value for port, samples in after.items()
        for name, value in samples.items()
        if name.endswith('_accept_errors_total{error="EMFILE"}') and value > 0}
    emfile_logs = log_mentions_emfile(run_dir)

    def moved(port: int, pattern: str) -> float:
        total = 0.0
        for name, value in after.get(port, {}).items():
            if re.fullmatch(pattern, name):
                total += value - before.get(port, {}).get(name, 0.0)
        return total

    target_rows = []
    by_label = {t["name"]: t for t in swarm["targets"]}
    for t in chosen:
        key = f"{t.metrics} {t.prefix}_listener_connections{{listener=\"{t.listener}\"}}"
        s = by_label.get(t.label, {})
        settle = sampler.settled(key, attack_end, max(10.0, listener_cap * 0.1))
        label = re.escape(t.listener)
        reached = moved(t.metrics, rf'{t.prefix}_listener_cap_reached_total\{{listener="{label}"\}}')
        per_address = moved(t.metrics,
                            rf'{t.prefix}_listener_per_address_refused_total\{{listener="{label}"\}}')
        evicted = moved(t.metrics, rf'{t.prefix}_listener_evicted_total\{{listener="{label}"\}}')
        target_rows.append(
            f"| {t.label} | {s.get('sources', 0)} | {s.get('attempts', 0)} "
            f"({s.get('attempts_per_second', 0)}/s) | {s.get('max_open', 0)} | "
            f"{sampler.peak(key, attack_start, attack_end):.0f} of {listener_cap} | "
            f"{reached:.0f} | {per_address:.0f} | {evicted:.0f} | {s.get('closed_by_server', 0)} "
            f"(median held {s.get('held_median')} s) | {s.get('connect_timeouts', 0)} | "
            + (f"{settle:.0f} s" if settle is not None else "NOT within the window") + " |")
    fd_peaks = ", ".join(
        f"{role} {sampler.peak(f'fd {role}', attack_start, attack_end):.0f} of {LIMIT}"
        for role in sorted(attacked))
    process_peaks = ", ".join(
        f"{role} {sampler.peak(f'{port} {prefix}_connections', attack_start, attack_end):.0f} of {process_cap}"
        for role, port, prefix in (("public-proxy-1", 2114, "proxy"), ("hd-2", 2113, "eps")))

    stream_rows = []
    for name in sorted(rest):
        r, d, a = rest[name], during[name], later[name]
        stream_rows.append(
            f"| {name} | {r['calls']}, {r['failed']} failed, p50 {r['p50']:.0f} / p99 "
            f"{r['p99']:.0f} ms, {r['rate']:.1f}/s | {d['calls']}, {d['failed']} failed, p50 "
            f"{d['p50']:.0f} / p99 {d['p99']:.0f} ms, {d['rate']:.1f}/s | {a['calls']}, "
            f"{a['failed']} failed, p50 {a['p50']:.0f} / p99 {a['p99']:.0f} ms, "
            f"{a['rate']:.1f}/s |" + (f" {d['example'][:80]}" if d["example"] else ""))
    skipped = ", ".join(f"{st.name} {st.skipped}" for st in traffic.streams if st.skipped)
    sni_ratio = during["sni"]["rate"] / rest["sni"]["rate"] if rest.get("sni", {}).get("rate") else 0.0
    failures = {s: during[s]["failed"] for s in MUST_NOT_FAIL if s in during}
    held = (not emfile_metric and not emfile_logs and not any(failures.values())
            and sni_ratio >= 0.5 and bool(swarm["targets"]))
    load = Path("/proc/loadavg").read_text().split()[:3]
    section = "\n\n".join([
        "### Distributed attack",
        f"Targets' descriptor limit lowered with prlimit: {limits}; caps derived from it "
        f"(none configured): process {process_cap}, listener {listener_cap}, per address "
        f"{per_address_cap}.  Attacker: one process (`python -m attack.swarm`), "
        f"{ADDRESSES} source addresses per target (127.10-12.0.x, bound explicitly) x "
        f"{PER_ADDRESS} connections + {GREEDY} from one more address, each trickling a "
        f"ClientHello or token one byte every 2 s and reopening at once when closed, for "
        f"{swarm.get('seconds', 0)} s.  Load average at the end: {' '.join(load)} "
        "(2 CPUs shared with other work: timings are disturbed by it).",
        "| target | attacking addresses | attempts (rate: the attacker's ceiling here) | "
        "attacker's open sockets (peak) | served by the listener (peak) | cap reached | "
        "over the per-address cap | evicted at the cap | closed by the server (all "
        "causes) | connects timed out | back under 10% of the cap after |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(target_rows),
        f"Descriptors (peak): {fd_peaks}; connections on capped listeners (peak): "
        f"{process_peaks}.",
        "EMFILE: accept-error metric "
        + ("0 on every process" if not emfile_metric else f"NON-ZERO {emfile_metric}")
        + "; logs " + ("mention none" if not emfile_logs else f"MENTION IT: {emfile_logs}") + ".",
        "| legitimate stream (client rate) | at rest | during the attack | after |\n"
        "|---|---|---|---|\n" + "\n".join(stream_rows),
        f"New SNI clients served during the attack at {sni_ratio:.0%} of their rate at rest "
        f"(goal: at least 50%).  Calls not even started because every worker of a stream "
        f"was busy (the legitimate clients' own ceiling): {skipped or 'none'}.",
    ])
    print("\n" + section, flush=True)
    return section, held
