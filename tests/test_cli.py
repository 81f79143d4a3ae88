"""
The ``eps`` command, run as a real subprocess: certs (dev, own names), csr, fingerprint,
example-settings, sign/verify, sd submit-records and get-entries, --settings before or
after the command, --version and the help of every command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import protocol, reactor, utils
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest

from epsproxy import __version__
from epsproxy.cli import BROKEN_PIPE_STATUS, build_parser
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.examples import example_text, example_values
from epsproxy.rules.certificate_profile import signing_extensions, tls_extensions
from epsproxy.rules.certificates import (
    certificate_names,
    load_certificate_file,
    load_private_key_file,
)
from epsproxy.rules.records.trust import load_signer
from epsproxy.rules import forms
from epsproxy.rules.settings import load_settings

from .support.pki import pki
from .support.sd import sd_client, start_sd, write_sd_settings


def run_eps(*args: str, env: dict | None = None):
    """Run ``python -m epsproxy.cli ARGS``; fires with (stdout, stderr, exit code)."""
    environment = dict(os.environ)
    environment.pop("EPS_SETTINGS", None)
    environment.update(env or {})
    return utils.getProcessOutputAndValue(
        sys.executable, ["-m", "epsproxy.cli", *args], env=environment, reactor=reactor
    )


def write_role(folder: Path, sd_port: int = 1, name: str = "hd-1") -> Path:
    """An EPS role folder with an api directory pointing at the SD and a signing identity."""
    p = pki()
    folder.mkdir(parents=True, exist_ok=True)
    crt, key = p.tls(name)
    sign_crt, sign_key = p.signing(name)
    settings = {
        "name": name,
        "directory": {
            "type": "api",
            "settings": {
                "endpoints": [f"https://127.0.0.1:{sd_port}/jsonrpc"],
                "server_names": ["sd-1"],
                "jsonrpc_client": {
                    "tls": {
                        "ca_certificate_files": [str(p.root)],
                        "certificate_file": str(crt),
                        "key_file": str(key),
                    }
                },
                "ca_certificate_files": [str(p.root)],
                "ca_intermediate_certificate_files": [str(p.intermediate)],
            },
        },
        "signing": {
            "certificate_file": str(sign_crt),
            "key_file": str(sign_key),
            "ca_certificate_file": str(p.root),
            "ca_intermediate_certificate_files": [str(p.intermediate)],
        },
    }
    (folder / "eps.yml").write_text(yaml.safe_dump(settings))
    return folder


class CertsCommandTests(unittest.TestCase):
    @inlineCallbacks
    def test_creates_and_refuses_to_overwrite(self):
        target = Path(self.mktemp())
        out, err, code = yield run_eps("certs", str(target / "certs"), "--directory",
                                       str(target / "directory"))
        self.assertEqual(code, 0, err)
        self.assertTrue((target / "certs" / "root.crt").exists())
        self.assertTrue((target / "directory" / "002_certificates.json").exists())
        before = (target / "certs" / "hd-1.crt").read_bytes()
        out, err, code = yield run_eps("certs", str(target / "certs"))
        self.assertEqual(code, 1)
        self.assertIn(b"eps: error:", err)
        self.assertNotIn(b"Traceback", err)
        self.assertEqual((target / "certs" / "hd-1.crt").read_bytes(), before)
        out, err, code = yield run_eps("certs", str(target / "certs"), "--force")
        self.assertEqual(code, 0, err)
        self.assertNotEqual((target / "certs" / "hd-1.crt").read_bytes(), before)


class SignVerifyCommandTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp())
        self.role = write_role(self.folder / "role")
        self.env = {"EPS_SETTINGS": str(self.role)}
        self.data = self.folder / "data.json"
        self.data.write_text(json.dumps({"hello": ["world", 1, 2.5, None, True]}))

    @inlineCallbacks
    def sign(self) -> Path:
        out, err, code = yield run_eps("sign", str(self.data), env=self.env)
        self.assertEqual(code, 0, err)
        signed = self.folder / "signed.json"
        signed.write_bytes(out)
        return signed

    @inlineCallbacks
    def test_sign_then_verify(self):
        signed = yield self.sign()
        content = json.loads(signed.read_text())
        self.assertEqual(content["data"], {"hello": ["world", 1, 2.5, None, True]})
        self.assertTrue(content["signature"]["r"].isdigit())
        out, err, code = yield run_eps("verify", str(signed), "hd-1", env=self.env)
        self.assertEqual(code, 0, err)
        out, err, code = yield run_eps("sd", "verify", str(signed), "hd-1", env=self.env)
        self.assertEqual(code, 0, err)

    @inlineCallbacks
    def test_verify_refuses_other_name_and_tampering(self):
        signed = yield self.sign()
        out, err, code = yield run_eps("verify", str(signed), "hd-2", env=self.env)
        self.assertEqual(code, 1)
        content = json.loads(signed.read_text())
        content["data"]["hello"].append("more")
        signed.write_text(json.dumps(content))
        out, err, code = yield run_eps("verify", str(signed), "hd-1", env=self.env)
        self.assertEqual(code, 1)
        self.assertIn(b"NOT valid", err)
        self.assertNotIn(b"Traceback", err)

    @inlineCallbacks
    def test_garbage_inputs(self):
        garbage = self.folder / "garbage.json"
        for content in ("", "{", "[1, 2]", '{"signature": 1, "data": 2}',
                        '{"signature": {"r": "1", "s": "2", "c": "x"}, "data": 1}'):
            garbage.write_text(content)
            out, err, code = yield run_eps("verify", str(garbage), "hd-1", env=self.env)
            self.assertEqual(code, 1, content)
            self.assertNotIn(b"Traceback", err)

    @inlineCallbacks
    def test_missing_settings_is_one_clear_line(self):
        out, err, code = yield run_eps("sign", str(self.data))
        self.assertEqual(code, 1)
        self.assertIn(b"EPS_SETTINGS", err)
        self.assertNotIn(b"Traceback", err)


class SubmitRecordsCommandTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        folder = Path(self.mktemp())
        self.sd = yield start_sd(write_sd_settings(folder / "sd"))
        self.addCleanup(self.sd.stop)
        self.env = {"EPS_SETTINGS": str(write_role(folder / "hd-1", self.sd.port_number))}
        self.client = sd_client(self.sd.port_number)
        self.addCleanup(self.client.close)
        self.base = folder / "001_base.json"
        self.base.write_text(json.dumps({"records": [
            {"name": "hd-1", "section": "groups", "data": ["health-departments"],
             "created_at": "2021-05-17T10:00:00Z"},
            {"name": "hd-2", "section": "services", "data": [
                {"name": "internals", "permissions": [{"group": "health-departments",
                                                       "rights": ["call"]}],
                 "methods": [{"name": "_ping", "params": "dropped by the schema"}]}],
             "created_at": "2021-05-17T10:00:00Z"},
        ]}))
        self.certificates = Path(pki().directory_file)

    @inlineCallbacks
    def test_reset_then_append(self):
        out, err, code = yield run_eps("sd", "submit-records", "--reset", str(self.base),
                                       env=self.env)
        self.assertEqual(code, 0, err)
        out, err, code = yield run_eps("sd", "submit-records", str(self.certificates),
                                       env=self.env)
        self.assertEqual(code, 0, err)
        entries = {e["name"]: e for e in (yield self.client.call("getEntries", {}))}
        self.assertEqual(entries["hd-1"]["groups"], ["health-departments"])
        self.assertEqual(
            {c["key_usage"]: c["fingerprint"] for c in entries["hd-2"]["certificates"]},
            pki().fingerprints("hd-2"),
        )
        method = entries["hd-2"]["services"][0]["methods"][0]
        self.assertNotIn("params", method)
        records = yield self.client.call("getRecords", {})
        self.assertEqual(records[0]["parent_hash"], "")
        for previous, record in zip(records, records[1:]):
            self.assertEqual(record["parent_hash"], previous["hash"])
        # created_at is set by the command, not taken from the file.
        self.assertNotEqual(records[0]["record"]["created_at"], "2021-05-17T10:00:00Z")
        out, err, code = yield run_eps("sd", "get-entries", "--name", "hd-2", env=self.env)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)[0]["name"], "hd-2")

    @inlineCallbacks
    def test_a_reader_going_away_ends_the_command_quietly(self):
        # eps sd get-entries | head: the reader closes the pipe before the entries are
        # printed.  No traceback, the shell's status for a program ended by SIGPIPE.
        out, err, code = yield run_eps("sd", "submit-records", "--reset", str(self.base),
                                       env=self.env)
        self.assertEqual(code, 0, err)
        environment = dict(os.environ)
        environment.update(self.env)
        ended: Deferred[tuple[bytes, int]] = Deferred()

        class ClosesItsEnd(protocol.ProcessProtocol):
            def __init__(self) -> None:
                self.err = b""

            def connectionMade(self) -> None:
                self.transport.closeStdout()  # nobody reads what the command prints

            def errReceived(self, data: bytes) -> None:
                self.err += data

            def processEnded(self, reason: Any) -> None:
                ended.callback((self.err, reason.value.exitCode))

        reactor.spawnProcess(ClosesItsEnd(), sys.executable,
                             [sys.executable, "-m", "epsproxy.cli", "sd", "get-entries"],
                             env=environment)
        err, code = yield ended
        self.assertEqual((code, err), (BROKEN_PIPE_STATUS, b""))

    @inlineCallbacks
    def test_non_admin_is_refused_with_a_clear_message(self):
        role = write_role(Path(self.mktemp()) / "hd-2", self.sd.port_number, name="hd-2")
        out, err, code = yield run_eps("sd", "submit-records", "--reset", str(self.base),
                                       env={"EPS_SETTINGS": str(role)})
        self.assertEqual(code, 1)
        self.assertIn(b"refused", err)
        self.assertNotIn(b"Traceback", err)
        self.assertIsNone((yield self.client.call("getTip", {})))

    @inlineCallbacks
    def test_unreachable_sd(self):
        role = write_role(Path(self.mktemp()) / "hd-1", sd_port=1)
        out, err, code = yield run_eps("sd", "submit-records", str(self.base),
                                       env={"EPS_SETTINGS": str(role)})
        self.assertEqual(code, 1)
        self.assertIn(b"cannot reach", err)
        self.assertNotIn(b"Traceback", err)

    @inlineCallbacks
    def test_malformed_record_file(self):
        bad = Path(self.mktemp())
        bad.write_text(json.dumps({"records": [{"name": "hd-1", "section": "nonsense",
                                                "data": []}]}))
        out, err, code = yield run_eps("sd", "submit-records", str(bad), env=self.env)
        self.assertEqual(code, 1)
        self.assertIn(b"section", err)
        self.assertNotIn(b"Traceback", err)


class SettingsPositionTests(unittest.TestCase):
    """``--settings`` before or after the command; the option wins over EPS_SETTINGS."""

    @inlineCallbacks
    def test_before_and_after_the_subcommand(self):
        folder = Path(self.mktemp())
        sd = yield start_sd(write_sd_settings(folder / "sd"))
        self.addCleanup(sd.stop)
        role = str(write_role(folder / "hd-1", sd.port_number))
        records = folder / "records.json"
        records.write_text(json.dumps({"records": [
            {"name": "hd-1", "section": "groups", "data": ["health-departments"]}]}))
        out, err, code = yield run_eps("sd", "submit-records", "--reset", str(records),
                                       "--settings", role)
        self.assertEqual(code, 0, err)
        for args in (("sd", "get-entries", "--settings", role),
                     ("--settings", role, "sd", "get-entries"),
                     ("--settings", "/nonexistent", "sd", "get-entries", "--settings", role)):
            out, err, code = yield run_eps(*args, env={"EPS_SETTINGS": "/nonexistent"})
            self.assertEqual(code, 0, (args, err))
            self.assertEqual([e["name"] for e in json.loads(out)], ["hd-1"])

    @inlineCallbacks
    def test_sign_takes_settings_after_the_command(self):
        folder = Path(self.mktemp())
        role = str(write_role(folder / "hd-1"))
        data = folder / "data.json"
        data.write_text('{"a": 1}')
        out, err, code = yield run_eps("sign", str(data), "--settings", role)
        self.assertEqual(code, 0, err)
        signed = folder / "signed.json"
        signed.write_bytes(out)
        out, err, code = yield run_eps("sd", "verify", str(signed), "hd-1", "--settings", role)
        self.assertEqual(code, 0, err)


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "eps"):
    """Every (command path, parser, help line) below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub, helps.get(name)
                yield from _subparsers(sub, f"{prefix} {name}")


