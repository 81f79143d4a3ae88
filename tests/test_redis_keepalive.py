"""
Keep-alive of the Redis pub/sub subscription (issue 6 scale-out gap): a silently dead
subscriber connection (Redis frozen, a NAT forgetting the flow, half-open TCP) is noticed
within about ``keepalive + timeout`` seconds instead of by the 30 s safety read.

The timing logic runs on a :class:`~twisted.internet.task.Clock` with a stand-in
connection; txredisapi's handling of the pong on a subscribed connection is checked on
the real protocol with bytes as Redis sends them; and the whole thing runs against a real
``redis-server`` (tests/support/redis.py) that is frozen with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
import txredisapi

from epsproxy.store.redis import RedisStore
from epsproxy.store.redis_pubsub import Subscription, _SubscriberProtocol

from .support.redis import RedisServer

CHANNEL = "keepalive-test"
PONG = [b"pong", b""]  # RESP2's answer to PING on a subscribed connection


# ----------------------------------------------------------- timing, on a Clock


class FakeConnection:
    """Stands in for a subscribed _SubscriberProtocol: PINGs wait for the test to answer."""

    def __init__(self) -> None:
        self.connected = 1
        self.pings: list[Deferred[Any]] = []
        self.aborted = 0
        self.transport = self

    def subscribe(self, channel: str) -> Deferred[Any]:
        return defer.succeed([b"subscribe", channel.encode(), 1])

    def keepalive_ping(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pings.append(d)
        return d

    def abortConnection(self) -> None:
        self.aborted += 1


class KeepaliveTimingTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.subscribed = 0
        self.subscription = Subscription(
            self.clock, "127.0.0.1:6379", CHANNEL, lambda message: None, self.on_subscribed,
            timeout=1.0, keepalive=5.0,
        )
        self.conn = FakeConnection()
        self.subscription._connected(self.conn)
        self.assertTrue(self.subscription.subscribed)

    def on_subscribed(self) -> None:
        self.subscribed += 1

    def test_pings_every_keepalive_after_the_last_reply(self):
        self.clock.advance(4.9)
        self.assertEqual(self.conn.pings, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.conn.pings), 1)
        # one at a time: the reply is late but in time, the next PING waits for it
        self.clock.advance(0.9)
        self.assertEqual(len(self.conn.pings), 1)
        self.conn.pings[0].callback(PONG)
        self.assertEqual(self.subscription.keepalive_replies, 1)
        self.clock.advance(4.9)
        self.assertEqual(len(self.conn.pings), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.conn.pings), 2)
        self.conn.pings[1].callback("PONG")  # what an unsubscribed connection answers
        self.assertEqual(self.subscription.keepalive_replies, 2)
        self.assertEqual(self.subscription.keepalive_failures, 0)
        self.assertEqual(self.conn.aborted, 0)
        self.assertTrue(self.subscription.subscribed)

    def test_no_reply_within_timeout_drops_the_connection(self):
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.clock.advance(5.0)
        self.clock.advance(0.99)
        self.assertEqual(self.subscription.keepalive_failures, 0)
        self.clock.advance(0.01)
        self.assertEqual(self.subscription.keepalive_failures, 1)
        self.assertEqual(self.conn.aborted, 1)
        self.assertFalse(self.subscription.subscribed)
        warnings = [e for e in events if "keep-alive" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["address"], "127.0.0.1:6379")
        self.assertEqual(warnings[0]["log_level"].name, "warn")
        # a reply that comes after all is ignored, and nothing more is scheduled
        self.conn.pings[0].callback(PONG)
        self.assertEqual(self.subscription.keepalive_replies, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # the abort lands: no second warning, no second count
        self.conn.connected = 0
        self.subscription._lost(self.conn)
        self.assertEqual(self.subscription.keepalive_failures, 1)

    def test_a_failed_ping_drops_the_connection(self):
        self.clock.advance(5.0)
        self.conn.pings[0].errback(txredisapi.ResponseError("NOPERM no PING for you"))
        self.assertEqual(self.subscription.keepalive_failures, 1)
        self.assertEqual(self.conn.aborted, 1)
        self.assertFalse(self.subscription.subscribed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_ping_that_raises_drops_the_connection(self):
        def broken() -> Deferred[Any]:
            raise txredisapi.ConnectionError("Not connected")

        self.conn.keepalive_ping = broken
        self.clock.advance(5.0)
        self.assertEqual(self.subscription.keepalive_failures, 1)
        self.assertEqual(self.conn.aborted, 1)

    def test_a_reply_that_is_not_a_pong_drops_the_connection(self):
        for n, reply in enumerate([[b"message", b"x", b"y"], [b"pong"], b"", None, 7,
                                   [b"subscribe", b"x", 1], "OK"]):
            conn = FakeConnection()
            self.subscription._connected(conn)
            self.clock.advance(5.0)
            conn.pings[0].callback(reply)
            self.assertEqual(self.subscription.keepalive_failures, n + 1, reply)
            self.assertEqual(conn.aborted, 1, reply)
            self.assertFalse(self.subscription.subscribed)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_lost_connection_is_not_a_keepalive_failure(self):
        self.clock.advance(5.0)
        # as txredisapi does it: connected drops, the pending reply fails, then _lost
        self.conn.connected = 0
        self.conn.pings[0].errback(txredisapi.ConnectionError("Lost connection"))
        self.subscription._lost(self.conn)
        self.assertEqual(self.subscription.keepalive_failures, 0)
        self.assertEqual(self.conn.aborted, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_loss_while_waiting_cancels_the_next_ping(self):
        self.clock.advance(2.0)
        self.conn.connected = 0
        self.subscription._lost(self.conn)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10.0)
        self.assertEqual(self.conn.pings, [])

    def test_resubscription_starts_again_on_the_new_connection(self):
        self.clock.advance(5.0)
        self.clock.advance(1.0)  # no reply: dropped
        self.assertEqual(self.subscription.keepalive_failures, 1)
        again = FakeConnection()
        self.subscription._connected(again)
        self.assertEqual(self.subscribed, 2)
        self.assertTrue(self.subscription.subscribed)
        self.clock.advance(5.0)
        self.assertEqual((len(self.conn.pings), len(again.pings)), (1, 1))
        again.pings[0].callback(PONG)
        self.assertEqual(self.subscription.keepalive_replies, 1)
        self.assertEqual(self.subscription.keepalive_failures, 1)
        self.assertTrue(self.subscription.subscribed)

    @inlineCallbacks
    def test_stop_while_waiting_cancels_the_timer(self):
        self.clock.advance(1.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        yield self.subscription.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_stop_with_a_ping_in_flight_cancels_its_deadline(self):
        self.clock.advance(5.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        yield self.subscription.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.conn.pings[0].callback(PONG)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.subscription.keepalive_replies, 0)
        self.assertEqual(self.subscription.keepalive_failures, 0)

    def test_none_turns_it_off(self):
        subscription = Subscription(self.clock, "127.0.0.1:6379", CHANNEL,
                                    lambda message: None, lambda: None, keepalive=None)
        conn = FakeConnection()
        before = len(self.clock.getDelayedCalls())
        subscription._connected(conn)
        self.assertTrue(subscription.subscribed)
        self.assertEqual(len(self.clock.getDelayedCalls()), before)

    def test_keepalive_must_be_positive(self):
        for bad in (0, 0.0, -1.0, float("nan")):
            with self.assertRaises(ValueError):
                Subscription(self.clock, "127.0.0.1:6379", CHANNEL, lambda message: None,
                             lambda: None, keepalive=bad)


# ------------------------------------------------ txredisapi's subscriber protocol


class SubscriberProtocolTests(unittest.TestCase):
    """The pong on a subscribed connection, in the bytes Redis sends."""

    def setUp(self):
        self.messages: list[bytes] = []
        self.protocol = _SubscriberProtocol(charset=None, convertNumbers=False)
        self.protocol.factory = SimpleNamespace(subscription=SimpleNamespace(
            _message=self.messages.append, _lost=lambda conn: None))
        # txredisapi parses what follows a bulk string in a later reactor turn
        # (LineReceiver.setLineMode); on a Clock here, turned by feed()
        self.clock = Clock()
        self.protocol.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        for _ in range(1000):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(0)
        self.fail("txredisapi kept scheduling")

    def test_ping_sends_ping_and_gets_the_pong(self):
        d = self.protocol.keepalive_ping()
        self.assertEqual(self.transport.value(), b"*1\r\n$4\r\nPING\r\n")
        self.feed(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        self.assertEqual(self.successResultOf(d), PONG)
        self.assertEqual(self.messages, [])

    def test_messages_around_the_pong_are_messages(self):
        message = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$2\r\n%s\r\n"
        data = (message % (len(CHANNEL), CHANNEL.encode(), b"m1")
                + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
                + message % (len(CHANNEL), CHANNEL.encode(), b"m2"))
        for chunk in (len(data), 1):  # in one piece, and byte by byte
            del self.messages[:]
            d = self.protocol.keepalive_ping()
            for start in range(0, len(data), chunk):
                self.feed(data[start:start + chunk])
            self.assertEqual(self.successResultOf(d), PONG)
            self.assertEqual(self.messages, [b"m1", b"m2"])

    def test_a_pong_nobody_asked_for_does_not_break_the_next_ping(self):
        """A pong with no PING waiting is queued; documents txredisapi's behaviour."""
        self.feed(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        d = self.protocol.keepalive_ping()
        # the stray pong answers it: txredisapi matches replies by order only, which is
        # why a PING whose reply is late is never forgiven (the connection is dropped)
        self.assertEqual(self.successResultOf(d), PONG)

    def test_an_error_reply_fails_the_ping(self):
        d = self.protocol.keepalive_ping()
        self.feed(b"-ERR something\r\n")
        self.failureResultOf(d, txredisapi.ResponseError)

    def test_losing_the_connection_fails_the_ping(self):
        d = self.protocol.keepalive_ping()
        self.protocol.connectionLost(None)
        self.failureResultOf(d, txredisapi.ConnectionError)


# ------------------------------------------------------------------- real Redis


def within(d: Deferred[Any], seconds: float) -> Deferred[Any]:
    """``d``, failing with TimeoutError after ``seconds`` (so a test fails, never hangs)."""
    return d.addTimeout(seconds, reactor)


class RealRedisTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(reactor)
        self.addCleanup(self.redis.cleanup)
        yield self.redis.start()
        self.store = yield RedisStore.open(
            reactor, {"addresses": [self.redis.address], "key": "k", "timeout": 2.0})
        self.addCleanup(self.store.close)
        self.received: list[bytes] = []
        self.waiting: list[tuple[int, Deferred[None]]] = []

    def on_message(self, message: bytes) -> None:
        self.received.append(message)
        waiting, self.waiting = self.waiting, []
        for count, d in waiting:
            if len(self.received) >= count:
                d.callback(None)
            else:
                self.waiting.append((count, d))

    def until_received(self, count: int) -> Deferred[None]:
        if len(self.received) >= count:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append((count, d))
        return within(d, 5.0)

    def subscribe(self, keepalive: float | None, timeout: float) -> Subscription:
        subscription = Subscription(reactor, self.redis.address, CHANNEL, self.on_message,
                                    lambda: None, timeout=timeout, keepalive=keepalive)
        subscription.start()
        self.addCleanup(subscription.stop)
        return subscription

    def publish(self, message: bytes) -> Deferred[Any]:
        return self.store.redis_connection().publish(CHANNEL, message)

    def test_store_subscribe_passes_keepalive(self):
        default = self.store.subscribe(CHANNEL, self.on_message)
        self.addCleanup(default.stop)
        off = self.store.subscribe(CHANNEL, self.on_message, keepalive=None)
        self.addCleanup(off.stop)
        self.assertEqual((default.keepalive, off.keepalive), (5.0, None))
        self.assertEqual(default.timeout, 2.0)

    @inlineCallbacks
    def test_frozen_redis_is_noticed_and_the_subscription_comes_back(self):
        keepalive, timeout = 0.2, 0.2
        subscription = self.subscribe(keepalive, timeout)
        yield within(subscription.when_subscribed(), 5.0)
        noticed: Deferred[dict[str, Any]] = Deferred()

        def observe(event: dict[str, Any]) -> None:
            if "keep-alive" in event.get("log_format", "") and not noticed.called:
                reactor.callLater(0, noticed.callback, event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        pid = self.redis._transport.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.resume, pid)
        frozen = time.monotonic()
        event = yield within(noticed, 5.0)
        took = time.monotonic() - frozen
        self.assertLess(took, keepalive + timeout + 0.5)
        self.assertEqual(event["address"], self.redis.address)
        self.assertEqual(subscription.keepalive_failures, 1)
        self.assertFalse(subscription.subscribed)
        self.assertEqual(subscription.subscriptions, 1)

        os.kill(pid, signal.SIGCONT)
        yield within(subscription.when_subscribed(2), 10.0)
        self.assertTrue(subscription.subscribed)
        yield self.publish(b"after")
        yield self.until_received(1)
        self.assertEqual(self.received, [b"after"])
        self.assertEqual(subscription.keepalive_failures, 1)

    def resume(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    @inlineCallbacks
    def test_healthy_subscription_keeps_delivering_between_pings(self):
        """
        With a PING every 50 ms, publish and await one message after another until ten
        PINGs have been answered: every message arrives, in order, none is a pong, and
        the subscription was never dropped.
        """
        subscription = self.subscribe(0.05, 2.0)
        yield within(subscription.when_subscribed(), 5.0)
        started = time.monotonic()
        sent: list[bytes] = []
        while subscription.keepalive_replies < 10:
            self.assertLess(time.monotonic() - started, 10, "ten PINGs not answered in 10 s")
            message = b"m%d" % len(sent)
            sent.append(message)
            yield self.publish(message)
            yield self.until_received(len(sent))
        self.assertEqual(self.received, sent)
        self.assertGreater(len(sent), 10)  # messages did arrive in between
        self.assertEqual(subscription.keepalive_failures, 0)
        self.assertEqual(subscription.subscriptions, 1)
        self.assertTrue(subscription.subscribed)

    @inlineCallbacks
    def test_stop_cancels_the_keepalive(self):
        subscription = self.subscribe(0.05, 2.0)
        yield within(subscription.when_subscribed(), 5.0)
        yield self.publish(b"x")
        yield self.until_received(1)

        def ours() -> list[Any]:
            return [call for call in reactor.getDelayedCalls()
                    if getattr(call.func, "__self__", None) is subscription]

        self.assertEqual(len(ours()), 1)  # the next PING, or the deadline of one
        yield subscription.stop()
        self.assertEqual(ours(), [])
        self.assertFalse(subscription.subscribed)
        yield subscription.stop()  # twice is fine

    @inlineCallbacks
    def test_stop_twice_at_once(self):
        subscription = self.subscribe(0.05, 2.0)
        yield within(subscription.when_subscribed(), 5.0)
        first, second = subscription.stop(), subscription.stop()
        yield within(defer.gatherResults([first, second]), 5.0)
        self.assertTrue(second.called)
