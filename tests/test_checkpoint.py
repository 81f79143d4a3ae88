"""The checkpoint note format: round trips, signatures, and hostile input."""

from __future__ import annotations

import base64
import hashlib

from twisted.trial.unittest import TestCase

from epsproxy.rules import checkpoint as cp
from epsproxy.rules.certificates import load_private_key_file
from epsproxy.rules.records import TrustStore, load_signer
from tests.support.pki import pki

HEAD = hashlib.sha256(b"x").digest()


def _identity(name: str, label: str = "main"):
    p = pki(label)
    cert_path, key_path = p.signing(name)
    pem = cert_path.read_text()
    return load_private_key_file(key_path), pem, load_signer(pem)


class CheckpointFormatTests(TestCase):
    def setUp(self) -> None:
        self.key, self.pem, self.signer = _identity("sd-1")
        p = pki()
        self.trust = TrustStore.from_files([p.root], [p.intermediate])
        self.pins = {"sd-1": self.signer.fingerprint}
        self.checkpoint = cp.Checkpoint("sd-1", 42, HEAD, 1_790_000_000)
        self.note = cp.sign(self.checkpoint, "sd-1", self.key, self.pem).text

    def verify(self, note: str, certificates=None, names=None) -> list[str]:
        return cp.verify(cp.parse(note), certificates or [self.pem], self.trust,
                         self.pins.get, names)

    def test_round_trip(self) -> None:
        parsed = cp.parse(self.note)
        self.assertEqual(parsed.checkpoint, self.checkpoint)
        self.assertEqual(parsed.text, self.note)
        self.assertEqual(self.note.split("\n")[:5],
                         ["sd-1", "42", base64.b64encode(HEAD).decode(),
                          "2026-09-21T14:13:20Z", ""])
        self.assertTrue(self.note.split("\n")[5].startswith("\u2014 sd-1 "))
        self.assertEqual(self.verify(self.note), ["sd-1"])
        self.assertEqual(cp.parse(self.note.encode()).checkpoint, self.checkpoint)

    def test_chain_heads(self) -> None:
        hashes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
        heads = cp.chain_heads(hashes)
        self.assertEqual(heads[0], hashlib.sha256(bytes(32) + bytes.fromhex(hashes[0])).digest())
        self.assertEqual(cp.chain_heads(hashes[2:], heads[1]), heads[2:])
        self.assertRaises(cp.CheckpointError, cp.chain_head, bytes(32), "XYZ")

    def test_cosign(self) -> None:
        key, pem, signer = _identity("hd-2")
        self.pins["hd-2"] = signer.fingerprint
        both = cp.cosign(cp.parse(self.note), "hd-2", key, pem)
        self.assertEqual(self.verify(both.text, [self.pem, pem]), ["sd-1", "hd-2"])
        self.assertEqual(self.verify(both.text, [self.pem, pem], names=["hd-2"]), ["hd-2"])
        # The same witness twice replaces its line.
        again = cp.cosign(both, "hd-2", key, pem)
        self.assertEqual(len(again.signatures), 2)

    def test_unknown_signer_ignored(self) -> None:
        self.assertEqual(self.verify(self.note, certificates=[_identity("hd-1")[1]]), [])

    def test_wrong_signer(self) -> None:
        key, pem, _ = _identity("hd-1")
        self.assertRaises(cp.CheckpointError, cp.sign, self.checkpoint, "sd-1", key, pem)
        self.assertRaises(cp.CheckpointError, cp.sign, self.checkpoint, "sd-1", key, self.pem)

    def test_not_pinned(self) -> None:
        self.pins["sd-1"] = "0" * 64
        self.assertRaisesRegex(cp.CheckpointError, "pinned", self.verify, self.note)

    def test_foreign_ca(self) -> None:
        key, pem, signer = _identity("sd-1", "foreign")
        self.pins["sd-1"] = signer.fingerprint
        note = cp.sign(self.checkpoint, "sd-1", key, pem).text
        self.assertRaisesRegex(cp.CheckpointError, "trusted root", self.verify, note, [pem])

    def test_bad_signature(self) -> None:
        other = cp.sign(cp.Checkpoint("sd-1", 43, HEAD, 1_790_000_000), "sd-1", self.key,
                        self.pem).text
        # The signature line of size 43 under the body of size 42.
        forged = self.note.split("\n\n")[0] + "\n\n" + other.split("\n\n")[1]
        self.assertRaisesRegex(cp.CheckpointError, "not valid", self.verify, forged)
        body_changed = self.note.replace("\n42\n", "\n41\n")
        self.assertRaisesRegex(cp.CheckpointError, "not valid", self.verify, body_changed)

    def test_hostile_notes(self) -> None:
        sig = self.note.split("\n\n")[1]
        body = self.note.split("\n\n")[0]
        bad = {
            "empty": "",
            "truncated": self.note[:-1],
            "truncated body": "sd-1\n42\n",
            "no signature": body + "\n\n",
            "no blank line": body + "\n" + sig,
            "extra body line": body + "\nextra\n\n" + sig,
            "missing body line": "\n".join(body.split("\n")[:3]) + "\n\n" + sig,
            "extra blank line": body + "\n\n\n" + sig,
            "leading zero size": self.note.replace("\n42\n", "\n042\n"),
            "negative size": self.note.replace("\n42\n", "\n-42\n"),
            "huge size": self.note.replace("\n42\n", "\n" + "9" * 30 + "\n"),
            "bad base64 head": self.note.replace(base64.b64encode(HEAD).decode(), "!!!!"),
            "short head": self.note.replace(base64.b64encode(HEAD).decode(),
                                            base64.b64encode(b"abc").decode()),
            "bad time": self.note.replace("2026-09-21T14:13:20Z", "yesterday"),
            "impossible time": self.note.replace("2026-09-21T14:13:20Z", "2026-13-41T14:13:20Z"),
            "space in origin": self.note.replace("sd-1\n42", "sd 1\n42", 1),
            "bad base64 signature": body + "\n\n\u2014 sd-1 ***\n",
            "short signature": body + "\n\n\u2014 sd-1 " + base64.b64encode(b"abcd").decode() + "\n",
            "oversized signature": body + "\n\n\u2014 sd-1 "
            + base64.b64encode(bytes(200)).decode() + "\n",
            "signature without dash": body + "\n\n" + sig.replace("\u2014 ", "- "),
            "extra field": body + "\n\n" + sig.rstrip("\n") + " extra\n",
            "carriage returns": self.note.replace("\n", "\r\n"),
            "NUL": self.note.replace("sd-1", "sd-1\x00", 1),
            "oversized": body + "\n\n" + sig * 2000,
            "too many signatures": body + "\n\n" + sig * (cp.MAX_SIGNATURES + 1),
        }
        for label, note in bad.items():
            with self.subTest(label):
                self.assertRaises(cp.CheckpointError, cp.parse, note)
        self.assertRaises(cp.CheckpointError, cp.parse, b"\xff\xfe\n")
        self.assertRaises(cp.CheckpointError, cp.parse, 42)  # type: ignore[arg-type]  # hostile type

    def test_checkpoint_values(self) -> None:
        self.assertRaises(cp.CheckpointError, cp.Checkpoint, "", 1, HEAD, 0)
        self.assertRaises(cp.CheckpointError, cp.Checkpoint, "sd-1", -1, HEAD, 0)
        self.assertRaises(cp.CheckpointError, cp.Checkpoint, "sd-1", 1, b"short", 0)
        self.assertRaises(cp.CheckpointError, cp.Checkpoint, "sd-1", 1, HEAD, -5)


