"""
docs/operators.md, followed literally: its guide steps run in order, as written, for a
three-node network with names of its own (an SD ``sd-a`` and endpoint servers
``clinic-a`` and ``lab-b``): keys and requests from ``eps csr``, certificates from a CA
made with ``openssl ca``, settings from ``eps example-settings``, the directory founded
and joined with ``eps sd submit-records``, real ``twistd`` processes, and a call from
clinic-a to lab-b through clinic-a's gateway. Only the variables differ from the guide:
loopback addresses, ports the kernel handed out, and temporary folders.
"""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from epsproxy.rules.certificates import fingerprint, load_certificates_file

from .support.guide import (
    Block,
    exported_names,
    free_ports,
    guide_blocks,
    run_step,
    service_command,
    step_environment,
)
from .support.twistd import Twistd, stop_twistd

#: The guide's blocks, in order: (kind, name).
ORDER = [
    ("vars", ""), ("step", "ca"), ("step", "sd-request"), ("step", "clinic-request"),
    ("step", "lab-request"), ("step", "sign"), ("step", "check"), ("service", "sd-a"),
    ("step", "sd-ready"), ("step", "fingerprints"), ("step", "records"), ("step", "found"),
    ("step", "join"), ("service", "lab-b"), ("service", "clinic-a"),
    ("step", "nodes-ready"), ("step", "call"), ("step", "backup"),
]

#: The log line after which each service is up (the next step checks /readyz).
READY = {
    "sd-a": r"service directory serving \d+ verified record",
    "lab-b": r"endpoint server lab-b ready",
    "clinic-a": r"endpoint server clinic-a ready",
}


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


