"""
Checkpoint gossip over real mutual TLS (issue 15 item 3): two SDs on forked stores, each
serving one of two endpoint servers; the servers' gossip over their link catches the
split view, both raise the alarm, and the evidence saved verifies offline.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.trial import unittest

from epsproxy.eps.evidence import FORMAT, check_evidence, EvidenceError, verify_evidence
from epsproxy.eps.service import EndpointServerService
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.rules import checkpoint as cp

from .support.checkpoints import api_settings, sd_with, url
from .support.eps import client_channel, server_channel, service
from .support.pki import pki
from .support.sd import change, checkpoint_pin, sd_client, sign_chain

T0 = "2025-01-01T10:00:00Z"
HD = ("health-departments",)


def operator_changes(name: str) -> list[dict]:
    fingerprints = pki().fingerprints(name)
    return [
        change(name, "certificates", [
            {"fingerprint": fingerprints["signing"], "key_usage": "signing"},
            {"fingerprint": fingerprints["encryption"], "key_usage": "encryption"}], T0),
        change(name, "groups", list(HD), T0),
        change(name, "services", [service("internals", HD, "_ping", "_checkpoint")], T0),
    ]


class GossipTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.sd_a = yield sd_with(self, [])
        self.sd_b = yield sd_with(self, [])
        self.folder = Path(self.mktemp())
        self.nodes = {}
        self.registries = {}
        # The common history: pins, groups and services of both operators.
        self.prefix = sign_chain([checkpoint_pin(created_at=T0), *operator_changes("hd-1"),
                                  *operator_changes("hd-2")])
        yield self.submit(self.sd_a, self.prefix)
        yield self.submit(self.sd_b, self.prefix)
        for name, sd in (("hd-1", self.sd_a), ("hd-2", self.sd_b)):
            yield self.start_node(name, sd)
        # Then their channels, the same signed records on both SDs.
        channels = sign_chain([
            change(name, "channels", [
                {"type": "eps_client"},
                {"type": "eps_server", "settings": {"address": self.address(name)}}], T0)
            for name in ("hd-1", "hd-2")], self.prefix[-1]["hash"])
        self.common = self.prefix + channels
        yield self.submit(self.sd_a, channels)
        yield self.submit(self.sd_b, channels)

    @defer.inlineCallbacks
    def submit(self, sd, chain):
        client = sd_client(sd.port_number)
        try:
            yield client.call("submitRecords", {"records": chain})
        finally:
            yield client.close()

    @defer.inlineCallbacks
    def start_node(self, name: str, sd, interval: float = 3600):
        registry = CollectorRegistry()
        settings = EPS_SETTINGS.validate({
            "name": name,
            "directory": {"type": "api", "settings": api_settings(
                [url(sd.port_number)], checkpoints="required", cache_entries_for=3600,
                cache_file=str(self.folder / name / "cache.json"))},
            "channels": [server_channel(name), client_channel(name)],
            "gossip": {"interval": interval, "evidence_dir": str(self.folder / name / "ev")},
        })
        node = EndpointServerService(reactor, settings, registry=registry)
        node.startService()
        self.addCleanup(node.stopService)
        yield node.when_ready()
        self.nodes[name] = node
        self.registries[name] = registry
        return node

    def address(self, name: str) -> str:
        for channel in self.nodes[name].channels:
            if channel.type == "eps_server":
                return f"127.0.0.1:{channel.port.getHost().port}"
        raise LookupError(name)

    @defer.inlineCallbacks
    def fork(self, a_changes: list[dict], b_changes: list[dict]):
        tip = self.common[-1]["hash"]
        yield self.submit(self.sd_a, sign_chain(a_changes, tip))
        yield self.submit(self.sd_b, sign_chain(b_changes, tip))
        for node in self.nodes.values():
            yield node.directory.update()

    def conflicts(self, name: str) -> float:
        return self.registries[name].get_sample_value("eps_checkpoint_conflicts_total")

    @defer.inlineCallbacks
    def test_agreeing_checkpoints_raise_nothing(self):
        for node in self.nodes.values():
            yield node.directory.update()
        gossip = self.nodes["hd-1"].gossip
        response = yield gossip._call("hd-2", gossip._message())
        self.assertEqual(response.result["checkpoint"],
                         self.nodes["hd-2"].directory.checkpoint.signed.text)
        found = yield gossip.exchange("hd-2")
        self.assertIsNone(found)
        self.assertEqual(self.conflicts("hd-1"), 0)
        self.assertEqual(self.conflicts("hd-2"), 0)
        self.assertEqual(self.nodes["hd-1"].readiness(), {})

    @defer.inlineCallbacks
    def test_same_size_split_view(self):
        yield self.fork([change("hd-3", "groups", ["a"], T0)],
                        [change("hd-3", "groups", ["b"], T0)])
        yield self.nodes["hd-1"].gossip.exchange("hd-2")
        # A side whose checkpoint is the older one updates before it believes the conflict.
        for node in self.nodes.values():
            yield defer.gatherResults(node.gossip.rechecks)
        for name in ("hd-1", "hd-2"):
            node = self.nodes[name]
            self.assertEqual(self.conflicts(name), 1)
            self.assertIn("same size", node.readiness()["gossip"])
            [path] = node.gossip.evidence
            ok, message = verify_evidence(path)
            self.assertTrue(ok, message)
            self.assertIn("two different chains", message)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_periodic_gossip_catches_a_longer_fork(self):
        # hd-1 sees one record after the common history, hd-2 two others: hd-2's chain
        # shows that hd-1's checkpoint is not a prefix of it.
        yield self.fork([change("hd-3", "groups", ["a"], T0)],
                        [change("hd-3", "groups", ["b"], T0), change("hd-4", "groups", ["c"], T0)])
        # A link between them (gossip uses the links they have), then gossip every 0.1 s.
        yield self.nodes["hd-1"].gossip.exchange("hd-2")
        for name in ("hd-1", "hd-2"):
            gossip = self.nodes[name].gossip
            gossip.alarm, gossip._seen = None, set()
        alarms = {}
        for name in ("hd-1", "hd-2"):
            gossip = self.nodes[name].gossip
            alarms[name] = defer.Deferred()
            gossip.add_listener(alarms[name].callback)
            gossip.stop()
            gossip.interval = 0.1
            gossip.start()
        started = reactor.seconds()
        yield defer.gatherResults(list(alarms.values()))
        self.assertLess(reactor.seconds() - started, 5)
        ok, message = verify_evidence(self.nodes["hd-2"].gossip.evidence[-1])
        self.assertTrue(ok, message)
        self.assertIn("not a prefix", message)
        self.assertIn("reports", self.nodes["hd-1"].readiness()["gossip"])

    @defer.inlineCallbacks
    def test_a_reset_is_not_a_split_view(self):
        for node in self.nodes.values():
            yield node.directory.update()
        old = self.nodes["hd-1"].directory.checkpoint.checkpoint
        # A named reset of the same size on both SDs, seen so far by hd-1 only.
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        reset = sign_chain([
            cp.reset_change("hd-1", old, now), checkpoint_pin(created_at=now),
            *[dict(c, created_at=now) for c in operator_changes("hd-1")],
            *[dict(c, created_at=now) for c in operator_changes("hd-2")[:2]],
            *[dict(r["record"], created_at=now) for r in self.common[-2:]]])
        self.assertEqual(len(reset), old.size)
        yield self.submit(self.sd_a, reset)
        yield self.submit(self.sd_b, reset)
        yield self.nodes["hd-1"].directory.update()
        self.assertEqual(self.nodes["hd-1"].directory.tip_hash, reset[-1]["hash"])
        # hd-1 finds hd-2's checkpoint older than its reset; hd-2 finds hd-1's newer, and
        # updates before believing anything: it gets the reset too.
        found = yield self.nodes["hd-1"].gossip.exchange("hd-2")
        self.assertIsNone(found)
        for node in self.nodes.values():
            yield defer.gatherResults(node.gossip.rechecks)
        self.assertEqual(self.nodes["hd-2"].directory.tip_hash, reset[-1]["hash"])
        for name in ("hd-1", "hd-2"):
            self.assertEqual(self.conflicts(name), 0)
            self.assertIsNone(self.nodes[name].gossip.alarm)

    @defer.inlineCallbacks
    def test_gossip_needs_permission(self):
        # hd-2's entry no longer lets hd-1 call _checkpoint: refused like any call.
        records = sign_chain([change("hd-2", "services", [service("internals", HD, "_ping")],
                                     T0)], self.common[-1]["hash"])
        yield self.submit(self.sd_a, records)
        yield self.submit(self.sd_b, records)
        for node in self.nodes.values():
            yield node.directory.update()
        gossip = self.nodes["hd-1"].gossip
        response = yield gossip._call("hd-2", gossip._message())
        self.assertIn("Permission denied", response.error["message"])
        found = yield gossip.exchange("hd-2")
        self.assertIsNone(found)
        self.assertEqual(self.conflicts("hd-2"), 0)
        # A round does not even ask a peer that does not offer it (a service operator, a
        # proxy): no refused calls pile up on either side, once a minute.
        self.assertFalse(gossip.may_gossip_with("hd-2"))
        self.assertTrue(self.nodes["hd-2"].gossip.may_gossip_with("hd-1"))
        self.assertFalse(gossip.may_gossip_with("nobody"))
        denied = {"method": "_checkpoint", "outcome": "denied"}
        before = self.registries["hd-2"].get_sample_value("eps_requests_total", denied)
        self.assertEqual(before, 2)  # the two calls above
        self.assertIsNotNone(self.nodes["hd-1"].links.link_to("hd-2", "outgoing"))
        yield gossip.round()  # over the open link: hd-2 is not asked
        self.assertEqual(
            self.registries["hd-2"].get_sample_value("eps_requests_total", denied), before)


class EvidenceTests(unittest.TestCase):
    """verify_evidence on hostile and inconclusive files (a real one is made above)."""

    def write(self, content) -> Path:
        path = Path(self.mktemp())
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    def test_hostile_files(self):
        self.assertFalse(verify_evidence(Path(self.mktemp()))[0])  # missing
        for content in ["", "not json", "[]", "{\"format\": \"other\"}",
                        {"format": FORMAT}, {"format": FORMAT, "checkpoints": []},
                        {"format": FORMAT, "checkpoints": [{}, {}]},
                        {"format": FORMAT, "checkpoints": [
                            {"checkpoint": "x\n", "certificates": []}] * 2},
                        "[" * 100000]:
            ok, message = verify_evidence(self.write(content))
            self.assertFalse(ok, content)
            self.assertTrue(message)

    def test_same_checkpoint_twice_proves_nothing(self):
        from epsproxy.rules import checkpoint as cp
        from .support.sd import signer
        key, pem = signer("sd-1")
        note = cp.sign(cp.Checkpoint("sd-1", 3, bytes(32), 0), "sd-1", key, pem).text
        pair = [{"checkpoint": note, "certificates": [pem]}] * 2
        with self.assertRaisesRegex(EvidenceError, "same chain"):
            check_evidence({"format": FORMAT, "checkpoints": pair})
        other = cp.sign(cp.Checkpoint("sd-1", 5, bytes(32), 0), "sd-1", key, pem).text
        pair[1] = {"checkpoint": other, "certificates": [pem]}
        with self.assertRaisesRegex(EvidenceError, "records do not make"):
            check_evidence({"format": FORMAT, "checkpoints": pair, "records": []})
        # Signed by different keys: nothing proven about one signer.
        key2, pem2 = signer("hd-2")
        third = cp.sign(cp.Checkpoint("sd-1", 3, bytes([1]) * 32, 0), "hd-2", key2, pem2).text
        with self.assertRaisesRegex(EvidenceError, "same key"):
            check_evidence({"format": FORMAT, "checkpoints": [
                {"checkpoint": note, "certificates": [pem]},
                {"checkpoint": third, "certificates": [pem2]}]})
