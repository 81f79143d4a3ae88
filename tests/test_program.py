"""
What every program does for its process once it runs under twistd (epsproxy.net.program),
checked on a real ``twistd sd``: the garbage collector's thresholds are set and what exists
once the program is ready is frozen out of its sight (issue 14), both visible in /metrics.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support.metrics import request, samples
from tests.support.sd import write_sd_settings
from tests.support.twistd import spawn_twistd, stop_twistd


class GarbageCollector(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_ready_program_has_frozen_its_start_and_reports_the_collector(self):
        folder = write_sd_settings(Path(self.mktemp()).absolute())
        settings_file = folder / "sd.yml"
        settings = yaml.safe_load(settings_file.read_text())
        settings["metrics"] = {"bind_address": "127.0.0.1:0"}
        settings_file.write_text(yaml.safe_dump(settings))
        process = spawn_twistd(["sd", "--settings", str(folder)])
        self.addCleanup(stop_twistd, process)
        match = yield process.wait_for(r"sd metrics listener on [\d.]+:(\d+)")
        yield process.wait_for(r"serving \d+ verified record\(s\)")
        found = samples((yield request(int(match.group(1)), "/metrics")).body)
        # The modules, settings and services of a started program: tens of thousands.
        self.assertGreater(found[("sd_gc_frozen_objects", ())], 10_000)
        for generation in ("0", "1", "2"):
            self.assertIn(("python_gc_collections_total", (("generation", generation),)),
                          found)
        process.signal("TERM")
        self.assertEqual((yield process.ended), 0)