class OperatorsGuideTests(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir(parents=True)
        ports = free_ports(8)
        self.values = {
            "CA": str(self.base / "ca"),
            "RECORDS": str(self.base / "directory-records"),
            "SD_DIR": str(self.base / "etc" / "sd-a"),
            "CLINIC_DIR": str(self.base / "etc" / "clinic-a"),
            "LAB_DIR": str(self.base / "etc" / "lab-b"),
            "SD_LISTEN": f"127.0.0.1:{ports[0]}",
            "SD_METRICS": f"127.0.0.1:{ports[1]}",
            "SD_URL": f"https://127.0.0.1:{ports[0]}/jsonrpc",
            "CLINIC_LISTEN": f"127.0.0.1:{ports[2]}",
            "CLINIC_ADDRESS": f"127.0.0.1:{ports[2]}",
            "CLINIC_GATEWAY": f"127.0.0.1:{ports[3]}",
            "CLINIC_METRICS": f"127.0.0.1:{ports[4]}",
            "LAB_LISTEN": f"127.0.0.1:{ports[5]}",
            "LAB_ADDRESS": f"127.0.0.1:{ports[5]}",
            "LAB_GATEWAY": f"127.0.0.1:{ports[6]}",
            "LAB_METRICS": f"127.0.0.1:{ports[7]}",
        }
        self.env = step_environment(self.values)

    def path(self, variable: str, *parts: str) -> Path:
        return Path(self.values[variable], *parts)

    # -- what each step must have done ----------------------------------------------

    def expect_ca(self, out: str, err: str) -> None:
        root = load_certificates_file(self.path("CA", "root.crt"))[0]
        intermediate = load_certificates_file(self.path("CA", "intermediate.crt"))[0]
        self.assertEqual(intermediate.issuer, root.subject)
        constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertEqual((constraints.value.ca, constraints.value.path_length), (True, 0))

    def expect_sd_request(self, out: str, err: str) -> None:
        self.assertTrue(self.path("SD_DIR", "sd.yml").is_file())
        self.assertTrue(_private(self.path("SD_DIR", "certs", "tls.key")))
        self.assertTrue(self.path("SD_DIR", "certs", "tls.csr").is_file())

    def _expect_node_request(self, variable: str) -> None:
        self.assertTrue(self.path(variable, "eps.yml").is_file())
        for stem in ("tls", "signing"):
            self.assertTrue(_private(self.path(variable, "certs", f"{stem}.key")))
            self.assertTrue(self.path(variable, "certs", f"{stem}.csr").is_file())

    def expect_clinic_request(self, out: str, err: str) -> None:
        self._expect_node_request("CLINIC_DIR")

    def expect_lab_request(self, out: str, err: str) -> None:
        self._expect_node_request("LAB_DIR")

    def expect_sign(self, out: str, err: str) -> None:
        for variable, stems in (("SD_DIR", ("tls",)), ("CLINIC_DIR", ("tls", "signing")),
                                ("LAB_DIR", ("tls", "signing"))):
            for stem in stems:
                chain = load_certificates_file(self.path(variable, "certs", f"{stem}.crt"))
                self.assertEqual(len(chain), 2)

    def expect_check(self, out: str, err: str) -> None:
        self.assertIn("URI:iris-name://clinic-a, URI:iris-group://sd-admin, DNS:clinic-a", out)
        self.assertIn("DNS:lab-b", out)
        self.assertIn("TLS Web Server Authentication, TLS Web Client Authentication", out)
        self.assertEqual(out.count("settings OK"), 3, out)

    def _expect_ready(self, out: str, err: str) -> None:
        self.assertIn('"status":"ready"', out.replace(" ", ""))

    expect_sd_ready = _expect_ready

    def expect_fingerprints(self, out: str, err: str) -> None:
        document = json.loads(self.path("RECORDS", "lab-b-certificates.json").read_text())
        [record] = document["records"]
        tls = load_certificates_file(self.path("LAB_DIR", "certs", "tls.crt"))[0]
        signing = load_certificates_file(self.path("LAB_DIR", "certs", "signing.crt"))[0]
        self.assertEqual(record, {"section": "certificates", "name": "lab-b", "data": [
            {"fingerprint": fingerprint(signing), "key_usage": "signing"},
            {"fingerprint": fingerprint(tls), "key_usage": "encryption"},
        ]})

    def expect_records(self, out: str, err: str) -> None:
        lab = json.loads(self.path("RECORDS", "lab-b.json").read_text())
        channels = [r for r in lab["records"] if r["section"] == "channels"][0]
        self.assertIn({"type": "eps_server", "settings": {"address": self.values["LAB_ADDRESS"]}},
                      channels["data"])

    def expect_found(self, out: str, err: str) -> None:
        self.assertIn("submitted 3 record(s) as a reset", err)

    def expect_join(self, out: str, err: str) -> None:
        self.assertIn("submitted 4 record(s);", err)
        [entry] = json.loads(self.path("RECORDS", "lab-b-entry.json").read_text())
        self.assertEqual(entry["name"], "lab-b")
        self.assertEqual(entry["groups"], ["laboratories"])
        tls = load_certificates_file(self.path("LAB_DIR", "certs", "tls.crt"))[0]
        self.assertIn({"fingerprint": fingerprint(tls), "key_usage": "encryption"},
                      entry["certificates"])

    expect_nodes_ready = _expect_ready

    def expect_call(self, out: str, err: str) -> None:
        self.assertEqual(out, "answered by lab-b\n")

    def expect_backup(self, out: str, err: str) -> None:
        backup = sqlite3.connect(self.path("RECORDS", "records-backup.sqlite"))
        self.addCleanup(backup.close)
        self.assertEqual(backup.execute("PRAGMA integrity_check").fetchone(), ("ok",))
        tables = [row[0] for row in backup.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = sum(backup.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)
        self.assertGreaterEqual(rows, 7)

    # -- running the guide ----------------------------------------------------------

    def start_service(self, block: Block) -> Twistd:
        process = Twistd()
        argv = service_command(block)
        reactor.spawnProcess(process, argv[0], argv, env=self.env, path="/")
        self.addCleanup(stop_twistd, process)
        return process

    def test_blocks_are_the_expected_steps(self) -> None:
        """A new or renamed step needs its expectation here; the variables are ours."""
        blocks = guide_blocks()
        self.assertEqual([(b.kind, b.name) for b in blocks], ORDER)
        self.assertEqual(sorted(exported_names(blocks[0])), sorted(self.values))
        for kind, name in ORDER:
            if kind == "step":
                self.assertTrue(callable(getattr(self, "expect_" + name.replace("-", "_"))))

    @inlineCallbacks
    def test_follow_the_guide(self) -> Any:
        for block in guide_blocks():
            where = f"docs/operators.md line {block.line} ({block.kind} {block.name})"
            if block.kind == "vars":
                continue
            if block.kind == "service":
                process = self.start_service(block)
                try:
                    yield process.wait_for(READY[block.name])
                except RuntimeError as e:
                    self.fail(f"{where}: did not start:\n{e}")
                continue
            out, err, code = yield run_step(block, self.env, self.base)
            out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            self.assertEqual(code, 0, f"{where} failed ({code}):\n{out}\n{err}")
            expect: Callable[[str, str], None] = getattr(
                self, "expect_" + block.name.replace("-", "_"))
            expect(out, err)
