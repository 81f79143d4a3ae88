"""
The private proxy's pool of pre-dialled connections (issue 14, private side).

Unit tests drive :class:`PoolKeeper` with a ``Clock``, a fake client and fake
connections.  The real-socket tests run a real private proxy service; the test plays
the public proxy: a fake own endpoint server hands out pool tokens, a small internal
listener accepts the pooled connections and checks their tokens, and a small TLS front
writes the pooled header (PROXY v2 with the client's address and the server name) on an
idle pooled connection and relays a real TLS client through it to a real internal
server (and, in one test, a real HAProxy with ``accept-proxy`` in front of it).
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest
from twisted.web.template import flattenString, tags

from epsproxy.dev.examples import internal_server
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import (
    INVALID_PARAMS,
    CallContext,
    JSONRPCError,
    TransportError,
)
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from epsproxy.net.proxy_protocol import V2_SIGNATURE
from epsproxy.net.token import TOKEN_BYTES
from epsproxy.proxy.pooling import (
    DEFAULT_POOL_CAP,
    LEGACY_MAX_TOKENS_PER_REQUEST,
    MAX_TOKENS_PER_REQUEST,
    pool_header,
    token_cap,
)
from epsproxy.proxy.private.forwarding import Forwarder, address_text
from epsproxy.proxy.private.pool import (
    REPLACE_DELAY,
    REPLACE_LATER_FROM,
    HELD_BEFORE_SPLICE,
    BACKOFF_START,
    SPARE_LIMIT_SECONDS,
    DEFAULT_SPARES,
    SPARE_MARGIN,
    YOUNG_SECONDS,
    PoolKeeper,
)
from epsproxy.proxy.settings import PROXY_SETTINGS
from epsproxy.proxy.status_page import PrivateProxyPage
from epsproxy.proxy.tap import Options, makeService
from epsproxy.rules.settings import SettingsError, load_settings

from .support.haproxy import accept_proxy_front, start_haproxy
from .support.pki import pki
from .support.proxies import (
    PUBLIC_PROXY,
    Collect,
    client,
    private_section,
    write_settings,
)
from .support.garbage import garbage_names, watch_new_garbage
from .support.splice import Peer
from .support.tls import handshake_then_close, tls_block

PUBLIC = PUBLIC_PROXY
DOMAIN = "test.internal-server.local"


def tokens_result(count: int, endpoint: str = "127.0.0.1:9",
                  expires_in: float = 30) -> dict[str, Any]:
    return {"tokens": [base64.b64encode(secrets.token_bytes(32)).decode()
                       for _ in range(count)],
            "endpoint": endpoint, "expires_in": expires_in}


def tokens_of(result: dict[str, Any]) -> set[bytes]:
    return {base64.b64decode(text) for text in result["tokens"]}


# ------------------------------------------------------------------------ unit tests


class FakeClient:
    """Records each call; the test answers it through ``calls[i][2]``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Deferred[Any]]] = []

    def call(self, method: str, params: dict[str, Any], id: Any = None,
             timeout: float | None = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((method, params, d))
        return d


class FakeAnnouncements:
    def __init__(self) -> None:
        self.live: dict[str, set[str]] = {PUBLIC: {DOMAIN}}

    def by_proxy(self) -> dict[str, list[Any]]:
        return {proxy: sorted(domains) for proxy, domains in self.live.items() if domains}

    def is_live(self, domain: str, proxy: str) -> bool:
        return domain in self.live.get(proxy, set())


class FakeForwarder:
    def __init__(self) -> None:
        self.busy = False
        self.limited: set[str] = set()  # clients over max_connections_per_client
        self.served: list[tuple[Any, Any]] = []
        #: None: each client is set up at once (a raw forward over loopback); else the
        #: Deferred of each served client's set-up (a handshake), fired by the test.
        self.set_ups: list[Deferred[None]] | None = None
        self.setting_up = 0

    def admits(self, client: Any) -> bool:
        # The keeper passes the pooled header's address object.
        return address_text(client) not in self.limited

    def serve_pooled(self, pooled: Any, header: Any, tag: str) -> Deferred[None]:
        self.served.append((pooled, header))
        if self.set_ups is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.set_ups.append(d)
        self.setting_up += 1
        return d

    def set_up(self, index: int = 0) -> None:
        """The ``index``-th client served is set up (its handshake done)."""
        assert self.set_ups is not None
        self.setting_up -= 1
        self.set_ups.pop(index).callback(None)


class KeeperTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.announcements = FakeAnnouncements()
        self.forwarder = FakeForwarder()
        self.transports: list[StringTransport] = []
        self.dialled: list[str] = []  # the address of each dial
        self.refusing = False  # dials fail (connection refused) while set
        self.keeper = PoolKeeper(
            self.clock, self.announcements, self.client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=2, pool_max=3, shrink_after=30, dial=self.dial, spares=0)
        self.keeper.start()
        self.addCleanup(self.keeper.stop)

    def dial(self, address: str, protocol: Protocol) -> Deferred[Any]:
        self.dialled.append(address)
        if self.refusing:
            return fail(ConnectionRefusedError("refused"))
        transport = StringTransport()
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return succeed(protocol)

    def answer(self, result: Any, index: int = -1) -> None:
        self.client.calls[index][2].callback(result)

    def fill(self) -> dict[str, Any]:
        """The first tick asks for the pool (2) plus twice the target in spares (4)."""
        self.clock.advance(1)
        method, params, _ = self.client.calls[-1]
        self.assertEqual((method, params), (f"{PUBLIC}.requestPoolTokens", {"count": 6}))
        result = tokens_result(6)
        self.answer(result)
        return result

    def idle(self) -> list[Any]:
        return list(self.keeper.pools[PUBLIC].idle)

    def die(self) -> None:
        """An idle connection dies, not a young one (no back-off)."""
        self.clock.advance(YOUNG_SECONDS)
        self.idle()[0].connectionLost()

    def spares(self) -> int:
        return len(self.keeper.pools[PUBLIC].spare)

    def written(self) -> list[bytes]:
        """The token written on each connection dialled, in order."""
        return [t.value() for t in self.transports]

    def test_fills_to_pool_size_and_writes_tokens(self) -> None:
        self.assertEqual(self.client.calls, [])  # nothing before the first tick
        result = self.fill()
        self.assertEqual(self.keeper.state(), {PUBLIC: {"idle": 2, "connecting": 0,
                                                        "target": 2}})
        self.assertEqual([len(t) for t in self.written()], [TOKEN_BYTES] * 2)
        self.assertLessEqual(set(self.written()), tokens_of(result))
        self.assertEqual(self.spares(), 4)  # the other four are kept
        self.clock.advance(5)
        self.assertEqual(len(self.client.calls), 1)  # full: no more asking
        self.assertTrue(self.keeper.when_idle(PUBLIC, 2).called)

    def test_a_served_connection_is_replaced_at_once(self) -> None:
        self.fill()
        conn = self.idle()[0]
        conn.dataReceived(pool_header(DOMAIN, "192.0.2.7:4000", "198.51.100.1:443")
                          + b"\x16hello")
        [(served, header)] = self.forwarder.served
        self.assertIs(served, conn)
        self.assertEqual((header.source.host, header.source.port), ("192.0.2.7", 4000))
        self.assertEqual(header.rest, b"\x16hello")
        self.assertEqual(self.keeper.served, 1)
        # replaced at once, with a spare token: no call
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        self.assertNotIn(conn, self.idle())
        self.assertEqual((len(self.transports), len(self.client.calls), self.spares()),
                         (3, 1, 3))

    def pool_of_three(self) -> PoolKeeper:
        """The keeper of a filled pool of three instead (two idle once one is taken)."""
        self.keeper.stop()
        keeper = self.keeper = PoolKeeper(
            self.clock, self.announcements, self.client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=3, pool_max=3, shrink_after=30, dial=self.dial, spares=0)
        keeper.start()
        self.addCleanup(keeper.stop)
        self.clock.advance(1)
        self.answer(tokens_result(9))  # the pool (3) and twice the target in spares (6)
        self.assertEqual(len(self.idle()), 3)
        return keeper

    def test_with_others_idle_a_served_connection_is_replaced_a_little_later(self) -> None:
        # One taken leaves two idle, enough to replace it off the path of its client; a
        # second taken leaves one, and both are replaced at once.
        self.assertEqual(REPLACE_LATER_FROM, 2)
        self.pool_of_three()
        header = pool_header(DOMAIN, "192.0.2.7:4000", "198.51.100.1:443")

        self.idle()[0].dataReceived(header)
        self.assertEqual(len(self.forwarder.served), 1)
        self.assertEqual((len(self.idle()), len(self.transports)), (2, 3))  # not yet
        self.clock.advance(REPLACE_DELAY)
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 4))  # a spare dialled
        self.assertEqual(len(self.client.calls), 1)

        self.idle()[0].dataReceived(header)  # two left: later again
        self.idle()[0].dataReceived(header)  # one left: now, both
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 6))
        self.clock.advance(REPLACE_DELAY)  # the waiting top-up finds nothing missing
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 6))

    def test_the_only_client_being_set_up_is_replaced_once_it_is(self) -> None:
        # A terminating proxy: the replacement waits for the client's handshake, not
        # for a timer that may fall in the middle of it.
        self.pool_of_three()
        self.forwarder.set_ups = []
        header = pool_header(DOMAIN, "192.0.2.7:4000", "198.51.100.1:443")
        self.idle()[0].dataReceived(header)
        self.assertEqual((len(self.idle()), len(self.transports)), (2, 3))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the tick alone: no timer
        self.clock.advance(REPLACE_DELAY)
        self.assertEqual(len(self.transports), 3)  # still waiting for the handshake
        self.forwarder.set_up()
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 4))  # a spare
        self.assertEqual(len(self.client.calls), 1)

    def test_with_another_client_being_set_up_the_timer_gathers_replacements(self) -> None:
        self.pool_of_three()
        self.forwarder.set_ups = []
        header = pool_header(DOMAIN, "192.0.2.7:4000", "198.51.100.1:443")
        self.idle()[0].dataReceived(header)  # alone: waits for its set-up
        self.assertEqual((len(self.idle()), len(self.transports)), (2, 3))
        self.idle()[0].dataReceived(header)  # one idle left: both replaced at once
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 5))
        # Two clients being set up: the next one taken waits for the timer.
        self.idle()[0].dataReceived(header)
        self.assertEqual(self.forwarder.setting_up, 3)
        self.assertEqual((len(self.idle()), len(self.transports)), (2, 5))
        self.clock.advance(REPLACE_DELAY)
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 6))
        for _ in range(3):
            self.forwarder.set_up()  # nothing missing: nothing more dialled
        self.assertEqual((len(self.idle()), len(self.transports)), (3, 6))

    def test_a_waiting_replacement_ends_with_its_pool(self) -> None:
        keeper = self.pool_of_three()
        self.idle()[0].dataReceived(pool_header(DOMAIN, "192.0.2.7:4000"))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # the tick, the top-up
        keeper.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(REPLACE_DELAY)
        self.assertEqual(len(self.transports), 3)  # nothing dialled after the stop

    def test_bytes_after_the_header_are_kept_and_reading_pauses_past_a_bound(self) -> None:
        self.fill()
        conn = self.idle()[0]
        conn.dataReceived(pool_header(DOMAIN, "192.0.2.7:4000") + b"\x16hello")
        self.assertEqual(conn.transport.producerState, "producing")  # not paused for nothing
        conn.dataReceived(b"early")
        self.assertEqual(conn.transport.producerState, "producing")
        conn.dataReceived(b"x" * HELD_BEFORE_SPLICE)
        self.assertEqual(conn.transport.producerState, "paused")
        self.assertEqual(b"".join(conn.received), b"early" + b"x" * HELD_BEFORE_SPLICE)

    def test_a_header_in_pieces_is_read(self) -> None:
        self.fill()
        conn = self.idle()[0]
        data = pool_header(DOMAIN, "192.0.2.7:4000") + b"\x16"
        for i in range(len(data)):
            conn.dataReceived(data[i:i + 1])
        self.assertEqual(len(self.forwarder.served), 1)

    def refused(self, data: bytes, reason: str) -> None:
        self.fill()
        conn, other = self.idle()
        conn.dataReceived(data)
        self.assertEqual(self.keeper.closed, {reason: 1})
        self.assertEqual(self.forwarder.served, [])
        self.assertTrue(conn.transport.disconnecting)
        self.assertFalse(other.transport.disconnecting)  # only that one
        self.assertNotIn(conn, self.idle())
        self.assertIn(other, self.idle())
        # replaced at once with a spare (no call): two idle again
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        self.assertEqual((len(self.transports), len(self.client.calls)), (3, 1))

    def test_garbage_is_a_bad_header(self) -> None:
        self.refused(b"GET / HTTP/1.1\r\n", "bad_header")

    def test_a_header_without_a_name_is_bad(self) -> None:
        from epsproxy.net.proxy_protocol import proxy_v2_header
        self.refused(proxy_v2_header("192.0.2.7:1") + b"\x16", "bad_header")

    def test_an_oversized_header_is_bad(self) -> None:
        self.refused(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 2000), "bad_header")

    def test_a_name_not_announced_there_is_refused(self) -> None:
        self.refused(pool_header("evil.example.org", "192.0.2.7:1") + b"\x16",
                     "not_announced")

    def test_busy_forwarder_closes_it(self) -> None:
        self.forwarder.busy = True
        self.refused(pool_header(DOMAIN, "192.0.2.7:1") + b"\x16", "busy")

    def test_a_client_over_its_limit_is_closed(self) -> None:
        # The limit is the real client's (from the header), not the public proxy's.
        self.forwarder.limited.add("192.0.2.7:1")
        self.refused(pool_header(DOMAIN, "192.0.2.7:1") + b"\x16", "client_limit")

    def test_a_header_trickling_past_its_deadline(self) -> None:
        self.fill()
        conn = self.idle()[0]
        conn.dataReceived(V2_SIGNATURE[:5])
        self.clock.advance(4.9)
        conn.dataReceived(V2_SIGNATURE[5:8])
        self.assertEqual(self.keeper.closed, {})
        self.clock.advance(0.2)
        self.assertEqual(self.keeper.closed, {"header_timeout": 1})
        self.assertTrue(conn.transport.disconnecting)

    def test_bad_results_back_off_doubling(self) -> None:
        self.clock.advance(1)
        backoff = BACKOFF_START
        for bad in ({"tokens": "x"}, {"tokens": ["!!"], "endpoint": "a:1", "expires_in": 1},
                    tokens_result(7),  # more than asked for
                    {"tokens": [], "endpoint": "nohost", "expires_in": 1}):
            calls = len(self.client.calls)
            self.assertEqual(self.client.calls[-1][1], {"count": 6})  # nothing in hand
            self.answer(bad)
            self.assertEqual(self.keeper.pools[PUBLIC].backoff, backoff)
            self.clock.advance(backoff - 1)
            self.assertEqual(len(self.client.calls), calls)  # backing off
            self.clock.advance(1)
            self.assertEqual(len(self.client.calls), calls + 1)
            backoff *= 2
        self.assertEqual(self.keeper.bad_results, 4)
        self.assertEqual(self.transports, [])  # nothing dialled
        self.assertEqual(self.spares(), 0)  # nor kept
        self.answer(tokens_result(6))
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, 0)

    def test_refusals_back_off(self) -> None:
        self.clock.advance(1)
        self.client.calls[-1][2].errback(JSONRPCError(404, "no announcement"))
        self.clock.advance(BACKOFF_START)
        self.client.calls[-1][2].errback(TransportError("no connection"))
        self.assertEqual(self.keeper.request_failures, 2)
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, 2 * BACKOFF_START)
        for _ in range(10):
            self.clock.advance(60)
            self.client.calls[-1][2].errback(TransportError("no connection"))
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, 60)

    def test_failures_are_logged_when_the_reason_changes(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def warnings() -> list[str]:
            return [formatEvent(e) for e in events if "cannot fill" in e.get("log_format", "")]

        self.clock.advance(1)
        for _ in range(3):
            self.client.calls[-1][2].errback(JSONRPCError(404, "no announcement"))
            self.clock.advance(60)
        self.assertEqual(len(warnings()), 1)
        self.assertIn("no announcement", warnings()[0])
        self.client.calls[-1][2].errback(JSONRPCError(403, "not allowed"))
        self.assertEqual(len(warnings()), 2)
        self.clock.advance(60)
        self.answer(tokens_result(6))
        self.assertTrue(any("filled again" in formatEvent(e) for e in events))

    def test_spares_live_from_when_they_were_asked_for(self) -> None:
        # The answer comes 3 s after the call (two endpoint servers under load): the
        # public proxy made the tokens after the call, so they expire 30 s after it,
        # and a spare is used until 1 s before that, not 1 s before 30 s after the answer.
        self.clock.advance(1)  # the first tick asks, at t=1
        self.clock.advance(3)
        self.answer(tokens_result(6, expires_in=30))
        self.assertEqual({until for _, _, until in self.keeper.pools[PUBLIC].spare}, {30.0})
        self.clock.advance(30.5 - self.clock.seconds())
        dialled = len(self.transports)
        self.idle()[0].dataReceived(pool_header(DOMAIN, "192.0.2.7:4000") + b"\x16hello")
        self.assertEqual(len(self.transports), dialled)  # no dial with a forgotten token
        self.assertEqual(self.spares(), 0)
        self.assertIsNotNone(self.keeper.pools[PUBLIC].requesting)  # asked for fresh ones

    def test_grows_on_fallbacks_and_shrinks_when_quiet(self) -> None:
        self.fill()
        self.keeper.fallback(PUBLIC)  # grown and dialled at once, with a spare
        self.assertEqual(self.keeper.state()[PUBLIC], {"idle": 3, "connecting": 0,
                                                       "target": 3})
        self.assertEqual((len(self.client.calls), self.spares()), (1, 3))
        self.keeper.fallback(PUBLIC)  # at pool_max
        self.assertEqual(self.keeper.state()[PUBLIC], {"idle": 3, "connecting": 0,
                                                       "target": 3})
        self.keeper.fallback("other.ga")  # no pool there: ignored
        self.clock.advance(29)
        self.assertEqual(self.keeper.state()[PUBLIC]["target"], 3)
        self.clock.advance(1)
        # Shrunk by its target only: no idle connection is closed (the public proxy may
        # be handing it to a client right now); the surplus goes as it is used.
        self.assertEqual(self.keeper.state()[PUBLIC], {"idle": 3, "connecting": 0,
                                                       "target": 2})
        self.assertEqual(self.keeper.closed, {})
        self.assertTrue(all(t.connected for t in self.transports))
        dialled, asked = len(self.transports), len(self.client.calls)
        first = self.idle()[0]
        first.dataReceived(pool_header(DOMAIN, "192.0.2.7:4000") + b"\x16hello")
        self.assertEqual(self.keeper.state()[PUBLIC], {"idle": 2, "connecting": 0,
                                                       "target": 2})
        # not replaced: at its target (no dial, no tokens asked for)
        self.assertEqual((len(self.transports), len(self.client.calls)), (dialled, asked))
        self.idle()[0].dataReceived(pool_header(DOMAIN, "192.0.2.7:4001") + b"\x16hello")
        # below it: replaced, with the tokens asked for when the spares expired
        self.assertEqual(len(self.transports), dialled)
        self.answer(tokens_result(6))
        self.assertEqual((len(self.transports), self.keeper.state()[PUBLIC]["idle"]),
                         (dialled + 1, 2))
        self.clock.advance(60)
        self.assertEqual(self.keeper.state()[PUBLIC]["target"], 2)  # never below pool_size

    def test_dead_idle_connections_are_replaced(self) -> None:
        self.fill()
        self.clock.advance(10)
        dead = self.idle()[0]
        dead.connectionLost()
        self.assertEqual((self.keeper.replaced, self.keeper.closed), (1, {"died": 1}))
        self.assertNotIn(dead, self.idle())
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)  # a spare, at once
        self.assertEqual((len(self.transports), len(self.client.calls)), (3, 1))
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, 0)

    def test_a_public_proxy_closing_them_at_once_backs_off(self) -> None:
        self.fill()
        for dials in (3, 4):  # young deaths up to a pool's worth: replaced at once
            self.idle()[0].connectionLost()
            self.assertEqual(len(self.transports), dials)
        self.assertEqual((len(self.client.calls), self.spares()), (1, 2))
        self.idle()[0].connectionLost()
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, BACKOFF_START)
        self.clock.advance(BACKOFF_START - 0.5)
        # backing off: no dial (not even with a spare token in hand), no call
        self.assertEqual((len(self.transports), len(self.client.calls), self.spares()),
                         (4, 1, 2))
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 1)
        self.clock.advance(0.5)  # then a spare is dialled, and fewer than 2 are left
        self.assertEqual((len(self.transports), self.spares()), (5, 1))
        self.assertEqual(self.client.calls[-1][1], {"count": 3})

    def test_expired_announcements_close_the_pool(self) -> None:
        self.fill()
        waiting = self.keeper.when_idle(PUBLIC, 0)
        self.announcements.live[PUBLIC] = set()
        self.clock.advance(1)
        self.assertTrue(waiting.called)
        self.assertEqual(self.keeper.state(), {})
        self.assertEqual(self.keeper.closed, {"expired": 2})
        self.assertTrue(all(t.disconnecting for t in self.transports))

    def test_pool_size_zero_keeps_none_and_stop_closes_all(self) -> None:
        self.fill()
        self.keeper.reconfigure(pool_size=0, pool_max=1, shrink_after=30, connect_timeout=1,
                                call_timeout=None)
        self.clock.advance(1)
        self.assertEqual(self.keeper.state(), {})
        self.assertEqual(self.keeper.closed, {"disabled": 2})
        self.keeper.reconfigure(pool_size=1, pool_max=1, shrink_after=30, connect_timeout=1,
                                call_timeout=None)
        self.clock.advance(1)
        # a new pool: its own call (1 + 2 spares), none of the old pool's spares dialled
        self.assertEqual((self.client.calls[-1][1], len(self.transports)), ({"count": 3}, 2))
        self.answer(tokens_result(3))
        self.assertEqual((len(self.transports), self.spares()), (3, 2))
        self.keeper.stop()
        self.assertEqual(self.keeper.closed, {"disabled": 2, "stopped": 1})
        self.clock.advance(10)
        self.assertEqual((len(self.client.calls), len(self.transports)), (2, 3))

    # -- spare tokens

    def test_a_replacement_uses_a_spare_without_a_call(self) -> None:
        result = tokens_result(6, endpoint="127.0.0.1:7")
        self.clock.advance(1)
        self.answer(result)
        for dials in (3, 4):
            self.idle()[0].connectionLost()
            self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
            self.assertEqual(len(self.transports), dials)
        self.assertEqual(len(self.client.calls), 1)  # two replacements, no call
        self.assertEqual(self.dialled, ["127.0.0.1:7"] * 4)  # the answer's endpoint
        written = self.written()
        self.assertEqual(len(set(written)), 4)  # each token used once
        self.assertLessEqual(set(written), tokens_of(result))
        self.assertEqual(self.spares(), 2)

    def test_a_call_once_fewer_than_target_spares_are_left(self) -> None:
        self.fill()
        self.die()
        self.die()
        self.assertEqual((len(self.client.calls), self.spares()), (1, 2))  # target left
        self.die()  # one spare left: ask for 4 - 1 more
        self.assertEqual((len(self.client.calls), self.spares()), (2, 1))
        self.assertEqual(self.client.calls[-1][1], {"count": 3})
        self.die()  # the last spare; one call in flight at most
        self.assertEqual((len(self.client.calls), self.spares()), (2, 0))
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        self.answer(tokens_result(3))
        self.assertEqual((len(self.client.calls), self.spares()), (2, 3))
        self.clock.advance(5)
        self.assertEqual(len(self.client.calls), 2)  # enough in hand

    def test_a_call_asks_for_what_is_missing_plus_spares_capped(self) -> None:
        keeper = PoolKeeper(
            self.clock, self.announcements, self.client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=800, pool_max=800, dial=self.dial, spares=0)
        keeper.check()
        self.assertEqual(self.client.calls[-1][1], {"count": MAX_TOKENS_PER_REQUEST})
        self.answer(tokens_result(MAX_TOKENS_PER_REQUEST))
        self.assertEqual(keeper.state()[PUBLIC]["idle"], 800)
        self.assertEqual(len(keeper.pools[PUBLIC].spare), MAX_TOKENS_PER_REQUEST - 800)
        # Spares: twice the target (1,600), but 800 dialled + 1,248 spares are the public
        # proxy's default cap on unused tokens (2,048); one over it would be answered
        # with no token at all.
        self.assertEqual((DEFAULT_POOL_CAP, token_cap(DEFAULT_POOL_CAP), MAX_TOKENS_PER_REQUEST),
                         (64, 2048, 1024))
        self.assertEqual(self.client.calls[-1][1], {"count": 1248 - 224})
        self.answer(tokens_result(1248 - 224))
        self.assertEqual(len(keeper.pools[PUBLIC].spare), 1248)
        self.assertEqual(len(self.client.calls), 2)
        # Spares used for replacements: asked again once fewer than half are left.
        self.clock.advance(YOUNG_SECONDS)  # (connections dying young would back off)
        calls = len(self.client.calls)  # (the fixture's own keeper ticked meanwhile)
        for conn in list(keeper.pools[PUBLIC].idle)[:624]:
            conn.connectionLost()
        self.assertEqual(len(self.client.calls), calls)
        list(keeper.pools[PUBLIC].idle)[0].connectionLost()
        self.assertEqual(len(keeper.pools[PUBLIC].spare), 1248 - 625)
        self.assertEqual(self.client.calls[-1][1], {"count": 625})
        keeper.stop()

    def test_an_older_public_proxy_is_asked_for_what_it_takes(self) -> None:
        # Public proxies before 2026-12-03 take at most 64 tokens per call and answer
        # more with invalid params: asked again at once for 64, and never for more.
        keeper = PoolKeeper(
            self.clock, self.announcements, self.client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=2, pool_max=2, dial=self.dial, spares=200)
        keeper.check()
        self.assertEqual(self.client.calls[-1][1], {"count": 202})
        calls = len(self.client.calls)
        self.client.calls[-1][2].errback(
            JSONRPCError(INVALID_PARAMS, "params.count: at most 64"))
        self.assertEqual(len(self.client.calls), calls + 1)  # at once, no back-off
        self.assertEqual(self.client.calls[-1][1], {"count": LEGACY_MAX_TOKENS_PER_REQUEST})
        self.answer(tokens_result(LEGACY_MAX_TOKENS_PER_REQUEST))
        self.assertEqual(keeper.state()[PUBLIC]["idle"], 2)
        self.assertEqual(self.client.calls[-1][1], {"count": LEGACY_MAX_TOKENS_PER_REQUEST})
        self.assertEqual(keeper.request_failures, 0)
        # Any other refusal still counts and backs off.
        self.client.calls[-1][2].errback(JSONRPCError(INVALID_PARAMS, "something else"))
        self.assertEqual(keeper.request_failures, 1)
        self.assertEqual(len(self.client.calls), calls + 2)
        keeper.stop()

    def serve(self) -> None:
        """The public proxy takes an idle connection for a client (a whole header)."""
        self.idle()[0].dataReceived(
            pool_header(DOMAIN, "192.0.2.7:4000", "198.51.100.1:443") + b"\x16hello")

    def test_a_busy_pool_keeps_a_token_life_of_spares(self) -> None:
        # The floor here is 4 spares (twice the target): alone, it would make a call
        # every two or three clients.  A pool that serves many keeps as many spares as
        # clients took in a token's life (29 s), so its calls grow with the demand and
        # come about twice per token life, not once per half the floor.
        self.fill()
        asked = []
        for _ in range(64):
            self.serve()
            _, params, d = self.client.calls[-1]
            if not d.called:
                asked.append(params["count"])
                self.answer(tokens_result(params["count"]))
        self.assertEqual(self.keeper.served, 64)
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        # Each call lasts a third more clients than the one before: 10 calls, where the
        # floor alone would have made 21 (one per three clients).
        self.assertLessEqual(len(asked), 10)
        self.assertEqual(asked, sorted(asked))  # each larger than the one before
        self.assertGreaterEqual(asked[-1], 16)
        self.assertGreaterEqual(self.spares(), 32)  # half of 64 or more in hand
        # Quiet: the spares expire after their life (29 s) and are asked for again, as
        # many as the demand remembered, which halves per DEMAND_HALF_LIFE (60 s) until
        # the floor is all that is asked for.
        quiet = []
        for _ in range(20):
            self.clock.advance(30)
            _, params, d = self.client.calls[-1]
            if not d.called:
                quiet.append(params["count"])
                self.answer(tokens_result(params["count"]))
        self.assertEqual(len(quiet), 20)  # one call per token life, no more
        self.assertEqual(quiet, sorted(quiet, reverse=True))
        self.assertGreaterEqual(quiet[0], 40)  # 64 clients, 30 s ago
        self.assertLessEqual(quiet[3], 24)  # 2 minutes later: a quarter
        self.assertEqual(quiet[-1], 4)  # the floor

    def test_the_demand_never_takes_the_spares_over_the_token_cap(self) -> None:
        self.fill()
        pool = self.keeper.pools[PUBLIC]
        now = self.clock.seconds()
        pool.taken.extend([now] * 5000)  # (as if 5,000 clients had been served)
        for _ in range(5):
            self.serve()
        # Twice the target and the floor are 4; the demand is capped at what the public
        # proxy lets an operator hold (its default cap on unused tokens, less the pool).
        _, params, _ = self.client.calls[-1]
        self.assertEqual(params["count"],
                         min(MAX_TOKENS_PER_REQUEST,
                             token_cap(DEFAULT_POOL_CAP) - 2 - self.spares()))
        self.assertLessEqual(len(pool.taken), token_cap(DEFAULT_POOL_CAP))

    def test_public_proxies_of_each_earlier_version_are_asked_for_what_they_take(
            self) -> None:
        # 2026-12-03 to 2026-12-04: at most 256 per call; before: 64.  Each answers a
        # larger count with invalid params; the keeper steps down at once, one step at a
        # time, and never back up.
        keeper = PoolKeeper(
            self.clock, self.announcements, self.client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=2, pool_max=2, dial=self.dial, spares=1500)
        keeper.check()
        self.assertEqual(self.client.calls[-1][1], {"count": MAX_TOKENS_PER_REQUEST})
        calls = len(self.client.calls)
        self.client.calls[-1][2].errback(
            JSONRPCError(INVALID_PARAMS, "params.count: at most 256"))
        self.assertEqual(self.client.calls[-1][1], {"count": 256})
        self.client.calls[-1][2].errback(
            JSONRPCError(INVALID_PARAMS, "params.count: at most 64"))
        self.assertEqual(self.client.calls[-1][1], {"count": LEGACY_MAX_TOKENS_PER_REQUEST})
        self.assertEqual(len(self.client.calls), calls + 2)
        self.assertEqual(keeper.request_failures, 0)
        self.answer(tokens_result(LEGACY_MAX_TOKENS_PER_REQUEST))
        self.assertEqual(keeper.state()[PUBLIC]["idle"], 2)
        self.assertEqual(self.client.calls[-1][1], {"count": LEGACY_MAX_TOKENS_PER_REQUEST})
        # At 64, invalid params is a failure like any other.
        self.client.calls[-1][2].errback(JSONRPCError(INVALID_PARAMS, "something else"))
        self.assertEqual(keeper.request_failures, 1)
        keeper.stop()

    def test_a_small_pool_still_keeps_its_floor_of_spares(self) -> None:
        # One client at a time never grows the pool: without the floor a pool of 2
        # would call for tokens every few connections.
        keeper = PoolKeeper(
            self.clock, self.announcements, self.client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=2, pool_max=2, dial=self.dial, spares=20)
        keeper.check()
        self.assertEqual(self.client.calls[-1][1], {"count": 2 + 20})
        self.answer(tokens_result(22))
        self.assertEqual(len(keeper.pools[PUBLIC].spare), 20)

        def die() -> None:
            self.clock.advance(YOUNG_SECONDS)  # (connections dying young back off)
            list(keeper.pools[PUBLIC].idle)[0].connectionLost()

        self.clock.advance(YOUNG_SECONDS)
        calls = len(self.client.calls)  # (the fixture's own keeper ticks meanwhile)
        for _ in range(10):  # ten served or dead: replaced with spares, no call
            die()
        self.assertEqual(len(keeper.pools[PUBLIC].spare), 10)
        self.assertNotIn({"count": 11}, [c[1] for c in self.client.calls[calls:]])
        die()  # under half: ask for 11
        self.assertEqual(keeper.state()[PUBLIC]["idle"], 2)
        self.assertEqual(self.client.calls[-1][1], {"count": 11})
        self.assertEqual(DEFAULT_SPARES, 384)
        keeper.stop()

    def test_expired_spares_are_dropped_and_not_dialled(self) -> None:
        self.fill()  # at t=1, tokens living 30 s: spares usable until t=30
        self.assertEqual(SPARE_MARGIN, 1.0)
        self.clock.advance(28)
        self.assertEqual((len(self.client.calls), self.spares()), (1, 4))
        self.clock.advance(1)  # t=30: a second before the public proxy forgets them
        self.assertEqual(self.spares(), 0)
        self.assertEqual(self.client.calls[-1][1], {"count": 4})
        old = set(self.written())
        self.idle()[0].connectionLost()
        self.assertEqual(len(self.transports), 2)  # no spare dialled
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 1)
        fresh = tokens_result(4)
        self.answer(fresh)
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        self.assertIn(self.written()[-1], tokens_of(fresh))
        self.assertNotIn(self.written()[-1], old)
        self.assertEqual((len(self.client.calls), self.spares()), (2, 3))

    def test_shorter_lived_spares_are_used_first_and_expire_alone(self) -> None:
        self.fill()  # t=1: four spares, usable until t=30
        for _ in range(3):
            self.die()
        self.assertEqual((len(self.client.calls), self.spares()), (2, 1))
        (long_lived,) = [token for token, _, _ in self.keeper.pools[PUBLIC].spare]
        short = tokens_result(3, expires_in=6)  # the public proxy's expiry was lowered
        self.answer(short)
        self.assertEqual(self.spares(), 4)
        self.die()  # replaced with the spare that expires first: a short-lived one
        self.assertIn(self.written()[-1], tokens_of(short))
        self.clock.advance(5)  # the short-lived ones expire, the long-lived one stays
        self.assertEqual([token for token, _, _ in self.keeper.pools[PUBLIC].spare],
                         [long_lived])

    def test_short_lived_tokens_are_dialled_not_kept(self) -> None:
        self.clock.advance(1)
        self.answer(tokens_result(6, expires_in=SPARE_MARGIN / 2))
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)  # dialled at once
        self.assertEqual((self.spares(), len(self.client.calls)), (0, 1))  # no loop
        self.clock.advance(5)
        self.assertEqual(len(self.client.calls), 1)
        self.idle()[0].connectionLost()  # no spares then: ask for what is missing only
        self.assertEqual(self.client.calls[-1][1], {"count": 1})
        self.answer(tokens_result(1, expires_in=30))  # they live longer again
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)
        self.assertEqual(self.client.calls[-1][1], {"count": 4})

    def test_spares_of_a_closed_pool_are_forgotten(self) -> None:
        self.fill()
        self.announcements.live[PUBLIC] = set()
        self.clock.advance(1)
        self.assertEqual(self.keeper.state(), {})
        self.announcements.live[PUBLIC] = {DOMAIN}
        self.clock.advance(1)  # a new pool: nothing in hand, so nothing dialled
        self.assertEqual(self.keeper.state(), {PUBLIC: {"idle": 0, "connecting": 0,
                                                        "target": 2}})
        self.assertEqual((len(self.transports), self.spares()), (2, 0))
        self.assertEqual(self.client.calls[-1][1], {"count": 6})
        fresh = tokens_result(6)
        self.answer(fresh)
        self.assertLessEqual(set(self.written()[2:]), tokens_of(fresh))
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 2)

    def test_fewer_tokens_than_asked_still_fill(self) -> None:
        self.clock.advance(1)
        self.answer(tokens_result(1))  # asked 6: 1 is dialled; the public proxy is at its
        self.assertEqual(self.keeper.state()[PUBLIC]["idle"], 1)  # cap for us
        self.assertEqual(self.client.calls[-1][1], {"count": 1})  # what is missing only
        self.answer(tokens_result(1))
        self.assertEqual((self.keeper.state()[PUBLIC]["idle"], self.spares()), (2, 0))
        calls = len(self.client.calls)
        self.clock.advance(5)
        self.assertEqual(len(self.client.calls), calls)  # no call for spares it will not give
        self.die()  # a replacement: one token is asked for
        self.assertEqual(self.client.calls[-1][1], {"count": 1})
        self.answer(tokens_result(0))  # at its cap: asked again after BACKOFF_START
        calls = len(self.client.calls)
        self.clock.advance(BACKOFF_START - 1)
        self.assertEqual(len(self.client.calls), calls)
        self.clock.advance(1)
        self.assertEqual(self.client.calls[-1][1], {"count": 1})
        self.answer(tokens_result(1))
        self.assertEqual((self.keeper.state()[PUBLIC]["idle"], self.spares()), (2, 0))
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, 0)
        # Once SPARE_LIMIT_SECONDS have passed, the full number of spares is asked again.
        calls = len(self.client.calls)
        self.clock.advance(SPARE_LIMIT_SECONDS)
        self.assertEqual(len(self.client.calls), calls + 1)
        self.assertEqual(self.client.calls[-1][1], {"count": 4})

    def test_a_capped_public_proxy_is_not_asked_per_replacement(self) -> None:
        # A public proxy that lets us hold 20 unused tokens (an older one, or a lower
        # pool_max_per_operator there): asked again only once half of them are used,
        # not for the one token each replacement frees.
        client = FakeClient()
        keeper = PoolKeeper(
            self.clock, self.announcements, client, self.forwarder,  # type: ignore[arg-type]  # fakes
            pool_size=2, pool_max=2, dial=self.dial, spares=200)
        self.addCleanup(keeper.stop)
        keeper.check()
        self.assertEqual(client.calls[-1][1], {"count": 202})
        client.calls[-1][2].callback(tokens_result(22))  # short: 2 dialled, 20 spares
        self.assertEqual((keeper.state()[PUBLIC]["idle"], len(keeper.pools[PUBLIC].spare)),
                         (2, 20))
        for _ in range(10):  # ten replacements, from the spares: no call
            self.clock.advance(YOUNG_SECONDS)  # (connections dying young back off)
            list(keeper.pools[PUBLIC].idle)[0].connectionLost()
        self.assertEqual((len(client.calls), len(keeper.pools[PUBLIC].spare)), (1, 10))
        self.clock.advance(YOUNG_SECONDS)
        list(keeper.pools[PUBLIC].idle)[0].connectionLost()  # fewer than half: ask
        self.assertEqual(len(client.calls), 2)
        self.assertEqual(client.calls[-1][1], {"count": 20 - 9})

    def test_a_failed_call_does_not_stop_the_spares(self) -> None:
        self.fill()
        for _ in range(3):
            self.die()
        self.assertEqual((self.client.calls[-1][1], self.spares()), ({"count": 3}, 1))
        self.client.calls[-1][2].errback(TransportError("no connection"))
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, BACKOFF_START)
        self.idle()[0].connectionLost()  # replaced with the last spare while backing off
        self.assertEqual((self.keeper.state()[PUBLIC]["idle"], self.spares()), (2, 0))
        self.assertEqual(len(self.client.calls), 2)  # but no call
        self.clock.advance(BACKOFF_START)
        self.assertEqual((len(self.client.calls), self.client.calls[-1][1]), (3, {"count": 4}))

    def test_a_failed_dial_backs_off_the_spares_too(self) -> None:
        self.fill()
        self.refusing = True
        self.idle()[0].connectionLost()  # its replacement cannot connect
        self.assertEqual((len(self.dialled), self.keeper.closed),
                         (3, {"died": 1, "connect_failed": 1}))
        self.assertEqual(self.keeper.pools[PUBLIC].backoff, BACKOFF_START)
        self.clock.advance(BACKOFF_START - 1)
        # no dial while backing off, though spares are in hand
        self.assertEqual((len(self.dialled), self.spares()), (3, 3))
        self.refusing = False
        self.clock.advance(1)
        self.assertEqual((self.keeper.state()[PUBLIC]["idle"], self.spares()), (2, 2))
        self.assertEqual(len(self.client.calls), 1)


