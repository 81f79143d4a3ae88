"""
The ``api`` directory back-end (SPEC §7.2, §23.3 #28): against a real service directory
over mutual TLS on loopback, and with a fake SD client on a Clock for timing and
state-machine details.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest

from epsproxy.directory import api as api_module
from epsproxy.directory.api import APIDirectory, UpdateError
from epsproxy.directory.jsondir import DirectoryError
from epsproxy.eps.settings import API_DIRECTORY_SETTINGS
from epsproxy.net.jsonrpc.envelope import JSONRPCError, TransportError

from .support.pki import pki
from .support.sd import base_changes, change, sd_client, sign_chain, start_sd, write_sd_settings

T0 = "2025-01-01T10:00:00Z"
T1 = "2025-01-01T11:00:00Z"


def directory_settings(endpoints: list[str], **extra: Any) -> dict:
    """Validated api directory settings with hd-1's TLS identity."""
    p = pki()
    crt, key = p.tls("hd-1")
    raw = {
        "endpoints": endpoints,
        "server_names": ["sd-1"],
        "jsonrpc_client": {
            "tls": {
                "ca_certificate_files": [str(p.root)],
                "certificate_file": str(crt),
                "key_file": str(key),
            },
            "timeout": 10,
        },
        "ca_certificate_files": [str(p.root)],
        "ca_intermediate_certificate_files": [str(p.intermediate)],
    }
    raw.update(extra)
    return API_DIRECTORY_SETTINGS.validate(raw)


def url(port: int) -> str:
    return f"https://127.0.0.1:{port}/jsonrpc"


def tamper(signed: dict) -> dict:
    """A copy whose signed content changed after signing."""
    bad = copy.deepcopy(signed)
    bad["record"]["data"] = ["intruders"]
    return bad


def capture_log(case: unittest.TestCase) -> list[dict]:
    events: list[dict] = []
    case.patch(api_module, "log", Logger(observer=events.append))
    return events


def messages(events: list[dict], level: str) -> list[str]:
    return [e["log_format"] for e in events if e["log_level"].name == level]


# ----------------------------------------------------------------------------- real SD


