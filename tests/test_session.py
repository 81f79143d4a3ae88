"""
Tests for epsproxy.eps.links.session: one EPS link as a sans-IO machine, driven with
bytes, a certificate and numbers for the time; no sockets, no reactor, no Deferreds.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.eps.links import wire
from epsproxy.eps.links.peers import PeerRefused
from epsproxy.eps.links.session import (
    HANDLER_ERROR,
    CallTimeout,
    PeerGone,
    Session,
)
from epsproxy.directory.jsondir import DirectoryError
from epsproxy.rules.certificates import load_certificate_file
from tests.support.pki import pki


def leaf(name: str, alt: bool = False):
    return load_certificate_file(pki().tls(name, alt=alt)[0])


class Directory:
    """Pins the encryption certificates of hd-1 and hd-2."""

    def entry_for(self, name: str) -> dict[str, Any]:
        if name not in ("hd-1", "hd-2"):
            raise DirectoryError(f"no entry for {name}")
        return {"name": name, "certificates": [
            {"fingerprint": pki().fingerprints(name)["encryption"], "key_usage": "encryption"}]}


class Recorder:
    """A SessionEvents that records every event as a tuple."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def link_ready(self, peer):
        self.events.append(("ready", peer.name))

    def link_not_ready(self, error):
        self.events.append(("not_ready", type(error)))

    def link_refused(self, reason):
        self.events.append(("refused", reason))

    def serve(self, request):
        self.events.append(("serve", request))

    def answered(self, handle, response):
        self.events.append(("answered", handle, response))

    def call_failed(self, handle, error):
        self.events.append(("call_failed", handle, type(error)))

    def disconnect(self, abort):
        self.events.append(("disconnect", abort))