class SettingsTests(unittest.SynchronousTestCase):
    def load(self, **changes: Any) -> dict[str, Any]:
        folder = write_settings(Path(self.mktemp()), {"private": private_section(
            Path("/x"), 1, **changes)})
        return load_settings([folder], PROXY_SETTINGS)["private"]

    def test_defaults_and_refusals(self) -> None:
        private = self.load()
        self.assertEqual((private["pool_size"], private["pool_max"],
                          private["pool_shrink_after"]), (4, 64, 30.0))
        self.assertEqual(self.load(pool_size=0)["pool_size"], 0)
        for key, value in [("pool_size", -1), ("pool_size", "4"), ("pool_max", 0),
                           ("pool_shrink_after", 0), ("pool_max", 2)]:
            with self.assertRaises(SettingsError) as caught:
                self.load(**{key: value})
            self.assertIn(f"private.{key}", str(caught.exception))


# ------------------------------------------------------------------ real sockets


class FakeEPS:
    """
    The private proxy's own endpoint server (plain HTTP): accepts announcements and
    hands out pool tokens for the test's pool listener: at most ``most`` per answer (a
    public proxy near its cap), and ``bad[n]`` as the answer to the n-th request.
    """

    def __init__(self) -> None:
        self.issued: set[bytes] = set()
        self.endpoint = ""
        self.requests = 0
        self.most: int | None = None
        self.bad: dict[int, Any] = {}
        self.asked: list[int] = []  # count per request
        self.answered: list[int] = []  # tokens per good answer

    def handle(self, method: str, params: dict[str, Any], context: CallContext) -> Any:
        if method.endswith(".announceConnections"):
            return [None] * len(params["connections"])
        if method == f"{PUBLIC}.requestPoolTokens":
            self.requests += 1
            self.asked.append(params["count"])
            if self.requests in self.bad:
                return self.bad[self.requests]
            count = params["count"] if self.most is None else min(params["count"], self.most)
            result = tokens_result(count, self.endpoint)
            self.issued.update(tokens_of(result))
            self.answered.append(count)
            return result
        raise JSONRPCError(-32601, "method not found")

    @inlineCallbacks
    def start(self, test: unittest.TestCase):
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        port = yield listen_jsonrpc(reactor, jsonrpc_site(self, settings, reactor=reactor),
                                    settings)
        test.addCleanup(port.stopListening)
        return port.getHost().port