class ResetRecordTests(TestCase):
    def test_reset_change_round_trip(self) -> None:
        c = cp.Checkpoint("sd-1", 7, HEAD, 0)
        record = cp.reset_change("hd-1", c, "2025-01-01T00:00:00Z")
        self.assertEqual(cp.replaced_by(record), ("sd-1", 7, HEAD))

    def test_records_that_name_nothing(self) -> None:
        good = cp.reset_change("hd-1", cp.Checkpoint("sd-1", 7, HEAD, 0), "x")
        named = good["data"][0]["settings"][cp.RESET_KEY]
        for bad in [None, [], {"section": "groups", "data": good["data"]},
                    {"section": "settings", "data": "x"},
                    {"section": "settings", "data": [1, {"settings": 2}]},
                    {"section": "settings", "data": [{"settings": {cp.RESET_KEY: "x"}}]},
                    {"section": "settings", "data": [{"settings": {cp.RESET_KEY: dict(
                        named, size=True)}}]},
                    {"section": "settings", "data": [{"settings": {cp.RESET_KEY: dict(
                        named, head="!!")}}]},
                    {"section": "settings", "data": [{"settings": {cp.RESET_KEY: dict(
                        named, head="AAAA")}}]}]:
            self.assertIsNone(cp.replaced_by(bad), bad)
        self.assertRaises(cp.CheckpointError, cp.reset_root, {"checkpoint": 3}, "hd-1", "x")
        self.assertRaises(cp.CheckpointError, cp.reset_root, {"checkpoint": "x\n"}, "hd-1", "x")
