"""The SD's signed checkpoints over real mutual TLS: getCheckpoint, getRecords, cosignatures."""

from __future__ import annotations

from pathlib import Path

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.rules import checkpoint as cp
from epsproxy.rules.records import Pins, TrustStore
from epsproxy.sd.settings import SD_SETTINGS, sd_file_sets
from epsproxy.rules.credentials import check_file_sets

from .support.pki import pki
from .support.sd import (
    base_changes, checkpoint_pin, sd_client, sign_chain, signer, start_sd, write_sd_settings,
)


class SDCheckpointTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.folder = Path(self.mktemp())
        write_sd_settings(self.folder, checkpoint=True)
        self.sd = yield start_sd(self.folder)
        self.addCleanup(lambda: self.sd.stop())
        self.client = sd_client(self.sd.port_number)
        self.addCleanup(lambda: self.client.close())
        self.trust = TrustStore.from_files([pki().root], [pki().intermediate])

    def check(self, served: dict, chain: list[dict]) -> cp.Checkpoint:
        note = cp.parse(served["checkpoint"])
        names = cp.verify(note, served["certificates"], self.trust,
                          Pins.from_records(chain).pinned)
        self.assertEqual(names, ["sd-1"])
        self.assertEqual(note.checkpoint.origin, "sd-1")
        self.assertEqual(note.checkpoint.size, len(chain))
        heads = cp.chain_heads(r["hash"] for r in chain)
        self.assertEqual(note.checkpoint.head, heads[-1] if heads else cp.ZERO_HEAD)
        return note.checkpoint

    @inlineCallbacks
    def test_checkpoints_follow_the_chain(self):
        empty = yield self.client.call("getCheckpoint", {})
        self.assertEqual(cp.parse(empty["checkpoint"]).checkpoint.size, 0)
        chain = sign_chain([checkpoint_pin(), *base_changes()])
        yield self.client.call("submitRecords", {"records": chain})
        served = yield self.client.call("getCheckpoint", {})
        self.check(served, chain)
        # getRecords with the checkpoint: the records and the checkpoint of their chain.
        reply = yield self.client.call("getRecords", {"after": chain[1]["hash"],
                                                      "checkpoint": True})
        self.assertEqual([r["hash"] for r in reply["records"]], [r["hash"] for r in chain[2:]])
        self.check(reply, chain)
        # The reference's shape stays when not asked for.
        plain = yield self.client.call("getRecords", {"after": ""})
        self.assertEqual(len(plain), len(chain))
        more = sign_chain([base_changes("2025-01-02T10:00:00Z")[1]], chain[-1]["hash"])
        yield self.client.call("submitRecords", {"records": more})
        self.assertEqual(self.check((yield self.client.call("getCheckpoint", {})),
                                    chain + more).size, len(chain) + 1)

    @inlineCallbacks
    def test_cosignature(self):
        p = pki()
        chain = sign_chain([checkpoint_pin(), checkpoint_pin("hd-2"), *base_changes()])
        yield self.client.call("submitRecords", {"records": chain})
        served = yield self.client.call("getCheckpoint", {})
        key, pem = signer("hd-2")
        cosigned = cp.cosign(cp.parse(served["checkpoint"]), "hd-2", key, pem)
        answer = yield self.client.call("submitCosignature",
                                        {"checkpoint": cosigned.text, "certificate": pem})
        self.assertEqual(answer, {"witnesses": ["hd-2"]})
        served = yield self.client.call("getCheckpoint", {})
        self.assertEqual(cp.verify(cp.parse(served["checkpoint"]), served["certificates"],
                                   self.trust, Pins.from_records(chain).pinned),
                         ["sd-1", "hd-2"])
        # A cosignature by a key not pinned (op-1), of another state, or garbage: refused.
        key1, pem1 = signer("op-1")
        other = cp.cosign(cp.parse(served["checkpoint"]), "op-1", key1, pem1)
        stale = cp.sign(cp.Checkpoint("sd-1", 1, cp.ZERO_HEAD, 0), "hd-2", key, pem)
        for note, cert in [(other.text, pem1), (stale.text, pem), ("garbage\n", pem),
                           (cosigned.text, p.signing("hd-1")[0].read_text())]:
            try:
                yield self.client.call("submitCosignature",
                                       {"checkpoint": note, "certificate": cert})
            except JSONRPCError as e:
                self.assertEqual(e.code, 400)
            else:
                self.fail("cosignature accepted")

    @inlineCallbacks
    def test_no_checkpoint_key(self):
        folder = Path(self.mktemp())
        write_sd_settings(folder)
        sd = yield start_sd(folder)
        self.addCleanup(sd.stop)
        client = sd_client(sd.port_number)
        self.addCleanup(client.close)
        try:
            yield client.call("getCheckpoint", {})
        except JSONRPCError as e:
            self.assertEqual(e.code, 404)
        else:
            self.fail("getCheckpoint answered without a key")
        self.assertEqual((yield client.call("getRecords", {"checkpoint": True})),
                         {"records": []})


class CheckpointSettingsTests(unittest.TestCase):
    def settings(self, **checkpoint):
        folder = Path(self.mktemp())
        write_sd_settings(folder, checkpoint=True)
        raw = yaml.safe_load((folder / "sd.yml").read_text())
        raw["checkpoint"].update(checkpoint)
        return SD_SETTINGS.validate(raw)

    def test_file_checks(self):
        from datetime import datetime, timezone
        now = datetime.now(timezone.utc)
        self.assertEqual([str(f) for f in check_file_sets(sd_file_sets(self.settings()), now)
                          if f.severity == "error"], [])
        p = pki()
        wrong = self.settings(certificate_file=str(p.signing("hd-2")[0]),
                              key_file=str(p.signing("hd-2")[1]))
        errors = [str(f) for f in check_file_sets(sd_file_sets(wrong), now)]
        self.assertTrue(any("checkpoint.certificate_file" in e and "hd-2" in e for e in errors),
                        errors)
        mismatched = self.settings(key_file=str(p.signing("hd-2")[1]))
        errors = [str(f) for f in check_file_sets(sd_file_sets(mismatched), now)]
        self.assertTrue(any(e.startswith("checkpoint.") for e in errors), errors)