class PoolEnd(Protocol):
    """A pooled connection as the public proxy holds it: token first, then idle."""

    def __init__(self, test: PooledService) -> None:
        self.test = test
        self.buffer = b""
        self.token: bytes | None = None
        self.peer: Protocol | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        self.buffer += data
        if self.token is None and len(self.buffer) >= TOKEN_BYTES:
            self.token, self.buffer = self.buffer[:TOKEN_BYTES], self.buffer[TOKEN_BYTES:]
            if self.token not in self.test.eps.issued:
                self.transport.abortConnection()
                return
            self.test.eps.issued.discard(self.token)  # single use
            self.test.end_arrived(self)
        if self.buffer:  # bytes on an idle pooled connection: not allowed
            self.test.early_bytes += 1
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        if self in self.test.ends:
            self.test.ends.remove(self)
        if self.peer is not None:
            self.peer.transport.loseConnection()
        self.lost.callback(None)


class Front(Protocol):
    """The public proxy's TLS listener: takes an idle pooled connection, writes the
    pooled header with this client's address, and relays."""

    def __init__(self, test: PooledService) -> None:
        self.test = test
        self.end: PoolEnd | None = None

    def connectionMade(self) -> None:
        if not self.test.ends:
            self.transport.abortConnection()
            return
        end = self.end = self.test.ends.pop(0)
        end.peer = self
        peer, host = self.transport.getPeer(), self.transport.getHost()
        end.transport.write(pool_header(self.test.domain, f"{peer.host}:{peer.port}",
                                        f"{host.host}:{host.port}"))

    def dataReceived(self, data: bytes) -> None:
        if self.end is not None:
            self.end.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.end is not None:
            self.end.transport.loseConnection()


