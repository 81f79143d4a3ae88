"""
What every program does for its process once it runs under twistd (epsproxy.net.program),
checked on a real ``twistd sd``: the garbage collector's thresholds are set and what exists
once the program is ready is frozen out of its sight (issue 14), both visible in /metrics;
it runs on epsproxy's reactor unless twistd is given another.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support.metrics import request, samples
from tests.support.sd import write_sd_settings
from tests.support.twistd import spawn_twistd, stop_twistd


def _sd_with_metrics(test: unittest.TestCase) -> Path:
    folder = write_sd_settings(Path(test.mktemp()).absolute())
    settings_file = folder / "sd.yml"
    settings = yaml.safe_load(settings_file.read_text())
    settings["metrics"] = {"bind_address": "127.0.0.1:0"}
    settings_file.write_text(yaml.safe_dump(settings))
    return folder


class Reactor(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def _serves_on(self, twistd_args: list[str], reactor_class: str):
        folder = _sd_with_metrics(self)
        process = spawn_twistd([*twistd_args, "sd", "--settings", str(folder)])
        self.addCleanup(stop_twistd, process)
        yield process.wait_for(r"reactor class: " + reactor_class.replace(".", r"\."))
        match = yield process.wait_for(r"sd metrics listener on [\d.]+:(\d+)")
        yield process.wait_for(r"serving \d+ verified record\(s\)")
        response = yield request(int(match.group(1)), "/metrics")
        self.assertIn(("sd_gc_frozen_objects", ()), samples(response.body))
        process.signal("TERM")
        self.assertEqual((yield process.ended), 0)

    def test_a_program_runs_on_epsproxys_reactor_by_default(self):
        return self._serves_on([], "epsproxy.net.reactor.EPollReactor")

    def test_the_reactor_can_be_named(self):
        return self._serves_on(["--reactor", "epsproxy"], "epsproxy.net.reactor.EPollReactor")

    def test_another_reactor_given_to_twistd_is_kept(self):
        return self._serves_on(["--reactor", "poll"], "twisted.internet.pollreactor.PollReactor")


class GarbageCollector(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_ready_program_has_frozen_its_start_and_reports_the_collector(self):
        folder = _sd_with_metrics(self)
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
