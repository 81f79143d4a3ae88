"""
Tests for ``epsproxy.store``: the entry layout, the settings schema, and both back-ends
against the real thing (an SQLite file, a ``redis-server`` process).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epsproxy.rules import forms
from epsproxy.store import (
    DATASTORE_SETTINGS,
    MalformedEntry,
    StoredEntry,
    StoreError,
    StoreUnavailable,
    open_store,
    parse,
    parse_address,
    serialise,
)
from tests.support.redis import RedisServer


def entries(count: int, start: int = 0, type_: int = 1) -> list[StoredEntry]:
    return [
        StoredEntry(type_, b"id-%04d" % i, b"data %d" % i) for i in range(start, start + count)
    ]


class LogCapture:
    """Collects log events of the store modules while a test runs."""

    def __init__(self, test: Any) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def levels(self, word: str) -> list[str]:
        return [
            e["log_level"].name
            for e in self.events
            if str(e.get("log_namespace", "")).startswith("epsproxy.store")
            and word in e.get("log_format", "")
        ]


# -- entry layout -------------------------------------------------------------------------


class SerialisationTests(SynchronousTestCase):
    def test_layout_matches_reference(self) -> None:
        self.assertEqual(
            serialise(StoredEntry(2, b"\xaa\xbb", b"xyz")), b"\x01\x02\x02\x00\xaa\xbbxyz"
        )

    def test_id_length_is_little_endian(self) -> None:
        data = serialise(StoredEntry(1, b"i" * 300, b""))
        self.assertEqual(data[2:4], b"\x2c\x01")
        self.assertEqual(len(data), 304)

    def test_round_trip_edges(self) -> None:
        for entry in [
            StoredEntry(0, b"", b""),
            StoredEntry(255, b"\x00" * 0xFFFF, b"\xff" * 10),
            StoredEntry(1, b"", b"\x01\x01\x00\x00"),
        ]:
            self.assertEqual(parse(serialise(entry)), entry)

    def test_malformed(self) -> None:
        for data in [
            b"",
            b"\x01",
            b"\x01\x01\x00",  # header cut short
            b"\x02\x01\x00\x00",  # unknown version
            b"\x00\x01\x00\x00",
            b"\x01\x01\x05\x00abcd",  # id longer than what is left
            b"\x01\x01\xff\xff",  # huge id, nothing there
        ]:
            self.assertRaises(MalformedEntry, parse, data)

    def test_not_bytes(self) -> None:
        self.assertRaises(MalformedEntry, parse, "\x01\x01\x00\x00")
        self.assertRaises(MalformedEntry, parse, None)

    def test_id_exactly_at_end(self) -> None:
        self.assertEqual(parse(b"\x01\x07\x03\x00abc"), StoredEntry(7, b"abc", b""))

    def test_invalid_entries_refused(self) -> None:
        for args in [
            (256, b"", b""),
            (-1, b"", b""),
            (True, b"", b""),
            ("1", b"", b""),
            (1, "id", b""),
            (1, b"", "data"),
            (1, b"x" * 0x10000, b""),
        ]:
            self.assertRaises(MalformedEntry, StoredEntry, *args)

    def test_errors_are_store_errors(self) -> None:
        self.assertTrue(issubclass(MalformedEntry, StoreError))
        self.assertTrue(issubclass(StoreUnavailable, StoreError))

    @hsettings(deadline=None, max_examples=200)
    @given(
        st.integers(0, 255),
        st.binary(max_size=300),
        st.binary(max_size=2000),
    )
    def test_round_trip_property(self, type_: int, id_: bytes, data: bytes) -> None:
        entry = StoredEntry(type_, id_, data)
        self.assertEqual(parse(serialise(entry)), entry)

    @hsettings(deadline=None, max_examples=300)
    @given(st.one_of(st.binary(max_size=64), st.binary(max_size=8).map(lambda b: b"\x01" + b)))
    def test_arbitrary_bytes_only_raise_store_errors(self, data: bytes) -> None:
        try:
            entry = parse(data)
        except StoreError:
            return
        # Whatever parses must be exactly what serialise would have written.
        self.assertEqual(serialise(entry), data)


# -- settings -----------------------------------------------------------------------------


class SettingsTests(SynchronousTestCase):
    def error(self, value: Any, schema: forms.Schema = DATASTORE_SETTINGS) -> forms.FormError:
        return self.assertRaises(forms.FormError, schema.validate, value)

    def test_defaults_to_embedded(self) -> None:
        self.assertEqual(DATASTORE_SETTINGS.validate({}), {"type": "embedded", "settings": {}})
        self.assertEqual(
            DATASTORE_SETTINGS.validate({"settings": {"path": "/x/db"}}),
            {"type": "embedded", "settings": {"path": "/x/db"}},
        )

    def test_redis_defaults(self) -> None:
        checked = DATASTORE_SETTINGS.validate(
            {"type": "redis", "settings": {"addresses": ["localhost:6379"], "password": ""}}
        )
        self.assertEqual(
            checked["settings"],
            {"addresses": ["localhost:6379"], "key": "entries", "database": 0, "timeout": 1.0},
        )

    def test_redis_full(self) -> None:
        value = {
            "addresses": ["[::1]:7000", "b:1"],
            "key": "sd-entries",
            "database": 3,
            "password": "secret",
            "timeout": 0.5,
            "master_name": "",
        }
        checked = DATASTORE_SETTINGS.validate({"type": "redis", "settings": value})
        del value["master_name"]
        self.assertEqual(checked["settings"], value)

    def test_paths(self) -> None:
        def redis(**options: Any) -> dict:
            return {"type": "redis", "settings": {"addresses": ["h:1"], **options}}

        cases = [
            ({"typo": 1}, ("typo",)),
            ({"type": "file"}, ("type",)),
            ({"type": "redis"}, ("settings", "addresses")),
            ({"type": "redis", "settings": {"addresses": []}}, ("settings", "addresses")),
            (redis(addresses=["nohost"]), ("settings", "addresses", 0)),
            (redis(addresses=["h:0"]), ("settings", "addresses", 0)),
            (redis(addresses=["h:1", 5]), ("settings", "addresses", 1)),
            (redis(kye="x"), ("settings", "kye")),
            (redis(key=5), ("settings", "key")),
            (redis(database=-1), ("settings", "database")),
            (redis(database=1.5), ("settings", "database")),
            (redis(timeout=0), ("settings", "timeout")),
            (redis(timeout="1s"), ("settings", "timeout")),
            (redis(master_name="m"), ("settings", "master_name")),
            (redis(password=123), ("settings", "password")),
            ({"type": "embedded", "settings": {"key": "x"}}, ("settings", "key")),
            ({"type": "embedded", "settings": {"path": 3}}, ("settings", "path")),
            ({"settings": ["x"]}, ("settings",)),
            ("redis", ()),
        ]
        for value, path in cases:
            self.assertEqual(self.error(value).path, path, value)

    def test_nested_path(self) -> None:
        schema = forms.Map({"directory": forms.Map({"datastore": DATASTORE_SETTINGS})})
        error = self.error(
            {
                "directory": {
                    "datastore": {"type": "redis", "settings": {"addresses": ["a:1"], "key": []}}
                }
            },
            schema,
        )
        self.assertEqual(str(error).split(":")[0], "directory.datastore.settings.key")

    def test_parse_address(self) -> None:
        self.assertEqual(parse_address("localhost:6379"), ("localhost", 6379))
        self.assertEqual(parse_address("[::1]:80"), ("::1", 80))
        for bad in ["", ":80", "h:", "h:65536", "h:0", "a b:1", "[::1]", "h:1:2", "h:-1"]:
            self.assertRaises(ValueError, parse_address, bad)

    def test_open_store_invalid_settings(self) -> None:
        self.failureResultOf(open_store(reactor, {"type": "nope"}), forms.FormError)

    def test_open_store_embedded_needs_a_path(self) -> None:
        failure = self.failureResultOf(open_store(reactor, {}), StoreError)
        self.assertIn("settings.path", str(failure.value))


# -- behaviour common to both back-ends ---------------------------------------------------


class StoreBehaviour:
    """Mixed into a TestCase that defines ``open()`` returning a Deferred[Store]."""

    def open(self, **overrides: Any) -> defer.Deferred:
        raise NotImplementedError

    @defer.inlineCallbacks
    def opened(self, **overrides: Any) -> Any:
        store = yield self.open(**overrides)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def test_round_trip_in_order(self) -> Any:
        store = yield self.opened()
        written = entries(20) + [
            StoredEntry(2, b"", b""),
            StoredEntry(255, b"\x00" * 16, b"\x00\xff"),
        ]
        for entry in written:
            yield store.append(entry)
        self.assertEqual((yield store.read_new()), written)

    @defer.inlineCallbacks
    def test_empty(self) -> Any:
        store = yield self.opened()
        self.assertEqual((yield store.read_new()), [])

    @defer.inlineCallbacks
    def test_incremental_reads(self) -> Any:
        store = yield self.opened()
        for entry in entries(3):
            yield store.append(entry)
        self.assertEqual((yield store.read_new()), entries(3))
        self.assertEqual((yield store.read_new()), [])
        for entry in entries(2, start=3):
            yield store.append(entry)
        self.assertEqual((yield store.read_new()), entries(2, start=3))
        self.assertEqual((yield store.read_new()), [])

    @defer.inlineCallbacks
    def test_concurrent_appends_and_reads(self) -> Any:
        store = yield self.opened()
        yield defer.gatherResults([store.append(e) for e in entries(30)])
        first, second = yield defer.gatherResults([store.read_new(), store.read_new()])
        self.assertEqual(sorted(first + second, key=lambda e: e.id), entries(30))

    @defer.inlineCallbacks
    def test_two_stores_see_each_other(self) -> Any:
        a = yield self.opened()
        b = yield self.opened()
        yield a.append(entries(1)[0])
        yield b.append(entries(1, start=1)[0])
        self.assertEqual((yield a.read_new()), entries(2))
        self.assertEqual((yield b.read_new()), entries(2))
        yield a.append(entries(1, start=2)[0])
        self.assertEqual((yield b.read_new()), entries(1, start=2))
        self.assertEqual((yield a.read_new()), entries(1, start=2))

    @defer.inlineCallbacks
    def test_reopen_reads_everything(self) -> Any:
        store = yield self.open()
        for entry in entries(5):
            yield store.append(entry)
        yield store.close()
        again = yield self.opened()
        self.assertEqual((yield again.read_new()), entries(5))

    @defer.inlineCallbacks
    def test_closed_store_refuses(self) -> Any:
        store = yield self.open()
        yield store.close()
        yield store.close()  # twice is fine
        yield self.assertFailure(store.append(entries(1)[0]), StoreUnavailable)
        yield self.assertFailure(store.read_new(), StoreUnavailable)


# -- embedded -----------------------------------------------------------------------------

CRASH_CHILD = r"""
import sys
from twisted.internet import defer, task
from epsproxy.store import StoredEntry, open_store

