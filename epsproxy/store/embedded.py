"""
The ``embedded`` datastore: data entries in one SQLite file.

Why SQLite rather than the reference's chunked append file (SPEC §8.5, §23.3 #31): a
commit is atomic, so a crash in the middle of a write leaves the previous state and never a
half entry; in WAL mode several readers and processes share the file while one writes;
and it is in the standard library.  ``synchronous=FULL`` makes every commit durable
before :meth:`EmbeddedStore.append` fires.

Entries are rows of ``entries(seq INTEGER PRIMARY KEY AUTOINCREMENT, type, id, data)``.
SQLite serialises writers and ``AUTOINCREMENT`` never reuses or lowers a ``seq``, so
reading ``seq > last seen`` misses nothing another process committed.

All SQLite work runs on one dedicated thread (a 1-thread pool), never on the reactor
thread; the connection lives and dies on that thread.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Generator, TypeVar

from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from epsproxy.net.reactor import IReactor
from epsproxy.store import MalformedEntry, StoredEntry, StoreError, StoreUnavailable

__all__ = ["EmbeddedStore"]

log = Logger()

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type INTEGER NOT NULL,
    id BLOB NOT NULL,
    data BLOB NOT NULL
)
"""

#: How long a writer waits for another process's write lock before failing.
BUSY_TIMEOUT = 30.0


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database file; runs on the store thread."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file 0600 ourselves: SQLite gives the -wal and -shm files the same mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    # check_same_thread=False: the 1-thread pool already serialises every use.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class EmbeddedStore:
    """A :class:`epsproxy.store.Store` on an SQLite file; build it with :meth:`open`."""

    def __init__(self, reactor: IReactor, path: Path, pool: ThreadPool) -> None:
        self.resets = 0  # one SQLite file, never replaced under a reader
        self.path = path
        self._reactor = reactor
        self._pool = pool
        self._conn: sqlite3.Connection | None = None
        self._last_seq = 0  # only touched on the store thread
        self._closed = False
        self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    @classmethod
    @inlineCallbacks
    def open(cls, reactor: IReactor, path: Path) -> Generator[Deferred[Any], Any, EmbeddedStore]:
        """Open or create the store at ``path``; fires with the store or StoreError."""
        pool = ThreadPool(minthreads=1, maxthreads=1, name=f"epsproxy-store:{path.name}")
        pool.start()
        store = cls(reactor, path, pool)
        try:
            store._conn = yield store._in_thread(_connect, path)
        except BaseException:
            yield store.close()
            raise
        log.info("opened embedded datastore {path}", path=str(path))
        return store

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._closed:
            return fail(StoreUnavailable(f"{self.path}: the store is closed"))

        def run() -> T:
            try:
                return fn(*args)
            except StoreError:
                raise
            except (sqlite3.Error, OSError) as e:
                raise StoreUnavailable(f"{self.path}: {e}") from e

        return deferToThreadPool(self._reactor, self._pool, run)

    def _check_open(self) -> sqlite3.Connection:
        # On the store thread: close() may have been called after this call was queued.
        conn = self._conn
        if conn is None:
            raise StoreUnavailable(f"{self.path}: the store is closed")
        return conn

    def append(self, entry: StoredEntry) -> Deferred[None]:
        """Insert one row; fires after the commit is on disk."""

        def insert() -> None:
            conn = self._check_open()
            # autocommit mode: the INSERT is its own transaction, committed on return
            conn.execute(
                "INSERT INTO entries (type, id, data) VALUES (?, ?, ?)",
                (entry.type, entry.id, entry.data),
            )

        return self._in_thread(insert)

    def read_new(self) -> Deferred[list[StoredEntry]]:
        """Rows with ``seq`` above the last one this store returned, in ``seq`` order."""

        def select() -> list[StoredEntry]:
            conn = self._check_open()
            rows = conn.execute(
                "SELECT seq, type, id, data FROM entries WHERE seq > ? ORDER BY seq",
                (self._last_seq,),
            ).fetchall()
            entries = []
            for seq, type_, id_, data in rows:
                self._last_seq = seq
                try:
                    entries.append(StoredEntry(type_, _blob(id_), _blob(data)))
                except MalformedEntry as e:
                    # A row another program wrote badly must not stop the readers.
                    log.error(
                        "skipping malformed entry {seq} in {path}: {error}",
                        seq=seq,
                        path=str(self.path),
                        error=str(e),
                    )
            return entries

        return self._in_thread(select)

    @inlineCallbacks
    def close(self) -> Generator[Deferred[Any], Any, None]:
        """Close the database and stop the store thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                yield deferToThreadPool(self._reactor, self._pool, conn.close)
            except sqlite3.Error as e:
                log.warn("closing {path} failed: {error}", path=str(self.path), error=str(e))
        self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
        self._pool.stop()


def _blob(value: Any) -> bytes:
    # Rows written by other tools may hold TEXT where we expect BLOB.
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise MalformedEntry(f"expected a blob, got {type(value).__name__}")