def rfc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PooledService(unittest.TestCase):
    """A real private proxy whose pool the test's fake public proxy holds."""

    timeout = 40
    domain = DOMAIN

    @inlineCallbacks
    def start(self, internal_tls: bool = True, haproxy: bool = False,
              expires_at: str | None = None, most: int | None = None,
              bad: dict[int, Any] | None = None, **changes: Any):
        self.eps = FakeEPS()
        self.eps.most, self.eps.bad = most, bad or {}
        self.ends: list[PoolEnd] = []
        self.early_bytes = 0
        self._end_waiters: list[tuple[int, Deferred[None]]] = []
        eps_port = yield self.eps.start(self)
        pool_port = reactor.listenTCP(0, Factory.forProtocol(lambda: PoolEnd(self)),
                                      interface="127.0.0.1")
        self.addCleanup(pool_port.stopListening)
        self.eps.endpoint = f"127.0.0.1:{pool_port.getHost().port}"
        front = reactor.listenTCP(0, Factory.forProtocol(lambda: Front(self)),
                                  interface="127.0.0.1")
        self.addCleanup(front.stopListening)
        self.front_port = front.getHost().port
        crt, key = pki().tls("internal-server")
        server = self.internal = yield internal_server.listen(
            reactor, "127.0.0.1:0", str(crt) if internal_tls else None, str(key))
        self.addCleanup(server.stopListening)
        address = f"127.0.0.1:{server.getHost().port}"
        endpoint: dict[str, Any] = {"address": address}
        if haproxy:
            self.haproxy = start_haproxy(self, accept_proxy_front(address))
            endpoint = {"address": f"127.0.0.1:{self.haproxy.port}", "proxy_protocol": True}
        if not internal_tls:
            endpoint["tls"] = {**tls_block("internal-server"), "verify_client": False}
        changes.setdefault("pool_size", 2)
        folder = self.folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "private", "--settings", str(write_settings(
            folder, {"private": private_section(folder, eps_port, internal_endpoint=endpoint,
                                                **changes)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        self.service = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield self.service.when_ready()
        self.pool: PoolKeeper = self.service.pool
        rpc = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
            "endpoint": f"http://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc"}))
        self.addCleanup(rpc.close)
        params: dict[str, Any] = {"proxy": PUBLIC, "domain": DOMAIN, "_client": client()}
        if expires_at is not None:
            params["expires_at"] = expires_at
        self.assertEqual((yield rpc.call("announceConnection", params)), "ok")

    def end_arrived(self, end: PoolEnd) -> None:
        self.ends.append(end)
        waiting, self._end_waiters = self._end_waiters, []
        for count, d in waiting:
            if len(self.ends) >= count:
                d.callback(None)
            else:
                self._end_waiters.append((count, d))

    @inlineCallbacks
    def full(self, count: int = 2):
        """Wait until the pool holds ``count`` idle connections and the public side
        has read all their tokens."""
        yield self.pool.when_idle(PUBLIC, count)
        if len(self.ends) < count:
            d: Deferred[None] = Deferred()
            self._end_waiters.append((count, d))
            yield d

    def tls_get(self, source: str = "127.0.0.1") -> Deferred[bytes]:
        """A real TLS client for DOMAIN through the front, verifying the internal server."""
        root = Certificate.loadPEM(Path(pki().root).read_bytes())
        endpoint = wrapClientTLS(optionsForClientTLS(DOMAIN, trustRoot=root),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", self.front_port,
                                                    bindAddress=(source, 0)))
        collector = Collect(b"GET / HTTP/1.1\r\nHost: " + DOMAIN.encode()
                            + b"\r\nConnection: close\r\n\r\n")
        return connectProtocol(endpoint, collector).addCallback(lambda _: collector.done)

    def assertSuccess(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), raw[:200])
        self.assertEqual(json.loads(body), {"message": "success"})

    @inlineCallbacks
    def hostile(self, data: bytes, reason: str):
        """``data`` on one idle pooled connection closes that one only; the pool refills
        and still serves a real client."""
        yield self.start()
        yield self.full()
        victim = self.ends.pop(0)
        victim.transport.write(data)
        yield victim.lost
        self.assertEqual(self.pool.closed, {reason: 1})
        yield self.full()
        self.assertSuccess((yield self.tls_get()))
        self.assertEqual((self.pool.served, self.service.proxy.incoming_calls), (1, 0))


