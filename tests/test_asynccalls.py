"""
Tests for epsproxy.eps.asynccalls: the tables of asynchronous calls on both ends (callee:
acknowledged/respond; caller: expect/wait/result_arrived), driven with a task.Clock and
recording fakes for ``send_result`` and ``push``; plus hostile params.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.eps.asynccalls import AsyncCalls
from epsproxy.eps.asyncrpc import (
    AMBIGUOUS,
    BAD_RESULT,
    DELIVERY_FAILED,
    MAX_ID_LENGTH,
    NOT_FOUND,
    AcknowledgingChannel,
    AsyncCallError,
    is_acknowledgement,
    parse_respond,
    unwrap,
    wrap,
)
from epsproxy.eps.broker import ClientInfo, Request, Response
from epsproxy.net.jsonrpc.envelope import INVALID_PARAMS, NO_RESULT, JSONRPCError, id_to_internal

X = "ls-1.add(n:7)"
SECRET = "patient-4711-secret"


class Recorder:
    """A ``send_result`` or ``push`` that records its calls and answers ``answer``."""

    def __init__(self, answer: Any = None) -> None:
        self.calls: list[Any] = []
        self.answer = answer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs if kwargs else args)
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent = Recorder()
        self.pushed = Recorder()

    def calls(self, own: str = "ls-1", **kwargs: Any) -> AsyncCalls:
        return AsyncCalls(self.clock, own, send_result=self.sent, push=self.pushed, **kwargs)

    def error_of(self, d: defer.Deferred[Any]) -> JSONRPCError:
        return self.failureResultOf(d, JSONRPCError).value


class HelpersTests(SynchronousTestCase):
    def test_is_acknowledgement(self) -> None:
        self.assertTrue(is_acknowledgement(Response("x", {"_async": True})))
        self.assertTrue(is_acknowledgement({"_async": True, "message": "later"}))
        for no in (Response("x", {"_async": 1}), Response("x", {"_async": "true"}),
                   Response("x", {"async": True}), Response("x", None),
                   Response("x", None, {"code": 1, "message": "m"}),
                   Response("x", {"_async": True}, {"code": 1, "message": "m"}),
                   None, True, [{"_async": True}], {"_": {"_async": True}}):
            self.assertFalse(is_acknowledgement(no), no)

    def test_wrap_unwrap(self) -> None:
        for value in (5, "x", None, [1], True):
            self.assertEqual(wrap(value), {"_": value})
            self.assertEqual(unwrap(wrap(value)), value)
        self.assertEqual(wrap({"a": 1}), {"a": 1})
        self.assertEqual(unwrap({"_": 1, "b": 2}), {"_": 1, "b": 2})


class ParseRespondTests(SynchronousTestCase):
    def refused(self, params: Any, request_id: str = "abc") -> str:
        e = self.assertRaises(JSONRPCError, parse_respond, params, request_id)
        self.assertEqual(e.code, INVALID_PARAMS)
        return e.message

    def test_id_from_request(self) -> None:
        self.assertEqual(parse_respond({"result": 5}, X), (X, 5, None, None))

    def test_id_from_params(self) -> None:
        # The JSON-RPC id (an int, internally "n:3") is the service's own.
        self.assertEqual(parse_respond({"id": X, "result": None}, id_to_internal(3)),
                         (X, None, None, None))
        self.assertEqual(parse_respond({"id": X, "result": 1}, X), (X, 1, None, None))

    def test_error_and_client(self) -> None:
        error = {"code": 2, "message": "not found", "data": [1]}
        self.assertEqual(parse_respond({"id": X, "error": error, "client": "hd-1"}, "r"),
                         (X, NO_RESULT, error, "hd-1"))

    def test_ids_disagree(self) -> None:
        self.assertIn("different calls", self.refused({"id": X, "result": 1}, "hd-1.add(1)"))

    def test_no_usable_id(self) -> None:
        self.assertIn("needs the id", self.refused({"result": 1}, id_to_internal(5)))
        self.assertIn("needs the id", self.refused({"result": 1}, "not-an-address"))
        self.assertIn("needs the id", self.refused({"result": 1}, "x" * (MAX_ID_LENGTH + 1)))

    def test_hostile(self) -> None:
        self.refused(None)
        self.refused([X])
        for bad_id in (5, True, [X], {"a": 1}, "x" * (MAX_ID_LENGTH + 1)):
            self.refused({"id": bad_id, "result": 1})
        self.assertIn("exactly one", self.refused({"id": X}))
        self.assertIn("exactly one", self.refused({"id": X, "result": 1, "error": None}))
        for bad in (None, [], "x", {"code": "1", "message": "m"}, {"code": True, "message": "m"},
                    {"code": 1.5, "message": "m"}, {"code": 1}, {"code": 1, "message": 2},
                    {"code": 2**70, "message": "m"}):
            self.refused({"id": X, "error": bad})
        for client in (5, "", "x" * (MAX_ID_LENGTH + 1)):
            self.refused({"id": X, "result": 1, "client": client})


class CalleeTests(Base):
    def test_respond_sends_result(self) -> None:
        calls = self.calls()
        calls.acknowledged("hd-1", X)
        self.assertEqual(calls.pending_acknowledged, 1)
        d = calls.respond(X, 5)
        self.assertEqual(self.successResultOf(d), {"message": "delivered"})
        self.assertEqual(self.sent.calls, [("hd-1", {"id": X, "result": {"_": 5}})])
        self.assertEqual((calls.acknowledged_count, calls.responded, calls.sent), (1, 1, 1))
        self.assertEqual(calls.pending_acknowledged, 0)

    def test_respond_error_wraps_data(self) -> None:
        calls = self.calls()
        calls.acknowledged("hd-1", X)
        d = calls.respond(X, error={"code": 7, "message": "no", "data": "why", "x": 1})
        self.successResultOf(d)
        self.assertEqual(self.sent.calls[0][1],
                         {"id": X, "error": {"code": 7, "message": "no", "data": {"_": "why"}}})

    def test_unknown_id(self) -> None:
        calls = self.calls()
        e = self.error_of(calls.respond(X, {"a": 1}))
        self.assertEqual(e.code, NOT_FOUND)
        self.assertIn("is waiting for a response", e.message)
        self.assertEqual((calls.refused, self.sent.calls), (1, []))

    def test_only_once(self) -> None:
        calls = self.calls()
        calls.acknowledged("hd-1", X)
        self.successResultOf(calls.respond(X, 1))
        self.assertEqual(self.error_of(calls.respond(X, 2)).code, NOT_FOUND)
        self.assertEqual(len(self.sent.calls), 1)

    def test_expired(self) -> None:
        calls = self.calls(expire_after=10)
        calls.acknowledged("hd-1", X)
        self.clock.advance(9.9)
        calls.acknowledged("hd-2", "hd-2.x(1)")
        self.clock.advance(0.1)
        self.assertEqual(self.error_of(calls.respond(X, 1)).code, NOT_FOUND)
        self.assertEqual((calls.expired, calls.pending_acknowledged), (1, 1))

    def test_acknowledged_again_restarts_expiry(self) -> None:
        calls = self.calls(expire_after=10)
        calls.acknowledged("hd-1", X)
        self.clock.advance(8)
        calls.acknowledged("hd-1", X)
        self.clock.advance(8)
        self.assertEqual(calls.pending_acknowledged, 1)
        self.successResultOf(calls.respond(X, 1))

    def test_cap_drops_oldest(self) -> None:
        calls = self.calls(max_pending=2)
        for n in range(3):
            calls.acknowledged("hd-1", f"ls-1.add({n})")
        self.assertEqual((calls.pending_acknowledged, calls.evicted), (2, 1))
        self.assertEqual(self.error_of(calls.respond("ls-1.add(0)", 1)).code, NOT_FOUND)
        self.successResultOf(calls.respond("ls-1.add(2)", 1))

    def test_send_failure_is_reported_and_entry_not_restored(self) -> None:
        self.sent.answer = ConnectionError("link down")
        calls = self.calls()
        calls.acknowledged("hd-1", X)
        e = self.error_of(calls.respond(X, 1))
        self.assertEqual(e.code, DELIVERY_FAILED)
        self.assertIn("link down", e.message)
        self.assertEqual(self.error_of(calls.respond(X, 1)).code, NOT_FOUND)
        self.assertEqual(calls.send_failed, 1)

    def test_no_send_result(self) -> None:
        calls = AsyncCalls(self.clock, "ls-1")
        calls.acknowledged("hd-1", X)
        self.assertEqual(self.error_of(calls.respond(X, 1)).code, DELIVERY_FAILED)

    def test_bad_params(self) -> None:
        calls = self.calls()
        calls.acknowledged("hd-1", X)
        for args, kwargs in (((X,), {}), ((X, 1), {"error": {"code": 1, "message": "m"}}),
                             ((X,), {"error": {"code": "1", "message": "m"}}),
                             ((X,), {"error": "boom"}), ((5, 1), {}), (("", 1), {}),
                             (("x" * (MAX_ID_LENGTH + 1), 1), {})):
            e = self.error_of(calls.respond(*args, **kwargs))
            self.assertEqual(e.code, INVALID_PARAMS, (args, kwargs))
        # Nothing was consumed by the refused attempts.
        self.successResultOf(calls.respond(X, 1))

    def test_two_callers_same_id(self) -> None:
        calls = self.calls()
        calls.acknowledged("hd-1", X)
        calls.acknowledged("hd-2", X)
        self.assertEqual(self.error_of(calls.respond(X, 1)).code, AMBIGUOUS)
        self.assertEqual(self.error_of(calls.respond(X, 1, caller="hd-3")).code, NOT_FOUND)
        self.successResultOf(calls.respond(X, 1, caller="hd-2"))
        self.successResultOf(calls.respond(X, 2))
        self.assertEqual([c[0] for c in self.sent.calls], ["hd-2", "hd-1"])

    def test_hostile_acknowledgements_are_not_noted(self) -> None:
        calls = self.calls()
        calls.acknowledged("hd-1", "x" * (MAX_ID_LENGTH + 1))
        calls.acknowledged("", X)
        self.assertEqual(calls.pending_acknowledged, 0)
        self.assertRaises(TypeError, calls.acknowledged, "hd-1", 5)

    def test_constructor_checks(self) -> None:
        self.assertRaises(ValueError, AsyncCalls, self.clock, "x", expire_after=0)
        self.assertRaises(ValueError, AsyncCalls, self.clock, "x", max_pending=0)


class CallerTests(Base):
    def test_result_is_pushed(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        answer = calls.result_arrived("ls-1", {"id": X, "result": {"_": [1, 2]}})
        self.assertEqual(answer, {"message": "delivered"})
        self.assertEqual(self.pushed.calls, [
            {"method": "respond", "params": {"id": 7, "result": [1, 2]}, "id": X}])
        self.assertEqual((calls.expected_count, calls.delivered), (1, 1))

    def test_error_is_pushed_unwrapped(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "nn:7")
        calls.result_arrived("ls-1", {"id": X, "error": {"code": 3, "message": "m",
                                                         "data": {"_": "d"}}, "extra": 1})
        self.assertEqual(self.pushed.calls[0]["params"],
                         {"id": "n:7", "error": {"code": 3, "message": "m", "data": "d"}})

    def test_wrong_peer(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        e = self.assertRaises(AsyncCallError, calls.result_arrived, "hd-2",
                              {"id": X, "result": {}})
        self.assertEqual(e.code, NOT_FOUND)
        self.assertEqual(e.as_dict()["code"], NOT_FOUND)
        self.assertEqual(self.pushed.calls, [])
        # The rightful peer can still answer.
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        self.assertEqual(len(self.pushed.calls), 1)

    def test_twice(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        e = self.assertRaises(AsyncCallError, calls.result_arrived, "ls-1",
                              {"id": X, "result": {}})
        self.assertEqual(e.code, NOT_FOUND)
        self.assertEqual((len(self.pushed.calls), calls.refused), (1, 1))

    def test_expired(self) -> None:
        calls = self.calls(own="hd-1", expire_after=60)
        calls.expect("ls-1", X, "n:7")
        self.clock.advance(60)
        self.assertRaises(AsyncCallError, calls.result_arrived, "ls-1", {"id": X, "result": {}})
        self.assertEqual(calls.expired, 1)

    def test_cap(self) -> None:
        calls = self.calls(own="hd-1", max_pending=2)
        for n in range(3):
            calls.expect("ls-1", f"ls-1.add({n})", str(n))
        self.assertEqual((calls.pending_expected, calls.evicted), (2, 1))
        self.assertRaises(AsyncCallError, calls.result_arrived, "ls-1",
                          {"id": "ls-1.add(0)", "result": {}})
        calls.result_arrived("ls-1", {"id": "ls-1.add(2)", "result": {}})

    def test_malformed(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        for params in (None, [X], {"result": {}}, {"id": 5, "result": {}},
                       {"id": "", "result": {}}, {"id": "x" * (MAX_ID_LENGTH + 1), "result": {}},
                       {"id": X}, {"id": X, "result": {}, "error": {"code": 1, "message": "m"}},
                       {"id": X, "result": 5}, {"id": X, "result": None},
                       {"id": X, "error": {"code": 1, "message": "m", "data": 5}},
                       {"id": X, "error": {"code": True, "message": "m"}},
                       {"id": X, "error": {"code": 1}}, {"id": X, "error": "bad"}):
            e = self.assertRaises(AsyncCallError, calls.result_arrived, "ls-1", params)
            self.assertEqual(e.code, BAD_RESULT, params)
        # None of it consumed the entry.
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        self.assertEqual(len(self.pushed.calls), 1)

    def test_no_push_drops(self) -> None:
        calls = AsyncCalls(self.clock, "hd-1")
        calls.expect("ls-1", X, "n:7")
        self.assertEqual(calls.result_arrived("ls-1", {"id": X, "result": {}}),
                         {"message": "delivered"})
        self.assertEqual(calls.dropped, 1)

    def test_push_failure_counted(self) -> None:
        self.pushed.answer = JSONRPCError(-32601, "method not found")
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        self.assertEqual((calls.push_failed, calls.delivered), (1, 0))

    def test_expect_again_replaces(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:1")
        calls.expect("ls-1", X, "n:2")
        self.assertEqual(calls.pending_expected, 1)
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        self.assertEqual(self.pushed.calls[0]["params"]["id"], 2)


class WaitTests(Base):
    def test_result_answers_waiting_request(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        d = calls.wait("ls-1", X, 5)
        self.assertNoResult(d)
        calls.result_arrived("ls-1", {"id": X, "result": {"_": 12}})
        self.assertEqual(self.successResultOf(d), {"result": 12})
        self.assertEqual(self.pushed.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_error_answers_waiting_request(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        d = calls.wait("ls-1", X, 5)
        calls.result_arrived("ls-1", {"id": X, "error": {"code": 9, "message": "m"}})
        self.assertEqual(self.successResultOf(d), {"error": {"code": 9, "message": "m"}})

    def test_timeout_then_push(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        d = calls.wait("ls-1", X, 5)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        calls.result_arrived("ls-1", {"id": X, "result": {"a": 1}})
        self.assertEqual(self.pushed.calls[0]["params"], {"id": 7, "result": {"a": 1}})

    def test_cancelled_wait_leaves_push(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        d = calls.wait("ls-1", X, 5)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        self.assertEqual(len(self.pushed.calls), 1)

    def test_nothing_expected(self) -> None:
        calls = self.calls(own="hd-1")
        self.assertIsNone(self.successResultOf(calls.wait("ls-1", X, 5)))
        calls.expect("ls-1", X, "n:7")
        self.assertIsNone(self.successResultOf(calls.wait("ls-1", X, 0)))

    def test_second_waiter_releases_first(self) -> None:
        calls = self.calls(own="hd-1")
        calls.expect("ls-1", X, "n:7")
        first = calls.wait("ls-1", X, 5)
        second = calls.wait("ls-1", X, 5)
        self.assertIsNone(self.successResultOf(first))
        calls.result_arrived("ls-1", {"id": X, "result": {}})
        self.assertEqual(self.successResultOf(second), {"result": {}})

    def test_expiry_releases_waiter(self) -> None:
        calls = self.calls(own="hd-1", expire_after=10)
        calls.expect("ls-1", X, "n:7")
        d = calls.wait("ls-1", X, 100)
        self.clock.advance(10)
        calls.purge()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OwnOperatorTests(Base):
    """An application calls an asynchronous service of its own operator."""

    def test_respond_delivers_locally(self) -> None:
        calls = self.calls(own="hd-1")
        x = "hd-1.add(n:7)"
        calls.acknowledged("hd-1", x)
        calls.expect("hd-1", x, "n:7")
        waiting = calls.wait("hd-1", x, 5)
        self.assertEqual(self.successResultOf(calls.respond(x, "done")),
                         {"message": "delivered"})
        self.assertEqual(self.successResultOf(waiting), {"result": "done"})
        self.assertEqual(self.sent.calls, [])

    def test_respond_pushes_locally(self) -> None:
        calls = self.calls(own="hd-1")
        x = "hd-1.add(n:7)"
        calls.acknowledged("hd-1", x)
        calls.expect("hd-1", x, "n:7")
        self.successResultOf(calls.respond(x, error={"code": 5, "message": "m", "data": 1}))
        self.assertEqual(self.pushed.calls, [{
            "method": "respond", "id": x,
            "params": {"id": 7, "error": {"code": 5, "message": "m", "data": 1}}}])

    def test_nothing_expected_locally(self) -> None:
        calls = self.calls(own="hd-1")
        calls.acknowledged("hd-1", "hd-1.add(1)")
        e = self.error_of(calls.respond("hd-1.add(1)", 1))
        self.assertEqual(e.code, DELIVERY_FAILED)


class LoggingTests(Base):
    """Results are health data: they never reach the log."""

    def test_no_contents_logged(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.pushed.answer = JSONRPCError(1, "nope")
        calls = self.calls(own="hd-1", max_pending=1)
        calls.acknowledged("hd-2", X)
        calls.expect("ls-1", X, "n:7")
        self.successResultOf(calls.respond(X, {"name": SECRET}))
        calls.result_arrived("ls-1", {"id": X, "result": {"name": SECRET}})
        self.assertRaises(AsyncCallError, calls.result_arrived, "ls-1",
                          {"id": X, "result": {"name": SECRET}})
        self.assertRaises(AsyncCallError, calls.result_arrived, "ls-1",
                          {"id": X, "result": SECRET})
        long_id = "ls-1.add(" + "y" * 5000 + ")"
        calls.acknowledged("hd-2", long_id[:MAX_ID_LENGTH - 1] + ")")
        calls.acknowledged("hd-2", "ls-1.other(1)")
        self.assertTrue(events)
        for event in events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn(SECRET, text)
            self.assertNotIn("y" * 500, text)


class AcknowledgingChannelTests(Base):
    class Inner:
        name, type = "local", "jsonrpc_client"

        def __init__(self, result: Any) -> None:
            self.result = result
            self.closed = False

        def can_deliver_to(self, address: Any) -> bool:
            return True

        def deliver(self, request: Request, client: ClientInfo, address: Any = None) -> Any:
            return defer.succeed(Response(request.id, self.result))

        def close(self) -> None:
            self.closed = True

    def test_notes_acknowledgements_only(self) -> None:
        calls = self.calls()
        inner = self.Inner({"_async": True})
        channel = AcknowledgingChannel(inner, calls)
        self.assertEqual((channel.name, channel.type), ("local", "jsonrpc_client"))
        self.assertTrue(channel.can_deliver_to(None))
        response = self.successResultOf(
            channel.deliver(Request("ls-1.add", {}, X), ClientInfo("hd-1", {})))
        self.assertEqual(response.result, {"_async": True})
        inner.result = {"ok": 1}
        self.successResultOf(
            channel.deliver(Request("ls-1.add", {}, "ls-1.add(2)"), ClientInfo("hd-1", {})))
        self.assertEqual(calls.pending_acknowledged, 1)
        self.successResultOf(calls.respond(X, 1))
        channel.close()
        self.assertTrue(inner.closed)
