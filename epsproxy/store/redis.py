"""
The ``redis`` datastore: serialised data entries in one Redis list (SPEC §8.5).

Append is ``RPUSH key <entry>``; reading is incremental with ``LRANGE``.  Differences from
the reference, each on purpose:

- Only the first of ``addresses`` is used (no cluster or Sentinel support); a warning
  is logged when more are given.
- Every command, and the connection at open, is bounded by ``timeout`` and fails with
  :class:`~epsproxy.store.StoreUnavailable` instead of hanging.  An append that times
  out may still have been applied by Redis; callers that care read back (the SD does).
  While Redis is down the client keeps reconnecting in the background (txredisapi's
  backoff), so the store recovers by itself when Redis is back.
- The read index notices a list that was trimmed or recreated (SPEC §23.3 #32): each
  read also fetches the last element already seen and compares it.  If it changed or
  vanished, a warning is logged and the whole list is read again from index 0, so the
  caller gets entries it has seen before.  The SD tolerates that (records are keyed by
  hash).  A list replaced by one whose element at that index is byte-identical goes
  unnoticed; entries carry random ids, so that needs a deliberate copy.
- An element that does not parse as an entry is skipped with a logged error.

"Acknowledged" means Redis holds the entry in memory; surviving a Redis restart depends on
the server's persistence settings (``appendonly yes`` + ``appendfsync always`` for the
strictest).

txredisapi runs on the global reactor internally (its timers and reconnects); the
injected reactor bounds our own timeouts and makes the connection.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from epsproxy.store import (
    MalformedEntry,
    StoredEntry,
    StoreUnavailable,
    parse,
    parse_address,
    serialise,
)

__all__ = ["RedisStore"]

log = Logger()


class RedisStore:
    """A :class:`epsproxy.store.Store` on a Redis list; build it with :meth:`open`."""

    def __init__(
        self, reactor: Any, connection: Any, address: str, key: str, timeout: float
    ) -> None:
        self.address = address
        self.key = key
        self.timeout = timeout
        self._reactor = reactor
        self._connection = connection
        self._key = key.encode("utf-8")
        self._index = -1  # index of the last element returned
        self._last: bytes | None = None  # that element, to notice a rewritten list
        self._reading = defer.DeferredLock()
        self._closed = False

    @classmethod
    @inlineCallbacks
    def open(
        cls, reactor: Any, settings: dict[str, Any]
    ) -> Generator[Deferred[Any], Any, RedisStore]:
        """
        Connect to the first address of validated ``REDIS_SETTINGS``, select the database,
        authenticate if a password is set, and PING.  Fails with StoreUnavailable naming
        the address when any step fails or takes longer than ``timeout``.
        """
        addresses = settings["addresses"]
        address = addresses[0]
        if len(addresses) > 1:
            log.warn(
                "redis datastore: using only {address} of {count} addresses",
                address=address,
                count=len(addresses),
            )
        host, port = parse_address(address)
        timeout = settings.get("timeout", 1.0)
        factory = txredisapi.RedisFactory(
            address,
            settings.get("database", 0),
            1,
            charset=None,  # entries are bytes
            password=settings.get("password") or None,
            replyTimeout=timeout,  # also drops a connection that stopped answering
            convertNumbers=False,
        )
        ready = factory.deferred
        factory.startConnecting(HostnameEndpoint(reactor, host, port, timeout=timeout))
        try:
            connection = yield ready.addTimeout(timeout, reactor)
            store = cls(reactor, connection, address, settings.get("key", "entries"), timeout)
            reply = yield store._command("PING", lambda c: c.ping())
        except Exception as e:
            yield factory.disconnect()
            if isinstance(e, StoreUnavailable):
                raise
            reason = (
                f"no connection within {timeout:g}s"
                if isinstance(e, defer.TimeoutError)
                else _describe(e)
            )
            raise StoreUnavailable(f"cannot connect to redis at {address}: {reason}") from e
        if reply not in (b"PONG", "PONG"):
            yield factory.disconnect()
            raise StoreUnavailable(f"redis at {address} answered PING with {reply!r}")
        log.info("opened redis datastore {address} key {key}", address=address, key=store.key)
        return store

    def redis_connection(self) -> Any:
        """The txredisapi connection handler (for later pub/sub or admin work)."""
        return self._connection

    def _command(self, name: str, call: Callable[[Any], Deferred[Any]]) -> Deferred[Any]:
        """Run one command, bounded by ``timeout``; every failure becomes StoreUnavailable."""
        if self._closed:
            return defer.fail(StoreUnavailable(f"redis store {self.address} is closed"))
        d = defer.maybeDeferred(call, self._connection)
        d.addTimeout(self.timeout, self._reactor)

        def failed(failure: Any) -> Any:
            if failure.check(defer.TimeoutError, txredisapi.TimeoutError):
                raise StoreUnavailable(
                    f"redis timeout after {self.timeout:g}s: {name} at {self.address}"
                )
            raise StoreUnavailable(
                f"redis {name} at {self.address} failed: {_describe(failure.value)}"
            )

        return d.addErrback(failed)

    def append(self, entry: StoredEntry) -> Deferred[None]:
        """``RPUSH`` the serialised entry; fires once Redis has acknowledged it."""
        data = serialise(entry)
        return self._command("RPUSH", lambda c: c.rpush(self._key, data)).addCallback(
            lambda _: None
        )

    def read_new(self) -> Deferred[list[StoredEntry]]:
        """Elements after the last one returned, parsed; see the module doc on resets."""
        return self._reading.run(self._read_new)

    @inlineCallbacks
    def _read_new(self) -> Generator[Deferred[Any], Any, list[StoredEntry]]:
        start = max(self._index, 0)
        items = yield self._command("LRANGE", lambda c: c.lrange(self._key, start, -1))
        if self._index >= 0:
            if not items or items[0] != self._last:
                log.warn(
                    "redis list {key} at {address} was trimmed or replaced;"
                    " reading it again from the start",
                    key=self.key,
                    address=self.address,
                )
                self._index, self._last, start = -1, None, 0
                items = yield self._command("LRANGE", lambda c: c.lrange(self._key, 0, -1))
            else:
                items = items[1:]
                start += 1
        entries = []
        for offset, item in enumerate(items):
            try:
                entries.append(parse(item))
            except MalformedEntry as e:
                log.error(
                    "skipping malformed entry {index} of redis list {key}: {error}",
                    index=start + offset,
                    key=self.key,
                    error=str(e),
                )
        if items:
            self._index = start + len(items) - 1
            self._last = items[-1]
        return entries

    @inlineCallbacks
    def close(self) -> Generator[Deferred[Any], Any, None]:
        """Disconnect (bounded by ``timeout``); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            yield self._connection.disconnect().addTimeout(self.timeout, self._reactor)
        except Exception as e:
            log.warn(
                "closing redis connection {address}: {error}",
                address=self.address,
                error=_describe(e),
            )


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
