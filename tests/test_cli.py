"""The ``eps`` command, run as a real subprocess: certs, sign/verify, sd submit-records."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml
from twisted.internet import reactor, utils
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

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