class RealSDTests(unittest.TestCase):
    """An APIDirectory talking to a real SD (and sometimes a second one)."""

    @inlineCallbacks
    def setUp(self):
        self.sd = yield self.start_sd("sd")
        self.admin = sd_client(self.sd.port_number)
        self.addCleanup(self.admin.close)

    @inlineCallbacks
    def start_sd(self, label: str):
        folder = write_sd_settings(Path(self.mktemp()) / label)
        running = yield start_sd(folder)
        stopped = []

        def stop():
            if not stopped:
                stopped.append(True)
                return running.stop()

        running.stop_once = stop
        self.addCleanup(stop)
        return running

    def directory(self, endpoints: list[str] | None = None, **extra: Any) -> APIDirectory:
        d = APIDirectory(
            reactor, directory_settings(endpoints or [url(self.sd.port_number)], **extra), "hd-1"
        )
        self.addCleanup(d.stop)
        return d

    def spy(self, directory: APIDirectory, index: int = 0) -> list[tuple[str, dict, Any]]:
        """Record (method, params, result) of the calls of one of its clients."""
        calls: list[tuple[str, dict, Any]] = []
        client = directory._clients[index]
        original = client.call

        def call(method, params, *args, **kwargs):
            d = original(method, params, *args, **kwargs)

            def seen(result):
                calls.append((method, copy.deepcopy(params), result))
                return result

            return d.addCallback(seen)

        client.call = call
        return calls

    @inlineCallbacks
    def stop_sd(self, running, *directories: APIDirectory):
        """Stop an SD; a stopped SD keeps serving established connections, so drop them."""
        yield running.stop_once()
        for d in directories:
            for client in d._clients:
                yield client._pool.closeCachedConnections()

    @inlineCallbacks
    def submit(self, chain: list[dict], client=None):
        result = yield (client or self.admin).call("submitRecords", {"records": chain})
        self.assertEqual(result, "ok")

    @inlineCallbacks
    def test_first_update_fetches_and_verifies_everything(self):
        chain = sign_chain(base_changes(T0))
        yield self.submit(chain)
        d = self.directory()
        calls = self.spy(d)
        self.assertIsNone(d.last_success)
        self.assertTrue((yield d.update()))
        self.assertEqual(calls[0][:2], ("getRecords", {"after": "", "checkpoint": True}))
        self.assertEqual(d.tip_hash, chain[-1]["hash"])
        self.assertEqual(d.own_entry()["name"], "hd-1")
        self.assertEqual(d.entry_for("hd-2")["channels"][0]["type"], "eps_server")
        self.assertEqual(
            sorted(e["name"] for e in d.entries({"group": "health-departments"})),
            ["hd-1", "hd-2"],
        )
        self.assertEqual([e["name"] for e in d.entries({"operator": "hd-2"})], ["hd-2"])
        self.assertIsNotNone(d.last_success)
        self.assertFalse(d.is_stale(60))
        self.assertRaises(DirectoryError, d.entry_for, "hd-9")
        self.assertRaises(DirectoryError, d.entries, ["not", "a", "query"])
        self.assertRaises(DirectoryError, d.entries, {"channels": "grpc_server"})

    @inlineCallbacks
    def test_incremental_update_fetches_only_new_records(self):
        chain = sign_chain(base_changes(T0))
        yield self.submit(chain)
        d = self.directory()
        yield d.update()
        calls = self.spy(d)
        more = sign_chain([change("hd-3", "groups", ["labs"])], parent_hash=chain[-1]["hash"])
        yield self.submit(more)
        self.assertTrue((yield d.update()))
        method, params, result = calls[-1]
        self.assertEqual(params, {"after": chain[-1]["hash"], "checkpoint": True})
        self.assertEqual([r["hash"] for r in result["records"]], [more[0]["hash"]])
        self.assertEqual(d.entry_for("hd-3")["groups"], ["labs"])
        self.assertEqual(d.tip_hash, more[0]["hash"])
        # Nothing new: no change.
        self.assertFalse((yield d.update()))

    @inlineCallbacks
    def test_sd_reset_with_newer_root_rebuilds(self):
        old = sign_chain(base_changes(T0) + [change("hd-3", "groups", ["labs"], T0)])
        yield self.submit(old)
        d = self.directory()
        yield d.update()
        self.assertEqual(d.entry_for("hd-3")["groups"], ["labs"])
        new = sign_chain(base_changes(T1))
        yield self.submit(new)
        self.assertTrue((yield d.update()))
        self.assertEqual(d.tip_hash, new[-1]["hash"])
        self.assertEqual(d._chain.records[0]["hash"], new[0]["hash"])
        # Rebuilt from scratch: hd-3 existed only in the old chain.
        self.assertRaises(DirectoryError, d.entry_for, "hd-3")

    @inlineCallbacks
    def test_older_root_is_refused_and_old_data_kept(self):
        # SD A has the newer directory; SD B (the second endpoint) an older one.
        newer = sign_chain(base_changes(T1))
        yield self.submit(newer)
        sd_b = yield self.start_sd("sd-b")
        client_b = sd_client(sd_b.port_number)
        self.addCleanup(client_b.close)
        older = sign_chain(base_changes(T0) + [change("hd-3", "groups", ["labs"], T0)])
        yield self.submit(older, client_b)
        d = self.directory([url(self.sd.port_number), url(sd_b.port_number)])
        yield d.update()
        self.assertEqual(d.tip_hash, newer[-1]["hash"])
        first_success = d.last_success
        yield self.admin.close()
        yield self.stop_sd(self.sd, d)
        error = yield self.assertFailure(d.update(), UpdateError)
        self.assertIn("outdated service directory", str(error))
        self.assertEqual(d.tip_hash, newer[-1]["hash"])
        self.assertRaises(DirectoryError, d.entry_for, "hd-3")
        self.assertEqual(d.last_success, first_success)

    @inlineCallbacks
    def test_tampered_record_is_refused(self):
        chain = sign_chain(base_changes(T0))
        yield self.submit(chain)
        d = self.directory()
        yield d.update()
        before = d.entries()
        more = sign_chain([change("hd-3", "groups", ["labs"])], parent_hash=chain[-1]["hash"])
        client = d._clients[0]
        self.patch(client, "call", lambda method, params, *a, **k: succeed([tamper(more[0])]))
        error = yield self.assertFailure(d.update(), UpdateError)
        self.assertIn("refused records", str(error))
        self.assertEqual(d.entries(), before)
        self.assertEqual(d.tip_hash, chain[-1]["hash"])

    @inlineCallbacks
    def test_dropped_or_reordered_records_are_refused(self):
        # SPEC §23.3 #28: each record is validly signed, but the chain does not link.
        chain = sign_chain(base_changes(T0))
        d = self.directory()
        client = d._clients[0]
        for served in ([chain[0], chain[2], chain[3]], [chain[1], chain[0]], [chain[0], chain[0]]):
            self.patch(client, "call", lambda method, params, *a, s=served, **k: succeed(s))
            yield self.assertFailure(d.update(), UpdateError)
            self.assertEqual(d.entries(), [])
            self.assertEqual(d.tip_hash, "")

    @inlineCallbacks
    def test_unreachable_sd_serves_memory_then_cache(self):
        cache = Path(self.mktemp())
        cache.parent.mkdir(parents=True, exist_ok=True)
        chain = sign_chain(base_changes(T0))
        yield self.submit(chain)
        sd_url = url(self.sd.port_number)
        d = self.directory([sd_url], cache_file=str(cache))
        yield d.start()
        self.assertEqual(d.tip_hash, chain[-1]["hash"])
        self.assertEqual(stat.S_IMODE(os.stat(cache).st_mode), 0o600)
        on_disk = json.loads(cache.read_text())
        self.assertEqual([r["hash"] for r in on_disk["records"]], [r["hash"] for r in chain])
        yield self.admin.close()
        yield self.stop_sd(self.sd, d)
        yield self.assertFailure(d.update(), UpdateError)
        self.assertEqual(d.entry_for("hd-2")["name"], "hd-2")
        # A restart while the SD is down starts from the verified cache.
        again = self.directory([sd_url], cache_file=str(cache))
        yield again.start()
        self.assertEqual(again.tip_hash, chain[-1]["hash"])
        self.assertEqual(again.entries(), d.entries())
        self.assertIsNone(again.last_success)
        self.assertTrue(again.is_stale(3600))

    @inlineCallbacks
    def test_second_endpoint_used_when_first_is_down(self):
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        dead = port.getHost().port
        yield port.stopListening()
        chain = sign_chain(base_changes(T0))
        yield self.submit(chain)
        d = self.directory([url(dead), url(self.sd.port_number)])
        self.assertTrue((yield d.update()))
        self.assertEqual(d.tip_hash, chain[-1]["hash"])
        # The pass-throughs fail over too.
        tip = yield d.tip()
        self.assertEqual(tip["hash"], chain[-1]["hash"])

    @inlineCallbacks
    def test_submit_and_tip_pass_through(self):
        d = self.directory()
        self.assertIsNone((yield d.tip()))
        chain = sign_chain(base_changes(T0))
        self.assertEqual((yield d.submit(chain)), "ok")
        self.assertEqual((yield d.tip())["hash"], chain[-1]["hash"])
        # A refusal is an answer: reported as the SD's error.
        yield self.assertFailure(d.submit([tamper(chain[0])]), JSONRPCError)

    @inlineCallbacks
    def test_listeners_called_on_change_only(self):
        chain = sign_chain(base_changes(T0))
        yield self.submit(chain)
        d = self.directory()
        calls = []
        d.add_listener(lambda: calls.append(1))
        d.add_listener(lambda: 1 / 0)  # a broken listener does not break the update
        yield d.update()
        self.assertEqual(len(calls), 1)
        yield d.update()
        self.assertEqual(len(calls), 1)
        more = sign_chain([change("hd-3", "groups", ["labs"])], parent_hash=chain[-1]["hash"])
        yield self.submit(more)
        yield d.update()
        self.assertEqual(len(calls), 2)
        self.flushLoggedErrors(ZeroDivisionError)