class HelpAndVersionTests(unittest.TestCase):
    def test_every_command_and_argument_has_help(self):
        commands = list(_subparsers(build_parser()))
        names = {path for path, _, _ in commands}
        for expected in ("eps csr", "eps fingerprint", "eps example-settings", "eps certs",
                         "eps sign", "eps verify", "eps sd", "eps sd submit-records",
                         "eps sd get-entries", "eps sd sign", "eps sd verify", "eps check"):
            self.assertIn(expected, names)
        for path, parser, help_line in commands:
            self.assertTrue(help_line, f"{path} has no help line")
            for action in parser._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                self.assertTrue(action.help, f"{path}: {action.dest} has no help")

    @inlineCallbacks
    def test_version(self):
        out, err, code = yield run_eps("--version")
        self.assertEqual((out.decode(), code), (f"eps {__version__}\n", 0))
        out, err, code = yield run_eps("version")
        self.assertEqual((out.decode(), code), (f"{__version__}\n", 0))

    @inlineCallbacks
    def test_certs_help_says_development(self):
        out, err, code = yield run_eps("certs", "--help")
        self.assertEqual(code, 0)
        self.assertIn(b"development", out.lower())
        self.assertIn(b"--names", out)
        out, err, code = yield run_eps("--help")
        self.assertIn(b"DEVELOPMENT PKI", out)


