"""
``python -m attack [--run-dir DIR] [--only NAME]`` (``make attack``): start the dev network,
keep checked legitimate traffic running through it (the chaos streams: ``hd-2._ping``
through the public proxy's splice, ``ls-1`` lookups and adds, HTTPS through the SNI path,
``_directory``), and attack every listener from another loopback address: slowloris,
handshake floods, held connection floods, random and replayed tokens, foreign-CA,
unpinned and missing client certificates, tampered/replayed/reordered records, oversized
bodies, lines and ClientHellos; last, a distributed attack: slow connections from 250
addresses per listener, about twice its cap (attack/distributed.py).

For each attack the report says what the attacker saw, whether the target refused it in
time, which counters moved on the target's metrics endpoint, and what the legitimate
traffic saw meanwhile.  Exit status 0 only if every attack was refused and counted, no
legitimate call failed, and every process's file descriptors came back to baseline.
Fixed ports: not while ``make demo``, ``make chaos`` or ``make soak`` run.
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from chaos.__main__ import Workload
from chaos.faults import Network
from chaos.traffic import Outcome, Traffic
from epsproxy.dev import demo

from . import scenarios
from .clients import fd_count
from .distributed import run_distributed
from .scenarios import Row

#: Metrics port of every role (conf/dev/roles/*).
METRICS = {2111: "sd-1", 2112: "hd-1", 2113: "hd-2", 2114: "public-proxy-1",
           2115: "public-proxy-eps-1", 2116: "private-proxy-eps-1", 2117: "ls-1",
           2118: "private-proxy-1"}

#: Counters reported when they move (refusals of any kind).
INTERESTING = re.compile(
    r"refus|timeout|rate_limited|tls_connections_total|outcome=\"error|failed|abandoned")


def scrape(port: int) -> dict[str, float]:
    """Every sample of one metrics endpoint, by ``name{labels}``."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        connection.close()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                pass
    return samples


def scrape_all() -> dict[int, dict[str, float]]:
    return {port: scrape(port) for port in METRICS}


def deltas(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]
           ) -> dict[int, dict[str, float]]:
    moved: dict[int, dict[str, float]] = {}
    for port, samples in after.items():
        for name, value in samples.items():
            change = value - before.get(port, {}).get(name, 0.0)
            family = name.split("{", 1)[0]
            if change > 0 and INTERESTING.search(name) and not family.endswith(("_created", "_bucket")):
                moved.setdefault(port, {})[name] = change
    return moved


def canary(outcomes: list[Outcome]) -> str:
    failed = [o for o in outcomes if not o.ok]
    durations = sorted(o.end - o.start for o in outcomes)
    p99 = durations[int(len(durations) * 0.99)] * 1000 if durations else 0
    text = f"{len(failed)}/{len(outcomes)} failed, p99 {p99:.0f} ms"
    if failed:
        text += f" (e.g. {failed[0].stream}: {failed[0].error})"
    return text


def run_attack(name: str, attack: Callable[[], list[Row]], traffic: Traffic
               ) -> tuple[list[Row], str, bool]:
    """Run one attack with metrics before/after; fills each row's ``moved``/``counted``."""
    print(f"attack: {name} ...", flush=True)
    before = scrape_all()
    started = time.monotonic()
    rows = attack()
    ended = time.monotonic()
    time.sleep(0.5)  # let the targets finish counting what they just closed
    moved = deltas(before, scrape_all())
    for row in rows:
        found = []
        row.counted = True
        for port, pattern in row.counters:
            hits = {k: v for k, v in moved.get(port, {}).items() if re.search(pattern, k)}
            if not hits:
                row.counted = False
            found += [f"{METRICS[port]} {k} +{v:g}" for k, v in hits.items()]
        row.moved = "; ".join(found) if found else ("NOT COUNTED" if row.counters else "-")
    window = traffic.window(started, ended)
    summary = canary(window)
    quiet = all(o.ok for o in window)
    others = [f"{METRICS[p]} {k} +{v:g}" for p, ks in moved.items() for k, v in ks.items()]
    print(f"  done in {ended - started:.0f} s; legitimate traffic: {summary}", flush=True)
    if others:
        print("  counters that moved: " + "; ".join(others), flush=True)
    return rows, summary, quiet