class ServedFromThePool(PooledService):
    @inlineCallbacks
    def test_fills_serves_end_to_end_and_refills(self):
        yield self.start()
        yield self.full()
        self.assertEqual(self.service.pool_state(),
                         {PUBLIC: {"idle": 2, "connecting": 0, "target": 2}})
        # 2 for the pool and DEFAULT_SPARES spares (more than twice the target), as many
        # as one call may ask for
        self.assertEqual(self.eps.answered, [min(2 + DEFAULT_SPARES, MAX_TOKENS_PER_REQUEST)])
        self.assertSuccess((yield self.tls_get()))  # a real TLS handshake through it
        self.assertEqual(self.service.proxy.incoming_calls, 0)
        self.assertEqual((self.pool.served, self.service.forwarder.pooled,
                          self.service.forwarder.forwarded), (1, 1, 1))
        self.assertEqual(self.service.forwarder.setting_up, 0)  # spliced: set up
        yield self.full()  # refilled
        self.assertSuccess((yield self.tls_get()))
        self.assertEqual(self.pool.served, 2)
        self.assertEqual(self.early_bytes, 0)  # idle connections never sent a byte
        yield self.full()
        # both refills were dialled with spare tokens: still the one call
        self.assertEqual((self.eps.requests, len(self.pool.pools[PUBLIC].spare)),
                         (1, min(2 + DEFAULT_SPARES, MAX_TOKENS_PER_REQUEST) - 4))
        metrics = generate_latest(self.service.registry).decode()
        self.assertIn('private_proxy_pool_connections{proxy="public-proxy-1.ga",'
                      'state="idle"} 2.0', metrics)
        self.assertIn("private_proxy_pool_served_total 2.0", metrics)
        self.assertIn("private_proxy_incoming_calls_total 0.0", metrics)

    @inlineCallbacks
    def test_an_internal_server_that_refuses_closes_that_client_only(self):
        yield self.start()
        yield self.full()
        yield self.internal.stopListening()  # its port now refuses connections
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual((yield self.tls_get()), b"")  # closed, nothing relayed
        self.assertEqual((self.pool.served, self.service.forwarder.failed,
                          self.service.forwarder.forwarded), (1, 1, 0))
        [warning] = [e for e in events
                     if "cannot serve pooled connection" in e.get("log_format", "")]
        self.assertIn("refused", warning["error"].lower())
        self.assertEqual(self.service.forwarder.active, set())  # nothing left counted
        self.assertEqual(self.service.forwarder.setting_up, 0)
        yield self.full()  # the pool is topped up and goes on

    @inlineCallbacks
    def test_terminated_behind_the_private_proxy(self):
        yield self.start(internal_tls=False)
        yield self.full()
        self.assertSuccess((yield self.tls_get()))
        self.assertEqual((self.pool.served, self.service.forwarder.requests,
                          self.service.proxy.incoming_calls), (1, 1, 0))

    @inlineCallbacks
    def test_a_terminated_clients_replacement_waits_for_its_handshake(self):
        # Three pooled: one taken leaves two idle, so the replacement need not be at
        # once; the client is the only one being set up, so it waits for the handshake.
        yield self.start(internal_tls=False, pool_size=3)
        yield self.full(3)
        context = ssl.create_default_context(cafile=str(pki().root))
        into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client_tls = context.wrap_bio(into, out, server_hostname=DOMAIN)
        with self.assertRaises(ssl.SSLWantReadError):
            client_tls.do_handshake()
        client = Peer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.front_port),
                              client)
        client.transport.write(out.read())  # the ClientHello
        seen = yield client.wait_for(1)  # the server's first flight: it was served
        into.write(bytes(client.received[:seen]))
        forwarder = self.service.forwarder
        self.assertEqual((self.pool.served, forwarder.setting_up), (1, 1))
        pool = self.pool.pools[PUBLIC]
        self.assertIsNone(pool.replace_call)  # no timer: the top-up waits ...
        [channel] = forwarder.active
        self.assertFalse(channel.set_up.called)  # ... for this handshake
        while True:
            try:
                client_tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                now = yield client.wait_for(seen + 1)
                into.write(bytes(client.received[seen:now]))
                seen = now
        client.transport.write(out.read())  # the client's Finished
        yield self.full(3)  # topped up once the server has it
        self.assertEqual(forwarder.setting_up, 0)
        self.assertIsNone(channel.set_up)
        client.transport.loseConnection()

    @inlineCallbacks
    def test_a_closed_pooled_terminated_client_leaves_nothing_for_the_collector(self):
        # The benchmark's clients: a handshake, then a close.  Freed by reference counts
        # as it closes: the channel, its TLS transport and its pooled connection.
        yield self.start(internal_tls=False, pool_size=2)
        yield self.full(2)
        watch_new_garbage(self)
        yield threads.deferToThread(handshake_then_close, self.front_port, DOMAIN)
        self.assertEqual(self.pool.served, 1)
        yield self.service.forwarder.drain(30)  # the terminated client has ended
        yield deferLater(reactor, 0, lambda: None)  # and the close's calls have returned
        left = garbage_names(lambda o: isinstance(o, TLSMemoryBIOProtocol)
                             or type(o).__module__.startswith("epsproxy.proxy.private"))
        self.assertEqual(left, [])

    @inlineCallbacks
    def test_a_client_stuck_in_its_handshake_does_not_keep_the_pool_short(self):
        # Hostile: a ClientHello and then nothing.  The pool's tick tops it up anyway.
        yield self.start(internal_tls=False, pool_size=3)
        yield self.full(3)
        client_tls = ssl.create_default_context(cafile=str(pki().root)).wrap_bio(
            ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=DOMAIN)
        with self.assertRaises(ssl.SSLWantReadError):
            client_tls.do_handshake()
        client = Peer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.front_port),
                              client)
        client.transport.write(out.read())
        yield client.wait_for(1)  # served
        yield self.full(3)
        self.assertEqual(self.service.forwarder.setting_up, 1)  # still in its handshake
        [channel] = self.service.forwarder.active
        client.transport.loseConnection()
        yield channel.set_up  # gone: set up as far as the pool is concerned
        self.assertEqual(self.service.forwarder.setting_up, 0)

    @inlineCallbacks
    def test_a_dying_pooled_connection_is_replaced(self):
        yield self.start()
        yield self.full()
        end = self.ends.pop(0)
        end.transport.abortConnection()
        yield end.lost
        yield self.full()
        self.assertEqual((self.pool.replaced, self.pool.closed), (1, {"died": 1}))
        self.assertEqual(self.eps.requests, 1)  # replaced with a spare token, no call
        self.assertSuccess((yield self.tls_get()))  # and the replacement serves
        self.assertEqual(self.pool.served, 1)

    @inlineCallbacks
    def test_fewer_tokens_than_asked_still_fill_and_serve(self):
        yield self.start(most=1)  # every answer holds one token: at its cap for us
        yield self.full()
        while self.pool.pools[PUBLIC].requesting is not None:
            yield self.pool.pools[PUBLIC].requesting
        # 2 missing + the spares, then the 1 still missing: no spares asked for, since
        # the public proxy gives none
        asked = [min(2 + DEFAULT_SPARES, MAX_TOKENS_PER_REQUEST), 1]
        self.assertEqual((self.eps.asked, self.eps.answered), (asked, [1, 1]))
        self.assertEqual(len(self.pool.pools[PUBLIC].spare), 0)
        self.assertSuccess((yield self.tls_get()))
        self.assertEqual((self.pool.served, self.service.proxy.incoming_calls), (1, 0))
        yield self.full()  # its replacement: one call for one token

    @inlineCallbacks
    def test_expired_announcements_empty_the_pool(self):
        yield self.start(expires_at=rfc(reactor.seconds() + 2))
        yield self.full()
        ends = list(self.ends)
        yield self.pool.when_idle(PUBLIC, 0)
        for end in ends:
            yield end.lost
        self.assertEqual(self.service.pool_state(), {})
        self.assertEqual(self.pool.closed, {"expired": 2})

    @inlineCallbacks
    def test_reload_resizes_and_the_status_page_shows_it(self):
        yield self.start()
        yield self.full()
        settings = load_settings([self.folder], PROXY_SETTINGS)["private"]
        self.service.reload(dict(settings, pool_size=3, pool_max=3))
        yield self.full(3)
        html = (yield flattenString(None, tags.div(
            *PrivateProxyPage(self.service, reactor).sections({})))).decode()
        self.assertIn("Connection pool", html)
        self.assertIn("connecting: 0, idle: 3, target: 3", html)
        self.assertIn(PUBLIC, html)
        self.service.reload(dict(settings, pool_size=0))
        yield self.pool.when_idle(PUBLIC, 0)
        self.assertEqual(self.pool.closed, {"disabled": 3})
        html = (yield flattenString(None, tags.div(
            *PrivateProxyPage(self.service, reactor).sections({})))).decode()
        self.assertIn("no connection pool", html)

    @inlineCallbacks
    def test_no_pool_with_pool_size_zero(self):
        yield self.start(pool_size=0)
        self.assertIsNone(self.service.pool_state())
        self.assertEqual((self.eps.requests, self.pool.state()), (0, {}))