# ------------------------------------------------------------------- fake SD on a Clock


class FakeClient:
    """Scripted SD client: ``answers`` maps a method to a value, an exception or a Deferred."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict]] = []
        self.closed = False

    def call(self, method: str, params: dict) -> Deferred:
        self.calls.append((method, params))
        answer = self.answers[method]
        if callable(answer):
            answer = answer(params)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(copy.deepcopy(answer))

    def close(self) -> Deferred:
        self.closed = True
        return succeed(None)


class FakeSDTests(unittest.TestCase):
    """Timing, staleness, serialisation and hostile answers, without sockets."""

    def setUp(self):
        self.clock = Clock()
        self.chain = sign_chain(base_changes(T0))

    def directory(self, *clients: FakeClient, **extra: Any) -> APIDirectory:
        endpoints = [f"https://127.0.0.1:{i + 1}/jsonrpc" for i in range(len(clients))]
        settings = directory_settings(endpoints, **extra)
        return APIDirectory(self.clock, settings, "hd-1", clients=list(clients))

    def serving(self, records: list[dict]) -> FakeClient:
        by_hash = {r["hash"]: i for i, r in enumerate(records)}

        def get_records(params):
            after = params["after"]
            return records[by_hash[after] + 1:] if after in by_hash else records

        return FakeClient(getRecords=get_records)

    def test_stale_detection_and_log_once(self):
        events = capture_log(self)
        client = self.serving(self.chain)
        d = self.directory(client, cache_entries_for=5)
        self.successResultOf(d.start())
        self.assertEqual(d.last_success, 0)
        self.assertFalse(d.is_stale(10))
        client.answers["getRecords"] = TransportError("down")
        for _ in range(4):
            self.clock.advance(5)
        self.assertEqual(d.last_success, 0)  # #28: failures do not count as updates
        self.assertTrue(d.is_stale(10))
        self.assertEqual(len(client.calls), 5)  # the loop survives failures
        self.assertEqual(len([m for m in messages(events, "warn") if "stale" in m]), 1)
        self.assertEqual(d.entry_for("hd-2")["name"], "hd-2")
        client.answers["getRecords"] = []
        self.clock.advance(5)
        self.assertEqual(d.last_success, 25)
        self.assertFalse(d.is_stale(10))
        self.assertIn("directory data is fresh again", messages(events, "info"))
        self.successResultOf(d.stop())
        self.clock.advance(50)
        self.assertEqual(len(client.calls), 6)
        self.assertTrue(client.closed)

    def test_zero_cache_period_means_one_second(self):
        client = self.serving(self.chain)
        d = self.directory(client, cache_entries_for=0)
        self.successResultOf(d.start())
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(client.calls), 3)
        self.successResultOf(d.stop())

    def test_start_failure_is_only_logged(self):
        events = capture_log(self)
        d = self.directory(FakeClient(getRecords=JSONRPCError(-32603, "internal error")))
        self.successResultOf(d.start())
        self.assertEqual(d.entries(), [])
        self.assertIsNone(d.last_success)
        self.assertTrue(any("update failed" in m for m in messages(events, "warn")))
        self.successResultOf(d.stop())

    def test_updates_are_serialised(self):
        pending: list[Deferred] = []
        client = FakeClient(getRecords=lambda params: pending.append(Deferred()) or pending[-1])
        d = self.directory(client)
        first = d.update()
        second = d.update()
        self.assertEqual(len(client.calls), 1)
        pending[0].callback(self.chain)
        self.assertTrue(self.successResultOf(first))
        self.assertEqual(client.calls[1], ("getRecords", {"after": self.chain[-1]["hash"], "checkpoint": True}))
        pending[1].callback([])
        self.assertFalse(self.successResultOf(second))

    def test_hostile_answers_are_refused(self):
        good = self.directory(self.serving(self.chain))
        self.successResultOf(good.update())
        tip = self.chain[-1]["hash"]
        more = sign_chain([change("hd-3", "groups", ["labs"])], parent_hash=tip)
        hostile = [
            {"not": "a list"},
            "records",
            [None],
            [42],
            [{"parent_hash": tip}],  # truncated record
            [{**more[0], "hash": "0" * 64}],  # lies about its hash
            [tamper(more[0])],
            [dict(more[0], parent_hash="f" * 64)],  # continues nothing we know
            sign_chain([change("hd-3", "groups", ["x"])], parent_hash="a" * 64),
            sign_chain([change("hd-3", "groups", ["labs"])], parent_hash=tip, foreign=True),
            [more[0]] * 2,
            [more[0], {"x": "y" * 100_000}],  # a good record followed by junk: all or nothing
        ]
        for answer in hostile:
            self.patch(good._clients[0], "answers", {"getRecords": answer})
            f = self.failureResultOf(good.update(), UpdateError)
            self.assertTrue(str(f.value))
            self.assertEqual(good.tip_hash, tip)
            self.assertRaises(DirectoryError, good.entry_for, "hd-3")

    def test_second_endpoint_after_bad_answer(self):
        first = FakeClient(getRecords={"not": "a list"})
        second = self.serving(self.chain)
        d = self.directory(first, second)
        self.assertTrue(self.successResultOf(d.update()))
        self.assertEqual(len(first.calls), 1)

    def test_reset_to_older_root_on_fake(self):
        newer = sign_chain(base_changes(T1))
        client = self.serving(newer)
        d = self.directory(client)
        self.successResultOf(d.update())
        client.answers["getRecords"] = self.chain  # root at T0, earlier
        f = self.failureResultOf(d.update(), UpdateError)
        self.assertIn("outdated service directory", str(f.value))
        self.assertEqual(d.tip_hash, newer[-1]["hash"])
        # Same root time is a valid reset (not earlier).
        same = sign_chain(base_changes(T1) + [change("hd-3", "groups", ["labs"], T1)])
        client.answers["getRecords"] = same
        self.assertTrue(self.successResultOf(d.update()))
        self.assertEqual(d.tip_hash, same[-1]["hash"])

    def test_bad_cache_files_are_ignored(self):
        events = capture_log(self)
        folder = Path(self.mktemp())
        folder.mkdir()
        good = json.dumps({"records": self.chain})
        bad_contents = {
            "not-json": b"{",
            "not-utf8": b"\xff\xfe",
            "list": b"[]",
            "no-records": b'{"records": 1}',
            "tampered": json.dumps({"records": [tamper(self.chain[0])] + self.chain[1:]}).encode(),
            "unlinked": json.dumps({"records": self.chain[1:]}).encode(),
            "truncated": good[: len(good) // 2].encode(),
            "nan": b'{"records": [NaN]}',
            "deep": b'{"records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        }
        for label, content in bad_contents.items():
            path = folder / label
            path.write_bytes(content)
            client = FakeClient(getRecords=TransportError("down"))
            d = self.directory(client, cache_file=str(path))
            self.successResultOf(d.start())
            self.assertEqual(d.entries(), [], label)
            self.successResultOf(d.stop())
        ignored = [e for e in events if "ignoring directory cache" in e["log_format"]]
        self.assertEqual(len(ignored), len(bad_contents))

    def test_oversized_cache_is_ignored(self):
        self.patch(api_module, "MAX_CACHE_BYTES", 100)
        path = Path(self.mktemp())
        path.write_text(json.dumps({"records": self.chain}))
        d = self.directory(FakeClient(getRecords=TransportError("down")), cache_file=str(path))
        self.successResultOf(d.start())
        self.assertEqual(d.entries(), [])
        self.successResultOf(d.stop())

    def test_good_cache_then_update_continues_it(self):
        path = Path(self.mktemp())
        path.write_text(json.dumps({"records": self.chain[:2]}))
        client = self.serving(self.chain)
        d = self.directory(client, cache_file=str(path))
        loaded = []
        d.add_listener(lambda: loaded.append(d.tip_hash))
        self.successResultOf(d.start())
        self.assertEqual(client.calls[0], ("getRecords", {"after": self.chain[1]["hash"], "checkpoint": True}))
        self.assertEqual(loaded, [self.chain[1]["hash"], self.chain[-1]["hash"]])
        self.assertEqual(len(json.loads(path.read_text())["records"]), len(self.chain))
        self.successResultOf(d.stop())

    def test_missing_cache_folder_is_made(self):
        # The dev roles put caches under run/<role>/, which nothing else creates: a
        # node restarted while the SD is down must still find its cache (make chaos).
        path = Path(self.mktemp()) / "missing-folder" / "cache.json"
        d = self.directory(self.serving(self.chain), cache_file=str(path))
        self.assertTrue(self.successResultOf(d.update()))
        self.assertEqual(len(json.loads(path.read_text())["records"]), len(self.chain))

    def test_unwritable_cache_is_logged(self):
        events = capture_log(self)
        blocker = Path(self.mktemp())
        blocker.write_text("a file where the cache folder should be")
        path = blocker / "cache.json"
        d = self.directory(self.serving(self.chain), cache_file=str(path))
        self.assertTrue(self.successResultOf(d.update()))
        self.assertTrue(any("cannot write" in m for m in messages(events, "warn")))
        self.assertFalse(path.exists())

    def test_server_names_per_endpoint(self):
        self.assertEqual(api_module._server_name(1, "https://a:1/", ["x", "y"]), "y")
        self.assertEqual(api_module._server_name(2, "https://a:1/", ["x", "y"]), "x")
        self.assertEqual(api_module._server_name(0, "https://sd.example:1/", []), "sd.example")
