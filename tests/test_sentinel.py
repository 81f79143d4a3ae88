"""
Redis Sentinel for the ``redis`` datastore (issue 15, item 5): the settings, the RESP
reader of the sentinel conversation (hostile bytes included), clear errors for a master
name nobody knows, unreachable or garbage-speaking sentinels and a "master" that is a
replica, and the real thing: two ``redis-server`` (a master and its replica), three
``redis-sentinel`` (quorum 2) and two real SDs on them; the master is killed with
SIGKILL under a stream of submissions.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chaos.store import RedisClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.rules import forms
from epsproxy.sd.api import STORE_UNAVAILABLE
from epsproxy.sd.directory import STALE
from epsproxy.store import DATASTORE_SETTINGS, StoredEntry, StoreUnavailable, open_store, parse
from epsproxy.store.redis_sentinel import (
    MASTER_NAME_SETTING,
    SENTINELS_SETTING,
    MasterLocator,
    ask,
)
from epsproxy.store.resp import (
    MAX_DEPTH,
    MAX_REPLY_BYTES,
    ErrorReply,
    RespError,
    RespReader,
    encode_command,
)

from .support.redis import RedisSentinel, RedisServer, SentinelSetup
from .support.sd import base_changes, change, sd_client, sign_chain, start_sd, write_sd_settings


# -- RESP ------------------------------------------------------------------------------


class Resp(SynchronousTestCase):
    def test_replies(self) -> None:
        reader = RespReader()
        data = (b"+OK\r\n-ERR no\r\n:42\r\n$-1\r\n*-1\r\n$3\r\na\r\n\r\n"
                b"*3\r\n$6\r\nmaster\r\n:7\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n$1\r\n7\r\n")
        replies = reader.feed(data)
        self.assertEqual(replies, [
            b"OK", ErrorReply("ERR no"), 42, None, None, b"a\r\n",
            [b"master", 7, [[b"127.0.0.1", b"6380", b"7"]]],
        ])
        self.assertEqual(reader.rest, b"")

    def test_fragments_one_byte_at_a_time(self) -> None:
        reader = RespReader()
        data = b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n+after"
        got = []
        for i in range(len(data)):
            got += reader.feed(data[i : i + 1])
        self.assertEqual(got, [[b"127.0.0.1", b"6379"]])
        self.assertEqual(reader.rest, b"+after")

    def test_encode(self) -> None:
        self.assertEqual(encode_command("SENTINEL", b"x\r\n", 5),
                         b"*3\r\n$8\r\nSENTINEL\r\n$3\r\nx\r\n\r\n$1\r\n5\r\n")

    def test_hostile(self) -> None:
        cases = [
            b"HTTP/1.1 400 Bad Request\r\n",
            b"\r\n",
            b":12x\r\n",
            b":--5\r\n",
            b":" + b"9" * 30 + b"\r\n",
            b"$-2\r\n",
            b"$%d\r\n" % (MAX_REPLY_BYTES + 1),
            b"$3\r\nabcde\r\n",
            b"*%d\r\n" % (MAX_REPLY_BYTES,),
            b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n",
            b"+" + b"x" * (MAX_REPLY_BYTES + 10),
        ]
        for data in cases:
            with self.assertRaises(RespError, msg=data[:40]):
                RespReader().feed(data)

    def test_endless_partial_reply_is_bounded(self) -> None:
        reader = RespReader()
        reader.feed(b"*3\r\n$5\r\nabcde\r\n+")
        with self.assertRaises(RespError):
            for _ in range(MAX_REPLY_BYTES // 1000 + 2):
                self.assertEqual(reader.feed(b"x" * 1000), [])


# -- settings --------------------------------------------------------------------------


class Settings(SynchronousTestCase):
    def check(self, settings: dict) -> dict:
        return DATASTORE_SETTINGS.validate({"type": "redis", "settings": settings})["settings"]

    def error(self, settings: dict) -> forms.FormError:
        with self.assertRaises(forms.FormError) as caught:
            self.check(settings)
        return caught.exception

    def test_sentinels(self) -> None:
        checked = self.check({"sentinels": ["a:26379", "[::1]:26380"], "master_name": "m",
                              "sentinel_password": "s", "wait_replicas": 2})
        self.assertEqual(checked["sentinels"], ["a:26379", "[::1]:26380"])
        self.assertEqual(checked["master_name"], "m")
        self.assertEqual(checked["wait_replicas"], 2)

    def test_reference_empty_master_name_still_loads(self) -> None:
        checked = self.check({"addresses": ["a:1", "b:2"], "master_name": ""})
        self.assertNotIn("master_name", checked)
        self.assertEqual(checked["addresses"], ["a:1", "b:2"])

    def test_errors_name_the_key(self) -> None:
        cases = [
            ({"sentinels": ["a:1"]}, ("master_name",), "required with sentinels"),
            ({"addresses": ["a:1"], "master_name": "m"}, ("master_name",), "needs sentinels"),
            ({"sentinels": ["a:1"], "addresses": ["b:1"], "master_name": "m"},
             ("sentinels",), "not both"),
            ({}, ("addresses",), "required"),
            ({"sentinels": [], "master_name": "m"}, ("sentinels",), ""),
            ({"sentinels": ["nohost"], "master_name": "m"}, ("sentinels", 0), "host:port"),
            ({"sentinels": "a:1", "master_name": "m"}, ("sentinels",), ""),
            ({"sentinels": ["a:1"], "master_name": 5}, ("master_name",), ""),
            ({"sentinels": ["a:1"], "master_name": "m", "wait_replicas": -1},
             ("wait_replicas",), ""),
        ]
        for settings, path, words in cases:
            error = self.error(settings)
            self.assertEqual(error.path, ("settings", *path), settings)
            self.assertIn(words, error.message)


    def test_chaos_overlays_with_sentinels(self) -> None:
        """``python -m chaos --store redis-sentinel`` gives each store role valid settings."""
        from chaos.store import MASTER_NAME, STORE_ROLES, write_overlays
        from epsproxy.dev.demo import CONF
        from epsproxy.proxy.settings import PROXY_SETTINGS
        from epsproxy.rules.settings import load_settings
        from epsproxy.sd.settings import SD_SETTINGS

        sentinels = ["127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"]
        overlays = write_overlays(Path(self.mktemp()), "127.0.0.1:6390", sentinels)
        schemas = {"sd-1": SD_SETTINGS, "public-proxy-1": PROXY_SETTINGS,
                   "private-proxy-1": PROXY_SETTINGS}
        for role, (section, key) in STORE_ROLES.items():
            loaded = load_settings([CONF / "roles" / role, overlays[role]], schemas[role])
            store = loaded[section]["datastore"]["settings"]
            self.assertEqual((store["sentinels"], store["master_name"], store["key"]),
                             (sentinels, MASTER_NAME, key))
            self.assertNotIn("addresses", store)


# -- errors against real and fake sentinels ---------------------------------------------


class _Garbage(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.answer)  # type: ignore[attr-defined]


def _listen(answer: bytes | None) -> Any:
    """A loopback server that answers every connection with ``answer`` (None: silence)."""
    factory = protocol.Factory.forProtocol(_Garbage if answer is not None else protocol.Protocol)
    factory.answer = answer  # type: ignore[attr-defined]
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Errors(TestCase):
    timeout = 30

    @inlineCallbacks
    def open_failure(self, settings: dict) -> Any:
        started = time.monotonic()
        with self.assertRaises(StoreUnavailable) as caught:
            yield open_store(reactor, {"type": "redis", "settings": settings})
        return str(caught.exception), time.monotonic() - started

    def listen(self, answer: bytes | None) -> str:
        port = _listen(answer)
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def test_no_sentinel_reachable(self) -> Any:
        dead = [f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"]
        silent = self.listen(None)
        message, took = yield self.open_failure(
            {"sentinels": [*dead, silent], "master_name": "m", "timeout": 0.3})
        self.assertIn(SENTINELS_SETTING, message)
        for address in dead:
            self.assertIn(address, message)
        self.assertIn(f"{silent}: no answer within 0.3s", message)
        self.assertLess(took, 3)

    @inlineCallbacks
    def test_garbage_answers(self) -> Any:
        http = self.listen(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        wrong = self.listen(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\nnope\r\n")
        refused = self.listen(b"-ERR unknown command\r\n")
        message, took = yield self.open_failure(
            {"sentinels": [http, wrong, refused], "master_name": "m", "timeout": 0.5})
        self.assertIn(SENTINELS_SETTING, message)
        self.assertIn(f"{http}: not a RESP reply", message)
        self.assertIn(f"{wrong} answered", message)
        self.assertIn("not [host, port]", message)
        self.assertIn(f"{refused} refused: ERR unknown command", message)
        self.assertLess(took, 3)

    @inlineCallbacks
    def test_unknown_master_name_and_replica_named_master(self) -> Any:
        replica = RedisServer(
            reactor, extra_args=["--replicaof", "127.0.0.1", str(_closed_port())])
        self.addCleanup(replica.cleanup)
        yield replica.start()
        sentinel = RedisSentinel(reactor, master_address=replica.address, quorum=1)
        self.addCleanup(sentinel.cleanup)
        yield sentinel.start()

        message, took = yield self.open_failure(
            {"sentinels": [sentinel.address], "master_name": "nosuch"})
        self.assertIn(f"{MASTER_NAME_SETTING} 'nosuch' is not a master the sentinels know",
                      message)
        self.assertLess(took, 3)

        # The sentinel names the replica (it was told to watch it as the master): the ROLE
        # check refuses it, and the open says why instead of only "no connection".
        message, took = yield self.open_failure(
            {"sentinels": [sentinel.address], "master_name": "mymaster", "timeout": 0.5})
        self.assertIn("answered ROLE with b'slave'", message)
        self.assertLess(took, 3)


    @inlineCallbacks
    def test_the_sentinel_that_answered_is_asked_first(self) -> Any:
        dead = f"127.0.0.1:{_closed_port()}"
        unknown = self.listen(b"*-1\r\n")
        knows = self.listen(_address_reply("127.0.0.1:7000"))
        locator = MasterLocator(reactor, [dead, unknown, knows], "m", timeout=0.5)
        self.assertEqual((yield locator.locate()), ("127.0.0.1", 7000))
        self.assertTrue(locator.description.startswith("master m via sentinels"))
        self.assertEqual(locator._order, [knows, dead, unknown])

    @inlineCallbacks
    def test_master_with_a_password(self) -> Any:
        """AUTH goes before ROLE on the checked connection; a wrong password is named."""
        master = RedisServer(reactor, extra_args=["--requirepass", "sesame"])
        self.addCleanup(master.cleanup)
        yield master.start()
        # a stand-in sentinel that names this master (to every question)
        sentinel = self.listen(_address_reply(master.address))
        settings = {"sentinels": [sentinel], "master_name": "m", "wait_replicas": 0,
                    "timeout": 0.5}
        store = yield open_store(reactor, {"type": "redis",
                                           "settings": {**settings, "password": "sesame"}})
        self.addCleanup(store.close)
        yield store.append(StoredEntry(1, b"id", b"data"))
        self.assertEqual([e.data for e in (yield store.read_new())], [b"data"])
        message, took = yield self.open_failure({**settings, "password": "wrong"})
        self.assertIn(f"{master.address} refused AUTH", message)
        self.assertLess(took, 3)


class Demoted(TestCase):
    """A master demoted behind the store's back: READONLY, and the store moves on."""

    timeout = 30

    @inlineCallbacks
    def test_readonly_reply_sends_the_store_to_the_new_master(self) -> Any:
        old, new = RedisServer(reactor), RedisServer(reactor)
        for server in (old, new):
            self.addCleanup(server.cleanup)
            yield server.start()
        factory = protocol.Factory.forProtocol(_Garbage)
        factory.answer = _address_reply(old.address)  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        store = yield open_store(reactor, {"type": "redis", "settings": {
            "sentinels": [f"127.0.0.1:{port.getHost().port}"], "master_name": "m",
            "wait_replicas": 0, "key": "k"}})
        self.addCleanup(store.close)
        yield store.append(StoredEntry(1, b"a", b"on the old master"))

        # the "failover": the old master follows the new one, the sentinel names the new
        RedisClient(old.port).command("REPLICAOF", "127.0.0.1", new.port)
        factory.answer = _address_reply(new.address)  # type: ignore[attr-defined]
        with self.assertRaises(StoreUnavailable) as caught:
            yield store.append(StoredEntry(1, b"b", b"refused"))
        self.assertIn("READONLY", str(caught.exception))
        limit = reactor.seconds() + 10
        while True:
            try:
                yield store.append(StoredEntry(1, b"c", b"on the new master"))
                break
            except StoreUnavailable as e:
                self.assertLess(reactor.seconds(), limit, str(e))
                yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(RedisClient(new.port).command("LRANGE", "k", 0, -1)[-1][-17:],
                         b"on the new master")


