"""
Smoke test of the EPS messaging benchmark (``python -m bench eps``), so it cannot rot:
a tiny run (200 calls per phase, one round) of every variant through real server and
client processes, and the report's rows.  The gRPC variants need the ``bench`` extra
(grpcio, protobuf); without it only our side is run.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from bench import eps

CALLS = 200


class BenchEPSSmokeTests(SynchronousTestCase):
    def test_tiny_run_reports_every_variant(self) -> None:
        variants = eps.VARIANTS if eps.grpc_available() else eps.VARIANTS[:1]
        results = eps.run(calls=CALLS, rounds=1, warmup=0, variants=variants)

        self.assertEqual(sorted(results), sorted(v.key for v in variants))
        for key, rounds in results.items():
            self.assertEqual(len(rounds), 1, key)
            for in_flight in eps.IN_FLIGHT:
                phase = rounds[0][str(in_flight)]
                self.assertEqual(phase["calls"], CALLS, (key, in_flight))
                self.assertGreater(phase["seconds"], 0)
                self.assertGreater(phase["p99_us"], 0)
                self.assertGreaterEqual(phase["p99_us"], phase["p50_us"])

        text = eps.report(results)
        lines = text.splitlines()
        for variant in variants:
            [row] = [line for line in lines if line.startswith(f"| {variant.label} ")]
            self.assertEqual(len(row.strip("|").split("|")), 6, row)
        for goal in ("ours calls/s @64 / better gRPC variant", "ours p99 @1 / gRPC unary p99 @1"):
            [row] = [line for line in lines if line.startswith(f"| {goal} ")]
            if eps.grpc_available():
                self.assertRegex(row, r"\| (PASS|MISS) +\|$")
            else:
                self.assertIn("n/a", row)
        if not eps.grpc_available():
            self.skipTest("gRPC variants not measured: grpcio/protobuf not installed")