@defer.inlineCallbacks
def main(reactor, path):
    store = yield open_store(reactor, {"settings": {"path": path}})
    i = 0
    while True:
        yield store.append(StoredEntry(1, b"%08d" % i, b"x" * 4000))
        sys.stdout.write("%d\n" % i)
        sys.stdout.flush()
        i += 1

task.react(main, sys.argv[1:])
"""


class _Child(protocol.ProcessProtocol):
    """Counts acknowledged appends and kills the child after ``kill_after`` of them."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after
        self.acked: list[int] = []
        self.buffer = b""
        self.stderr = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.acked += [int(line) for line in lines]
        if len(self.acked) >= self.kill_after:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.reason = reason
        self.ended.callback(None)


class EmbeddedStoreTests(StoreBehaviour, TestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="epsproxy-store-"))
        self.addCleanup(self._remove)
        self.path = self.directory / "sub" / "folder" / "store.sqlite"

    def _remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def open(self, **overrides: Any) -> defer.Deferred:
        return open_store(reactor, {"type": "embedded", "settings": {"path": str(self.path)}})

    @defer.inlineCallbacks
    def test_default_path(self) -> Any:
        store = yield open_store(reactor, {"type": "embedded"}, default_path=self.path)
        self.addCleanup(store.close)
        yield store.append(entries(1)[0])
        self.assertTrue(self.path.exists())

    @defer.inlineCallbacks
    def test_settings_path_beats_default(self) -> Any:
        other = self.directory / "other.sqlite"
        store = yield open_store(
            reactor, {"settings": {"path": str(self.path)}}, default_path=other
        )
        yield store.close()
        self.assertTrue(self.path.exists())
        self.assertFalse(other.exists())

    @defer.inlineCallbacks
    def test_file_layout_and_modes(self) -> Any:
        store = yield self.opened()
        yield store.append(entries(1)[0])
        self.assertEqual(stat.S_IMODE(self.path.parent.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(
            conn.execute("SELECT seq, type, id, data FROM entries").fetchall(),
            [(1, 1, b"id-0000", b"data 0")],
        )

    @defer.inlineCallbacks
    def test_not_a_database(self) -> Any:
        self.path.parent.mkdir(parents=True)
        self.path.write_bytes(b"this is not an SQLite file, not at all" * 100)
        failure = yield self.assertFailure(self.open(), StoreError)
        self.assertIn(str(self.path), str(failure))

    @defer.inlineCallbacks
    def test_unwritable_folder(self) -> Any:
        self.path = Path("/proc/epsproxy-no-such/store.sqlite")
        failure = yield self.assertFailure(self.open(), StoreError)
        self.assertIn("store.sqlite", str(failure))

    @defer.inlineCallbacks
    def test_bad_rows_are_skipped(self) -> Any:
        store = yield self.opened()
        yield store.append(entries(1)[0])
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("INSERT INTO entries (type, id, data) VALUES (999, x'00', x'00')")
        conn.execute("INSERT INTO entries (type, id, data) VALUES (1, 5, x'00')")
        conn.execute("INSERT INTO entries (type, id, data) VALUES (3, 'text id', 'text')")
        conn.close()
        yield store.append(entries(1, start=1)[0])
        log = LogCapture(self)
        self.assertEqual(
            (yield store.read_new()),
            [entries(1)[0], StoredEntry(3, b"text id", b"text"), entries(1, start=1)[0]],
        )
        self.assertEqual(log.levels("skipping malformed"), ["error", "error"])
        self.assertEqual((yield store.read_new()), [])

    @defer.inlineCallbacks
    def test_killed_writer_loses_no_acknowledged_entry(self) -> Any:
        child = _Child(kill_after=40)
        reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", CRASH_CHILD, str(self.path)],
            env=dict(os.environ),
        )
        yield child.ended
        self.assertGreaterEqual(len(child.acked), 40, child.stderr.decode(errors="replace"))
        store = yield self.opened()
        found = yield store.read_new()
        self.assertEqual(child.acked, list(range(len(child.acked))))
        # Every acknowledged entry is there, intact and in order; at most the one in
        # flight when the child died may follow.
        self.assertIn(len(found) - len(child.acked), (0, 1))
        self.assertEqual(
            found, [StoredEntry(1, b"%08d" % i, b"x" * 4000) for i in range(len(found))]
        )
        # and the store still accepts writes
        yield store.append(entries(1)[0])
        self.assertEqual((yield store.read_new()), entries(1))


# -- redis --------------------------------------------------------------------------------


class RedisStoreTests(StoreBehaviour, TestCase):
    key = "test-entries"

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield self.start_server()

    @defer.inlineCallbacks
    def start_server(self, **kwargs: Any) -> Any:
        server = RedisServer(reactor, **kwargs)
        self.addCleanup(server.cleanup)
        yield server.start()
        return server

    def settings(self, **overrides: Any) -> dict:
        options = {"addresses": [self.server.address], "key": self.key, "timeout": 2.0}
        options.update(overrides)
        return {"type": "redis", "settings": options}

    def open(self, **overrides: Any) -> defer.Deferred:
        return open_store(reactor, self.settings(**overrides))

    @defer.inlineCallbacks
    def raw(self) -> Any:
        """A second, direct connection to the same Redis for out-of-band edits."""
        store = yield self.opened()
        return store.redis_connection()

    @defer.inlineCallbacks
    def test_stored_as_reference_bytes(self) -> Any:
        store = yield self.opened()
        yield store.append(StoredEntry(2, b"ab", b"cd"))
        raw = yield self.raw()
        self.assertEqual((yield raw.lrange(self.key, 0, -1)), [b"\x01\x02\x02\x00abcd"])

    @defer.inlineCallbacks
    def test_garbage_is_skipped(self) -> Any:
        store = yield self.opened()
        raw = yield self.raw()
        yield store.append(entries(1)[0])
        yield raw.rpush(self.key, [b"", b"\x09garbage", b"\x01\x01\xff\xff", b"12"])
        yield store.append(entries(1, start=1)[0])
        log = LogCapture(self)
        self.assertEqual((yield store.read_new()), entries(2))
        self.assertEqual(log.levels("skipping malformed"), ["error"] * 4)
        yield store.append(entries(1, start=2)[0])
        self.assertEqual((yield store.read_new()), entries(1, start=2))

    @defer.inlineCallbacks
    def test_recreated_list_is_read_again(self) -> Any:
        store = yield self.opened()
        raw = yield self.raw()
        for entry in entries(3):
            yield store.append(entry)
        self.assertEqual((yield store.read_new()), entries(3))
        yield raw.delete(self.key)
        for entry in entries(5, start=10):
            yield store.append(entry)
        log = LogCapture(self)
        self.assertEqual((yield store.read_new()), entries(5, start=10))
        self.assertEqual(log.levels("trimmed or replaced"), ["warn"])
        self.assertEqual((yield store.read_new()), [])

    @defer.inlineCallbacks
    def test_trimmed_list_is_read_again(self) -> Any:
        store = yield self.opened()
        raw = yield self.raw()
        for entry in entries(4):
            yield store.append(entry)
        self.assertEqual((yield store.read_new()), entries(4))
        yield raw.ltrim(self.key, 2, -1)
        yield store.append(entries(1, start=4)[0])
        self.assertEqual((yield store.read_new()), entries(3, start=2))

    @defer.inlineCallbacks
    def test_deleted_list(self) -> Any:
        store = yield self.opened()
        raw = yield self.raw()
        yield store.append(entries(1)[0])
        self.assertEqual((yield store.read_new()), entries(1))
        yield raw.delete(self.key)
        self.assertEqual((yield store.read_new()), [])
        yield store.append(entries(1, start=1)[0])
        self.assertEqual((yield store.read_new()), entries(1, start=1))

    @defer.inlineCallbacks
    def test_databases_are_separate(self) -> Any:
        zero = yield self.opened()
        one = yield self.opened(database=1)
        yield zero.append(entries(1)[0])
        self.assertEqual((yield one.read_new()), [])
        self.assertEqual((yield zero.read_new()), entries(1))

    @defer.inlineCallbacks
    def test_wrong_type_key(self) -> Any:
        store = yield self.opened()
        raw = yield self.raw()
        yield raw.set(self.key, b"a string")
        failure = yield self.assertFailure(store.append(entries(1)[0]), StoreUnavailable)
        self.assertIn("WRONGTYPE", str(failure))
        yield self.assertFailure(store.read_new(), StoreUnavailable)

    @defer.inlineCallbacks
    def test_stopped_redis_fails_clearly(self) -> Any:
        store = yield self.opened(timeout=0.3)
        yield store.append(entries(1)[0])
        yield self.server.stop()
        started = reactor.seconds()
        failure = yield self.assertFailure(store.append(entries(1)[0]), StoreUnavailable)
        self.assertIn(self.server.address, str(failure))
        yield self.assertFailure(store.read_new(), StoreUnavailable)
        self.assertLess(reactor.seconds() - started, 5)

    @defer.inlineCallbacks
    def test_open_without_redis(self) -> Any:
        address = self.server.address
        yield self.server.stop()
        failure = yield self.assertFailure(self.open(timeout=0.3), StoreUnavailable)
        self.assertIn(f"cannot connect to redis at {address}", str(failure))

    @defer.inlineCallbacks
    def test_password(self) -> Any:
        self.server = yield self.start_server(extra_args=["--requirepass", "s3cret"])
        failure = yield self.assertFailure(self.open(password="wrong"), StoreUnavailable)
        self.assertIn(self.server.address, str(failure))
        self.assertNotIn("wrong", str(failure).replace("WRONGPASS", ""))
        yield self.assertFailure(self.open(timeout=0.5), StoreUnavailable)  # none given
        store = yield self.opened(password="s3cret")
        yield store.append(entries(1)[0])
        self.assertEqual((yield store.read_new()), entries(1))

    @defer.inlineCallbacks
    def test_only_first_address_used(self) -> Any:
        log = LogCapture(self)
        store = yield self.opened(addresses=[self.server.address, "127.0.0.1:1"])
        yield store.append(entries(1)[0])
        self.assertEqual(log.levels("using only"), ["warn"])

    @defer.inlineCallbacks
    def test_survives_redis_restart_with_persistence(self) -> Any:
        self.server = yield self.start_server(appendonly=True)
        store = yield self.open()
        for entry in entries(3):
            yield store.append(entry)
        yield store.close()
        yield self.server.stop()
        self.server = yield self.start_server(appendonly=True, directory=self.server.directory)
        again = yield self.opened()
        self.assertEqual((yield again.read_new()), entries(3))

    @defer.inlineCallbacks
    def test_reconnects_after_redis_restart(self) -> Any:
        store = yield self.opened(timeout=0.5)
        yield store.append(entries(1)[0])
        self.assertEqual((yield store.read_new()), entries(1))
        yield self.server.stop()
        yield self.assertFailure(store.append(entries(1)[0]), StoreUnavailable)
        self.server = yield self.start_server(port=self.server.port)
        # The client reconnects in the background with a backoff of about a second.
        for _ in range(20):
            try:
                yield store.append(entries(1, start=1)[0])
                break
            except StoreUnavailable:
                pass
        else:
            self.fail("the store did not reconnect")
        # Redis came back empty (no persistence): the store notices and reads from 0.
        self.assertEqual((yield store.read_new()), entries(1, start=1))
