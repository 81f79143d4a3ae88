"""
Scale-out on one Redis (issue 6): the store's notifications and compare-and-append, two
public proxy instances sharing announcements (pub/sub, within 1 s, across restarts of an
instance and of Redis), and two SD instances serving one record log without forking it.

Everything runs against a real ``redis-server`` (tests/support/redis.py) and the real
services on loopback port 0.  Propagation is awaited on the watchers' Deferreds, never by
sleeping; the latencies measured are collected in :data:`LATENCIES` (printed by
``pytest -s``) for docs/robustness.md.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.trial import unittest

from epsproxy.proxy.tap import Options, makeService
from epsproxy.store import StoredEntry, open_store
from epsproxy.store.redis import AppendConflict, RedisStore

from .support.proxies import caller_client, client, public_section, write_settings
from .support.redis import RedisServer
from .support.sd import base_changes, change, sd_client, sign_chain, start_sd, write_sd_settings

#: (what, seconds) of every propagation measured by these tests.
LATENCIES: list[tuple[str, float]] = []

#: Propagation must take less than this (issue 6).
LIMIT = 1.0

DOMAIN = "a.internal-server.local"
KEY = "scaleout-entries"


def entry(n: int, data: bytes = b"") -> StoredEntry:
    return StoredEntry(1, n.to_bytes(4, "big"), data)


@inlineCallbacks
def until(watcher: Any, condition: Callable[[], bool], what: str, limit: float = LIMIT):
    """
    Wait on ``watcher``'s runs until ``condition()`` holds; fails after ``limit`` seconds
    (measured from the call), returns the seconds it took.  Each wait is for a run that
    starts after the previous one ended, so nothing is missed and nothing is polled.
    """
    started = time.monotonic()
    timeout = Deferred()
    call = reactor.callLater(limit * 3, timeout.callback, None)
    try:
        while not condition():
            run = watcher.next_run()
            yield DeferredList([run, timeout], fireOnOneCallback=True)
            if timeout.called:
                raise AssertionError(f"{what}: not seen within {limit * 3:g}s")
    finally:
        if call.active():
            call.cancel()
    took = time.monotonic() - started
    LATENCIES.append((what, took))
    assert took < limit, f"{what} took {took:.3f}s (limit {limit}s)"
    return took


class RedisCase(unittest.TestCase):
    """A real Redis with the append-only file on, so a restart keeps the data."""

    @inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(reactor, appendonly=True)
        self.addCleanup(self.redis.cleanup)
        yield self.redis.start()

    def datastore(self, key: str = KEY) -> dict[str, Any]:
        return {"type": "redis",
                "settings": {"addresses": [self.redis.address], "key": key, "timeout": 2.0}}

    @inlineCallbacks
    def open(self, key: str = KEY) -> Any:
        store = yield open_store(reactor, self.datastore(key))
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def restart_redis(self):
        """SIGKILL Redis and start it again on the same port and data."""
        yield self.redis.kill()
        again = RedisServer(reactor, appendonly=True, directory=self.redis.directory,
                            port=self.redis.port)
        self.addCleanup(again.kill)
        yield again.start()


# ------------------------------------------------------------------------ the store


class StoreTests(RedisCase):
    @inlineCallbacks
    def test_append_publishes_the_new_length(self):
        store = yield self.open()
        messages: list[bytes] = []
        got = Deferred()

        def received(message: bytes) -> None:
            messages.append(message)
            if len(messages) == 2:
                got.callback(None)

        subscription = store.subscribe(store.channel, received)
        self.addCleanup(subscription.stop)
        yield subscription.when_subscribed()
        yield store.append(entry(1))
        yield store.append(entry(2))
        yield got
        self.assertEqual(messages, [b"1", b"2"])
        self.assertEqual(store.channel, f"epsproxy:0:{KEY}")

    @inlineCallbacks
    def test_append_if_unchanged_refuses_after_another_append(self):
        a = yield self.open()
        b = yield self.open()
        self.assertEqual((yield a.read_new()), [])
        self.assertEqual((yield b.read_new()), [])
        yield a.append_if_unchanged([entry(1), entry(2)])
        with self.assertRaises(AppendConflict):
            yield b.append_if_unchanged([entry(3)])
        # nothing of b's was written; once b has read, it may append
        self.assertEqual((yield b.read_new()), [entry(1), entry(2)])
        yield b.append_if_unchanged([entry(3)])
        self.assertEqual((yield a.read_new()), [entry(1), entry(2), entry(3)])
        # a has not read b's entry yet... it has now: an empty batch is fine too
        yield a.append_if_unchanged([])

    @inlineCallbacks
    def test_append_if_unchanged_notices_a_replaced_list(self):
        a = yield self.open()
        yield a.append(entry(1))
        yield a.read_new()
        raw = a.redis_connection()
        # same length, different last element: someone rewrote the list
        yield raw.lset(KEY, 0, b"\x01\x01\x04\x00XXXX")
        with self.assertRaises(AppendConflict):
            yield a.append_if_unchanged([entry(2)])
        self.assertEqual(len((yield raw.lrange(KEY, 0, -1))), 1)

    @inlineCallbacks
    def test_two_concurrent_appenders_never_fork(self):
        """
        Two stores append a hash chain concurrently, each entry naming the last one its
        writer saw: with compare-and-append every entry names its predecessor in the list.
        """
        stores = []
        for _ in range(2):
            stores.append((yield self.open()))
        conflicts = [0]

        @inlineCallbacks
        def writer(store: RedisStore, name: bytes, count: int):
            last = b""
            for n in range(count):
                while True:
                    for seen in (yield store.read_new()):
                        last = hashlib.sha256(seen.data).digest()
                    try:
                        yield store.append_if_unchanged(
                            [StoredEntry(1, name + bytes([n]), last + name)])
                        break
                    except AppendConflict:
                        conflicts[0] += 1

        yield DeferredList([writer(stores[0], b"A", 40), writer(stores[1], b"B", 40)],
                           fireOnOneErrback=True, consumeErrors=True)
        reader = yield self.open()
        written = yield reader.read_new()
        self.assertEqual(len(written), 80)
        previous = b""
        for item in written:
            self.assertEqual(item.data[:-1], previous)
            previous = hashlib.sha256(item.data).digest()
        self.assertGreater(conflicts[0], 0)  # they did race

    @inlineCallbacks
    def test_garbage_on_the_channel_only_triggers_a_read(self):
        store = yield self.open()
        runs: list[int] = []
        watcher = store.watch(lambda: runs.append(1), interval=None)
        yield watcher.subscription.when_subscribed()
        first = len(runs)  # the run after subscribing
        raw = store.redis_connection()
        ran = watcher.next_run()
        yield raw.publish(store.channel, b"\x00" * 10000)
        yield ran
        self.assertEqual(len(runs), first + 1)
        yield watcher.stop()
        yield watcher.stop()  # twice is fine


# ------------------------------------------------------------ public proxy instances


class PublicProxyTests(RedisCase):
    """Two (or three) public proxy instances on one Redis."""

    @inlineCallbacks
    def start_proxy(self, tag: str):
        folder = Path(self.mktemp()).absolute()
        # The own EPS is never called here: port 9 (discard) stands in for it.
        section = public_section(folder, 9, datastore=self.datastore())
        options = Options()
        options.parseOptions(["--mode", "public", "--settings",
                              str(write_settings(folder, {"public": section}))])
        top = makeService(options, reactor, exit_on_failure=False)
        proxy = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield proxy.when_ready()
        proxy.top = top
        proxy.jsonrpc_port = ports.jsonrpc.getHost().port
        yield proxy.announcements.watcher.subscription.when_subscribed()
        return proxy

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.a = yield self.start_proxy("a")
        self.b = yield self.start_proxy("b")

    def announce(self, proxy: Any, expires_at: str | None = None, name: str = "hd-1",
                 domain: str = DOMAIN) -> Deferred[Any]:
        connection: dict[str, Any] = {"domain": domain}
        if expires_at is not None:
            connection["expires_at"] = expires_at
        return proxy.announcements.announce(client(name), [connection])

    @inlineCallbacks
    def test_announcement_over_jsonrpc_reaches_the_other_within_a_second(self):
        caller = caller_client(self.a.jsonrpc_port)
        self.addCleanup(caller.close)
        self.assertIsNone(self.b.announcements.operator_for(DOMAIN))
        started = time.monotonic()
        result = yield caller.call("announceConnections", {
            "connections": [{"domain": DOMAIN}], "_client": client("hd-1")})
        self.assertEqual(result, [None])
        yield until(self.b.announcements.watcher,
                    lambda: self.b.announcements.operator_for(DOMAIN) == "hd-1",
                    "announcement A->B (JSON-RPC call to B's table)")
        LATENCIES.append(("announceConnections call + propagation",
                          time.monotonic() - started))
        self.assertEqual(self.a.announcements.announcements(),
                         self.b.announcements.announcements())

    @inlineCallbacks
    def test_withdrawal_and_takeover_propagate_both_ways(self):
        yield self.announce(self.a)
        yield until(self.b.announcements.watcher,
                    lambda: self.b.announcements.operator_for(DOMAIN) == "hd-1", "announce")
        # a past expires_at withdraws it
        result = yield self.announce(self.a, "2001-01-01T00:00:00Z")
        self.assertEqual(result, [None])
        yield until(self.b.announcements.watcher,
                    lambda: self.b.announcements.operator_for(DOMAIN) is None, "withdrawal")
        # now free: another operator takes it at B, and A learns it
        self.assertEqual((yield self.announce(self.b, name="hd-2")), [None])
        yield until(self.a.announcements.watcher,
                    lambda: self.a.announcements.operator_for(DOMAIN) == "hd-2", "takeover B->A")
        # and A, knowing, refuses hd-1
        self.assertEqual((yield self.announce(self.a)),
                         [{"code": 409, "message": "already taken"}])

    @inlineCallbacks
    def test_expiry_time_propagates(self):
        later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        yield self.announce(self.a, later)
        yield until(self.b.announcements.watcher,
                    lambda: bool(self.b.announcements.announcements()), "expiring announce")
        self.assertEqual(self.b.announcements.announcements()[0]["expires_at"], later)

    @inlineCallbacks
    def test_restarted_instance_sees_it_and_keeps_following(self):
        yield self.announce(self.a)
        yield self.b.top.stopService()
        self.b = yield self.start_proxy("b2")
        self.assertEqual(self.b.announcements.operator_for(DOMAIN), "hd-1")
        other = "b.internal-server.local"
        yield self.announce(self.a, domain=other)
        yield until(self.b.announcements.watcher,
                    lambda: self.b.announcements.operator_for(other) == "hd-1",
                    "announce to a restarted instance")

    @inlineCallbacks
    def test_concurrent_claims_of_a_free_domain_one_wins(self):
        """
        Both instances decide on a free domain in the same reactor turn (neither has seen
        the other's claim): the compare-and-append lets exactly one operator have it, the
        other is told 409, and both tables agree.  (The plain append accepted both.)
        """
        for n in range(5):
            domain = f"race{n}.internal-server.local"
            at_a = self.announce(self.a, name="hd-1", domain=domain)
            at_b = self.announce(self.b, name="hd-2", domain=domain)
            results = yield DeferredList([at_a, at_b], consumeErrors=True)
            answers = [value for ok, value in results]
            self.assertTrue(all(ok for ok, _ in results), answers)
            taken = [{"code": 409, "message": "already taken"}]
            self.assertIn(answers, ([[None], taken], [taken, [None]]))
            winner = "hd-1" if answers[0] == [None] else "hd-2"
            self.assertEqual(self.a.announcements.operator_for(domain), winner)
            yield until(self.b.announcements.watcher,
                        lambda: self.b.announcements.operator_for(domain) == winner,
                        "race winner at B")
            # the loser asking again is refused at either instance
            self.assertEqual((yield self.announce(self.a, name=("hd-2", "hd-1")[winner == "hd-2"],
                                                  domain=domain)), taken)

    @inlineCallbacks
    def test_an_instance_keeps_announcing_after_its_own_append(self):
        """Its own entry does not make its next compare-and-append fail again and again."""
        for n in range(3):
            result = yield self.announce(self.a, domain=f"own{n}.internal-server.local")
            self.assertEqual(result, [None])
        self.assertEqual(len(self.a.announcements.announcements()), 3)

    def test_each_instance_pairs_its_own_tokens(self):
        """Token pairing needs no shared state: tokens live in the instance that made them."""
        self.assertIsNot(self.a.rendezvous, self.b.rendezvous)
        self.a.rendezvous.new_token()
        self.assertEqual((self.a.rendezvous.pending, self.b.rendezvous.pending), (1, 0))
        # each answers requestConnection with its own internal listener's endpoint
        self.assertIsNot(self.a.proxy, self.b.proxy)
        self.assertEqual(self.a.proxy.internal_endpoint, self.a.settings["internal_endpoint"])

    @inlineCallbacks
    def test_redis_restart_resubscribes(self):
        yield self.announce(self.a)
        yield until(self.b.announcements.watcher,
                    lambda: self.b.announcements.operator_for(DOMAIN) == "hd-1", "before")
        subscribed = [p.announcements.watcher.subscription.subscriptions
                      for p in (self.a, self.b)]
        killed = time.monotonic()
        yield self.restart_redis()
        back = time.monotonic()
        for proxy, count in zip((self.a, self.b), subscribed):
            yield proxy.announcements.watcher.subscription.when_subscribed(count + 1)
        LATENCIES.append(("both resubscribed after Redis answered PING again",
                          time.monotonic() - back))
        LATENCIES.append(("Redis kill -9 to both resubscribed", time.monotonic() - killed))
        started = time.monotonic()
        other = "c.internal-server.local"
        self.assertEqual((yield self.announce(self.a, domain=other)), [None])
        yield until(self.b.announcements.watcher,
                    lambda: self.b.announcements.operator_for(other) == "hd-1",
                    "announce after a Redis restart")
        LATENCIES.append(("announce + propagation after Redis restart",
                          time.monotonic() - started))
        # the data survived (append-only file) and B still serves the first one
        self.assertEqual(self.b.announcements.operator_for(DOMAIN), "hd-1")

    @inlineCallbacks
    def test_stop_stops_the_watcher(self):
        watcher = self.b.announcements.watcher
        yield self.b.top.stopService()
        self.assertIsNone(self.b.announcements.watcher)
        self.assertFalse(watcher.subscription.subscribed)
        yield self.b.announcements.stop()  # twice is fine


# ------------------------------------------------------------------- SD instances


class ServiceDirectoryTests(RedisCase):
    """Two SD instances serving one Redis-backed record log."""

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.sds = []
        self.clients = []
        for tag in ("a", "b"):
            folder = write_sd_settings(Path(self.mktemp()), datastore=self.datastore("records"))
            sd = yield start_sd(folder)
            self.addCleanup(sd.stop)
            yield sd.sd.watcher.subscription.when_subscribed()
            rpc = sd_client(sd.port_number)
            self.addCleanup(rpc.close)
            self.sds.append(sd)
            self.clients.append(rpc)

    def tip_hash(self, index: int) -> str | None:
        tip = self.sds[index].sd.directory.tip()
        return None if tip is None else tip["hash"]

    @inlineCallbacks
    def test_submit_at_a_is_served_by_b_promptly(self):
        chain = sign_chain(base_changes())
        self.assertEqual((yield self.clients[0].call("submitRecords", {"records": chain})),
                         "ok")
        yield until(self.sds[1].sd.watcher, lambda: self.tip_hash(1) == chain[-1]["hash"],
                    "SD record A->B")
        tips = []
        for rpc in self.clients:
            tips.append((yield rpc.call("getTip", {})))
        self.assertEqual(tips[0], tips[1])
        self.assertEqual(tips[1]["hash"], chain[-1]["hash"])
        self.assertEqual((yield self.clients[1].call("getEntry", {"name": "hd-2"}))["groups"],
                         ["health-departments"])

    @inlineCallbacks
    def test_concurrent_conflicting_submits_one_wins(self):
        chain = sign_chain(base_changes())
        yield self.clients[0].call("submitRecords", {"records": chain})
        yield until(self.sds[1].sd.watcher, lambda: self.tip_hash(1) == chain[-1]["hash"],
                    "SD base chain A->B")
        tip = chain[-1]["hash"]
        x = sign_chain([change("hd-2", "groups", ["x"])], parent_hash=tip)
        y = sign_chain([change("hd-2", "groups", ["y"])], parent_hash=tip)
        results = yield DeferredList([
            self.clients[0].call("submitRecords", {"records": x}),
            self.clients[1].call("submitRecords", {"records": y}),
        ], consumeErrors=True)
        won = [i for i, (ok, _) in enumerate(results) if ok]
        lost = [i for i, (ok, _) in enumerate(results) if not ok]
        self.assertEqual(len(won), 1, results)
        error = results[lost[0]][1].value
        self.assertEqual(error.code, 409, error)
        winner = (x, y)[won[0]][0]["hash"]
        self.assertEqual(error.data["tip"], winner)
        for index in (0, 1):
            yield until(self.sds[index].sd.watcher, lambda i=index: self.tip_hash(i) == winner,
                        "SD winner at both")
        records = []
        for rpc in self.clients:
            records.append((yield rpc.call("getRecords", {})))
        self.assertEqual(records[0], records[1])
        self.assertEqual(len(records[0]), len(chain) + 1)
        # the store holds no loser: one chain, no fork
        store = yield self.open("records")
        self.assertEqual(len((yield store.read_new())), len(chain) + 1)

    @inlineCallbacks
    def test_many_concurrent_submits_keep_one_chain(self):
        chain = sign_chain(base_changes())
        yield self.clients[0].call("submitRecords", {"records": chain})
        yield until(self.sds[1].sd.watcher, lambda: self.tip_hash(1) == chain[-1]["hash"],
                    "SD base chain A->B")
        ok = 0
        for round_ in range(5):
            tip = self.tip_hash(0)
            batches = [sign_chain([change("hd-2", "groups", [f"{round_}-{i}"])],
                                  parent_hash=tip) for i in range(2)]
            results = yield DeferredList(
                [self.clients[i].call("submitRecords", {"records": batches[i]})
                 for i in range(2)], consumeErrors=True)
            ok += sum(1 for success, _ in results if success)
            self.assertEqual(sum(1 for success, _ in results if success), 1, results)
            winner = next(batches[i][0]["hash"] for i, (s, _) in enumerate(results) if s)
            for index in (0, 1):
                yield until(self.sds[index].sd.watcher,
                            lambda i=index: self.tip_hash(i) == winner, "SD round")
        self.assertEqual(ok, 5)
        store = yield self.open("records")
        self.assertEqual(len((yield store.read_new())), len(chain) + 5)