def _extensions(request) -> list:
    return [(e.value, e.critical) for e in request.extensions]


class CsrCommandTests(unittest.TestCase):
    @inlineCallbacks
    def test_tls_request(self):
        out_dir = Path(self.mktemp()) / "certs"
        out, err, code = yield run_eps("csr", "--name", "clinic-a", "--kind", "tls", "--dns",
                                       "clinic-a.example.org", "--out", str(out_dir))
        self.assertEqual(code, 0, err)
        self.assertEqual(stat.S_IMODE((out_dir / "tls.key").stat().st_mode), 0o600)
        request = x509.load_pem_x509_csr((out_dir / "tls.csr").read_bytes())
        self.assertTrue(request.is_signature_valid)
        self.assertEqual(request.subject.rfc4514_string(), "CN=clinic-a")
        self.assertEqual(_extensions(request),
                         tls_extensions("clinic-a", ["clinic-a.example.org"]))
        key = load_private_key_file(out_dir / "tls.key")
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(key.public_key(), request.public_key())

    @inlineCallbacks
    def test_signing_request_with_groups(self):
        out_dir = Path(self.mktemp())
        out, err, code = yield run_eps("csr", "--name", "clinic-a", "--kind", "signing",
                                       "--group", "sd-admin", "--group", "clinics",
                                       "--out", str(out_dir), "--stem", "clinic-a-sign")
        self.assertEqual(code, 0, err)
        request = x509.load_pem_x509_csr((out_dir / "clinic-a-sign.csr").read_bytes())
        self.assertEqual(_extensions(request),
                         signing_extensions("clinic-a", ["sd-admin", "clinics"]))
        self.assertIn(b"EC PRIVATE KEY", (out_dir / "clinic-a-sign.key").read_bytes())

    @inlineCallbacks
    def test_refuses_to_overwrite(self):
        out_dir = Path(self.mktemp())
        args = ("csr", "--name", "lab-b", "--kind", "tls", "--out", str(out_dir))
        out, err, code = yield run_eps(*args)
        self.assertEqual(code, 0, err)
        before = (out_dir / "tls.key").read_bytes()
        out, err, code = yield run_eps(*args)
        self.assertEqual(code, 1)
        self.assertIn(b"already exists", err)
        self.assertEqual((out_dir / "tls.key").read_bytes(), before)
        out, err, code = yield run_eps(*args, "--force")
        self.assertEqual(code, 0, err)
        self.assertNotEqual((out_dir / "tls.key").read_bytes(), before)
        self.assertEqual(stat.S_IMODE((out_dir / "tls.key").stat().st_mode), 0o600)

    @inlineCallbacks
    def test_hostile_input(self):
        out_dir = Path(self.mktemp())
        for args in (
            ("--name", "../etc", "--kind", "tls"),
            ("--name", "a/b", "--kind", "tls"),
            ("--name", "iris-name://x", "--kind", "signing"),
            ("--name", "a b", "--kind", "tls"),
            ("--name", "", "--kind", "tls"),
            ("--name", "x" * 300, "--kind", "tls"),
            ("--name", "a\nb", "--kind", "tls"),
            ("--name", "ok", "--kind", "signing", "--group", "x@y"),
            ("--name", "ok", "--kind", "tls", "--group", "sd-admin"),
            ("--name", "ok", "--kind", "signing", "--dns", "ok.example.org"),
            ("--name", "ok", "--kind", "signing", "--group", "g", "--group", "g"),
            ("--name", "ok", "--kind", "tls", "--stem", "../x"),
            ("--name", "ok", "--kind", "rsa"),
        ):
            out, err, code = yield run_eps("csr", *args, "--out", str(out_dir))
            self.assertIn(code, (1, 2), args)
            self.assertIn(b"error", err, args)
            self.assertNotIn(b"Traceback", err, args)
        self.assertFalse(out_dir.exists() and any(out_dir.iterdir()))

    @inlineCallbacks
    def test_unwritable_folder(self):
        blocker = Path(self.mktemp())
        blocker.write_text("a file, not a folder")
        out, err, code = yield run_eps("csr", "--name", "ok", "--kind", "tls",
                                       "--out", str(blocker / "certs"))
        self.assertEqual(code, 1)
        self.assertIn(b"cannot write", err)
        self.assertNotIn(b"Traceback", err)