def _address_reply(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(host), host.encode(), len(port), port.encode())


class ReplicatedWrites(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        self.redis = SentinelSetup(reactor)
        self.addCleanup(self.redis.cleanup)
        yield self.redis.start()

    @inlineCallbacks
    def test_writes_wait_for_the_replica(self) -> Any:
        """
        An append is acknowledged only once the replica confirmed it (WAIT): with the
        replica frozen, it fails clearly within the timeout instead; after, it is there.
        """
        store = yield open_store(reactor, self.redis.datastore(key="waited", timeout=0.5))
        self.addCleanup(store.close)
        yield store.append(StoredEntry(1, b"one", b"first"))
        replica = self.redis.replica
        assert replica is not None
        self.assertEqual(RedisClient(replica.port).command("LLEN", "waited"), 1)
        replica._transport.signalProcess(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with self.assertRaises(StoreUnavailable) as caught:
                yield store.append(StoredEntry(1, b"two", b"second"))
            self.assertIn("confirmed by 0 of 1 replica(s)", str(caught.exception))
            self.assertLess(time.monotonic() - started, 2)
        finally:
            replica._transport.signalProcess(signal.SIGCONT)
        yield store.append(StoredEntry(1, b"three", b"third"))
        self.assertEqual(RedisClient(replica.port).command("LLEN", "waited"), 3)


    @inlineCallbacks
    def test_manual_failover_with_the_old_master_alive(self) -> Any:
        """
        SENTINEL FAILOVER: the old master lives on, still a master until the sentinels
        get round to demoting it (their 10 s INFO period).  A write it takes cannot be
        confirmed by a replica (its replica was promoted), so it is not acknowledged; the
        store then reconnects, finds the new master, and its subscription follows.
        """
        store = yield open_store(reactor, self.redis.datastore(key="moved", timeout=0.5))
        self.addCleanup(store.close)
        watcher = store.watch(lambda: None, interval=None)
        assert watcher.subscription is not None
        yield watcher.subscription.when_subscribed()
        yield store.append(StoredEntry(1, b"one", b"before"))
        (answer,) = yield ask(reactor, self.redis.sentinels[0].address,
                              [("SENTINEL", "FAILOVER", self.redis.master_name)], timeout=1)
        self.assertEqual(answer, b"OK")
        new_master = yield self.redis.wait_for_failover()
        with self.assertRaises(StoreUnavailable) as caught:
            yield store.append(StoredEntry(1, b"two", b"during"))
        self.assertIn("replica(s)", str(caught.exception))
        # the subscription moved to the new master, and so does the store's connection
        yield watcher.subscription.when_subscribed(2)
        with self.assertRaises(StoreUnavailable):
            yield store.append(StoredEntry(1, b"three", b"during"))
        new = RedisClient(int(new_master.rsplit(":", 1)[1]))
        clients = new.command("CLIENT", "LIST").decode()
        self.assertIn("cmd=subscribe", clients)
        self.assertIn("cmd=wait", clients)  # the store's own connection (its last command)
        self.assertEqual(new.command("LRANGE", "moved", 0, -1)[0][-6:], b"before")


# -- the failover ----------------------------------------------------------------------


class Failover(TestCase):
    """kill -9 of the master under two SDs submitting competing records."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.redis = SentinelSetup(reactor)
        self.addCleanup(self.redis.cleanup)
        yield self.redis.start()
        self.sds = []
        self.clients = []
        for name in ("a", "b"):
            folder = write_sd_settings(
                Path(self.mktemp()) / name, datastore=self.redis.datastore(key="records"))
            sd = yield start_sd(folder)
            self.addCleanup(sd.stop)
            client = sd_client(sd.port_number)
            self.addCleanup(client.close)
            self.sds.append(sd)
            self.clients.append(client)

    @inlineCallbacks
    def submit(self, client: Any, records: list[dict]) -> Any:
        try:
            result = yield client.call("submitRecords", {"records": records})
        except JSONRPCError as e:
            return e
        return result

    @inlineCallbacks
    def test_kill_master_under_traffic(self) -> Any:
        chain = sign_chain(base_changes())
        self.assertEqual((yield self.submit(self.clients[0], chain)), "ok")
        acknowledged = [r["hash"] for r in chain]
        parent = chain[-1]["hash"]
        unavailable = 0
        after_failover = 0
        killed_at: float | None = None
        restarted: Any = None
        recovered_at: float | None = None
        deadline = reactor.seconds() + 30
        for round_ in range(1000):
            self.assertLess(reactor.seconds(), deadline, "writes did not resume in time")
            if round_ == 3:
                yield self.redis.master.kill()
                killed_at = reactor.seconds()
                # its supervisor restarts it once the sentinels have failed over; until it
                # is a replica of the new master, writes cannot be confirmed (WAIT 1)
                restarted = self.redis.wait_for_failover().addCallback(
                    lambda _: self.redis.restart_old_master())
            competing = [
                sign_chain([change("hd-2", "groups", [f"{side}-{round_}"])], parent_hash=parent)
                for side in ("a", "b")
            ]
            results = yield defer.gatherResults([
                self.submit(client, records)
                for client, records in zip(self.clients, competing)
            ])
            ok = [records[0]["hash"] for records, result in zip(competing, results)
                  if result == "ok"]
            # the compare-and-append: two children of one parent are never both accepted
            self.assertLessEqual(len(ok), 1, results)
            for result in results:
                if result == "ok":
                    continue
                self.assertIsInstance(result, JSONRPCError)
                if result.code == STALE:
                    continue
                # during the failover: the existing clear "unavailable" error
                self.assertEqual((result.code, result.message), (-32603, STORE_UNAVAILABLE))
                self.assertIsNotNone(killed_at, "unavailable before the master was killed")
                unavailable += 1
            if ok:
                acknowledged.append(ok[0])
                parent = ok[0]
                if killed_at is not None and unavailable:
                    after_failover += 1
                    recovered_at = recovered_at or reactor.seconds()
                    if after_failover == 3:
                        break
            else:
                # both refused: the tip may still have moved (a write that was applied but
                # not acknowledged); ask what it is now
                stale = [r for r in results if isinstance(r, JSONRPCError) and r.code == STALE]
                if stale:
                    parent = stale[0].data["tip"]
        self.assertGreater(unavailable, 0, "no submission failed during the failover")
        assert killed_at is not None and recovered_at is not None
        yield restarted
        new_master = yield self.redis.wait_for_failover(deadline=10)
        self.assertEqual(new_master, self.redis.replica.address)

        # Every acknowledged record is on the new master, and the list is one chain.
        port = int(new_master.rsplit(":", 1)[1])
        stored = RedisClient(port).command("LRANGE", "records", 0, -1)
        records = [json.loads(parse(item).data) for item in stored]
        hashes = [r["hash"] for r in records]
        self.assertEqual(len(hashes), len(set(hashes)))
        for previous, record in zip(records, records[1:]):
            self.assertEqual(record["parent_hash"], previous["hash"])
        for hash_ in acknowledged:
            self.assertIn(hash_, hashes)
        self.assertEqual(hashes[-1], parent)
        # and both SDs serve exactly that chain
        for client in self.clients:
            tip = yield self.until_tip(client, parent)
            self.assertEqual(tip, parent)
            served = yield client.call("getRecords", {})
            self.assertEqual([r["hash"] for r in served], hashes)
        self.assertLess(recovered_at - killed_at, 20)

    @inlineCallbacks
    def until_tip(self, client: Any, tip: str) -> Any:
        """getTip until it is ``tip`` (the other SD catches up by its subscription)."""
        limit = reactor.seconds() + 10
        while True:
            answer = yield client.call("getTip", {})
            if answer["hash"] == tip or reactor.seconds() > limit:
                return answer["hash"]
            yield task.deferLater(reactor, 0.1, lambda: None)