class Hostile(PooledService):
    def test_a_header_that_cannot_be_parsed(self):
        return self.hostile(b"GET / HTTP/1.1\r\n\r\n", "bad_header")

    def test_a_header_for_a_name_not_announced(self):
        return self.hostile(pool_header("evil.example.org", "192.0.2.1:5") + b"\x16",
                            "not_announced")

    def test_an_oversized_header(self):
        return self.hostile(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 4000)
                            + b"\0" * 4000, "bad_header")

    @inlineCallbacks
    def test_a_header_trickling_past_its_deadline(self):
        yield self.start()
        yield self.full()
        self.pool.header_timeout = 0.3  # the test's deadline, not the default 5 s
        victim = self.ends.pop(0)
        victim.transport.write(V2_SIGNATURE[:6])
        yield victim.lost
        self.assertEqual(self.pool.closed, {"header_timeout": 1})
        yield self.full()
        self.assertSuccess((yield self.tls_get()))

    @inlineCallbacks
    def test_a_bad_token_result_is_counted_and_the_others_keep_working(self):
        # the first answer fills the pool and leaves one spare, all the public proxy
        # gives (fewer than asked): the next call goes out once that spare is used, and
        # gets a bad result
        yield self.start(most=3, bad={2: {"tokens": ["not base64!"], "endpoint": "x:1",
                                          "expires_in": 30}})
        yield self.full()
        self.assertEqual(self.eps.requests, 1)
        self.assertSuccess((yield self.tls_get()))  # replaced with the spare: a call
        while self.pool.pools[PUBLIC].requesting is not None:
            yield self.pool.pools[PUBLIC].requesting
        self.assertEqual(self.eps.requests, 2)
        self.assertEqual(self.pool.bad_results, 1)
        self.assertEqual(self.pool.pools[PUBLIC].backoff, BACKOFF_START)
        yield self.full()
        self.assertSuccess((yield self.tls_get()))  # the pooled ones still serve
        self.assertEqual((self.pool.served, self.service.proxy.incoming_calls), (2, 0))
        self.assertEqual((self.eps.requests, len(self.pool.pools[PUBLIC].spare)), (2, 0))


