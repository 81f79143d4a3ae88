"""
Smoke test of the relay benchmark (``python -m bench relay``), so it cannot rot: a tiny
run (100 MB streams, short pairing and slow-reader phases, 50 idle pairs) of our relay and
one competitor, through the real relay and load-generator processes, and the report's
tables and goal lines.  The competitor is HAProxy, else socat, else the transit relay,
whichever is installed; with none of them only ours runs and the competitor part is
skipped with a message.  Ours must run.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import relay
from bench.common import save_results

# Large enough that the relay's CPU time spans several clock ticks (/proc/<pid>/stat counts
# in 10 ms ticks): at ~0.4 s/GB a 20 MB stream took under one tick and read as 0.
SIZE = 100_000_000
IDLE_PAIRS = 50
GOALS = (
    "ours MB/s / best-tuned relay",
    "ours relay CPU s/GB",
    "ours pairings/s / transit relay's",
    "ours RSS per idle pair",
    "ours peak RSS growth - HAProxy's",
)


def competitor() -> relay.Relay | None:
    for key in ("haproxy", "socat-128k", "transit"):
        if relay.available(relay.BY_KEY[key]) is None:
            return relay.BY_KEY[key]
    return None


class BenchRelaySmokeTests(SynchronousTestCase):
    def test_tiny_run_of_ours_and_a_competitor(self) -> None:
        ours = relay.BY_KEY["ours"]
        self.assertIsNone(relay.available(ours), "our relay must be importable")
        other = competitor()
        only = ["ours", relay.FLOOR] + ([other.key] if other else [])
        results = relay.run(size=SIZE, rounds=1, pair_seconds=0.5,
                            idle_pairs_count=IDLE_PAIRS, slow_seconds=0.25, only=only)

        self.assertEqual(sorted(results["throughput"]), sorted(only))
        for key, rounds in results["throughput"].items():
            [one] = rounds
            self.assertEqual(one["bytes"], SIZE, key)
            self.assertGreater(one["seconds"], 0, key)
            self.assertGreater(one["relay_cpu"], 0, key)
        [pairing] = results["pairings"]["ours"]
        self.assertGreater(pairing["pairs"], 0)
        self.assertEqual(pairing["errors"], 0)
        idle = results["idle"]["ours"]
        self.assertEqual(idle["pairs"], IDLE_PAIRS)
        self.assertGreater(idle["held"], 0)
        if idle["active"] is not None:
            self.assertEqual(idle["active"], IDLE_PAIRS)
        for phase, streams in (("slow1", 1), ("slow50", relay.SLOW_STREAMS)):
            [slow] = results[phase]["ours"]
            self.assertEqual(slow["bytes"],
                             int(relay.SLOW_RATE * 0.25) // streams * streams, phase)
            self.assertGreaterEqual(slow["rss_growth"], 0, phase)
            # The receivers were throttled to 200 MB/s in all (with one chunk of slack).
            self.assertLess(slow["bytes"] / slow["seconds"], relay.SLOW_RATE * 1.5, phase)

        text = relay.report(results)
        # The run's raw results are kept, and print the same tables again.
        kept = save_results(results, Path(self.mktemp()))
        self.assertEqual(relay.report(json.loads(kept.read_text())), text)
        lines = text.splitlines()
        for key in only:
            rows = [line for line in lines if line.startswith(f"| {relay.BY_KEY[key].label} ")]
            self.assertGreaterEqual(len(rows), 1, key)
            self.assertEqual(len(rows[0].strip("|").split("|")), 6, rows[0])
        for goal in GOALS:
            [row] = [line for line in lines if line.startswith(f"| {goal}")]
            self.assertRegex(row, r"\| (PASS|MISS) +\|$|n/a")
        [cpu_goal] = [line for line in lines if line.startswith(f"| {GOALS[1]}")]
        self.assertTrue(re.search(r"\| (PASS|MISS) +\|$", cpu_goal), cpu_goal)
        if other is None:
            self.skipTest("no competitor installed (apt-get install haproxy socat; "
                          "pip install magic-wormhole-transit-relay): measured ours only")


class OursRunsOnTheProgramsReactor(SynchronousTestCase):
    """bench.relay_ours measures the relay as twistd runs it: on epsproxy's reactor (it
    ran on Twisted's default one until 2026-12-04, whose dispatch costs more per
    pairing)."""

    def test_its_stats_name_the_programs_reactor(self) -> None:
        process = subprocess.Popen([sys.executable, "-m", "bench.relay_ours"],
                                   cwd=relay.ROOT, stdout=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL)
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        assert process.stdout is not None
        self.addCleanup(process.stdout.close)
        words = process.stdout.readline().split()
        self.assertEqual(words[0::2], [b"internal", b"control"])
        with socket.create_connection(("127.0.0.1", int(words[3])), timeout=10) as control:
            control.sendall(b"stats\n")
            line = control.makefile("rb").readline()
        stats = json.loads(line)
        self.assertEqual(stats["reactor"], "epsproxy.net.reactor.EPollReactor")
        self.assertEqual(stats["pairings"], 0)
