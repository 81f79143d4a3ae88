"""
``twistd <program> --check`` and ``eps check``: validate settings and every credential
file, print a summary and the findings, exit 0 or 1, start nothing.
"""

from __future__ import annotations

import contextlib
import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from twisted.internet import defer
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.cli import main
from tests.support.eps import write_eps_settings
from tests.support.metrics import samples
from tests.support.pki import pki
from tests.support.proxies import PRIVATE_PROXY, private_section, public_section, write_settings
from tests.support.sd import write_sd_settings
from tests.support.tls import tls_block
from tests.support.twistd import issue_certificate, run_twistd


class TwistdCheckTests(unittest.TestCase):
    """``twistd <program> --check`` as a subprocess."""

    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_sd_check_ok(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = write_sd_settings(tmp_path / "sd")
        status, output = yield run_twistd(["sd", "--settings", str(folder), "--check"])
        assert status == 0, output
        assert output == "settings OK: 1 TLS file set, 1 signing file set checked\n"

    @defer.inlineCallbacks
    def test_twistd_eps_check_warns_and_starts_nothing(self):
        tmp_path = Path(self.mktemp()).absolute()
        now = datetime.now(timezone.utc)
        crt, key = issue_certificate(tmp_path / "certs", "hd-1", not_before=now - timedelta(days=1),
                                     not_after=now + timedelta(days=5, hours=1))
        folder = write_eps_settings(tmp_path / "eps", peer_tls=tls_block(
            "hd-1", certificate_file=str(crt), key_file=str(key)))
        status, output = yield run_twistd(["eps", "--settings", str(folder), "--check"])
        assert status == 0, output
        lines = output.splitlines()
        assert lines[0] == "settings OK: 2 TLS file sets, 0 signing file sets checked; 1 warning"
        assert lines[1].startswith("warning: channels[peers].settings.tls.certificate_file: the "
                                   "certificate expires in 5 day(s)")
        assert len(lines) == 2  # nothing started: no twistd log line at all

    @defer.inlineCallbacks
    def test_twistd_eps_check_fails_with_findings(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = write_eps_settings(tmp_path / "eps", peer_tls=tls_block(
            "hd-2", key_file="/nonexistent.key"))
        status, output = yield run_twistd(["eps", "--settings", str(folder), "--check"])
        assert status == 1, output
        assert output.splitlines() == [
            "settings NOT OK: 2 TLS file sets, 0 signing file sets checked; 1 error",
            "error: channels[peers].settings.tls.key_file: no such file /nonexistent.key",
        ]

    @defer.inlineCallbacks
    def test_the_metrics_listeners_tls_files_are_checked(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = write_eps_settings(tmp_path / "eps")
        settings = yaml.safe_load((folder / "eps.yml").read_text())
        settings["metrics"] = {"bind_address": "127.0.0.1:0",
                               "tls": tls_block("hd-1", key_file="/nonexistent-metrics.key")}
        (folder / "eps.yml").write_text(yaml.safe_dump(settings))
        status, output = yield run_twistd(["eps", "--settings", str(folder), "--check"])
        assert status == 1, output
        assert output.splitlines() == [
            "settings NOT OK: 3 TLS file sets, 0 signing file sets checked; 1 error",
            "error: metrics.tls.key_file: no such file /nonexistent-metrics.key",
        ]

    @defer.inlineCallbacks
    def test_twistd_proxy_check(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = write_settings(tmp_path / "proxy", {
            "public": public_section(tmp_path, 1),
            "private": private_section(tmp_path, 1, internal_endpoint={
                "tls": tls_block("hd-1", ca=tmp_path / "missing-ca.crt")}),
        })
        status, output = yield run_twistd(["proxy", "--mode", "public", "--settings", str(folder),
                                           "--check"])
        assert (status, output) == (0, "settings OK: 2 TLS file sets, 0 signing file sets checked\n")
        status, output = yield run_twistd(["proxy", "--mode", "private", "--settings", str(folder),
                                           "--check"])
        assert status == 1
        assert (f"error: private.internal_endpoint.tls.ca_certificate_files[0]: no such file "
                f"{tmp_path}/missing-ca.crt") in output
        status, output = yield run_twistd(["proxy", "--settings", str(folder), "--check"])
        assert status == 1
        assert "--mode is required" in output

    @defer.inlineCallbacks
    def test_twistd_check_bad_settings(self):
        tmp_path = Path(self.mktemp()).absolute()
        folder = write_sd_settings(tmp_path / "sd")
        (folder / "sd.yml").write_text("jsonrpc_server: {bind_address: 1}\n")
        status, output = yield run_twistd(["sd", "--settings", str(folder), "--check"])
        assert status == 1
        assert output.startswith(f"settings NOT OK: {folder}/sd.yml: ")
        assert "Traceback" not in output


# -- eps check -------------------------------------------------------------------------


def run_check(folder: Path) -> tuple[int, list[str], str]:
    """``eps check --settings FOLDER`` in this process: status, stdout lines, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["check", "--settings", str(folder)])
    return status, out.getvalue().splitlines(), err.getvalue()


class EpsCheckTests(SynchronousTestCase):
    """``eps check``: the program told from the settings, then its checks."""

    def tmp_path(self) -> Path:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        return folder

    def test_by_file_name(self):
        tmp_path = self.tmp_path()
        assert run_check(write_sd_settings(tmp_path / "sd"))[:2] == (
            0, ["sd: settings OK: 1 TLS file set, 1 signing file set checked"])
        assert run_check(write_eps_settings(tmp_path / "eps"))[:2] == (
            0, ["eps: settings OK: 2 TLS file sets, 0 signing file sets checked"])

    def test_by_top_level_keys(self):
        folder = write_eps_settings(self.tmp_path() / "eps")
        (folder / "eps.yml").rename(folder / "role.yml")
        assert run_check(folder)[0] == 0
        settings = yaml.safe_load((folder / "role.yml").read_text())
        settings["signing"] = {"certificate_file": str(pki().signing("hd-2")[0]),
                               "key_file": str(pki().signing("hd-2")[1]),
                               "ca_certificate_file": str(pki().root)}
        (folder / "role.yml").write_text(yaml.safe_dump(settings))
        status, lines, _ = run_check(folder)
        assert status == 1
        assert lines == [
            "eps: settings NOT OK: 2 TLS file sets, 1 signing file set checked; 1 error",
            "error: signing.certificate_file: the signing certificate names iris-name://hd-2, "
            "not the operator hd-1",
        ]

    def test_proxy_checks_every_mode_present(self):
        tmp_path = self.tmp_path()
        folder = write_settings(tmp_path / "p", {
            "public": public_section(tmp_path, 1),
            "private": private_section(tmp_path, 1, jsonrpc_client={
                "endpoint": "https://127.0.0.1:1/jsonrpc", "tls": tls_block("hd-1")}),
        })
        (folder / "proxy.yml").rename(folder / "settings.yml")
        status, lines, _ = run_check(folder)
        assert status == 1
        assert lines == [
            "proxy --mode public: settings OK: 2 TLS file sets, 0 signing file sets checked",
            "proxy --mode private: settings NOT OK: 1 TLS file set, 0 signing file sets "
            "checked; 1 error",
            f"error: private.jsonrpc_client.tls.certificate_file: the certificate names hd-1, "
            f"*.hd-1.local, not the operator {PRIVATE_PROXY}",
        ]

    def test_cannot_tell(self):
        for content in ("{}\n", "something: 1\n", "name: x\npublic: {}\n"):
            with self.subTest(content=content):
                folder = self.tmp_path()
                (folder / "settings.yml").write_text(content)
                status, lines, err = run_check(folder)
                assert (status, lines) == (1, [])
                assert "cannot tell whether these settings are for sd, eps or proxy" in err

    def test_hostile_settings(self):
        folder = self.tmp_path()
        (folder / "sd.yml").write_text("a: &x [*x]\n")
        status, lines, _ = run_check(folder)
        assert status == 1
        assert lines[0].startswith("sd: settings NOT OK: ")
        assert "aliases" in lines[0]

    def test_certificate_expiry_gauge(self):
        from prometheus_client import generate_latest
        from twisted.internet import reactor

        from epsproxy.eps.tap import Options, makeService
        from epsproxy.rules.certificates import load_certificate_file

        options = Options()
        options.parseOptions(["--settings", str(write_eps_settings(self.tmp_path() / "eps"))])
        top = makeService(options, reactor, exit_on_failure=False)
        text = generate_latest(top.registry).decode()
        expiry = load_certificate_file(pki().tls("hd-1")[0]).not_valid_after_utc.timestamp()
        # Compared as numbers: the exposition drops trailing zeros (1.83947785e+09).
        found = samples(text.encode())
        assert found[("eps_certificate_expiry_seconds",
                      (("where", "channels[peers].settings.tls"),))] == expiry
        assert 'where="channels[gateway].settings.tls"' in text
