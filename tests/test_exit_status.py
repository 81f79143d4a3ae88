"""
Every failure to start ends the real ``twistd`` with status 1 and one line naming the
listener or the settings key: no traceback, no usage text (issue 12, item 1).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support.eps import write_eps_settings
from tests.support.pki import pki
from tests.support.proxies import PUBLIC_PROXY, private_section, public_section, write_settings
from tests.support.sd import write_sd_settings
from tests.support.tls import tls_block
from tests.support.twistd import busy_port, issue_certificate, run_daemon_twistd, run_twistd

BUSY = "[Errno 98] Address already in use."


class ExitStatusTests(unittest.TestCase):
    timeout = 60

    def folder(self) -> Path:
        return Path(self.mktemp()).absolute()

    @inlineCallbacks
    def assertFails(self, args: list[str], line: str):
        status, output = yield run_twistd(args)
        self.assertEqual(status, 1, output)
        self.assertIn(line, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)
        self.assertNotIn("Options:", output)
        return output

    # -- busy ports: a failed start, status 1 -------------------------------------------

    @inlineCallbacks
    def test_eps_busy_peer_port(self):
        port = busy_port(self)
        folder = write_eps_settings(self.folder(), peers=port)
        yield self.assertFails(["eps", "--settings", str(folder)],
                               f"endpoint server hd-1 could not start: Couldn't listen on "
                               f"127.0.0.1:{port}: {BUSY}")

    @inlineCallbacks
    def test_eps_busy_gateway_port(self):
        port = busy_port(self)
        folder = write_eps_settings(self.folder(), gateway=port)
        yield self.assertFails(["eps", "--settings", str(folder)],
                               f"endpoint server hd-1 could not start: Couldn't listen on "
                               f"127.0.0.1:{port}: {BUSY}")

    @inlineCallbacks
    def test_eps_busy_metrics_port(self):
        port = busy_port(self)
        folder = write_eps_settings(self.folder(), metrics=port)
        yield self.assertFails(["eps", "--settings", str(folder)],
                               f"metrics listener could not start: Couldn't listen on "
                               f"127.0.0.1:{port}: {BUSY}")

    @inlineCallbacks
    def test_sd_busy_jsonrpc_port(self):
        port = busy_port(self)
        folder = write_sd_settings(self.folder(), jsonrpc_server={
            "bind_address": f"127.0.0.1:{port}"})
        output = yield self.assertFails(["sd", "--settings", str(folder)],
                                        f"127.0.0.1:{port}: {BUSY}")
        self.assertIn("could not start: Couldn't listen on", output)

    @inlineCallbacks
    def test_sd_busy_metrics_port(self):
        port = busy_port(self)
        folder = write_sd_settings(self.folder())
        settings = yaml.safe_load((folder / "sd.yml").read_text())
        settings["metrics"] = {"bind_address": f"127.0.0.1:{port}"}
        (folder / "sd.yml").write_text(yaml.safe_dump(settings))
        yield self.assertFails(["sd", "--settings", str(folder)],
                               f"metrics listener could not start: Couldn't listen on "
                               f"127.0.0.1:{port}: {BUSY}")

    @inlineCallbacks
    def public_proxy_fails(self, **listeners: Any):
        folder = self.folder()
        write_settings(folder, {"public": public_section(folder, 1, **listeners)})
        listener = next(iter(listeners.values()))
        address = listener["bind_address"] if isinstance(listener, dict) else listener
        port = address.rsplit(":", 1)[1]
        output = yield self.assertFails(["proxy", "--mode", "public", "--settings", str(folder)],
                                        f"127.0.0.1:{port}: {BUSY}")
        self.assertIn("public proxy could not start: Couldn't listen on", output)

    def test_public_proxy_busy_tls_port(self):
        return self.public_proxy_fails(tls_bind_address=f"127.0.0.1:{busy_port(self)}")

    def test_public_proxy_busy_internal_port(self):
        return self.public_proxy_fails(internal_bind_address=f"127.0.0.1:{busy_port(self)}")

    def test_public_proxy_busy_jsonrpc_port(self):
        return self.public_proxy_fails(jsonrpc_server={
            "bind_address": f"127.0.0.1:{busy_port(self)}", "tls": tls_block(PUBLIC_PROXY)})

    @inlineCallbacks
    def test_private_proxy_busy_jsonrpc_port(self):
        port = busy_port(self)
        folder = self.folder()
        write_settings(folder, {"private": private_section(
            folder, 1, jsonrpc_server={"bind_address": f"127.0.0.1:{port}"})})
        output = yield self.assertFails(
            ["proxy", "--mode", "private", "--settings", str(folder)],
            f"127.0.0.1:{port}: {BUSY}")
        self.assertIn("could not start: Couldn't listen on", output)

    @inlineCallbacks
    def test_proxy_busy_metrics_port(self):
        port = busy_port(self)
        folder = self.folder()
        write_settings(folder, {"public": public_section(folder, 1),
                                "metrics": {"bind_address": f"127.0.0.1:{port}"}})
        yield self.assertFails(["proxy", "--mode", "public", "--settings", str(folder)],
                               f"metrics listener could not start: Couldn't listen on "
                               f"127.0.0.1:{port}: {BUSY}")

    # -- files and settings: refused before anything opens --------------------------------

    @inlineCallbacks
    def eps_with_peer_tls(self, line: str, **tls: Any):
        port = busy_port(self)  # proves nothing was opened: it would fail differently
        folder = write_eps_settings(self.folder(), metrics=port,
                                    peer_tls=tls_block("hd-1", **tls))
        output = yield self.assertFails(["eps", "--settings", str(folder)], line)
        self.assertNotIn("could not start", output)
        return output

    def test_missing_certificate_file(self):
        return self.eps_with_peer_tls(
            "channels[peers].settings.tls.certificate_file: no such file /nonexistent/hd-1.crt",
            certificate_file="/nonexistent/hd-1.crt")

    def test_missing_key_file(self):
        return self.eps_with_peer_tls(
            "channels[peers].settings.tls.key_file: no such file /nonexistent/hd-1.key",
            key_file="/nonexistent/hd-1.key")

    def test_key_of_another_certificate(self):
        key = pki().tls("hd-2")[1]
        return self.eps_with_peer_tls(
            f"channels[peers].settings.tls.key_file: {key} does not belong to the certificate",
            key_file=str(key))

    def test_expired_certificate(self):
        now = datetime.now(timezone.utc)
        crt, key = issue_certificate(self.folder(), "hd-1", not_before=now - timedelta(days=9),
                                     not_after=now - timedelta(days=2))
        return self.eps_with_peer_tls(
            "channels[peers].settings.tls.certificate_file: the certificate expired on ",
            certificate_file=str(crt), key_file=str(key))

    def test_certificate_of_another_operator(self):
        crt, key = pki().tls("hd-2")
        return self.eps_with_peer_tls(
            "channels[peers].settings.tls.certificate_file: the certificate names hd-2, "
            "*.hd-2.local, not the operator hd-1",
            certificate_file=str(crt), key_file=str(key))

    @inlineCallbacks
    def test_yaml_error(self):
        folder = write_eps_settings(self.folder())
        (folder / "eps.yml").write_text("name: hd-1\nchannels: [\n")
        yield self.assertFails(["eps", "--settings", str(folder)],
                               f"{folder}/eps.yml:3:1: invalid YAML")

    @inlineCallbacks
    def test_unknown_key(self):
        folder = write_eps_settings(self.folder())
        settings = yaml.safe_load((folder / "eps.yml").read_text())
        settings["channels"][1]["settings"]["tls_typo"] = True
        (folder / "eps.yml").write_text(yaml.safe_dump(settings))
        yield self.assertFails(["eps", "--settings", str(folder)],
                               f"{folder}/eps.yml: channels[gateway].settings.tls_typo: "
                               "unknown key")

    @inlineCallbacks
    def test_missing_settings_folder(self):
        yield self.assertFails(["sd", "--settings", "/nonexistent/sd"],
                               "/nonexistent/sd: no such file or folder")

    @inlineCallbacks
    def test_sd_store_that_cannot_open(self):
        folder = write_sd_settings(self.folder(), datastore={
            "type": "embedded", "settings": {"path": "/proc/no-such-folder/records.sqlite"}})
        output = yield self.assertFails(["sd", "--settings", str(folder)], "could not start: ")
        self.assertIn("records.sqlite", output)


class DaemonizingExitStatus(unittest.TestCase):
    """
    twistd without ``-n``: its parent exits with the start's real outcome, after the
    listeners were bound or failed, not as soon as the services' startService returned.
    """

    timeout = 60

    def run_dir(self) -> Path:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        return folder

    @inlineCallbacks
    def test_a_busy_port_is_a_failed_exit_of_the_parent(self):
        port = busy_port(self)
        run = self.run_dir()
        folder = write_eps_settings(run / "eps", peers=port)
        status, output = yield run_daemon_twistd(["eps", "--settings", str(folder)], run)
        self.assertEqual(status, 1, output)
        self.assertIn("endpoint server hd-1 could not start: Couldn't listen on", output)
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_a_started_daemon_is_serving_when_the_parent_exits_0(self):
        run = self.run_dir()
        folder = write_sd_settings(run / "sd")
        status, output = yield run_daemon_twistd(["sd", "--settings", str(folder)], run)
        pid = int((run / "twistd.pid").read_text())
        self.addCleanup(_kill, pid)
        self.assertEqual((status, output), (0, ""))
        # Serving already: the log has the line and the port accepts connections.
        match = re.search(r"serving \d+ verified record\(s\) at [\d.]+:(\d+)",
                          (run / "twistd.log").read_text())
        self.assertIsNotNone(match)
        assert match is not None
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=5):
            pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
