"""
The ``redis`` datastore: serialised data entries in one Redis list (SPEC §8.5).

Append is ``RPUSH key <entry>``; reading is incremental with ``LRANGE``.  Differences from
the reference, each on purpose:

- ``addresses`` names one Redis server: only the first address is used (no cluster
  support; a warning is logged when more are given).  For a Redis that survives losing
  its master, give ``sentinels`` and ``master_name`` instead (Redis Sentinel, issue 15):
  every connection, the store's and the subscriptions', then goes to the master the
  sentinels name, checked with ``ROLE`` (:mod:`epsproxy.store.redis_sentinel`), and
  follows a failover: a lost connection is re-established at the new master, and a
  ``READONLY`` reply (the master was demoted) drops the connection so that it is.
  Commands during the failover fail with StoreUnavailable like any outage.
- Replicated writes (``wait_replicas``, default 1 with sentinels, else 0): after an append
  the store ``WAIT``s, on the same connection, until ``wait_replicas`` replicas confirmed
  it, for at most half the ``timeout``.  Only then is the append acknowledged; otherwise
  it fails with StoreUnavailable (the entry may still be there, like after a timeout) and
  the connection is re-established (with sentinels: wherever the master is by then).
  Redis replication is asynchronous, so without this an append acknowledged by a master
  that dies the next instant is lost by the failover, and the compare-and-append alone
  cannot help: the promoted replica simply never saw it.  The count is not lowered to
  the replicas connected at the time: during a failover the old master has none left
  (its replica was just promoted) and would acknowledge alone a write that the new master
  never gets (tests/test_sentinel.py shows both).  The price: with one master and one
  replica, writes fail from the loss of either until the lost server is back as a replica
  (``wait_replicas: 0`` trades that for the loss window).

"Acknowledged" means Redis holds the entry in memory; surviving a Redis restart depends on
the server's persistence settings (``appendonly yes`` + ``appendfsync always`` for the
strictest).

Scale-out (issue 6): every append also ``PUBLISH``es the list's new length on
:attr:`RedisStore.channel` (one Lua script, so an acknowledged append has always been
announced), and :meth:`RedisStore.watch` runs a callback soon after any process appended,
over a subscription that reconnects and resubscribes by itself (each (re)subscription also
runs the callback, to catch up with what was missed while it was down).  The subscription
also PINGs Redis every few seconds, so a connection that died silently (Redis frozen, a
dropped flow) is noticed and replaced, not only one that was closed.  Pub/sub is not
durable, so a watcher also runs the callback every ``interval`` seconds as a safety net.
:meth:`RedisStore.append_if_unchanged` appends a batch atomically only if nobody appended
since this object's last read (compare-and-append against the tip), which is what keeps
two SD instances on one list from forking the chain.  The subscription and the watcher live
in :mod:`epsproxy.store.redis_pubsub` (re-exported here); this module is the store: the
connection, the commands and the read index.

txredisapi runs on the global reactor internally (its timers and reconnects); the
injected reactor bounds our own timeouts and makes the connection.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Generator, NoReturn, Sequence

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net.reactor import IReactor
from epsproxy.store import (
    AppendConflict,
    MalformedEntry,
    StoredEntry,
    StoreUnavailable,
    parse,
    parse_address,
    serialise,
)
from epsproxy.store.redis_sentinel import MasterEndpoint, MasterLocator
from epsproxy.store.redis_pubsub import (
    RECONNECT_INITIAL_DELAY,
    RECONNECT_MAX_DELAY,
    StoreWatcher,
    Subscription,
    describe,
)

__all__ = ["AppendConflict", "RedisStore", "StoreWatcher", "Subscription"]

log = Logger()


# KEYS[1] list; ARGV[1] channel; ARGV[2..] entries.  Appends and announces the new length.
_APPEND = b"""
local n = 0
for i = 2, #ARGV do n = redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('PUBLISH', ARGV[1], n)
return n
"""

# KEYS[1] list; ARGV[1] channel; ARGV[2] length seen; ARGV[3] last element seen ("" if
# none); ARGV[4..] entries.  -1 (nothing written) if the list is not as last read.
_APPEND_IF_UNCHANGED = b"""
local seen = tonumber(ARGV[2])
local n = redis.call('LLEN', KEYS[1])
if n ~= seen then return -1 end
if n > 0 and redis.call('LINDEX', KEYS[1], n - 1) ~= ARGV[3] then return -1 end
for i = 4, #ARGV do n = redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('PUBLISH', ARGV[1], n)
return n
"""


def _drop(conn: Any) -> None:
    """
    Close a txredisapi connection so that no further command goes to it: the close
    itself lands a reactor turn later, and meanwhile txredisapi would hand the connection
    to the next command unless it is marked dead (its own mark, checked by getConnection).
    """
    conn.connected = 0
    conn.transport.abortConnection()


class RedisStore:
    """A :class:`epsproxy.store.Store` on a Redis list; build it with :meth:`open`."""

    def __init__(
        self,
        reactor: IReactor,
        connection: Any,  # txredisapi's connection handler (txredisapi is untyped)
        address: str,
        key: str,
        timeout: float,
        *,
        database: int = 0,
        password: str | None = None,
        endpoint: Callable[[], IStreamClientEndpoint] | None = None,
        wait_replicas: int = 0,
    ) -> None:
        self.address = address
        self.wait_replicas = wait_replicas
        if endpoint is None:
            host, port = parse_address(address)
            endpoint = partial(HostnameEndpoint, reactor, host, port, timeout=timeout)
        #: Makes the endpoint of each new connection (the subscriptions').
        self._endpoint = endpoint
        self.key = key
        self.timeout = timeout
        self.database = database
        self._password = password
        self._watchers: list[StoreWatcher] = []
        self._in_flight: set[Deferred[Any]] = set()
        self._reactor = reactor
        self._connection = connection
        self._key = key.encode("utf-8")
        self._index = -1  # index of the last element returned
        self._last: bytes | None = None  # that element, to notice a rewritten list
        self._reading = defer.DeferredLock()
        self._closed = False
        #: Times :meth:`read_new` found the list trimmed or replaced (a failover to a
        #: replica that missed unacknowledged appends, say) and read it from the start: a
        #: reader holding state built from earlier reads should rebuild it then.
        self.resets = 0

    @classmethod
    @inlineCallbacks
    def open(
        cls, reactor: IReactor, settings: dict[str, Any]
    ) -> Generator[Deferred[Any], Any, RedisStore]:
        """
        Connect to the first address of validated ``REDIS_SETTINGS`` (or, with
        ``sentinels``, to the master they name, after checking that they name one),
        select the database, authenticate if a password is set, and PING.  Fails with
        StoreUnavailable naming the address (or the settings key) when any step fails or
        takes longer than ``timeout`` (per sentinel asked, with sentinels).
        """
        timeout = settings.get("timeout", 1.0)
        password = settings.get("password") or None
        endpoint: Callable[[], IStreamClientEndpoint]
        if settings.get("sentinels"):
            locator = MasterLocator(
                reactor, settings["sentinels"], settings["master_name"], timeout=timeout,
                password=settings.get("sentinel_password") or None,
            )
            address = locator.description
            # Ask now, so that an unknown name, unreachable sentinels or garbage answers
            # fail the open with their own error instead of a silent retry loop.
            yield locator.locate()
            endpoint = partial(MasterEndpoint, reactor, locator, password=password)
            wait_replicas = settings.get("wait_replicas", 1)
            # a connection asks the sentinels in turn, then connects and asks ROLE
            open_deadline = timeout * (len(settings["sentinels"]) + 2)
        else:
            addresses = settings["addresses"]
            address = addresses[0]
            if len(addresses) > 1:
                log.warn(
                    "redis datastore: using only {address} of {count} addresses",
                    address=address,
                    count=len(addresses),
                )
            host, port = parse_address(address)
            endpoint = partial(HostnameEndpoint, reactor, host, port, timeout=timeout)
            wait_replicas = settings.get("wait_replicas", 0)
            open_deadline = timeout
        factory = txredisapi.RedisFactory(
            address,
            settings.get("database", 0),
            1,
            charset=None,  # entries are bytes
            password=password,
            replyTimeout=timeout,  # also drops a connection that stopped answering
            convertNumbers=False,
        )
        ready = factory.deferred
        # Come back quickly after a Redis restart (txredisapi: 1 s growing to 10 s).
        factory.initialDelay = RECONNECT_INITIAL_DELAY
        factory.maxDelay = RECONNECT_MAX_DELAY
        first = endpoint()
        factory.startConnecting(first)
        try:
            connection = yield ready.addTimeout(open_deadline, reactor)
            store = cls(
                reactor, connection, address, settings.get("key", "entries"), timeout,
                database=settings.get("database", 0),
                password=password, endpoint=endpoint, wait_replicas=wait_replicas,
            )
            reply = yield store._command("PING", lambda c: c.ping())
        except Exception as e:
            yield factory.disconnect()
            if isinstance(e, StoreUnavailable):
                raise
            reason = (
                f"no connection within {open_deadline:g}s"
                if isinstance(e, defer.TimeoutError)
                else describe(e)
            )
            last_error = getattr(first, "last_error", None)
            if last_error:
                reason += f" ({last_error})"
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
        # Commands still waiting (for a connection that is coming back, say) are cancelled
        # by close, so that nothing outlives the store.
        self._in_flight.add(d)
        d.addBoth(self._landed, d)

        def failed(failure: Failure) -> NoReturn:
            if failure.check(StoreUnavailable):
                failure.raiseException()  # already says what and where
            if failure.check(txredisapi.ResponseError) and "READONLY" in str(failure.value):
                self._demoted()
            if failure.check(defer.TimeoutError, txredisapi.TimeoutError):
                raise StoreUnavailable(
                    f"redis timeout after {self.timeout:g}s: {name} at {self.address}"
                )
            raise StoreUnavailable(
                f"redis {name} at {self.address} failed: {describe(failure.value)}"
            )

        return d.addErrback(failed)

    def _demoted(self) -> None:
        """
        A write met ``READONLY``: this connection's server is a replica now (a failover
        demoted it).  Drop the connection; it is re-established wherever the master is.
        """
        log.warn("redis {address} refused a write as a read-only replica; reconnecting"
                 " to the master", address=self.address)
        for conn in list(self._connection._factory.pool):  # the handler's pool (txredisapi)
            _drop(conn)

    @property
    def channel(self) -> str:
        """
        The pub/sub channel that carries the list's new length after every append.
        Channels are not per database in Redis, so the name carries both.
        """
        return f"epsproxy:{self.database}:{self.key}"

    def _landed(self, result: Any, d: Deferred[Any]) -> Any:
        self._in_flight.discard(d)
        return result

    def append(self, entry: StoredEntry) -> Deferred[None]:
        """
        ``RPUSH`` the serialised entry and ``PUBLISH`` the new length on :attr:`channel`
        (atomically); fires once Redis has acknowledged it.
        """
        args = [self.channel.encode("utf-8"), serialise(entry)]
        return self._command(
            "RPUSH", lambda c: self._replicated(c, _APPEND, args)
        ).addCallback(lambda _: None)

    def append_if_unchanged(self, entries: Sequence[StoredEntry]) -> Deferred[None]:
        """
        Append ``entries`` (all or none, in order) only if the list still ends where this
        object's last :meth:`read_new` left it; fails with :class:`AppendConflict` (nothing
        written) if any process appended since.  Runs under the read lock, so a read in
        progress cannot interleave.  Like :meth:`append` it publishes on :attr:`channel`.
        """
        data = [serialise(entry) for entry in entries]
        return self._reading.run(self._append_if_unchanged, data)

    @inlineCallbacks
    def _append_if_unchanged(self, data: list[bytes]) -> Generator[Deferred[Any], Any, None]:
        seen = self._index + 1
        last = self._last if self._last is not None else b""
        args = [self.channel.encode("utf-8"), str(seen).encode("ascii"), last, *data]
        length = yield self._command(
            "RPUSH", lambda c: self._replicated(c, _APPEND_IF_UNCHANGED, args)
        )
        if int(length) < 0:
            raise AppendConflict(
                f"redis list {self.key} at {self.address} changed since it was last read"
            )

    @inlineCallbacks
    def _replicated(
        self, handler: Any, script: bytes, args: list[bytes]
    ) -> Generator[Deferred[Any], Any, Any]:
        """
        Run the append ``script``; with ``wait_replicas``, then ``WAIT`` on the same
        connection (a WAIT on another connection, or on a new master after a
        reconnect, would confirm nothing), so that the append is acknowledged only once
        the replicas have it (see the module doc).  Returns the script's reply.
        """
        if not self.wait_replicas:
            result = yield handler.eval(script, [self._key], args)
            return result
        conn = yield handler._factory.getConnection(peek=True)
        result = yield conn.eval(script, [self._key], args)
        if int(result) < 0:
            return result  # nothing written
        milliseconds = max(1, int(self.timeout * 500))
        confirmed = yield conn.execute_command("WAIT", self.wait_replicas, milliseconds)
        if int(confirmed) < self.wait_replicas:
            # A master that lost its replicas is often one being replaced (its replica
            # was just promoted): reconnect, so the next command asks the sentinels again.
            _drop(conn)
            raise StoreUnavailable(
                f"redis write at {self.address} confirmed by {int(confirmed)} of"
                f" {self.wait_replicas} replica(s) within {milliseconds} ms; it may not"
                " survive a failover"
            )
        return result

    def watch(
        self, callback: Callable[[], Any], *, interval: float | None = 30.0
    ) -> StoreWatcher:
        """
        A started :class:`StoreWatcher` that runs ``callback`` (which may return a
        Deferred) soon after any process appends, after each (re)subscription, and every
        ``interval`` seconds (None: never).  :meth:`close` stops it too.
        """
        watcher = StoreWatcher(self._reactor, self, callback, interval=interval)
        self._watchers.append(watcher)
        watcher.start()
        return watcher

    def subscribe(
        self,
        channel: str,
        on_message: Callable[[bytes], Any],
        on_subscribed: Callable[[], Any] = lambda: None,
        *,
        keepalive: float | None = 5.0,
    ) -> Subscription:
        """
        A started :class:`Subscription` to ``channel`` on this store's Redis (its own
        connection, reconnected with a short backoff while Redis is away, and PINGed
        every ``keepalive`` seconds to notice a silently dead one).
        """
        subscription = Subscription(
            self._reactor, self.address, channel, on_message, on_subscribed,
            password=self._password, timeout=self.timeout, keepalive=keepalive,
            endpoint=self._endpoint(),
        )
        subscription.start()
        return subscription

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
                self.resets += 1
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
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            yield watcher.stop()
        for d in list(self._in_flight):
            d.cancel()
        try:
            yield self._connection.disconnect().addTimeout(self.timeout, self._reactor)
        except Exception as e:
            log.warn(
                "closing redis connection {address}: {error}",
                address=self.address,
                error=describe(e),
            )