class FingerprintCommandTests(unittest.TestCase):
    @inlineCallbacks
    def test_items_and_record(self):
        p = pki()
        tls, signing = p.tls("hd-2")[0], p.signing("hd-2")[0]
        out, err, code = yield run_eps("fingerprint", str(tls), str(signing))
        self.assertEqual(code, 0, err)
        pins = p.fingerprints("hd-2")
        self.assertEqual(json.loads(out), [
            {"fingerprint": pins["signing"], "key_usage": "signing"},
            {"fingerprint": pins["encryption"], "key_usage": "encryption"},
        ])
        out, err, code = yield run_eps("fingerprint", "--name", "hd-2", str(signing), str(tls))
        self.assertEqual(code, 0, err)
        [record] = json.loads(out)["records"]
        self.assertEqual(record["section"], "certificates")
        self.assertEqual(record["name"], "hd-2")
        self.assertEqual({d["key_usage"]: d["fingerprint"] for d in record["data"]}, pins)
        # A rotation pins the old and the new TLS certificate together.
        out, err, code = yield run_eps("fingerprint", str(signing), str(tls),
                                       str(p.tls("hd-2", alt=True)[0]))
        self.assertEqual(code, 0, err)
        self.assertEqual([d["key_usage"] for d in json.loads(out)],
                         ["signing", "encryption", "encryption"])

    @inlineCallbacks
    def test_bad_files(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        pem = pki().tls("hd-1")[0].read_text()
        cases = {
            "missing": None,
            "empty": "",
            "garbage": "not a certificate at all",
            "truncated": pem[: len(pem) // 2],
            "corrupt": pem.replace(pem.splitlines()[3], "A" * 64),
            "key": pki().tls("hd-1")[1].read_text(),
            "oversized": "-----BEGIN CERTIFICATE-----\n" + "A" * (4 * 1024 * 1024),
        }
        for name, content in cases.items():
            path = folder / name
            if content is not None:
                path.write_text(content)
            out, err, code = yield run_eps("fingerprint", str(path))
            self.assertEqual(code, 1, name)
            self.assertIn(b"eps: error:", err, name)
            self.assertNotIn(b"Traceback", err, name)
        tls = str(pki().tls("hd-1")[0])
        out, err, code = yield run_eps("fingerprint", tls, tls)
        self.assertEqual(code, 1)
        self.assertIn(b"twice", err)
        out, err, code = yield run_eps("fingerprint", "--name", "a/b", tls)
        self.assertEqual(code, 1)


class ExampleSettingsCommandTests(unittest.TestCase):
    def install_certificates(self, folder: Path, name: str = "hd-1") -> None:
        """The test PKI's files for ``name`` where the example settings expect them."""
        p = pki()
        certs = folder / "certs"
        for source, target in ((p.tls(name)[0], "tls.crt"), (p.tls(name)[1], "tls.key"),
                               (p.signing(name)[0], "signing.crt"),
                               (p.signing(name)[1], "signing.key"),
                               (p.root, "root.crt"), (p.intermediate, "intermediate.crt")):
            shutil.copyfile(source, certs / target)

    @inlineCallbacks
    def test_every_example_passes_the_check_where_it_is_written(self):
        base = Path(self.mktemp())
        for program, name in (("sd", None), ("eps", "hd-1"),
                              ("proxy-public", "public-proxy-1.ga"),
                              ("proxy-private", "private-proxy-1.ga")):
            folder = base / program
            args = ["example-settings", program, str(folder)]
            if name:
                args += ["--set", f"name={name}"]
            out, err, code = yield run_eps(*args)
            self.assertEqual(code, 0, err)
            self.install_certificates(folder, name or "sd-1")
            # Moved elsewhere, the folder still works: every path is under $DIR.
            moved = base / "elsewhere" / program
            moved.parent.mkdir(exist_ok=True)
            folder.rename(moved)
            out, err, code = yield run_eps("check", "--settings", str(moved))
            self.assertEqual(code, 0, (program, out, err))
            self.assertIn(b"settings OK", out)

    @inlineCallbacks
    def test_values_are_written_and_comments_kept(self):
        folder = Path(self.mktemp())
        out, err, code = yield run_eps(
            "example-settings", "eps", str(folder), "--set", "name=lab-b",
            "--set", 'sd_endpoint=https://sd-a:3322/jsonrpc', "--set", 'state_dir=/var/lib/"x"')
        self.assertEqual(code, 0, err)
        text = (folder / "eps.yml").read_text()
        self.assertTrue(text.startswith("# Endpoint server"))
        self.assertEqual(example_values(text)["name"], "lab-b")
        self.assertEqual(example_values(text)["state_dir"], '/var/lib/"x"')
        self.assertIn(b"name = lab-b", err)
        self.assertTrue((folder / "certs").is_dir())
        settings = load_settings([folder], EPS_SETTINGS)
        self.assertEqual(settings["name"], "lab-b")
        self.assertEqual(settings["directory"]["settings"]["endpoints"],
                         ["https://sd-a:3322/jsonrpc"])
        self.assertEqual(settings["directory"]["settings"]["cache_file"],
                         '/var/lib/"x"/directory-cache.json')
        self.assertEqual(settings["signing"]["key_file"], str(folder.resolve() / "certs" /
                                                              "signing.key"))
        out, err, code = yield run_eps("example-settings", "eps")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode(), example_text("eps"))

    @inlineCallbacks
    def test_refusals(self):
        folder = Path(self.mktemp())
        for args in (
            ("example-settings", "nginx", str(folder)),
            ("example-settings", "eps", str(folder), "--set", "nonsense=1"),
            ("example-settings", "eps", str(folder), "--set", "name"),
            ("example-settings", "eps", str(folder), "--set", "name=a\nb: c"),
            ("example-settings", "eps", str(folder), "--set", "name=" + "x" * 2000),
        ):
            out, err, code = yield run_eps(*args)
            self.assertIn(code, (1, 2), args)
            self.assertNotIn(b"Traceback", err, args)
            self.assertFalse((folder / "eps.yml").exists(), args)
        out, err, code = yield run_eps("example-settings", "sd", str(folder))
        self.assertEqual(code, 0, err)
        out, err, code = yield run_eps("example-settings", "sd", str(folder))
        self.assertEqual(code, 1)
        self.assertIn(b"already exists", err)


class CertsNamesTests(unittest.TestCase):
    @inlineCallbacks
    def test_own_names(self):
        target = Path(self.mktemp())
        out, err, code = yield run_eps("certs", str(target), "--names", "sd-a,clinic-a,lab-b",
                                       "--sd-admin", "clinic-a")
        self.assertEqual(code, 0, err)
        self.assertIn(b"not for production", err)
        self.assertFalse((target / "hd-1.crt").exists())
        signer = load_signer((target / "clinic-a-sign.crt").read_text())
        self.assertEqual((signer.name, signer.groups), ("clinic-a", ("sd-admin",)))
        self.assertEqual(load_signer((target / "lab-b-sign.crt").read_text()).groups, ())
        self.assertIn("sd-a", certificate_names(load_certificate_file(target / "sd-a.crt")))

    @inlineCallbacks
    def test_bad_names(self):
        target = Path(self.mktemp())
        for args in (("--names", "a,,b"), ("--names", "a,a"), ("--names", "a/b"),
                     ("--names", "a,b", "--sd-admin", "c"), ("--sd-admin", "hd-2")):
            out, err, code = yield run_eps("certs", str(target), *args)
            self.assertEqual(code, 1, args)
            self.assertIn(b"eps: error:", err, args)
            self.assertFalse((target / "root.crt").exists())


def _keys(schema: forms.Schema) -> set[str]:
    """Every key name of a settings schema, nested maps included (list items too)."""
    while isinstance(schema, forms.Check):
        schema = schema.inner
    if isinstance(schema, forms.List):
        return _keys(schema.item)
    if not isinstance(schema, forms.Map):
        return set()
    found = set(schema.fields)
    for field in schema.fields.values():
        found |= _keys(field.schema)
    return found


class EndpointServerReferenceTests(unittest.TestCase):
    def test_every_key_is_documented(self):
        """docs/eps.md names every key of the endpoint server's settings."""
        from epsproxy.eps.settings import (
            API_DIRECTORY_SETTINGS,
            JSON_DIRECTORY_SETTINGS,
            channel_schemas,
        )

        keys = _keys(EPS_SETTINGS) | _keys(API_DIRECTORY_SETTINGS) | \
            _keys(JSON_DIRECTORY_SETTINGS)
        for schema in channel_schemas().values():
            keys |= _keys(schema)
        reference = (Path(__file__).parent.parent / "docs" / "eps.md").read_text()
        reference = re.sub(r"^```.*?^```", "", reference, flags=re.MULTILINE | re.DOTALL)
        named = {token for span in re.findall(r"`([^`\n]+)`", reference)
                 for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}
        missing = sorted(keys - named)
        self.assertEqual(missing, [])
        self.assertIn("`tls`", reference)