def table(sections: list[tuple[str, list[Row], str, bool]]) -> str:
    lines = ["| attack | target | attacker saw | refused in time | counted (delta) | legitimate traffic meanwhile |",
             "|---|---|---|---|---|---|"]
    for _, rows, summary, quiet in sections:
        for index, row in enumerate(rows):
            cell = summary if index == 0 else '"'
            lines.append(
                f"| {row.attack} | {row.target} | {_cell(row.saw)} | "
                f"{'yes' if row.held else 'NO'} | {_cell(row.moved)} | {cell} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run(run_dir: Path, only: list[str] | None) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    demo.stop(run_dir)
    demo.check_ports_free()
    print(f"starting the dev network in {run_dir} (output in {run_dir / 'start.out'})", flush=True)
    with demo.output_to(run_dir / "start.out"):
        demo.start(run_dir)
    network = Network(run_dir)
    pids = {role.name: network.pid(role.name) for role in demo.ROLES}
    time.sleep(2)  # let start-up connections settle before taking the baseline
    baseline = {name: fd_count(pid) for name, pid in pids.items()}
    pooled_before = demo.pooled_connections()
    scratch = scenarios.scratch_dir()
    foreign = scenarios.foreign_pki(scratch / "foreign-pki")
    attacks: list[tuple[str, Callable[[], list[Row]]]] = [
        ("slowloris", scenarios.slowloris),
        *[(f"handshake flood {target}", partial(scenarios.handshake_flood, index))
          for index, (target, *_) in enumerate(scenarios.HANDSHAKE_FLOODS)],
        *[(f"connection flood {label}", partial(scenarios.connection_floods, index))
          for index, (_, label, *_) in enumerate(scenarios.CONNECTION_FLOODS)],
        ("random tokens", scenarios.random_tokens),
        ("replayed token", scenarios.replayed_token),
        ("certificates", lambda: scenarios.certificates(foreign)),
        ("records", lambda: scenarios.records(foreign)),
        ("oversized", lambda: scenarios.oversized(scratch)),
    ]
    workload = Workload()
    traffic = Traffic(workload.streams())
    traffic.start()
    sections = []
    distributed = ""
    distributed_held = True
    try:
        time.sleep(3)
        steady = canary(traffic.window(0, time.monotonic()))
        print(f"legitimate traffic before the attacks: {steady}", flush=True)
        for name, attack in attacks:
            if only and not any(word in name for word in only):
                continue
            rows, summary, quiet = run_attack(name, attack, traffic)
            sections.append((name, rows, summary, quiet))
            time.sleep(1)  # (each flood uses attacking addresses of its own: no shared allowance)
        if not only or any(word in "distributed" for word in only):
            # Last: it lowers the targets' descriptor limit for good.
            distributed, distributed_held = run_distributed(
                run_dir, traffic, pids, scrape, scrape_all)
    finally:
        traffic.stop()
    lost, checked, _ = workload.lost_adds()
    settle_until = time.monotonic() + 30  # pooled and closing connections go on their timeouts
    # As in make soak: a proxy may also hold the idle pooled connections its pool grew by
    # under the load (issue 14: it shrinks back slowly, by design), read from its gauge.
    grown: dict[str, int] = {}
    while True:
        after = {name: fd_count(pid) for name, pid in pids.items()}
        pooled_after = demo.pooled_connections()
        grown = {n: max(0, pooled_after.get(n, 0) - pooled_before.get(n, 0)) for n in pids}
        if (all(after[n] <= baseline[n] + 8 + grown[n] for n in pids)
                or time.monotonic() > settle_until):
            break
        time.sleep(1)
    fds = ", ".join(f"{n} {baseline[n]}→{after[n]}"
                    + (f" ({grown[n]} more idle pooled)" if grown[n] else "") for n in pids)
    fds_ok = all(after[n] <= baseline[n] + 8 + grown[n] for n in pids)
    report = "\n\n".join([
        f"Command: `python -m attack` (make attack); machine: {demo.machine()}; "
        f"whole run {time.monotonic() - started:.0f} s. Attacking addresses 127.0.0.2 and up (each flood its own), "
        "legitimate traffic from 127.0.0.1.",
        f"Legitimate traffic before the attacks: {steady}.",
        table(sections),
        distributed,
        f"Acknowledged `ls-1.add` calls looked up again at the end: {checked}, lost {lost}.",
        f"File descriptors per process, before the attacks → after (settled, at most 30 s; "
        f"allowed: 8 more, plus the idle pooled connections a proxy's pool grew by): {fds}.",
    ])
    print("\n" + report)
    (run_dir / "attack-report.md").write_text(report + "\n")
    ok = (lost == 0 and fds_ok and distributed_held
          and all(row.held and row.counted for _, rows, _, _ in sections for row in rows)
          and all(quiet for *_, quiet in sections))
    print(f"\nattack: {'every attack refused and counted, nothing else harmed' if ok else 'FAILED (see NO / NOT COUNTED / failed calls above)'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="run/attack", help="folder for logs and pids")
    parser.add_argument("--only", action="append",
                        help="run only attacks whose name contains this (repeatable)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    try:
        return run(run_dir, args.only)
    except demo.DemoError as e:
        print(f"attack: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop(run_dir)


if __name__ == "__main__":
    sys.exit(main())