class SessionTests(SynchronousTestCase):
    def setUp(self):
        self.directory = Directory()
        self.events = Recorder()
        self.session = Session(self.directory, "hd-2", self.events, hello_timeout=10,
                               ping_interval=30, dead_after=90, max_line=1000)
        self.session.connection_made(0.0)

    def sent(self) -> list[wire.Frame]:
        return [wire.parse_frame(json.loads(line))
                for line in self.session.data_to_send().splitlines()]

    def taken(self) -> list[tuple[Any, ...]]:
        events, self.events.events = self.events.events, []
        return events

    def open(self, now: float = 0.0) -> None:
        self.session.handshake_done(leaf("hd-1"), now)
        self.assertEqual(self.sent(), [wire.Hello(1, "hd-2")])
        self.session.receive(wire.encode(wire.Hello(1, "")), now)
        self.assertEqual(self.taken(), [("ready", "hd-1")])
        self.assertTrue(self.session.is_open)

    # -- hello, identity, pinning -------------------------------------------------------

    def test_hello_exchange(self):
        self.assertFalse(self.session.is_open)
        self.assertEqual(self.session.next_deadline(), 10.0)
        self.open()
        self.assertEqual(self.session.peer.name, "hd-1")
        self.assertEqual(self.session.version, 1)
        self.assertEqual(self.session.next_deadline(), 30.0)

    def test_hello_split_in_pieces(self):
        self.session.handshake_done(leaf("hd-1"), 0)
        self.sent()
        line = wire.encode(wire.Hello(1, "hd-1"))
        for byte in line[:-1]:
            self.session.receive(bytes([byte]), 0)
        self.assertEqual(self.taken(), [])
        self.session.receive(line[-1:], 0)
        self.assertEqual(self.taken(), [("ready", "hd-1")])

    def test_unpinned_certificate_refused(self):
        self.session.handshake_done(leaf("hd-1", alt=True), 0)
        self.assertEqual(self.taken(), [("refused", "identity"),
                                        ("not_ready", PeerRefused), ("disconnect", False)])
        self.assertEqual(self.sent()[-1].code, wire.ERR_IDENTITY)
        self.assertTrue(self.session.is_closed)

    def test_no_certificate_refused(self):
        self.session.handshake_done(None, 0)
        self.assertEqual(self.taken()[1], ("not_ready", PeerRefused))

    def test_hello_with_another_name_refused(self):
        self.session.handshake_done(leaf("hd-1"), 0)
        self.sent()
        self.session.receive(wire.encode(wire.Hello(1, "hd-2")), 0)
        self.assertEqual(self.sent(), [wire.ErrorFrame(
            wire.ERR_IDENTITY, "hello name is not a name of the certificate")])
        self.assertEqual(self.taken(), [("refused", "identity"), ("disconnect", False)])
        self.session.connection_lost()
        self.assertEqual(self.taken(), [("not_ready", PeerGone)])

    def test_request_before_hello(self):
        self.session.handshake_done(leaf("hd-1"), 0)
        self.sent()
        self.session.receive(wire.encode(wire.Request("1", "x", {})), 0)
        self.assertEqual(self.sent()[-1].code, wire.ERR_PROTOCOL)
        self.assertEqual(self.taken(), [("refused", "malformed"), ("disconnect", False)])

    def test_version_zero_and_second_hello(self):
        self.session.handshake_done(leaf("hd-1"), 0)
        self.sent()
        self.session.receive(wire.encode(wire.Hello(0, "")), 0)
        self.assertEqual(self.sent()[-1].code, wire.ERR_VERSION)
        other = Session(self.directory, "hd-2", Recorder())
        other.handshake_done(leaf("hd-1"), 0)
        other.receive(wire.encode(wire.Hello(1, "")) * 2, 0)
        self.assertEqual(other.data_to_send().splitlines()[-1],
                         wire.encode(wire.ErrorFrame(wire.ERR_PROTOCOL, "second hello"))[:-1])

    def test_nothing_read_before_the_handshake(self):
        self.session.receive(wire.encode(wire.Hello(1, "")), 0)
        self.assertEqual(self.taken(), [])
        self.assertEqual(self.sent(), [])

    # -- pending calls ------------------------------------------------------------------

    def test_calls_matched_by_id_in_any_order(self):
        self.open()
        for i in range(3):
            self.session.call(f"c{i}", "m", {"i": i}, f"handle-{i}", 1.0)
        self.assertEqual([f.id for f in self.sent()], ["c0", "c1", "c2"])
        self.session.receive(b"".join(
            wire.encode(wire.Response(f"c{i}", {"i": i})) for i in (2, 0, 1)), 2.0)
        self.assertEqual([(e[1], e[2].result) for e in self.taken()],
                         [("handle-2", {"i": 2}), ("handle-0", {"i": 0}),
                          ("handle-1", {"i": 1})])

    def test_duplicate_call_id_refused_locally(self):
        self.open()
        self.session.call("7", "m", {}, "h", 0)
        self.assertRaises(ValueError, self.session.call, "7", "m", {}, "h2", 0)
        self.assertEqual(self.session.new_call_id(), "1")

    def test_call_before_hello_sent_after(self):
        self.session.handshake_done(leaf("hd-1"), 0)
        self.sent()
        self.session.call("e1", "early", {}, "h", 0)
        self.assertEqual(self.sent(), [])
        self.session.receive(wire.encode(wire.Hello(2, "hd-1")), 1)
        self.assertEqual(self.sent(), [wire.Request("e1", "early", {})])

    def test_oversized_call_fails_locally(self):
        self.open()
        self.assertRaises(wire.LineTooLong, self.session.call, "1", "m", {"a": "x" * 2000},
                          "h", 0)
        self.assertTrue(self.session.is_open)

    def test_call_timeout_then_late_response_dropped(self):
        self.open()
        self.session.call("1", "m", {}, "h", 0, timeout=5)
        self.assertEqual(self.session.next_deadline(), 5)
        self.session.timer_due(4.9)
        self.assertEqual(self.taken(), [])
        self.session.timer_due(5)
        self.assertEqual(self.taken(), [("call_failed", "h", CallTimeout)])
        self.session.receive(wire.encode(wire.Response("1", {})), 6)
        self.assertEqual(self.taken(), [])
        self.assertTrue(self.session.is_open)

    def test_answered_call_does_not_time_out(self):
        self.open()
        self.session.call("1", "m", {}, "h", 0, timeout=5)
        self.session.receive(wire.encode(wire.Response("1", {})), 1)
        self.taken()
        self.session.call("1", "m", {}, "h2", 1, timeout=10)  # same id, reused
        self.session.timer_due(6)
        self.assertEqual(self.taken(), [])
        self.session.timer_due(11)
        self.assertEqual(self.taken(), [("call_failed", "h2", CallTimeout)])

    def test_cancelled_call_forgotten(self):
        self.open()
        self.session.call("1", "m", {}, "h", 0, timeout=5)
        self.session.forget("1")
        self.session.timer_due(10)
        self.session.receive(wire.encode(wire.Response("1", {})), 10)
        self.assertEqual(self.taken(), [])

    def test_many_answered_calls_keep_few_deadlines(self):
        self.open()
        for i in range(1000):
            self.session.call(str(i), "m", {}, i, i, timeout=60)
            self.session.receive(wire.encode(wire.Response(str(i), {})), i)
        self.assertLess(len(self.session._deadlines), 200)

    def test_pending_calls_fail_when_connection_lost(self):
        self.open()
        self.session.call("1", "m", {}, "a", 0)
        self.session.call("2", "m", {}, "b", 0)
        self.session.connection_lost()
        self.assertEqual(self.taken(), [("call_failed", "a", PeerGone),
                                        ("call_failed", "b", PeerGone)])
        self.assertRaises(PeerGone, self.session.call, "3", "m", {}, "c", 0)
        self.assertIsNone(self.session.next_deadline())

    # -- serving ------------------------------------------------------------------------

    def test_request_served_and_answered(self):
        self.open()
        request = wire.Request("r1", "m", {"x": 1})
        self.session.receive(wire.encode(request), 1)
        self.assertEqual(self.taken(), [("serve", request)])
        self.session.answer(request, {"ok": True}, 2)
        self.assertEqual(self.sent(), [wire.Response("r1", {"ok": True})])
        self.session.answer(wire.Request("r2", "m", {}), None, 2)
        self.assertEqual(self.sent(), [wire.Response("r2", {})])

    def test_handler_failure_and_bad_result(self):
        self.open()
        request = wire.Request("r1", "m", {})
        try:
            raise RuntimeError("broke")
        except RuntimeError:
            failure = Failure()
        self.session.answer(request, failure, 1)
        self.assertEqual(self.sent()[0].error, {"code": HANDLER_ERROR, "message": "broke"})
        self.session.answer(request, ["not", "an", "object"], 1)
        self.assertEqual(self.sent()[0].error["code"], HANDLER_ERROR)
        self.flushLoggedErrors(RuntimeError, wire.MalformedFrame)

    def test_duplicate_incoming_id_is_protocol_error(self):
        self.open()
        self.session.receive(wire.encode(wire.Request("1", "x", {})) * 2, 1)
        self.assertEqual(self.sent()[-1].code, wire.ERR_PROTOCOL)
        self.assertIn(("refused", "malformed"), self.taken())

    def test_answer_after_close_not_sent(self):
        self.open()
        request = wire.Request("r1", "m", {})
        self.session.receive(wire.encode(request), 1)
        self.session.close(wire.ERR_SHUTDOWN, "bye", 1)
        self.sent()
        self.session.answer(request, {}, 2)
        self.assertEqual(self.sent(), [])

    # -- heartbeats ---------------------------------------------------------------------

    def test_ping_when_idle_pong_answered(self):
        self.open()
        self.session.timer_due(29)
        self.assertEqual(self.sent(), [])
        self.session.timer_due(30)
        self.assertEqual(self.sent(), [wire.Ping("1")])
        self.assertEqual(self.session.next_deadline(), 60)
        self.session.receive(wire.encode(wire.Ping("abc")), 31)
        self.assertEqual(self.sent(), [wire.Pong("abc")])

    def test_dead_peer_closed(self):
        self.open()
        for now in (30, 60):
            self.session.timer_due(now)
        self.session.timer_due(90)
        self.assertEqual(self.sent()[-1],
                         wire.ErrorFrame(wire.ERR_TIMEOUT, "peer silent for too long"))
        self.assertEqual(self.taken(), [("disconnect", False)])

    def test_trickle_is_not_a_sign_of_life(self):
        self.open()
        self.session.receive(b" ", 50)
        self.assertEqual(self.session.next_deadline(), 30)
        self.session.receive(wire.encode(wire.Pong("1")), 50)
        self.assertEqual(self.session.next_deadline(), 30)
        self.session.timer_due(30)
        self.assertEqual(self.session.next_deadline(), 60)

    # -- timeouts before the hello, close reasons, bad frames ---------------------------

    def test_no_handshake_in_time(self):
        self.session.timer_due(10)
        self.assertEqual(self.taken(), [("refused", "hello_timeout"), ("disconnect", True)])
        self.assertEqual(self.sent(), [])
        self.session.connection_lost("aborted")
        self.assertEqual(self.taken(), [("not_ready", PeerGone)])

    def test_no_hello_in_time(self):
        self.session.handshake_done(leaf("hd-1"), 1)
        self.sent()
        self.session.timer_due(10)
        self.assertEqual(self.sent(), [wire.ErrorFrame(wire.ERR_TIMEOUT, "no hello received")])

    def test_handshake_failure_counted(self):
        self.session.connection_lost("tls error")
        self.assertEqual(self.taken(), [("refused", "handshake_failed"), ("not_ready", PeerGone)])

    def test_error_frame_from_peer_closes(self):
        self.open()
        self.session.receive(wire.encode(wire.ErrorFrame(wire.ERR_SHUTDOWN, "bye")), 1)
        self.assertEqual(self.taken(), [("disconnect", False)])
        self.assertEqual(self.sent(), [])
        self.assertTrue(self.session.is_closed)

    def test_close_sends_reason(self):
        self.open()
        self.session.close(wire.ERR_SHUTDOWN, "idle", 1)
        self.assertEqual(self.sent(), [wire.ErrorFrame(wire.ERR_SHUTDOWN, "idle")])
        self.session.close(wire.ERR_SHUTDOWN, "again", 1)
        self.assertEqual(self.sent(), [])

    def test_oversized_line(self):
        self.open()
        self.session.receive(b'{"t":"req","id":"1","m":"x","p":{"a":"' + b"x" * 2000, 1)
        self.assertEqual(self.sent()[-1].code, wire.ERR_LINE_TOO_LONG)
        self.assertEqual(self.taken(), [("refused", "line_too_long"), ("disconnect", False)])

    def test_malformed_line_after_good_frames(self):
        self.open()
        good = wire.encode(wire.Request("1", "x", {}))
        self.session.receive(good + b"{not json}\n", 1)
        events = self.taken()
        self.assertEqual(events[0][0], "serve")
        self.assertEqual(events[1:], [("refused", "malformed"), ("disconnect", False)])
        self.assertEqual(self.sent()[-1].code, wire.ERR_MALFORMED)

    def test_truncated_frame_waits(self):
        self.open()
        line = wire.encode(wire.Request("1", "x", {}))
        self.session.receive(line[:5], 1)
        self.assertEqual(self.taken(), [])
        self.assertTrue(self.session.is_open)
        self.session.receive(line[5:], 1)
        self.assertEqual(self.taken()[0][0], "serve")