class ClientAddressThroughHAProxy(PooledService):
    @inlineCallbacks
    def test_haproxy_behind_the_private_proxy_logs_the_pooled_client(self):
        yield self.start(haproxy=True)
        yield self.full()
        self.assertSuccess((yield self.tls_get(source="127.0.0.9")))
        self.assertEqual(self.service.proxy.incoming_calls, 0)
        yield self.haproxy.wait_for(b"client=")
        line = self.haproxy.output.decode().split("client=", 1)[1].splitlines()[0]
        self.assertTrue(line.startswith("127.0.0.9:"), self.haproxy.output[-500:])
        self.assertIn(f"frontend=127.0.0.1:{self.front_port}", line)


# ------------------------------------------------- with a real public proxy and EPS


class ForwardsPerClient(unittest.TestCase):
    """Forwarder.admits counts forwards in progress per real client (IPv4, IPv6 /64)."""

    def test_counted_per_client_until_the_forward_ends(self) -> None:
        forwarder = Forwarder(Clock(), {"address": "127.0.0.1:1", "proxy_protocol": False},  # type: ignore[arg-type]  # a Clock is all it needs here
                              max_connections=100, max_connections_per_client=2)
        a, b = object(), object()
        forwarder._track(a, "192.0.2.7:1000")
        forwarder._track(b, "192.0.2.7:1001")
        self.assertFalse(forwarder.admits("192.0.2.7:1002"))  # the same address
        self.assertTrue(forwarder.admits("192.0.2.8:1000"))
        self.assertTrue(forwarder.admits(None))  # unknown: only max_connections applies
        self.assertTrue(forwarder.admits("not an address"))
        forwarder._track(object(), "[2001:db8::1]:5")
        forwarder._track(object(), "[2001:db8::2]:5")
        self.assertFalse(forwarder.admits("[2001:db8::3]:5"))  # one /64
        self.assertTrue(forwarder.admits("[2001:db8:0:1::3]:5"))
        self.assertEqual(forwarder.client_limited, 2)
        forwarder._forget(a)
        self.assertTrue(forwarder.admits("192.0.2.7:1002"))
        forwarder._forget(b)
        self.assertEqual(forwarder._per_client, {"2001:db8::/64": 2})

    def test_a_pooled_headers_address_counts_as_its_text(self) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address

        forwarder = Forwarder(Clock(), {"address": "127.0.0.1:1", "proxy_protocol": False},  # type: ignore[arg-type]  # a Clock is all it needs here
                              max_connections=100, max_connections_per_client=1)
        forwarder._track(object(), IPv4Address("TCP", "192.0.2.7", 1000))
        self.assertFalse(forwarder.admits("192.0.2.7:1002"))
        self.assertFalse(forwarder.admits(IPv4Address("TCP", "192.0.2.7", 1003)))
        forwarder._track(object(), IPv6Address("TCP", "2001:db8::1", 5))
        self.assertFalse(forwarder.admits(IPv6Address("TCP", "2001:db8::9", 5)))  # one /64
        self.assertTrue(forwarder.admits(IPv6Address("TCP", "2001:db8:0:1::3", 5)))
        self.assertTrue(forwarder.admits(object()))  # no host: not limited per client
        self.assertEqual(forwarder._per_client, {"192.0.2.7": 1, "2001:db8::/64": 1})

    def test_the_internal_servers_proxy_header_names_the_pooled_headers_client(self) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address

        from epsproxy.net.proxy_protocol import ProxyHeader, proxy_v2_header

        forwarder = Forwarder(Clock(), {"address": "127.0.0.1:1", "proxy_protocol": True},  # type: ignore[arg-type]  # a Clock is all it needs here
                              max_connections=10)
        client = IPv4Address("TCP", "192.0.2.7", 4000)
        server = IPv4Address("TCP", "198.51.100.1", 443)
        self.assertEqual(forwarder._proxy_header(ProxyHeader(client, b"", server)),
                         proxy_v2_header("192.0.2.7:4000", "198.51.100.1:443"))
        # A destination of another family is left out; no client address: LOCAL.
        self.assertEqual(
            forwarder._proxy_header(ProxyHeader(client, b"", IPv6Address("TCP", "::1", 443))),
            proxy_v2_header("192.0.2.7:4000"))
        self.assertEqual(forwarder._proxy_header(ProxyHeader(None, b"", None)),
                         proxy_v2_header(None))

    def test_default_is_a_quarter_of_max_connections(self) -> None:
        forwarder = Forwarder(Clock(), {"address": "127.0.0.1:1"},  # type: ignore[arg-type]  # a Clock is all it needs here
                              max_connections=10)
        self.assertEqual(forwarder.per_client_cap, 2)
        forwarder.reconfigure({"address": "127.0.0.1:1"}, max_connections=10,
                              connect_timeout=1, idle_timeout=1, max_connections_per_client=7)
        self.assertEqual(forwarder.per_client_cap, 7)
