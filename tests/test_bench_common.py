"""
The statistic the benchmarks' goals use (ours against the better competitor of each
round) and the competitors' own scores by it, printed beside the goals of
``python -m bench relay`` and ``python -m bench sni``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import relay, sni
from bench.common import best_per_round, own_scores, save_results


class BestPerRoundTests(SynchronousTestCase):
    def test_the_better_competitor_of_each_round(self) -> None:
        values = {"a": [10.0, 8.0, 9.0], "b": [9.0, 9.0, 9.5], "other": [100.0] * 3}
        self.assertEqual(best_per_round(values, ("a", "b"), max), [10.0, 9.0, 9.5])
        self.assertEqual(best_per_round(values, ("a", "b"), min), [9.0, 8.0, 9.0])

    def test_a_competitor_not_measured_is_left_out(self) -> None:
        self.assertEqual(best_per_round({"a": [1.0, 2.0]}, ("a", "b"), max), [1.0, 2.0])
        self.assertEqual(best_per_round({}, ("a", "b"), max), [])

    def test_each_competitor_scores_under_one_in_the_rounds_the_other_wins(self) -> None:
        values = {"a": [10.0, 8.0, 9.0], "b": [9.0, 10.0, 9.0]}
        scores = own_scores(values, ("a", "b"), max)
        self.assertEqual(scores["a"], [1.0, 0.8, 1.0])
        self.assertEqual(scores["b"], [0.9, 1.0, 1.0])
        costs = own_scores(values, ("a", "b"), min)
        self.assertEqual(costs["a"], [10.0 / 9.0, 1.0, 1.0])
        self.assertEqual(own_scores({}, ("a", "b"), max), {})


def _stream(mbps: float, cpu_per_gb: float) -> dict[str, float]:
    return {"bytes": 1e9, "seconds": 1e3 / mbps, "relay_cpu": cpu_per_gb,
            "relay_user": 0.0, "generator_cpu": 0.5}


class RelayReportTests(SynchronousTestCase):
    def test_the_best_tuned_relays_are_scored_as_ours_is(self) -> None:
        results = {
            "settings": {"size": 10**9, "rounds": 2, "pair_seconds": 1.0,
                         "idle_pairs": 10, "slow_streams": 50, "slow_seconds": 1.0},
            "throughput": {
                "ours": [_stream(1000, 0.30), _stream(1000, 0.30)],
                "haproxy-1m": [_stream(1000, 0.30), _stream(800, 0.40)],
                "socat-1m": [_stream(500, 0.60), _stream(1000, 0.30)],
            },
            "pairings": {}, "idle": {}, "slow1": {}, "slow50": {},
        }
        text = relay.report(results)
        [goal] = [line for line in text.splitlines()
                  if line.startswith("| ours MB/s / best-tuned relay")]
        self.assertIn("1.00x (1.00-1.00)", goal)
        [own] = [line for line in text.splitlines() if "for the best-tuned relays" in line]
        self.assertIn(f"{relay.BY_KEY['haproxy-1m'].label} MB/s 0.90x (0.80-1.00), "
                      "CPU per GB 1.17x (1.00-1.33)", own)
        self.assertIn(f"{relay.BY_KEY['socat-1m'].label} MB/s 0.75x (0.50-1.00), "
                      "CPU per GB 1.50x (1.00-2.00)", own)
        # The same tables again from the results a run keeps.
        kept = save_results(results, Path(self.mktemp()))
        again = subprocess.run([sys.executable, "-m", "bench.relay", "--report", str(kept.resolve())],
                               capture_output=True, text=True, check=True, cwd=relay.ROOT)
        self.assertEqual(again.stdout, text + "\n")


def _rate(per_second: float, p99: float) -> dict[str, float]:
    return {"connections": per_second, "seconds": 1.0, "p50_ms": p99 / 2, "p99_ms": p99,
            "cpu": 0.5, "proxy_cpu": 0.1, "broker_cpu": 0.0, "completed": per_second}


class SniReportTests(SynchronousTestCase):
    def test_the_chains_are_scored_as_ours_is(self) -> None:
        streams = {"haproxy": [400.0, 500.0], "haproxy-1m": [500.0, 400.0],
                   "ours-raw": [500.0, 500.0]}
        results = {
            "settings": {"paths": ["ours-raw", "haproxy", "haproxy-1m"], "clients": [1],
                         "rounds": 2, "seconds": 1.0, "stream_bytes": 10**9,
                         "term_stream_bytes": 10**9, "idle": 10},
            "rate": {"1": {"ours-raw": [_rate(80, 2.0), _rate(80, 2.0)],
                           "haproxy": [_rate(100, 2.0), _rate(50, 2.0)],
                           "haproxy-1m": [_rate(50, 1.0), _rate(100, 4.0)]}},
            "stream": {key: [{"bytes": v * 1e6, "seconds": 1.0} for v in values]
                       for key, values in streams.items()},
            "idle": {},
        }
        text = sni.report(results)
        [own] = [line for line in text.splitlines() if "for the HAProxy chains" in line]
        self.assertIn(f"{sni.BY_KEY['haproxy'].label}: conn/s @1 0.75x (0.50-1.00), "
                      "p99 @1 1.50x (1.00-2.00), one-stream MB/s 0.90x (0.80-1.00)", own)
        self.assertIn(f"{sni.BY_KEY['haproxy-1m'].label}: conn/s @1 0.75x (0.50-1.00), "
                      "p99 @1 1.50x (1.00-2.00), one-stream MB/s 0.90x (0.80-1.00)", own)
        [goal] = [line for line in text.splitlines()
                  if line.startswith("| raw: conn/s @1 / HAProxy chain's")]
        self.assertIn("0.80x (0.80-0.80)", goal)

    def test_with_one_chain_measured_nothing_is_scored(self) -> None:
        results = {
            "settings": {"paths": ["ours-raw", "haproxy"], "clients": [1], "rounds": 1,
                         "seconds": 1.0, "stream_bytes": 10**9, "term_stream_bytes": 10**9,
                         "idle": 10},
            "rate": {"1": {"ours-raw": [_rate(80, 2.0)], "haproxy": [_rate(100, 2.0)]}},
            "stream": {}, "idle": {},
        }
        self.assertNotIn("for the HAProxy chains", sni.report(results))


class SavedReportTests(SynchronousTestCase):
    """``python -m bench.relay --report FILE`` and ``python -m bench.sni --report FILE``
    with a file that is not a run's results: one line, exit status 2."""

    def report(self, module: str, content: str | None) -> subprocess.CompletedProcess[str]:
        path = Path(self.mktemp()).resolve()
        if content is not None:
            path.write_text(content)
        return subprocess.run([sys.executable, "-m", module, "--report", str(path)],
                              capture_output=True, text=True, cwd=relay.ROOT)

    def test_bad_files_are_refused_in_one_line(self) -> None:
        cases = {
            None: "cannot read a run's results from",  # missing
            "": "cannot read a run's results from",  # empty
            '{"settings": {"size": 1': "cannot read a run's results from",  # truncated
            "\x00\xff not json": "cannot read a run's results from",
            '{"a": 1}': "does not hold a run's results",
            "[1, 2]": "does not hold a run's results",
            '{"settings": 1}': "does not hold a run's results",
            # A round that took no time: the report would divide by it.
            '{"settings": {"size": 1, "rounds": 1, "pair_seconds": 1, "idle_pairs": 1, '
            '"slow_streams": 1, "slow_seconds": 1, "paths": ["ours-raw"], "clients": [1], '
            '"seconds": 1, "stream_bytes": 1, "term_stream_bytes": 1, "idle": 1}, '
            '"throughput": {"ours": [{"bytes": 1, "seconds": 0}]}, '
            '"rate": {"1": {"ours-raw": [{"connections": 1, "seconds": 0}]}}, '
            '"stream": {}, "idle": {}, "pairings": {}, "slow1": {}, "slow50": {}}':
                "does not hold a run's results",
        }
        for module in ("bench.relay", "bench.sni"):
            for content, expected in cases.items():
                done = self.report(module, content)
                self.assertEqual(done.returncode, 2, (module, content, done.stderr))
                self.assertIn(expected, done.stderr, (module, content))
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
                self.assertEqual(done.stdout, "")
