"""
The chaos run's traffic generator (:mod:`chaos.traffic`) without the dev network: every
call ends in one outcome, failures keep their text, a stream whose workers all hang
skips ticks instead of queueing them, and the report table marks what did not recover.
"""

from __future__ import annotations

import threading
from pathlib import Path

from twisted.trial import unittest

from chaos.__main__ import table
from chaos.faults import FaultResult
from chaos.fork import GOSSIP_INTERVAL, ForkedSD
from epsproxy.dev import demo
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.rules.settings import load_settings
from epsproxy.sd.settings import SD_SETTINGS
from chaos.traffic import CallFailed, Stream, Traffic


class TrafficTests(unittest.TestCase):
    def _traffic(self, streams: list[Stream]) -> Traffic:
        traffic = Traffic(streams)
        traffic.start()
        self.addCleanup(traffic.stop, 2)
        return traffic

    def test_outcomes_record_success_and_failure(self) -> None:
        """Odd calls fail with a checked-answer error, even ones succeed; all are recorded."""
        enough = threading.Event()
        seen: list[int] = []

        def call(n: int) -> None:
            seen.append(n)
            if len(seen) >= 20:
                enough.set()
            if n % 2:
                raise CallFailed(f"wrong answer {n}")

        traffic = self._traffic([Stream("s", 500, call, workers=4)])
        self.assertTrue(enough.wait(10))
        traffic.stop(5)
        outcomes = traffic.window(0, float("inf"), "s")
        self.assertGreaterEqual(len(outcomes), 20)
        failed = [o for o in outcomes if not o.ok]
        self.assertTrue(failed)
        self.assertTrue(all(o.error and o.error.startswith("wrong answer") for o in failed))
        self.assertTrue(all(o.end >= o.start for o in outcomes))
        self.assertEqual(traffic.window(0, float("inf"), "other"), [])

    def test_exceptions_are_described(self) -> None:
        done = threading.Event()

        def call(n: int) -> None:
            done.set()
            raise ConnectionRefusedError(111, "Connection refused")

        traffic = self._traffic([Stream("s", 200, call, workers=1)])
        self.assertTrue(done.wait(10))
        traffic.stop(5)
        errors = {o.error for o in traffic.outcomes}
        self.assertIn("ConnectionRefusedError: [Errno 111] Connection refused", errors)

    def test_hanging_calls_skip_ticks(self) -> None:
        """With every worker stuck, ticks are skipped (counted), not queued."""
        release = threading.Event()
        self.addCleanup(release.set)
        skipped = threading.Event()
        stream = Stream("s", 200, lambda n: release.wait(10), workers=2)
        traffic = self._traffic([stream])

        def watch() -> None:
            while not release.is_set():
                if stream.skipped >= 5:
                    skipped.set()
                    return
                release.wait(0.01)

        threading.Thread(target=watch, daemon=True).start()
        self.assertTrue(skipped.wait(10))
        self.assertEqual(stream.sent, 2)
        release.set()
        traffic.stop(5)
        self.assertEqual(len(traffic.outcomes), 2)


class TableTests(unittest.TestCase):
    def test_not_recovered_is_marked(self) -> None:
        good = FaultResult("sd", "SIGKILL", down=5, exit_seconds=0.1, ready=1.0)
        good.calls["p2p"] = 10
        bad = FaultResult("hd-2", "SIGKILL", recovered=False, lost="n/a")
        bad.calls["p2p"], bad.failed["p2p"] = 10, 4
        bad.recover["p2p"] = None
        bad.notes.append("traffic not recovered")
        text = table([good, bad])
        rows = text.splitlines()
        self.assertEqual(len(rows), 4)
        self.assertIn("| 0/10 |", rows[2])
        self.assertIn("p2p 4/10", rows[3])
        self.assertIn("p2p never", rows[3])
        self.assertIn("**NOT RECOVERED**", rows[3])
        self.assertIsNone(bad.worst_recovery)


class ForkOverlayTests(unittest.TestCase):
    """The forked-history fault's settings overlays, merged the way the roles load them."""

    def setUp(self) -> None:
        self.fork = ForkedSD(Path(self.mktemp()))

    def test_endpoint_server_uses_only_the_forked_sd(self) -> None:
        """Lists append when settings merge: the overlay must replace the endpoints."""
        settings = load_settings([demo.CONF / "roles" / "hd-2", self.fork.endpoint_overlay()],
                                 EPS_SETTINGS)
        self.assertEqual(settings["directory"]["settings"]["endpoints"], [self.fork.url])
        self.assertEqual(settings["gossip"]["interval"], GOSSIP_INTERVAL)
        self.assertEqual(settings["name"], "hd-2")

    def test_forked_sd_has_its_own_ports_and_store(self) -> None:
        settings = load_settings([demo.CONF / "roles" / "sd-1", self.fork.sd_overlay()],
                                 SD_SETTINGS)
        self.assertEqual(settings["jsonrpc_server"]["bind_address"],
                         f"localhost:{self.fork.port}")
        self.assertEqual(settings["metrics"]["bind_address"],
                         f"localhost:{self.fork.metrics_port}")
        store = settings["directory"]["datastore"]
        self.assertEqual(store["type"], "embedded")
        self.assertTrue(store["settings"]["path"].startswith(str(self.fork.folder)))
        # The same signing key as sd-1: only the history it serves tells it apart.
        self.assertEqual(settings["checkpoint"]["name"], "sd-1")
