"""
Tests for epsproxy.net.ratelimit: the counting rules with a Clock, and refusals over real
loopback sockets (plain TCP and TLS, where a refused peer must not get a handshake).
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epsproxy.rules import forms

from epsproxy.net import ratelimit, tls
from epsproxy.net.hostport import peer_key
from epsproxy.net.ratelimit import RateLimitedFactory, RateLimiter, rate_limited
from tests.support.tls import ClientProtocol, ServerFactory, tls_block as block


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


def limiter_at(t: float, limits: list[dict], **kw) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    clock.advance(t)
    return RateLimiter(limits, clock, **kw), clock


def at(clock: Clock, t: float) -> None:
    clock.advance(t - clock.seconds())


class SchemaTests(SynchronousTestCase):
    """TCP_RATE_LIMITS accepts exactly the SPEC §16 shape."""

    def test_valid(self):
        value = [{"type": "second", "limit": 5}, {"type": "hour", "limit": 1000}]
        self.assertEqual(ratelimit.TCP_RATE_LIMITS.validate(value), value)

    def test_invalid(self):
        for bad in [
            {"type": "second", "limit": 1},
            [{"type": "day", "limit": 1}],
            [{"type": "quarterHour", "limit": 1}],
            [{"type": "second", "limit": 0}],
            [{"type": "second", "limit": -3}],
            [{"type": "second", "limit": 1.5}],
            [{"type": "second", "limit": "10"}],
            [{"type": "second", "limit": True}],
            [{"type": "second"}],
            [{"limit": 3}],
            [{"type": "second", "limit": 1, "burst": 2}],
            ["second"],
            None,
        ]:
            with self.assertRaises(forms.FormError, msg=repr(bad)):
                ratelimit.TCP_RATE_LIMITS.validate(bad)
            if isinstance(bad, list):
                with self.assertRaises(forms.FormError, msg=repr(bad)):
                    RateLimiter(bad, Clock())


class CountingTests(SynchronousTestCase):
    """Fixed calendar windows, resets, SPEC order, key cap, refusal accounting."""

    def test_second_window_alignment(self):
        limiter, clock = limiter_at(100.2, [{"type": "second", "limit": 2}])
        peer = v4("192.0.2.1")
        self.assertTrue(limiter.allow(peer))
        at(clock, 100.5)
        self.assertTrue(limiter.allow(peer))
        at(clock, 100.999)
        self.assertFalse(limiter.allow(peer))
        at(clock, 101.0)  # a new whole second, not 1 s after the first connection
        self.assertTrue(limiter.allow(peer))
        self.assertTrue(limiter.allow(peer))
        self.assertFalse(limiter.allow(peer))

    def test_forgiven_connections_do_not_use_up_the_allowance(self):
        limiter, clock = limiter_at(100.0, [{"type": "second", "limit": 5},
                                            {"type": "minute", "limit": 2}])
        peer, other = v4("192.0.2.1"), v4("192.0.2.2")
        for _ in range(10):  # any number of proven connections
            self.assertTrue(limiter.allow(peer))
            limiter.forgive(peer)
        self.assertTrue(limiter.allow(peer))
        self.assertTrue(limiter.allow(peer))
        self.assertFalse(limiter.allow(peer))  # unforgiven ones still count
        limiter.forgive(other)  # never counted: nothing to take back, no negative credit
        self.assertTrue(limiter.allow(other))
        self.assertTrue(limiter.allow(other))
        self.assertFalse(limiter.allow(other))

    def test_forgiving_after_the_window_turned_takes_nothing_back(self):
        limiter, clock = limiter_at(100.0, [{"type": "minute", "limit": 1}])
        peer = v4("192.0.2.1")
        self.assertTrue(limiter.allow(peer))
        at(clock, 120.0)  # new minute
        self.assertTrue(limiter.allow(peer))
        limiter.forgive(peer)  # takes back the one of this minute
        self.assertTrue(limiter.allow(peer))
        self.assertFalse(limiter.allow(peer))

    def test_minute_and_hour_windows_are_calendar_aligned(self):
        limiter, clock = limiter_at(119.9, [{"type": "minute", "limit": 1}])
        peer = v4("192.0.2.1")
        self.assertTrue(limiter.allow(peer))
        at(clock, 120.0)  # 0.1 s later, but a new UTC minute
        self.assertTrue(limiter.allow(peer))
        at(clock, 179.99)
        self.assertFalse(limiter.allow(peer))

        limiter, clock = limiter_at(3600 * 5 + 10, [{"type": "hour", "limit": 1}])
        self.assertTrue(limiter.allow(peer))
        at(clock, 3600 * 6 - 0.01)
        self.assertFalse(limiter.allow(peer))
        at(clock, 3600 * 6)
        self.assertTrue(limiter.allow(peer))

    def test_window_change_resets_every_key(self):
        limiter, clock = limiter_at(10, [{"type": "second", "limit": 1}])
        peers = [v4(f"192.0.2.{i}") for i in range(5)]
        for p in peers:
            self.assertTrue(limiter.allow(p))
            self.assertFalse(limiter.allow(p))
        at(clock, 11)
        for p in peers:
            self.assertTrue(limiter.allow(p))

    def test_keys_are_independent(self):
        limiter, _ = limiter_at(10, [{"type": "second", "limit": 1}])
        self.assertTrue(limiter.allow(v4("192.0.2.1")))
        self.assertTrue(limiter.allow(v4("192.0.2.2")))
        self.assertFalse(limiter.allow(v4("192.0.2.1")))

    def test_ipv6_rotation_within_64_is_one_peer(self):
        limiter, _ = limiter_at(10, [{"type": "minute", "limit": 3}])
        allowed = [limiter.allow(v6(f"2001:db8::{i:x}")) for i in range(1, 10)]
        self.assertEqual(allowed, [True] * 3 + [False] * 6)
        self.assertTrue(limiter.allow(v6("2001:db8:0:1::1")))

    def test_earlier_limits_count_refused_attempts(self):
        # SPEC §16: the minute counter is incremented before the second limit refuses.
        limiter, clock = limiter_at(0.1, [{"type": "minute", "limit": 3},
                                          {"type": "second", "limit": 1}])
        peer = v4("192.0.2.1")
        self.assertTrue(limiter.allow(peer))   # minute 1, second 1
        at(clock, 0.2)
        self.assertFalse(limiter.allow(peer))  # minute 2, refused by second
        at(clock, 1.1)
        self.assertTrue(limiter.allow(peer))   # minute 3
        at(clock, 2.1)
        self.assertFalse(limiter.allow(peer))  # refused by minute
        at(clock, 60.0)
        self.assertTrue(limiter.allow(peer))

    def test_later_limits_not_counted_after_refusal(self):
        limiter, clock = limiter_at(0.5, [{"type": "second", "limit": 1},
                                          {"type": "minute", "limit": 2}])
        peer = v4("192.0.2.1")
        self.assertTrue(limiter.allow(peer))
        for _ in range(5):
            self.assertFalse(limiter.allow(peer))  # refused by second: minute not counted
        at(clock, 1.5)
        self.assertTrue(limiter.allow(peer))  # minute count is only 2 now
        at(clock, 2.5)
        self.assertFalse(limiter.allow(peer))

    def test_key_cap(self):
        reasons: list[str] = []
        limiter, clock = limiter_at(
            5, [{"type": "minute", "limit": 2}], max_keys=3, on_refused=reasons.append)
        for i in range(3):
            self.assertTrue(limiter.allow(v4(f"192.0.2.{i}")))
        self.assertFalse(limiter.allow(v4("192.0.2.99")))   # a fourth peer: refused
        self.assertTrue(limiter.allow(v4("192.0.2.0")))     # known peers keep their allowance
        self.assertFalse(limiter.allow(v4("192.0.2.0")))
        self.assertEqual(reasons, ["peer_cap", "minute"])
        at(clock, 60)
        self.assertTrue(limiter.allow(v4("192.0.2.99")))

    def test_refusals_counted_and_reported(self):
        reasons: list[str] = []
        limiter, _ = limiter_at(1, [{"type": "second", "limit": 1}], on_refused=reasons.append)
        peer = v4("192.0.2.1")
        limiter.allow(peer)
        for _ in range(4):
            limiter.allow(peer)
        self.assertEqual(limiter.refused, 4)
        self.assertEqual(reasons, ["second"] * 4)

    def test_failing_callback_does_not_break_limiting(self):
        def broken(reason: str) -> None:
            raise RuntimeError("metrics down")

        limiter, _ = limiter_at(1, [{"type": "second", "limit": 1}], on_refused=broken)
        peer = v4("192.0.2.1")
        self.assertTrue(limiter.allow(peer))
        self.assertFalse(limiter.allow(peer))
        self.assertEqual(limiter.refused, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_logging_is_rate_limited_and_truncated(self):
        events: list[dict] = []
        self.patch(ratelimit, "log", Logger(observer=events.append))
        limiter, clock = limiter_at(1, [{"type": "second", "limit": 1}], log_interval=60)
        peer = v4("198.51.100.23")
        for t in range(1, 200):
            at(clock, t)
            limiter.allow(peer)
            limiter.allow(peer)
            limiter.allow(peer)
        self.assertEqual(limiter.refused, 2 * 199)
        self.assertEqual([e["count"] for e in events], [1, 120, 120, 120])
        for event in events:
            self.assertEqual(event["peer"], "198.51.x.x")
            self.assertNotIn("198.51.100.23", repr(event))

    def test_no_limits_allows_everything(self):
        limiter, _ = limiter_at(1, [])
        self.assertTrue(all(limiter.allow(v4("192.0.2.1")) for _ in range(1000)))

    @settings(deadline=None, max_examples=60)
    @given(
        st.lists(
            st.tuples(st.floats(0, 3, allow_nan=False),
                      st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1",
                                       "2001:db8::2", "2001:db8:0:1::1", "::ffff:192.0.2.1"])),
            max_size=60,
        ),
        st.lists(st.tuples(st.sampled_from(["second", "minute", "hour"]), st.integers(1, 4)),
                 min_size=1, max_size=3),
    )
    def test_never_more_than_limit_per_window(self, steps, limits):
        limits = [{"type": t, "limit": n} for t, n in limits]
        limiter, clock = limiter_at(1000.0, limits)
        accepted: dict[tuple, int] = {}
        for step, host in steps:
            clock.advance(step)
            address = v6(host) if ":" in host else v4(host)
            if limiter.allow(address):
                key = peer_key(address)
                for i, rl in enumerate(limits):
                    window = int(clock.seconds() // ratelimit.WINDOWS[rl["type"]])
                    slot = (i, window, key)
                    accepted[slot] = accepted.get(slot, 0) + 1
                    self.assertLessEqual(accepted[slot], rl["limit"])


class FactoryTests(SynchronousTestCase):
    """RateLimitedFactory delegates everything but refused connections."""

    def test_delegation(self):
        calls: list[str] = []

        class Inner(Factory):
            protocol = Protocol

            def startFactory(self):
                calls.append("start")

            def stopFactory(self):
                calls.append("stop")

        clock = Clock()
        wrapped = rate_limited(Inner(), [{"type": "second", "limit": 1}], clock)
        wrapped.doStart()
        self.assertIsInstance(wrapped.buildProtocol(v4("192.0.2.1")), Protocol)
        self.assertIsNone(wrapped.buildProtocol(v4("192.0.2.1")))
        self.assertEqual(wrapped.refused, 1)
        wrapped.doStop()
        self.assertEqual(calls, ["start", "stop"])
        self.assertEqual(wrapped.logPrefix(), "Inner")

    def test_rewrap_shares_counters(self):
        wrapped = rate_limited(Factory.forProtocol(Protocol), [{"type": "second", "limit": 1}],
                               Clock())
        other = wrapped.rewrap(Factory.forProtocol(Protocol))
        self.assertIsNotNone(wrapped.buildProtocol(v4("192.0.2.1")))
        self.assertIsNone(other.buildProtocol(v4("192.0.2.1")))
        self.assertIs(other.limiter, wrapped.limiter)


# ------------------------------------------------------------------ real sockets


class Greeter(Protocol):
    """Plain TCP server side: greets at once."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.lost: defer.Deferred = defer.Deferred()
        self.factory.made.append(self.lost)
        self.transport.write(b"welcome")

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class SocketTests(TestCase):
    """Refusals over loopback; the window is driven by a Clock, so it is deterministic."""

    timeout = 15

    @defer.inlineCallbacks
    def connect(self, port: int, client_tls: dict | None = None):
        client = ClientProtocol()
        if client_tls is None:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        else:
            endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}", client_tls, "sd-1")
        yield endpoint.connect(Factory.forProtocol(lambda: client))
        yield client.lost
        return client

    @defer.inlineCallbacks
    def test_plain_tcp(self):
        clock = Clock()
        clock.advance(1000.5)
        server = ServerFactory()
        server.protocol = Greeter
        limited = rate_limited(server, [{"type": "second", "limit": 2}], clock)
        port = yield tls.listen_endpoint(reactor, "127.0.0.1:0", None).listen(limited)
        self.addCleanup(port.stopListening)
        number = port.getHost().port

        first = yield self.connect(number)
        second = yield self.connect(number)
        third = yield self.connect(number)
        self.assertEqual([first.received, second.received], [b"welcome", b"welcome"])
        self.assertEqual(third.received, b"")
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(limited.refused, 1)

        clock.advance(1)
        fourth = yield self.connect(number)
        self.assertEqual(fourth.received, b"welcome")
        yield defer.gatherResults(server.made)

    @defer.inlineCallbacks
    def test_tls_refused_before_handshake(self):
        clock = Clock()
        clock.advance(1000.5)
        server = ServerFactory()
        limited = rate_limited(server, [{"type": "second", "limit": 2}], clock)
        port = yield tls.listen_endpoint(reactor, "127.0.0.1:0", block("sd-1")).listen(limited)
        self.addCleanup(port.stopListening)
        # The limiter sits in front of the TLS layer, sharing the counters.
        self.assertIsInstance(port.factory, RateLimitedFactory)
        self.assertIsInstance(port.factory.wrappedFactory, TLSMemoryBIOFactory)
        self.assertIs(port.factory.limiter, limited.limiter)
        number = port.getHost().port

        accepted = []
        for _ in range(2):
            accepted.append((yield self.connect(number, block("hd-1"))))
        self.assertEqual([c.received for c in accepted], [b"welcome", b"welcome"])
        refused = yield self.connect(number, block("hd-1"))
        self.assertFalse(refused.handshake)
        self.assertEqual(refused.received, b"")
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(limited.refused, 1)

        clock.advance(1)
        again = yield self.connect(number, block("hd-1"))
        self.assertEqual(again.received, b"welcome")
        yield defer.gatherResults(server.made)
