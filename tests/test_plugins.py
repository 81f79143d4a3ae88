"""
The twistd plugins: discovery from any folder, and the real ``twistd sd`` as a subprocess
(start, serve, SIGKILL, restart with nothing acknowledged lost, bad settings).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet import reactor, utils
from twisted.internet.defer import inlineCallbacks
from twisted.plugin import getPlugins
from twisted.trial import unittest

from .support.sd import base_changes, sd_client, sign_chain, write_sd_settings
from .support.twistd import TWISTD, TwistdProcess


class DiscoveryTests(unittest.TestCase):
    def test_plugins_are_found(self):
        names = {maker.tapname for maker in getPlugins(IServiceMaker)}
        self.assertIn("sd", names)

    @inlineCallbacks
    def test_twistd_lists_the_plugins_from_another_folder(self):
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD, ["--help"], path="/", env=dict(os.environ),
            reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"\n\s+sd\s+The signed service directory")


def spawn_sd(settings: Path) -> TwistdProcess:
    protocol = TwistdProcess(r"serving (\d+) verified record\(s\) at [\d.]+:(\d+)")
    env = dict(os.environ, SD_SETTINGS=str(settings))
    reactor.spawnProcess(
        protocol, TWISTD, [TWISTD, "-n", "--pidfile=", "sd"], env=env, path="/"
    )
    return protocol


class TwistdSmokeTests(unittest.TestCase):
    @inlineCallbacks
    def test_serve_kill_restart(self):
        settings = write_sd_settings(Path(self.mktemp()).absolute())
        process = spawn_sd(settings)
        match = yield process.matched
        self.assertEqual(match.group(1), "0")
        client = sd_client(int(match.group(2)))
        chain = sign_chain(base_changes())
        self.assertEqual((yield client.call("submitRecords", {"records": chain})), "ok")
        yield client.close()
        process.transport.signalProcess(signal.SIGKILL)
        yield process.ended

        again = spawn_sd(settings)
        self.addCleanup(lambda: again.ended)
        self.addCleanup(again.transport.signalProcess, signal.SIGTERM)
        match = yield again.matched
        self.assertEqual(match.group(1), str(len(chain)))
        client = sd_client(int(match.group(2)))
        self.addCleanup(client.close)
        self.assertEqual((yield client.call("getTip", {}))["hash"], chain[-1]["hash"])

    @inlineCallbacks
    def test_bad_settings_stop_with_one_clear_message(self):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "sd.yml").write_text("jsonrpc_server:\n  bind_address: 1\n  tls_typo: {}\n")
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "sd", "--settings", str(folder)],
            env=dict(os.environ), path="/", reactor=reactor,
        )
        self.assertEqual(code, 1)
        text = (out + err).decode()
        self.assertNotIn("Traceback", text)
        self.assertNotIn("Usage:", text)  # a settings error is not a command-line mistake
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertIn("sd.yml", text)
        self.assertIn("jsonrpc_server", text)
