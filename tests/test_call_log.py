"""
One log line per call the broker handles (issue 12, item 5), over a real link between
two endpoint servers: the caller (the operator the certificate proved), the method, the
outcome and the duration as structured fields; a denied call is one line too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from epsproxy.net.jsonrpc.envelope import JSONRPCError
from tests.support.eps import (
    Network,
    client_channel,
    gateway_channel,
    gateway_client,
    server_channel,
    service,
)

HD = ("health-departments",)


class CallLog(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        net = self.net = Network(self)
        net.operator("hd-1", ["health-departments"], [service("internals", HD, "_ping")])
        net.operator("hd-2", ["health-departments"], [
            service("internals", HD, "_ping"),
            service("admin", ("administrators",), "wipe"),
        ])
        yield net.start("hd-2", [server_channel("hd-2"), client_channel("hd-2"),
                                 {"name": "out", "type": "stdout"}])
        yield net.start("hd-1", [server_channel("hd-1"), client_channel("hd-1"),
                                 gateway_channel("hd-1")])
        for name in ("hd-1", "hd-2"):
            net.channels(name, {"type": "eps_client"},
                         {"type": "eps_server",
                          "settings": {"address": net.server_address(name)}})
        self.hd1 = gateway_client(self, net.gateway_url("hd-1"))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def call_lines(self, node: str) -> list[dict[str, Any]]:
        """The call lines ``node``'s broker logged."""
        broker = self.net.nodes[node].broker
        return [e for e in self.events
                if e.get("log_source") is broker and "outcome" in e and "caller" in e]

    def check_line(self, event: dict[str, Any], level: LogLevel, **fields: Any) -> None:
        self.assertEqual(event["log_level"], level)
        for key, value in fields.items():
            self.assertEqual(event[key], value, key)
        self.assertIsInstance(event["duration"], float)
        self.assertGreaterEqual(event["duration"], 0.0)
        self.assertLess(event["duration"], 10.0)

    @defer.inlineCallbacks
    def test_a_call_is_one_line_on_each_side(self):
        result = yield self.hd1.call("hd-2._ping", {}, id="p1")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        [sent] = self.call_lines("hd-1")
        [served] = self.call_lines("hd-2")
        for event in (sent, served):
            self.check_line(event, LogLevel.info, caller="hd-1", method="hd-2._ping",
                            outcome="ok")
        text = formatEvent(served)
        self.assertTrue(text.startswith("call hd-2._ping from hd-1: ok in "), text)
        # the side that served it took no longer than the side that asked
        self.assertLessEqual(served["duration"], sent["duration"])

    @defer.inlineCallbacks
    def test_a_denied_call_is_one_line_with_outcome_denied(self):
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("hd-2.wipe", {}, id="w1")
        self.assertEqual(e.exception.code, 403)
        [denied] = self.call_lines("hd-2")
        self.check_line(denied, LogLevel.info, caller="hd-1", method="hd-2.wipe",
                        outcome="denied", reason="permission denied")
        # and no second line about the same refusal
        about = [e for e in self.events if "denied" in (formatEvent(e) or "").lower()]
        self.assertEqual(about, [denied])
        # the caller's side saw the 403 come back
        [sent] = self.call_lines("hd-1")
        self.check_line(sent, LogLevel.info, caller="hd-1", method="hd-2.wipe",
                        outcome="error_response")

    @defer.inlineCallbacks
    def test_a_call_that_fails_says_why(self):
        # hd-3 is not in the directory: hd-1's broker refuses, one line with the reason
        with self.assertRaises(JSONRPCError):
            yield self.hd1.call("hd-3._ping", {}, id="x1")
        [failed] = self.call_lines("hd-1")
        self.check_line(failed, LogLevel.info, caller="hd-1", method="hd-3._ping",
                        outcome="failed")
        self.assertIn("hd-3", failed["reason"])
        self.assertEqual(self.call_lines("hd-2"), [])
