"""
Endpoint servers never go back (issue 15 item 2), over real mutual TLS: an api directory
against real SDs whose stores hold rolled-back, forked, reset and unsigned chains.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from epsproxy.directory.api import APIDirectory, UpdateError
from epsproxy.eps.service import EndpointServerService
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.rules import checkpoint as cp

from .support.checkpoints import SwitchClient, api_settings, sd_with, url, validated_api_settings
from .support.eps import gateway_channel
from .support.pki import pki
from .support.sd import base_changes, change, checkpoint_pin, sd_client, sign_chain, signer

T0 = "2025-01-01T10:00:00Z"
T1 = "2025-01-02T10:00:00Z"


def full_chain() -> list[dict]:
    return sign_chain([checkpoint_pin(created_at=T0), checkpoint_pin("hd-2", T0),
                       *base_changes(T0), change("hd-3", "groups", ["labs"], T0)])


class NoRollbackTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.chain = full_chain()
        self.good = yield sd_with(self, self.chain)
        self.registry = CollectorRegistry()
        self.cache = Path(self.mktemp()) / "cache.json"

    def directory(self, sd, **extra) -> APIDirectory:
        self.switch = SwitchClient(sd_client(sd.port_number))
        d = APIDirectory(reactor, validated_api_settings([url(sd.port_number)],
                                                         cache_file=str(self.cache), **extra),
                         "hd-1", clients=[self.switch], registry=CollectorRegistry())
        self.addCleanup(d.stop)
        return d

    def point_at(self, sd) -> None:
        self.switch.switch(sd_client(sd.port_number))

    def refused(self, d: APIDirectory, reason: str) -> float:
        return d._refused.labels(reason)._value.get()

    @inlineCallbacks
    def assertRefused(self, d: APIDirectory, kind: str, text: str):
        tip = d.tip_hash
        entries = d.entries()
        before = self.refused(d, kind)
        with self.assertRaises(UpdateError) as caught:
            yield d.update()
        self.assertIn(text, str(caught.exception))
        self.assertEqual(self.refused(d, kind), before + 1)
        self.assertIn(text, d.refusal)
        # Still serving the verified data.
        self.assertEqual(d.tip_hash, tip)
        self.assertEqual(d.entries(), entries)

    @inlineCallbacks
    def test_accepts_and_keeps_the_checkpoint(self):
        d = self.directory(self.good, checkpoints="required")
        yield d.update()
        self.assertEqual(d.checkpoint.checkpoint.size, len(self.chain))
        self.assertEqual(d.checkpoint.checkpoint.head, cp.chain_heads(
            r["hash"] for r in self.chain)[-1])
        cached = json.loads(self.cache.read_text())
        self.assertEqual(cp.parse(cached["checkpoint"]["checkpoint"]).checkpoint.size,
                         len(self.chain))
        self.assertIsNone(d.refusal)

    @inlineCallbacks
    def test_rollback_refused(self):
        d = self.directory(self.good)
        yield d.update()
        shorter = yield sd_with(self, self.chain[:-2])
        self.point_at(shorter)
        yield self.assertRefused(d, "rollback", "does not extend the verified checkpoint")
        self.assertEqual(d.entry_for("hd-3")["groups"], ["labs"])
        # Back to an SD that extends it: accepted, refusal cleared.
        self.point_at(self.good)
        yield d.update()
        self.assertIsNone(d.refusal)

    @inlineCallbacks
    def test_fork_refused(self):
        d = self.directory(self.good)
        yield d.update()
        forked_chain = self.chain[:3] + sign_chain(
            [change("hd-3", "groups", ["forked"], T0), change("hd-4", "groups", ["x"], T0),
             change("hd-5", "groups", ["y"], T0), change("hd-6", "groups", ["z"], T0)],
            parent_hash=self.chain[2]["hash"])
        forked = yield sd_with(self, forked_chain)
        self.point_at(forked)
        yield self.assertRefused(d, "fork", "does not extend the verified checkpoint")
        self.assertEqual(d.entry_for("hd-3")["groups"], ["labs"])

    @inlineCallbacks
    def test_unsigned_view_refused(self):
        d = self.directory(self.good)  # optional: unsigned only until a checkpoint verified
        yield d.update()
        unsigned = yield sd_with(self, self.chain + sign_chain(
            [change("hd-7", "groups", ["x"], T0)], self.chain[-1]["hash"]), checkpoint=False)
        self.point_at(unsigned)
        yield self.assertRefused(d, "unsigned", "no checkpoint")

    @inlineCallbacks
    def test_required_refuses_unsigned_from_the_start(self):
        unsigned = yield sd_with(self, self.chain, checkpoint=False)
        d = self.directory(unsigned, checkpoints="required")
        with self.assertRaises(UpdateError):
            yield d.update()
        self.assertEqual(d.entries(), [])
        # optional mode (the JSON-directory-era setups) accepts it.
        self.cache.unlink(missing_ok=True)
        lax = self.directory(unsigned)
        yield lax.update()
        self.assertEqual(len(lax.entries()), 4)

    @inlineCallbacks
    def test_bad_signature_refused(self):
        d = self.directory(self.good)
        yield d.update()
        more = sign_chain([change("hd-8", "groups", ["x"], T0)], self.chain[-1]["hash"])
        real = sd_client(self.good.port_number)
        self.addCleanup(real.close)
        yield real.call("submitRecords", {"records": more})

        class Tampering:
            def call(self, method, params):
                def tamper(reply):
                    reply["checkpoint"] = reply["checkpoint"].replace(
                        f"\n{len(self.chain) + 1}\n", f"\n{len(self.chain) + 1}\n", 1)
                    lines = reply["checkpoint"].split("\n")
                    lines[1] = str(int(lines[1]) + 1)  # size changed after signing
                    reply["checkpoint"] = "\n".join(lines)
                    return reply
                return real.call(method, params).addCallback(tamper)

            def close(self):
                return real.close()

        Tampering.chain = self.chain  # type: ignore[attr-defined]  # read by tamper
        self.switch.switch(Tampering())
        yield self.assertRefused(d, "bad_checkpoint", "not valid")
        self.assertIsNone(d.entries({"operator": "hd-8"}) or None)

    @inlineCallbacks
    def test_reset(self):
        d = self.directory(self.good)
        yield d.update()
        old = d.checkpoint.checkpoint
        # A reset that does not name our checkpoint: refused.
        unnamed = yield sd_with(self, sign_chain([checkpoint_pin(created_at=T1), *base_changes(T1)]))
        self.point_at(unnamed)
        yield self.assertRefused(d, "reset", "does not name the checkpoint")
        # A reset by the sd-admin hd-1 naming it: accepted.
        # (made as `eps sd submit-records --reset` makes it, from the SD's getCheckpoint)
        admin = sd_client(self.good.port_number)
        self.addCleanup(admin.close)
        root = cp.reset_root((yield admin.call("getCheckpoint", {})), "hd-1", T1)
        self.assertEqual(cp.replaced_by(root), (old.origin, old.size, old.head))
        self.assertIsNone(cp.reset_root(None, "hd-1", T1))
        named_chain = sign_chain([root, checkpoint_pin(created_at=T1), *base_changes(T1)])
        named = yield sd_with(self, named_chain)
        self.point_at(named)
        self.assertTrue((yield d.update()))
        self.assertEqual(d.tip_hash, named_chain[-1]["hash"])
        self.assertIsNone(d.refusal)
        with self.assertRaises(Exception):
            d.entry_for("hd-3")
        # A reset naming some other checkpoint of the same size: refused.
        wrong = cp.Checkpoint(old.origin, len(named_chain), bytes(32), old.time)
        other = yield sd_with(self, sign_chain(
            [cp.reset_change("hd-1", wrong, "2025-01-03T10:00:00Z"),
             checkpoint_pin(created_at="2025-01-03T10:00:00Z")]))
        self.point_at(other)
        yield self.assertRefused(d, "reset", "does not name the checkpoint")

    @inlineCallbacks
    def test_restart_keeps_the_checkpoint(self):
        d = self.directory(self.good)
        yield d.update()
        yield d.stop()
        shorter = yield sd_with(self, self.chain[:-1])
        again = self.directory(shorter)
        yield again.start()  # loads the cache, then one update (refused)
        self.assertEqual(again.checkpoint.checkpoint.size, len(self.chain))
        self.assertEqual(again.tip_hash, self.chain[-1]["hash"])
        self.assertIn("does not extend", again.refusal)
        self.assertEqual(self.refused(again, "rollback"), 1)

    @inlineCallbacks
    def test_tampered_cache_checkpoint_ignored(self):
        d = self.directory(self.good)
        yield d.update()
        yield d.stop()
        content = json.loads(self.cache.read_text())
        content["checkpoint"]["checkpoint"] = content["checkpoint"]["checkpoint"].replace(
            f"\n{len(self.chain)}\n", f"\n{len(self.chain) - 1}\n")
        self.cache.write_text(json.dumps(content))
        again = self.directory(self.good)
        again._load_cache()
        self.assertEqual(again.entries(), [])  # the whole cache is ignored
        self.assertIsNone(again.checkpoint)

    @inlineCallbacks
    def test_witnesses_required(self):
        witnesses = {"names": ["hd-2"], "required": 1}
        d = self.directory(self.good, checkpoints="required", witnesses=witnesses)
        with self.assertRaises(UpdateError):
            yield d.update()
        self.assertIn("witness", d.refusal)
        self.assertEqual(self.refused(d, "witnesses"), 1)
        real = sd_client(self.good.port_number)
        self.addCleanup(real.close)
        served = yield real.call("getCheckpoint", {})
        key, pem = signer("hd-2")
        cosigned = cp.cosign(cp.parse(served["checkpoint"]), "hd-2", key, pem)
        yield real.call("submitCosignature", {"checkpoint": cosigned.text, "certificate": pem})
        self.assertTrue((yield d.update()))
        self.assertIsNone(d.refusal)
        self.assertEqual([s.name for s in d.checkpoint.signed.signatures], ["sd-1", "hd-2"])


class ReadinessTests(unittest.TestCase):
    """A real endpoint server: a refused view makes it report degraded readiness."""

    @inlineCallbacks
    def test_refusal_degrades_readiness(self):
        chain = full_chain()
        good = yield sd_with(self, chain)
        shorter = yield sd_with(self, chain[:-1])
        registry = CollectorRegistry()
        settings = EPS_SETTINGS.validate({
            "name": "hd-1",
            "directory": {"type": "api", "settings": api_settings(
                [url(good.port_number), url(shorter.port_number)], checkpoints="required",
                cache_entries_for=3600,
                cache_file=str(Path(self.mktemp()) / "cache.json"))},
            "channels": [gateway_channel("hd-1")],
        })
        node = EndpointServerService(reactor, settings, registry=registry)
        node.startService()
        self.addCleanup(node.stopService)
        yield node.when_ready()
        self.assertEqual(node.readiness(), {})
        # The first SD goes away; the second serves a rolled-back view.
        yield good.stop()
        for client in node.directory._clients:
            yield client._pool.closeCachedConnections()
        with self.assertRaises(UpdateError):
            yield node.directory.update()
        checks = node.readiness()
        self.assertIn("checkpoint", checks)
        self.assertIn("degraded", checks["checkpoint"])
        self.assertEqual(registry.get_sample_value(
            "eps_directory_views_refused_total", {"reason": "rollback"}), 1)
        self.assertEqual(node.directory.own_entry()["name"], "hd-1")


class WitnessTests(unittest.TestCase):
    """An endpoint server that cosigns; another that requires its cosignature."""

    @inlineCallbacks
    def test_witness_cosigns_and_is_required(self):
        chain = full_chain()
        sd = yield sd_with(self, chain)
        p = pki()
        crt, key = p.signing("hd-2")
        settings = EPS_SETTINGS.validate({
            "name": "hd-2",
            "directory": {"type": "api", "settings": api_settings(
                [url(sd.port_number)], checkpoints="required", cache_entries_for=3600,
                witnesses={"names": [], "required": 0, "cosign": True})},
            "channels": [gateway_channel("hd-2")],
            "signing": {"certificate_file": str(crt), "key_file": str(key),
                        "ca_certificate_file": str(p.root),
                        "ca_intermediate_certificate_files": [str(p.intermediate)]},
        })
        witness = EndpointServerService(reactor, settings)
        witness.startService()
        self.addCleanup(witness.stopService)
        yield witness.when_ready()  # its first update verified and cosigned the checkpoint
        strict = APIDirectory(reactor, validated_api_settings(
            [url(sd.port_number)], checkpoints="required",
            witnesses={"names": ["hd-2"], "required": 1}), "hd-1")
        self.addCleanup(strict.stop)
        yield strict.update()
        self.assertEqual([s.name for s in strict.checkpoint.signed.signatures], ["sd-1", "hd-2"])
        # Requiring a witness that never cosigned: refused.
        stricter = APIDirectory(reactor, validated_api_settings(
            [url(sd.port_number)], checkpoints="required",
            witnesses={"names": ["hd-2", "ls-1"], "required": 2}), "hd-1")
        self.addCleanup(stricter.stop)
        with self.assertRaises(UpdateError):
            yield stricter.update()
        self.assertIn("1 of the 2 witness cosignatures", stricter.refusal)


class RestartTests(unittest.TestCase):
    """A real endpoint server restarted against a rolled-back SD keeps its checkpoint."""

    @inlineCallbacks
    def start(self, sd, cache: Path):
        settings = EPS_SETTINGS.validate({
            "name": "hd-1",
            "directory": {"type": "api", "settings": api_settings(
                [url(sd.port_number)], checkpoints="required", cache_entries_for=3600,
                cache_file=str(cache))},
            "channels": [gateway_channel("hd-1")],
        })
        node = EndpointServerService(reactor, settings)
        node.startService()
        yield node.when_ready()
        return node

    @inlineCallbacks
    def test_restart_keeps_the_checkpoint(self):
        chain = full_chain()
        good = yield sd_with(self, chain)
        cache = Path(self.mktemp()) / "cache.json"
        node = yield self.start(good, cache)
        self.assertEqual(node.readiness(), {})
        yield node.stopService()
        shorter = yield sd_with(self, chain[:-1])
        node = yield self.start(shorter, cache)
        self.addCleanup(node.stopService)
        self.assertEqual(node.directory.checkpoint.checkpoint.size, len(chain))
        self.assertEqual(node.directory.entry_for("hd-3")["groups"], ["labs"])
        self.assertIn("degraded", node.readiness()["checkpoint"])
