"""
Announcement tables (SPEC §14.4, §14.5): the rules (403, 500, 409, expiry, the 7-day
limit, per-item results, the per-operator cap), persistence and reload from an embedded
store and a real Redis, and the public proxy's ``announceConnections`` /
``getAnnouncements`` over real HTTPS.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from epsproxy.net.jsonrpc.envelope import INVALID_PARAMS, JSONRPCError
from epsproxy.proxy.announcements import (
    PRIVATE_ENTRY_TYPE,
    PUBLIC_ENTRY_TYPE,
    InvalidDirectorySettings,
    InvalidExpiry,
    NotAuthorized,
    PersistFailed,
    PrivateAnnouncements,
    PublicAnnouncements,
    allowed_domains,
    domain_allowed,
    parse_expires_at,
)
from epsproxy.store import StoredEntry, StoreUnavailable, open_store

from .support.proxies import client
from .support.redis import RedisServer

PROXY = "public-proxy-1.ga"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
DAY = 86400.0


def rfc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MemoryStore:
    """A store in memory; ``broken`` makes appends fail like an unreachable back-end."""

    def __init__(self) -> None:
        self.entries: list[StoredEntry] = []
        self.read = 0
        self.broken = False
        self.resets = 0  # never replaced: a list in memory

    def append(self, entry: StoredEntry) -> Deferred[None]:
        if self.broken:
            return fail(StoreUnavailable("down"))
        self.entries.append(entry)
        return succeed(None)

    def read_new(self) -> Deferred[list[StoredEntry]]:
        new, self.read = self.entries[self.read:], len(self.entries)
        return succeed(new)

    def close(self) -> Deferred[None]:
        return succeed(None)


def now_clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


class HelperTests(unittest.SynchronousTestCase):
    def test_parse_expires_at(self) -> None:
        self.assertEqual(parse_expires_at(None, NOW), (None, None))
        text, nanos = parse_expires_at("2023-11-15T00:13:20.500+02:00", NOW)
        self.assertEqual(text, "2023-11-15T00:13:20.5+02:00")
        self.assertEqual(nanos, int(NOW * 1e9) + 500_000_000)
        # exactly 7 days ahead is fine, a second more is not; the past is fine
        self.assertIsNotNone(parse_expires_at(rfc(NOW + 7 * DAY), NOW)[1])
        self.assertIsNotNone(parse_expires_at(rfc(NOW - 365 * DAY), NOW)[1])
        with self.assertRaises(InvalidExpiry) as caught:
            parse_expires_at(rfc(NOW + 7 * DAY + 1), NOW)
        self.assertEqual(caught.exception.code, INVALID_PARAMS)
        self.assertIn("7 days or less", caught.exception.message)
        for bad in ("tomorrow", "2023-11-15", "2023-13-01T00:00:00Z", "2023-11-15T00:00:00",
                    "", "2023-11-15T25:00:00Z", "9" * 60):
            self.assertRaises(InvalidExpiry, parse_expires_at, bad, NOW)

    def test_allowed_domains(self) -> None:
        self.assertEqual(allowed_domains(client(allowed=(".A.example",)), PROXY), [".a.example"])
        self.assertEqual(allowed_domains(client(operator=PROXY), PROXY),
                         [".internal-server.local"])
        with self.assertRaises(NotAuthorized) as caught:
            allowed_domains(client(allowed=None), PROXY)
        self.assertEqual((caught.exception.code, caught.exception.message),
                         (403, "not authorized"))
        self.assertRaises(NotAuthorized, allowed_domains, client(operator="other.ga"), PROXY)
        self.assertRaises(NotAuthorized, allowed_domains, {"name": "x", "entry": None}, PROXY)
        for bad in (["internal-server.local"], "x", [7], 5, [".ok", "bad"]):
            with self.assertRaises(InvalidDirectorySettings) as caught:
                allowed_domains(client(allowed=bad), PROXY)
            self.assertEqual(caught.exception.code, 500)
        entry = client()
        entry["entry"]["settings"][1]["settings"] = "not a map"
        self.assertRaises(InvalidDirectorySettings, allowed_domains, entry, PROXY)

    def test_domain_allowed(self) -> None:
        allowed = [".internal-server.local"]
        self.assertTrue(domain_allowed("test.internal-server.local", allowed))
        self.assertTrue(domain_allowed("A.B.Internal-Server.LOCAL", allowed))
        self.assertFalse(domain_allowed("internal-server.local", allowed))
        self.assertFalse(domain_allowed("test.internal-server.local.evil", allowed))
        self.assertFalse(domain_allowed("testinternal-server.local", allowed))
        self.assertFalse(domain_allowed("x.local", []))


class PublicTableTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = now_clock()
        self.store = MemoryStore()
        self.table = PublicAnnouncements(self.clock, self.store, PROXY)

    def announce(self, connections: list[dict[str, Any]], who: dict[str, Any] | None = None
                 ) -> Any:
        return self.successResultOf(self.table.announce(who or client(), connections))

    def refused(self, connections: list[dict[str, Any]], who: dict[str, Any] | None = None
                ) -> Any:
        return self.failureResultOf(self.table.announce(who or client(), connections)).value

    def test_accept_list_and_look_up(self) -> None:
        expires = rfc(NOW + DAY)
        self.assertEqual(self.announce([{"domain": "test.internal-server.local"},
                                        {"domain": "b.internal-server.local",
                                         "expires_at": expires}]), [None, None])
        self.assertEqual(self.table.operator_for("test.internal-server.local"), "hd-1")
        self.assertEqual(self.table.operator_for("TEST.Internal-Server.local"), "hd-1")
        self.assertIsNone(self.table.operator_for("internal-server.local"))
        self.assertIsNone(self.table.operator_for("x.test.internal-server.local"))
        self.assertEqual(sorted(self.table.announcements(), key=lambda a: a["domain"]), [
            {"expires_at": expires, "operator": "hd-1", "domain": "b.internal-server.local"},
            {"expires_at": None, "operator": "hd-1", "domain": "test.internal-server.local"},
        ])
        self.assertEqual(len(self.store.entries), 2)
        entry = self.store.entries[1]
        self.assertEqual((entry.type, len(entry.id)), (PUBLIC_ENTRY_TYPE, 16))
        self.assertEqual(json.loads(entry.data), {
            "expires_at": expires, "operator": "hd-1", "domain": "b.internal-server.local"})

    def test_per_item_results(self) -> None:
        self.announce([{"domain": "taken.internal-server.local"}], client("hd-2"))
        results = self.announce([
            {"domain": "ok.internal-server.local"},
            {"domain": "evil.example"},
            {"domain": "taken.internal-server.local"},
            {"domain": "internal-server.local"},
        ])
        self.assertEqual(results, [None, {"code": 403, "message": "not allowed"},
                                   {"code": 409, "message": "already taken"},
                                   {"code": 403, "message": "not allowed"}])
        self.assertEqual(self.table.operator_for("taken.internal-server.local"), "hd-2")
        self.assertEqual(self.table.operator_for("ok.internal-server.local"), "hd-1")
        # domains differing only in case are the same domain
        self.assertEqual(self.announce([{"domain": "TAKEN.internal-server.local"}]),
                         [{"code": 409, "message": "already taken"}])

    def test_whole_call_refusals_store_nothing(self) -> None:
        self.assertEqual(self.refused([{"domain": "a.internal-server.local"}],
                                      client(allowed=None)).code, 403)
        self.assertEqual(self.refused([{"domain": "a.internal-server.local"}],
                                      client(allowed=["nodot"])).code, 500)
        error = self.refused([{"domain": "a.internal-server.local"},
                              {"domain": "b.internal-server.local",
                               "expires_at": rfc(NOW + 8 * DAY)}])
        self.assertIsInstance(error, InvalidExpiry)
        self.assertEqual(self.store.entries, [])
        self.assertEqual(self.table.announcements(), [])

    def test_expiry(self) -> None:
        self.announce([{"domain": "a.internal-server.local", "expires_at": rfc(NOW + 60)}])
        self.announce([{"domain": "old.internal-server.local", "expires_at": rfc(NOW - 1)}])
        self.assertEqual(self.table.operator_for("a.internal-server.local"), "hd-1")
        self.assertIsNone(self.table.operator_for("old.internal-server.local"))
        self.assertEqual([a["domain"] for a in self.table.announcements()],
                         ["a.internal-server.local"])
        self.clock.advance(60)
        self.assertIsNone(self.table.operator_for("a.internal-server.local"))
        self.assertEqual(self.table.announcements(), [])
        # An expired announcement no longer blocks another operator ...
        self.assertEqual(self.announce([{"domain": "a.internal-server.local"}],
                                       client("hd-2")), [None])
        self.assertEqual(self.table.operator_for("a.internal-server.local"), "hd-2")
        # ... and now hd-1 is the one refused.
        self.assertEqual(self.announce([{"domain": "a.internal-server.local"}]),
                         [{"code": 409, "message": "already taken"}])

    def test_update_persists_only_changes(self) -> None:
        later = rfc(NOW + DAY)
        self.announce([{"domain": "a.internal-server.local"}])
        self.announce([{"domain": "a.internal-server.local"}])
        self.assertEqual(len(self.store.entries), 1)
        self.announce([{"domain": "a.internal-server.local", "expires_at": later}])
        self.announce([{"domain": "a.internal-server.local", "expires_at": later}])
        self.assertEqual(len(self.store.entries), 2)
        self.assertEqual(self.table.announcements()[0]["expires_at"], later)
        # withdraw by setting a past time
        self.announce([{"domain": "a.internal-server.local", "expires_at": rfc(NOW - 1)}])
        self.assertIsNone(self.table.operator_for("a.internal-server.local"))

    def test_store_failure_aborts_and_changes_nothing(self) -> None:
        self.store.broken = True
        error = self.refused([{"domain": "a.internal-server.local"}])
        self.assertIsInstance(error, PersistFailed)
        self.assertEqual(error.code, -32603)
        self.assertIsNone(self.table.operator_for("a.internal-server.local"))
        self.store.broken = False
        self.assertEqual(self.announce([{"domain": "a.internal-server.local"}]), [None])

    def test_operator_cap(self) -> None:
        table = PublicAnnouncements(self.clock, self.store, PROXY, max_per_operator=2)
        results = self.successResultOf(table.announce(client(), [
            {"domain": f"d{i}.internal-server.local"} for i in range(3)]))
        self.assertEqual(results[:2], [None, None])
        self.assertEqual(results[2]["code"], 403)
        # updating one held already is fine; another operator has its own allowance
        self.assertEqual(self.successResultOf(table.announce(client(), [
            {"domain": "d0.internal-server.local", "expires_at": rfc(NOW + 5)}])), [None])
        self.assertEqual(self.successResultOf(table.announce(client("hd-2"), [
            {"domain": "d2.internal-server.local"}])), [None])

    def test_reload_folds_and_skips_garbage(self) -> None:
        self.announce([{"domain": "a.internal-server.local"},
                       {"domain": "b.internal-server.local"}])
        self.announce([{"domain": "a.internal-server.local", "expires_at": rfc(NOW + 9)}])
        self.announce([{"domain": "b.internal-server.local", "expires_at": rfc(NOW - 9)}])
        self.clock.advance(10)
        self.announce([{"domain": "b.internal-server.local"}], client("hd-2"))
        for data in (b"not json", b"[]", b'{"domain": "x.internal-server.local"}',
                     b'{"domain": "y", "operator": "o", "expires_at": "soon"}',
                     b'{"domain": 5, "operator": "o"}', b"\xff"):
            self.store.entries.append(StoredEntry(PUBLIC_ENTRY_TYPE, b"x" * 16, data))
        self.store.entries.append(StoredEntry(PRIVATE_ENTRY_TYPE, b"y" * 16, json.dumps(
            {"domain": "z.internal-server.local", "proxy": PROXY, "expires_at": None}).encode()))
        reloaded = PublicAnnouncements(self.clock, MemoryStore(), PROXY)
        reloaded.store.entries = list(self.store.entries)
        self.assertEqual(self.successResultOf(reloaded.load()), len(self.store.entries))
        self.assertEqual(reloaded.announcements(), self.table.announcements())
        self.assertIsNone(reloaded.operator_for("a.internal-server.local"))  # expired
        self.assertEqual(reloaded.operator_for("b.internal-server.local"), "hd-2")
        self.assertIsNone(reloaded.operator_for("z.internal-server.local"))


class PrivateTableTests(unittest.SynchronousTestCase):
    def test_upsert_live_and_group(self) -> None:
        clock, store = now_clock(), MemoryStore()
        table = PrivateAnnouncements(clock, store)
        soon = parse_expires_at(rfc(NOW + 30), NOW)
        self.successResultOf(table.upsert("A.internal-server.local", PROXY, None, None))
        self.successResultOf(table.upsert("a.internal-server.local", PROXY, None, None))
        self.successResultOf(table.upsert("a.internal-server.local", "other.ga", *soon))
        self.assertEqual(len(store.entries), 2)
        self.assertEqual(store.entries[0].type, PRIVATE_ENTRY_TYPE)
        self.assertEqual(json.loads(store.entries[0].data), {
            "expires_at": None, "proxy": PROXY, "domain": "a.internal-server.local"})
        self.assertTrue(table.is_live("a.internal-server.local", PROXY))
        self.assertTrue(table.is_live("a.internal-server.local", "other.ga"))
        self.assertFalse(table.is_live("b.internal-server.local", PROXY))
        self.assertEqual(sorted(table.by_proxy()), ["other.ga", PROXY])
        clock.advance(30)
        self.assertFalse(table.is_live("a.internal-server.local", "other.ga"))
        self.assertEqual(list(table.by_proxy()), [PROXY])
        self.assertEqual(table.announcements(), [
            {"expires_at": None, "proxy": PROXY, "domain": "a.internal-server.local"}])
        self.assertEqual(table.by_proxy()[PROXY][0].connection(),
                         {"domain": "a.internal-server.local"})
        reloaded = PrivateAnnouncements(clock, store)
        store.read = 0
        self.successResultOf(reloaded.load())
        self.assertEqual(reloaded.announcements(), table.announcements())
        store.broken = True
        failure = self.failureResultOf(table.upsert("c.internal-server.local", PROXY, None, None))
        self.assertIsInstance(failure.value, PersistFailed)
        self.assertFalse(table.is_live("c.internal-server.local", PROXY))


class RestartTests(unittest.TestCase):
    """Announcements survive a restart: a new table on a newly opened store."""

    timeout = 30

    @inlineCallbacks
    def roundtrip(self, settings: dict[str, Any]):
        clock = now_clock()
        store = yield open_store(reactor, settings)
        table = PublicAnnouncements(clock, store, PROXY)
        yield table.load()
        result = yield table.announce(client(), [
            {"domain": "a.internal-server.local"},
            {"domain": "b.internal-server.local", "expires_at": rfc(NOW + DAY)}])
        self.assertEqual(result, [None, None])
        yield table.announce(client(), [{"domain": "a.internal-server.local",
                                         "expires_at": rfc(NOW + 2 * DAY)}])
        private = PrivateAnnouncements(clock, store)
        yield private.upsert("c.internal-server.local", PROXY, None, None)
        yield store.close()

        store = yield open_store(reactor, settings)
        self.addCleanup(store.close)
        again = PublicAnnouncements(clock, store, PROXY)
        yield again.load()
        self.assertEqual(sorted(again.announcements(), key=lambda a: a["domain"]), [
            {"expires_at": rfc(NOW + 2 * DAY), "operator": "hd-1",
             "domain": "a.internal-server.local"},
            {"expires_at": rfc(NOW + DAY), "operator": "hd-1",
             "domain": "b.internal-server.local"},
        ])
        self.assertEqual((yield again.announce(client("hd-2"), [
            {"domain": "a.internal-server.local"}])), [{"code": 409, "message": "already taken"}])
        private_again = PrivateAnnouncements(clock, store)
        store2 = yield open_store(reactor, settings)
        self.addCleanup(store2.close)
        private_again.store = store2
        yield private_again.load()
        self.assertTrue(private_again.is_live("c.internal-server.local", PROXY))

    def test_embedded(self):
        path = Path(self.mktemp()).absolute() / "announcements.sqlite"
        return self.roundtrip({"type": "embedded", "settings": {"path": str(path)}})

    @inlineCallbacks
    def test_redis(self):
        server = RedisServer(reactor)
        self.addCleanup(server.cleanup)
        yield server.start()
        yield self.roundtrip({"type": "redis", "settings": {
            "addresses": [server.address], "key": "public-proxy-entries", "timeout": 2.0}})


class OverHTTPS(unittest.TestCase):
    """``announceConnections`` and ``getAnnouncements`` served by ``twistd proxy --mode public``."""

    timeout = 30

    @inlineCallbacks
    def test_announce_and_list(self):
        from epsproxy.proxy.tap import Options, makeService

        from .support.proxies import FakeEPS, caller_client, public_section, write_settings

        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(folder, eps_port)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        service = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield service.when_ready()
        rpc = caller_client(ports.jsonrpc.getHost().port)
        self.addCleanup(rpc.close)
        expires = rfc(reactor.seconds() + DAY)
        result = yield rpc.call("announceConnections", {
            "connections": [{"domain": "test.internal-server.local", "expires_at": expires},
                            {"domain": "evil.example"}],
            "_client": client("private-proxy-1.ga")})
        self.assertEqual(result, [None, {"code": 403, "message": "not allowed"}])
        self.assertEqual(service.announcements.operator_for("test.internal-server.local"),
                         "private-proxy-1.ga")
        listing = yield rpc.call("getAnnouncements", {})
        self.assertEqual(listing, [{"expires_at": expires, "operator": "private-proxy-1.ga",
                                    "domain": "test.internal-server.local"}])
        for params, code in [
            ({"connections": [{"domain": "a.internal-server.local"}],
              "_client": client(allowed=None)}, 403),
            ({"connections": [{"domain": "a.internal-server.local"}],
              "_client": client(allowed=[7])}, 500),
            ({"connections": [{"domain": "a.internal-server.local",
                               "expires_at": rfc(reactor.seconds() + 30 * DAY)}],
              "_client": client()}, INVALID_PARAMS),
            ({"connections": [{"domain": "a b"}], "_client": client()}, INVALID_PARAMS),
            ({"connections": "x", "_client": client()}, INVALID_PARAMS),
            ({"connections": [{"domain": "a.internal-server.local"}] * 1001,
              "_client": client()}, INVALID_PARAMS),
            ({"connections": [{"domain": "a.internal-server.local"}]}, 403),
        ]:
            try:
                yield rpc.call("announceConnections", params)
            except JSONRPCError as e:
                self.assertEqual(e.code, code, (params, e))
            else:
                self.fail(f"expected error {code}")
        # only the own endpoint server may call
        other = caller_client(ports.jsonrpc.getHost().port, name="hd-1")
        self.addCleanup(other.close)
        yield self.assertFailure(other.call("getAnnouncements", {}), JSONRPCError)
        self.assertEqual(len(service.announcements.announcements()), 1)
