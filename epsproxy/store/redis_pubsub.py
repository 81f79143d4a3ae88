"""
Redis pub/sub for the ``redis`` datastore (issue 6 scale-out): :class:`Subscription`, one
channel subscription on its own connection that reconnects, resubscribes and keeps itself
alive with PINGs, and :class:`StoreWatcher`, which runs a callback soon after any process
appended to a :class:`~epsproxy.store.redis.RedisStore`'s list.  The store itself (the
list, its commands and the connection they run on) is in :mod:`epsproxy.store.redis`,
which builds both of these (:meth:`~epsproxy.store.redis.RedisStore.subscribe`,
:meth:`~epsproxy.store.redis.RedisStore.watch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Generator

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net.reactor import IReactor
from epsproxy.store import parse_address

if TYPE_CHECKING:
    from epsproxy.store.redis import RedisStore

__all__ = ["StoreWatcher", "Subscription"]

log = Logger()


# Reconnection backoff of the store's and the subscriptions' connections (seconds).
RECONNECT_INITIAL_DELAY = 0.1
RECONNECT_MAX_DELAY = 1.0


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """Hands messages and the loss of the connection to the factory's Subscription."""

    factory: _SubscriberFactory

    def keepalive_ping(self) -> Deferred[Any]:
        """
        Send ``PING``; fires with the reply: ``[b"pong", b""]`` while subscribed (RESP2
        answers a subscribed client with a multi-bulk, which txredisapi's
        SubscriberProtocol queues as a reply, not as a message), ``"PONG"`` otherwise.
        txredisapi's own reply timeout is not applied: it would drop the connection
        behind the Subscription's back, which times the reply itself.
        """
        return self.execute_command("PING", apply_timeout=False)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.subscription._message(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.subscription._lost(self)


class _SubscriberFactory(txredisapi.RedisFactory):
    """One reconnecting connection that subscribes each time it is (re)established."""

    protocol = _SubscriberProtocol
    initialDelay = RECONNECT_INITIAL_DELAY
    maxDelay = RECONNECT_MAX_DELAY

    def __init__(self, subscription: Subscription, password: str | None, timeout: float):
        super().__init__(
            subscription.address, None, 1, isLazy=True, charset=None, password=password,
            replyTimeout=timeout, convertNumbers=False,
        )
        self.subscription = subscription

    def addConnection(self, conn: _SubscriberProtocol) -> None:
        super().addConnection(conn)
        if conn.connected and not self.disconnectCalled:
            self.subscription._connected(conn)


class Subscription:
    """
    A subscription to one Redis pub/sub ``channel`` that survives Redis restarts: its
    connection is re-established with a short backoff (0.1 s growing to 1 s) and
    resubscribed (with Redis Sentinel, at whichever server is the master by then).
    ``on_message(bytes)`` gets each message; ``on_subscribed()`` runs
    after each successful (re)subscription, so the owner can catch up with what was
    published while it was away (pub/sub keeps nothing).  Build it with
    :meth:`RedisStore.subscribe`.

    Keep-alive: a connection can die without the kernel telling us (Redis frozen, a
    NAT or firewall forgetting the flow, a half-open TCP connection), and then no
    message ever arrives again.  So while subscribed, a ``PING`` is sent ``keepalive``
    seconds after the previous reply (one at a time, never overlapping); if its reply
    does not arrive within ``timeout``, the PING fails, or the reply is not a pong, a
    warning is logged and the connection is aborted, which runs the usual reconnect
    and resubscribe (and ``on_subscribed``).  A dead connection is thus noticed within
    about ``keepalive + timeout`` seconds.  ``keepalive=None`` turns this off.
    """

    def __init__(
        self,
        reactor: IReactor,
        address: str,
        channel: str,
        on_message: Callable[[bytes], Any],
        on_subscribed: Callable[[], Any],
        *,
        password: str | None = None,
        timeout: float = 1.0,
        keepalive: float | None = 5.0,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        if keepalive is not None and not keepalive > 0:
            raise ValueError(f"keepalive must be a positive number of seconds or None,"
                             f" not {keepalive!r}")
        self.address = address
        self.channel = channel
        self.timeout = timeout
        self.keepalive = keepalive
        #: Successful (re)subscriptions so far.
        self.subscriptions = 0
        #: Messages received so far.
        self.messages = 0
        #: Keep-alive PINGs answered with a pong so far.
        self.keepalive_replies = 0
        #: Connections dropped because a keep-alive PING went unanswered or failed.
        self.keepalive_failures = 0
        # The next PING, or the deadline of the one in flight (one at a time).
        self._keepalive_call: IDelayedCall | None = None
        self._reactor = reactor
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._factory = _SubscriberFactory(self, password, timeout)
        # Where each (re)connection goes: ``address`` (None), or with Redis Sentinel
        # wherever the master is now (epsproxy.store.redis_sentinel.MasterEndpoint).
        self._endpoint = endpoint
        self._protocol: _SubscriberProtocol | None = None
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._stopped = False
        self._stopping: list[Deferred[None]] | None = None  # waiters while closing

    @property
    def subscribed(self) -> bool:
        """Whether the channel is subscribed right now."""
        return self._protocol is not None

    def start(self) -> None:
        """Start connecting (in the background; see :meth:`when_subscribed`)."""
        endpoint = self._endpoint
        if endpoint is None:
            host, port = parse_address(self.address)
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self.timeout)
        self._factory.startConnecting(endpoint)

    def when_subscribed(self, count: int = 1) -> Deferred[None]:
        """Fires once :attr:`subscriptions` has reached ``count``."""
        if self.subscriptions >= count:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        return d

    def stop(self) -> Deferred[None]:
        """
        Stop reconnecting, stop the keep-alive and close the connection; fires once it
        is closed.  Safe to call twice (txredisapi's disconnect is not: a second one
        while the first is still closing raises).
        """
        if self._stopped:
            if self._stopping is None:
                return defer.succeed(None)
            d: Deferred[None] = Deferred()
            self._stopping.append(d)
            return d
        self._stopped = True
        self._protocol = None
        self._stop_keepalive()
        self._stopping = []

        def closed(_: Any) -> None:
            waiters, self._stopping = self._stopping or [], None
            for waiter in waiters:
                waiter.callback(None)

        return self._factory.disconnect().addErrback(
            lambda f: log.warn("closing redis subscription {address}: {error}",
                               address=self.address, error=f.getErrorMessage())
        ).addCallback(closed)

    def _connected(self, conn: _SubscriberProtocol) -> None:
        d = conn.subscribe(self.channel).addTimeout(self.timeout, self._reactor)

        def subscribed(_: Any) -> None:
            if self._stopped or not conn.connected:
                return
            self._protocol = conn
            self.subscriptions += 1
            self._stop_keepalive()
            self._schedule_ping(conn)
            log.info(
                "subscribed to {channel} at {address} (#{count})",
                channel=self.channel, address=self.address, count=self.subscriptions,
            )
            waiters, self._waiters = self._waiters, []
            for count, waiter in waiters:
                if self.subscriptions >= count:
                    waiter.callback(None)
                else:
                    self._waiters.append((count, waiter))
            self._call(self._on_subscribed)

        def failed(failure: Failure) -> None:
            log.warn(
                "cannot subscribe to {channel} at {address}: {error}; reconnecting",
                channel=self.channel, address=self.address,
                error=describe(failure.value),
            )
            conn.transport.loseConnection()

        d.addCallbacks(subscribed, failed)

    def _lost(self, conn: _SubscriberProtocol) -> None:
        if conn is not self._protocol:
            return
        self._protocol = None
        self._stop_keepalive()
        if not self._stopped:
            log.warn(
                "lost the subscription to {channel} at {address}; reconnecting",
                channel=self.channel, address=self.address,
            )

    def _stop_keepalive(self) -> None:
        call, self._keepalive_call = self._keepalive_call, None
        if call is not None and call.active():
            call.cancel()

    def _schedule_ping(self, conn: _SubscriberProtocol) -> None:
        if self.keepalive is not None and not self._stopped:
            self._keepalive_call = self._reactor.callLater(self.keepalive, self._ping, conn)

    def _ping(self, conn: _SubscriberProtocol) -> None:
        self._keepalive_call = None
        if conn is not self._protocol or self._stopped:
            return
        # The deadline doubles as "this PING still matters": once it has fired or was
        # cancelled (connection lost, stop), whatever comes back is ignored.
        deadline = self._reactor.callLater(
            self.timeout, self._keepalive_failed, conn,
            f"no reply within {self.timeout:g}s",
        )
        self._keepalive_call = deadline

        def answered(reply: Any) -> None:
            if not deadline.active():
                return
            deadline.cancel()
            self._keepalive_call = None
            if conn is not self._protocol:
                return
            if reply == [b"pong", b""] or reply in ("PONG", b"PONG"):
                self.keepalive_replies += 1
                self._schedule_ping(conn)
            else:
                self._keepalive_failed(conn, f"unexpected reply {reply!r:.100}")

        def failed(failure: Failure) -> None:
            if not deadline.active():
                return
            deadline.cancel()
            self._keepalive_call = None
            if conn is not self._protocol or not conn.connected:
                return  # lost meanwhile: connectionLost reports that
            self._keepalive_failed(conn, describe(failure.value))

        defer.maybeDeferred(conn.keepalive_ping).addCallbacks(answered, failed)

    def _keepalive_failed(self, conn: _SubscriberProtocol, reason: str) -> None:
        self._keepalive_call = None
        if conn is not self._protocol or self._stopped:
            return
        self.keepalive_failures += 1
        # Unsubscribed from now on (and _lost, once the abort lands, stays quiet).
        self._protocol = None
        log.warn(
            "keep-alive PING on the subscription to {channel} at {address} failed:"
            " {error}; dropping the connection and reconnecting",
            channel=self.channel, address=self.address, error=reason,
        )
        conn.transport.abortConnection()

    def _message(self, message: bytes) -> None:
        self.messages += 1
        self._call(self._on_message, message)

    def _call(self, function: Callable[..., Any], *args: Any) -> None:
        d = defer.maybeDeferred(function, *args)
        d.addErrback(
            lambda f: log.failure("redis subscription callback failed", f)
        )


class StoreWatcher:
    """
    Runs ``callback`` (typically "read what is new in the store") soon after any process
    appended to ``store``'s list: on each message of :attr:`RedisStore.channel`, after each
    (re)subscription, and every ``interval`` seconds as a safety net.  Runs never overlap:
    notifications that arrive during a run cause exactly one more run after it.  Failures
    of ``callback`` are logged.  Build it with :meth:`RedisStore.watch`.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        store: RedisStore,
        callback: Callable[[], Any],
        *,
        interval: float | None = 30.0,
    ) -> None:
        self.store = store
        self.interval = interval
        #: Completed runs of ``callback``.
        self.runs = 0
        self._reactor = reactor
        self._callback = callback
        self._running = False
        self._again = False
        self._stopped = False
        self._next: list[Deferred[None]] = []  # fired when the next run ends
        self._loop: LoopingCall | None = None
        self.subscription: Subscription | None = None

    def start(self) -> None:
        """Subscribe and start the safety-net loop."""
        self.subscription = self.store.subscribe(
            self.store.channel, lambda message: self.notify(), self.notify
        )
        if self.interval:
            self._loop = LoopingCall(self.notify)
            self._loop.clock = self._reactor
            self._loop.start(self.interval, now=False)

    def notify(self) -> None:
        """Run ``callback`` now, or once more after the run in progress."""
        if self._stopped:
            return
        if self._running:
            self._again = True
            return
        self._run()

    def next_run(self) -> Deferred[None]:
        """
        Fires when the next run of ``callback`` ends (the one in progress, if any).  To
        wait for a state: check it, and if it does not hold yet, wait for this and check
        again; a run that starts after a change ends after it.
        """
        d: Deferred[None] = Deferred()
        self._next.append(d)
        return d

    def _run(self) -> None:
        self._running, self._again = True, False
        d = defer.maybeDeferred(self._callback)
        d.addErrback(
            lambda f: log.warn("refresh after a store notification failed: {error}",
                               error=f.getErrorMessage())
        )
        d.addBoth(self._ran)

    def _ran(self, _: Any) -> None:
        self._running = False
        self.runs += 1
        waiters, self._next = self._next, []
        for waiter in waiters:
            waiter.callback(None)
        if self._again and not self._stopped:
            self._run()

    @inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], Any, None]:
        """Unsubscribe and stop the loop; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.subscription is not None:
            yield self.subscription.stop()


def describe(error: BaseException | None) -> str:
    return str(error) or type(error).__name__
