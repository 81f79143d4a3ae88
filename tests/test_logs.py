"""
Log output: the level filter (``--log-level``, ``log_level``), the JSON format (one
object per line, parsed here from the real twistd), and twistd's own output choices.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from twisted.internet import defer
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from epsproxy.net.logs import LogOutput, debug_enabled, json_line, log_level
from tests.support.sd import write_sd_settings
from tests.support.twistd import spawn_twistd, stop_twistd


def event(**fields):
    base = {"log_time": 1764715068.25, "log_level": LogLevel.warn,
            "log_namespace": "epsproxy.x", "log_format": "paired {token_id} in {seconds:.1f}s",
            "token_id": "ab12", "seconds": 0.25}
    base.update(fields)
    return base


def sd_folder(tmp_path: Path, **settings) -> Path:
    folder = write_sd_settings(tmp_path / "sd")
    values = yaml.safe_load((folder / "sd.yml").read_text())
    values.update(settings)
    (folder / "sd.yml").write_text(yaml.safe_dump(values))
    return folder


class TwistdLogTests(unittest.TestCase):
    """The log options of the real twistd."""

    timeout = 60

    @defer.inlineCallbacks
    def run_until_serving(self, args):
        process = spawn_twistd(args)
        try:
            yield process.wait_for(r"service directory serving .*\n")
            process.signal("TERM")
            status = yield process.ended
        finally:
            yield stop_twistd(process)
        return status, process.output

    @defer.inlineCallbacks
    def test_twistd_json_lines_with_debug_from_the_settings(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = sd_folder(tmp_path, log_level="debug")
        status, output = yield self.run_until_serving(
            ["sd", "--settings", str(folder), "--log-format", "json"])
        assert status == 0, output
        records = [json.loads(line) for line in output.splitlines()]  # every line is JSON
        serving = [r for r in records if r["message"].startswith("service directory serving")]
        assert serving[0]["level"] == "info"
        assert serving[0]["namespace"].startswith("epsproxy.sd.service")
        assert serving[0]["records"] == 0 and isinstance(serving[0]["port"], int)
        debug = [r for r in records if r["level"] == "debug"]
        assert any(r["message"].startswith("read settings file ") for r in debug), debug
        assert any(r["message"].startswith("stopping on SIGTERM") for r in records)

    @defer.inlineCallbacks
    def test_twistd_log_level_option_wins_over_the_settings(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = sd_folder(tmp_path, log_level="debug")
        status, output = yield self.run_until_serving(
            ["sd", "--settings", str(folder), "--log-level", "info"])
        assert status == 0, output
        assert "service directory serving" in output
        assert "read settings file" not in output
        assert "#debug]" not in output
        assert output.startswith("20")  # the text format: twistd's own lines


class LogOutputTests(SynchronousTestCase):
    """The JSON line format and the level filter, without a process."""

    def tmp_path(self) -> Path:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        return folder

    def test_json_line_fields(self):
        line = json_line(event(peer=object(), nested={"a": [1, 2.5, None]}))
        assert line.endswith("\n") and "\n" not in line[:-1]
        record = json.loads(line)
        assert record == {
            "time": "2025-12-02T22:37:48.250000Z", "level": "warn", "namespace": "epsproxy.x",
            "message": "paired ab12 in 0.2s", "token_id": "ab12", "seconds": 0.25,
            "nested": {"a": [1, 2.5, None]},
        }  # the object() field cannot be JSON: left out

    def test_json_line_failure_and_hostile_values(self):
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = json.loads(json_line(event(log_failure=failure, log_format="{bad",
                                            text="\u2028 \x00 \"quoted\"", nan=float("nan"),
                                            deep=[[[[[[[[[[[1]]]]]]]]]]], key={1: 2})))
        assert "ZeroDivisionError" in record["traceback"]
        assert record["text"] == "\u2028 \x00 \"quoted\""
        assert "Unable to format event" in record["message"]
        for dropped in ("nan", "deep", "key"):
            assert dropped not in record

    def test_log_output_filters_and_changes_level(self):
        tmp_path = self.tmp_path()
        path = tmp_path / "out.log"
        self.addCleanup(LogOutput, "debug")  # debug_enabled() is the process's: as before
        output = LogOutput("info", "json", logfile=str(path), nodaemon=False)
        log = Logger(namespace="epsproxy.test", observer=output.observer())
        self.assertFalse(debug_enabled())  # hot paths skip building their debug events
        log.debug("hidden {n}", n=1)
        log.info("shown {n}", n=2)
        output.set_level("debug")
        self.assertTrue(debug_enabled())
        log.debug("now shown {n}", n=3)
        output.set_level("error")
        self.assertFalse(debug_enabled())
        log.warn("hidden again")
        log.error("an error")
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["level"], r["message"]) for r in records] == [
            ("info", "shown 2"), ("debug", "now shown 3"), ("error", "an error")]

    def test_log_output_refuses_bad_values(self):
        tmp_path = self.tmp_path()
        self.assertRaises(ValueError, LogOutput, "verbose")
        self.assertRaises(ValueError, LogOutput, "info", "xml")
        error = self.assertRaises(
            SystemExit, LogOutput("info", logfile="-", nodaemon=False).observer)
        self.assertEqual(error.code, "Daemons cannot log to stdout, exiting!")
        assert log_level("critical") is LogLevel.critical

    def test_log_output_rotates_its_file(self):
        tmp_path = self.tmp_path()
        path = tmp_path / "out.log"
        output = LogOutput("info", "text", logfile=str(path), nodaemon=True)
        log = Logger(namespace="epsproxy.test", observer=output.observer())
        log.info("before")
        output.rotate()
        log.info("after")
        assert "before" in (tmp_path / "out.log.1").read_text()
        assert "after" in path.read_text() and "before" not in path.read_text()
        LogOutput("info").rotate()  # stdout: nothing to rotate
