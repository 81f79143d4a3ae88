"""
Tests for epsproxy.eps.broker: the message broker (SPEC §9, §10), step by step, with a
json directory in a temp folder and fake channels that record what they get.  Includes
the fixes of SPEC §23.2 #18 (method and id must agree) and #19 (loops keyed by caller
and id), and that ``_client`` is always the broker's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.directory.jsondir import JSONDirectory
from epsproxy.eps.addresses import Address
from epsproxy.eps.broker import (
    CHANNEL_ERROR,
    INVALID_REQUEST,
    PERMISSION_DENIED,
    Broker,
    BrokerError,
    ClientInfo,
    Request,
    Response,
    rfc3339nano,
)


def rec(name: str, section: str, data: Any) -> dict:
    return {"name": name, "section": section, "data": data,
            "created_at": "2021-05-17T10:00:00Z"}


def perm(group: str) -> dict:
    return {"group": group, "rights": ["call"]}


def method(name: str, *groups: str) -> dict:
    return {"name": name, "permissions": [perm(g) for g in groups]}


RECORDS = [
    rec("hd-1", "groups", ["health-departments"]),
    rec("hd-1", "channels", [{"type": "grpc_client", "settings": None}]),
    rec("hd-2", "groups", ["health-departments"]),
    rec("hd-2", "channels", [{"type": "grpc_server",
                              "settings": {"address": "localhost:8889"}}]),
    rec("hd-2", "services", [
        {"name": "internals", "permissions": [perm("health-departments")],
         "methods": [method("_ping"), method("_directory")]},
        {"name": "arith", "permissions": [], "methods": [method("add", "ops")]},
        {"name": "public", "permissions": [perm("*")], "methods": [method("hello")]},
        {"name": "connection-requests", "permissions": [perm("proxy-providers")],
         "methods": [method("_connectionRequest")]},
    ]),
    rec("op-1", "groups", ["ops"]),
    rec("pp-1", "groups", ["proxy-providers"]),
]


class FakeChannel:
    """A channel that delivers to the operators in ``accepts`` and records requests."""

    def __init__(
        self,
        name: str,
        type: str,
        accepts: tuple[str, ...] = (),
        answer: Callable[[Request, ClientInfo], Any] | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.accepts = accepts
        self.answer = answer or (lambda request, client: Response(request.id, {"ok": True}))
        self.delivered: list[tuple[Request, ClientInfo]] = []
        self.asked: list[Address] = []

    def can_deliver_to(self, address: Address) -> bool:
        self.asked.append(address)
        return address.operator in self.accepts

    def deliver(self, request: Request, client_info: ClientInfo, address: Any = None) -> Any:
        self.delivered.append((request, client_info))
        return self.answer(request, client_info)


class ConnectionChannel(FakeChannel):
    """A channel that also handles ``_connectionRequest``."""

    def __init__(self, name: str, type: str, handle: Callable[[Any], Any]) -> None:
        super().__init__(name, type)
        self.handle = handle
        self.offered: list[Any] = []

    def handle_connection_request(self, params: Any) -> Any:
        self.offered.append(params)
        return self.handle(params)


class BrokerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "001.json").write_text(json.dumps({"records": RECORDS}))
        self.directory = JSONDirectory(folder, "hd-2")
        self.clock = Clock()
        self.observed: list[tuple[str, str, float]] = []

    def broker(self, *channels: Any, **kwargs: Any) -> Broker:
        kwargs.setdefault("observe", lambda *a: self.observed.append(a))
        return Broker(self.directory, list(channels), self.clock, **kwargs)

    def client(self, name: str) -> ClientInfo:
        return ClientInfo(name, {"name": name, "forged": True})

    def call(self, broker: Broker, caller: str | None, method: str, id: str,
             params: Any = None) -> Any:
        """Deliver and return the result of the (already fired) Deferred."""
        info = None if caller is None else self.client(caller)
        params = {} if params is None else params
        return self.successResultOf(broker.deliver(Request(method, params, id), info))

    def fails(self, broker: Broker, caller: str | None, method: str, id: Any,
              params: Any = None) -> str:
        info = None if caller is None else self.client(caller)
        params = {} if params is None else params
        failure = self.failureResultOf(broker.deliver(Request(method, params, id), info),
                                       BrokerError)
        return str(failure.value)


class CallerAndAddressTests(BrokerTestCase):
    """Steps 2-7: caller, own entry, `_client`, address, method/id agreement."""

    def test_client_info_missing(self) -> None:
        ch = FakeChannel("out", "grpc_client", ("hd-1",))
        self.assertEqual(self.fails(self.broker(ch), None, "hd-1.x", "hd-1.x(1)"),
                         "client info missing")
        self.assertEqual(ch.delivered, [])

    def test_unknown_caller(self) -> None:
        ch = FakeChannel("out", "grpc_client", ("hd-1",))
        message = self.fails(self.broker(ch), "nobody", "hd-1.x", "hd-1.x(1)")
        self.assertTrue(message.startswith("error retrieving directory entry for client nobody"))
        self.assertEqual(ch.delivered, [])

    def test_unknown_target_operator(self) -> None:
        ch = FakeChannel("out", "grpc_client", ("ghost",))
        message = self.fails(self.broker(ch), "hd-2", "ghost.x", "ghost.x(1)")
        self.assertTrue(message.startswith("error retrieving directory entry for operator ghost"))
        self.assertEqual(ch.delivered, [])

    def test_bad_id_format(self) -> None:
        ch = FakeChannel("out", "grpc_client", ("hd-1",))
        broker = self.broker(ch)
        for bad in ["hd-1.x()", "respond(abc)", "respond(hd-1.add(1))", "hd-1.add(1)(2)",
                    "", "x" * 5000 + ".y(1)", "hd-1.x(1)\n"]:
            self.assertEqual(self.fails(broker, "hd-2", "hd-1.x", bad),
                             "error parsing address: invalid ID format")
        for bad in [None, 17, ["a"]]:
            self.assertEqual(self.fails(broker, "hd-2", "hd-1.x", bad),
                             "error parsing address: invalid ID format")
        self.assertEqual(ch.delivered, [])

    def test_own_entry_missing(self) -> None:
        self.directory.name = "not-there"
        message = self.fails(self.broker(), "hd-1", "hd-1.x", "hd-1.x(1)")
        self.assertTrue(message.startswith("error retrieving own directory entry"))

    def test_method_disagreeing_with_id_is_refused(self) -> None:
        # SPEC §23.2 #18: authorised as _ping, delivered as secret -- not here.
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        for m in ["hd-2.secret", "hd-1._ping", "_ping", "hd-2._ping(1)", "", None, 5]:
            response = self.call(broker, "hd-1", m, "hd-2._ping(1)")
            self.assertIsInstance(response, Response)
            self.assertEqual(response.id, "hd-2._ping(1)")
            self.assertIsNone(response.result)
            self.assertEqual(response.error["code"], INVALID_REQUEST)
            self.assertIn("does not match the address 'hd-2._ping'", response.error["message"])
        self.assertEqual(ch.delivered, [])
        self.assertEqual(self.observed[-1][:2], ("_ping", "invalid"))

    def test_oversized_method_is_not_echoed_in_full(self) -> None:
        response = self.call(self.broker(), "hd-1", "hd-2." + "x" * 10000, "hd-2._ping(1)")
        self.assertEqual(response.error["code"], INVALID_REQUEST)
        self.assertLess(len(response.error["message"]), 600)

    def test_client_is_replaced_and_params_not_mutated(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        params = {"a": 1, "_client": {"name": "hd-2", "entry": {"groups": ["ops"]}}}
        self.call(broker, "op-1", "hd-2.add", "hd-2.add(1)", params)
        request, client = ch.delivered[0]
        op1 = self.directory.entry_for("op-1")
        self.assertEqual(request.params, {"a": 1, "_client": {"name": "op-1", "entry": op1}})
        self.assertIs(request.params["_client"]["entry"], client.entry)
        self.assertEqual(client, ClientInfo("op-1", op1))  # not the forged entry
        self.assertEqual(params["_client"]["name"], "hd-2")  # caller's dict untouched
        self.assertEqual(request.method, "hd-2.add")
        self.assertEqual(request.id, "hd-2.add(1)")

    def test_null_params_stay_null(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        d = broker.deliver(Request("hd-2.add", None, "hd-2.add(1)"), self.client("op-1"))
        self.successResultOf(d)
        self.assertIsNone(ch.delivered[0][0].params)

    def test_params_not_an_object(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        d = self.broker(ch).deliver(Request("hd-2.add", [1, 2], "hd-2.add(1)"),
                                    self.client("op-1"))
        self.failureResultOf(d, BrokerError)
        self.assertEqual(ch.delivered, [])


class PermissionTests(BrokerTestCase):
    """Step 8: CanCall(caller, own entry, method from the id)."""

    def denied(self, caller: str, m: str) -> Response:
        return Response(f"hd-2.{m}(1)", error={
            "code": PERMISSION_DENIED,
            "message": f"Permission denied for method '{m}' and client '{caller}'"})

    def test_service_level(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        self.assertEqual(self.call(broker, "op-1", "hd-2._ping", "hd-2._ping(1)"),
                         self.denied("op-1", "_ping"))
        self.assertEqual(self.call(broker, "hd-1", "hd-2._ping", "hd-2._ping(1)").id, "1")
        self.assertEqual(self.observed[0][:2], ("_ping", "denied"))

    def test_method_level(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        self.assertEqual(self.call(broker, "hd-1", "hd-2.add", "hd-2.add(1)"),
                         self.denied("hd-1", "add"))
        self.assertEqual(ch.delivered, [])
        self.call(broker, "op-1", "hd-2.add", "hd-2.add(1)")
        self.assertEqual([c.name for _, c in ch.delivered], ["op-1"])

    def test_star_group(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        for caller in ["hd-1", "op-1", "pp-1"]:
            self.call(broker, caller, "hd-2.hello", "hd-2.hello(1)")
        self.assertEqual(len(ch.delivered), 3)

    def test_unknown_method_denied(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        self.assertEqual(self.call(self.broker(ch), "hd-1", "hd-2.nope", "hd-2.nope(1)"),
                         self.denied("hd-1", "nope"))

    def test_local_caller_unchecked(self) -> None:
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch)
        response = self.call(broker, "hd-2", "hd-2.nope", "hd-2.nope(1)")
        self.assertEqual(response.result, {"ok": True})
        self.assertEqual(ch.delivered[0][1].name, "hd-2")

    def test_forwarding_checked_against_own_entry(self) -> None:
        # A remote caller asking us to forward to a third operator needs rights on us.
        ch = FakeChannel("out", "grpc_client", ("hd-1",))
        broker = self.broker(ch)
        response = self.call(broker, "op-1", "hd-1._ping", "hd-1._ping(1)")
        self.assertEqual(response.error["code"], PERMISSION_DENIED)
        self.assertEqual(ch.delivered, [])
        self.call(broker, "op-1", "hd-1.add", "hd-1.add(1)")
        self.assertEqual(len(ch.delivered), 1)


class InternalMethodTests(BrokerTestCase):
    """Step 9: _ping, _directory, _connectionRequest."""

    def test_ping_shape(self) -> None:
        self.clock.advance(1_700_000_000.25)
        ch = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        broker = self.broker(ch, version="1.2.3")
        response = self.call(broker, "hd-1", "hd-2._ping", "hd-2._ping(n:1)", {"x": [1]})
        hd1, hd2 = self.directory.entry_for("hd-1"), self.directory.own_entry()
        self.assertEqual(response, Response("n:1", {
            "version": "1.2.3",
            "timestamp": "2023-11-14T22:13:20.25Z",
            "params": {"x": [1], "_client": {"name": "hd-1", "entry": hd1}},
            "serverInfo": hd2,
        }))
        self.assertEqual(ch.delivered, [])
        self.assertEqual(self.observed, [("_ping", "ok", 0.0)])

    def test_ping_default_version(self) -> None:
        response = self.call(self.broker(), "hd-2", "hd-2._ping", "hd-2._ping(a.b)")
        self.assertEqual(response.id, "a.b")
        self.assertEqual(response.result["version"], "development")
        self.assertEqual(response.result["timestamp"], "1970-01-01T00:00:00Z")

    def test_internal_name_for_other_operator_goes_to_channel(self) -> None:
        ch = FakeChannel("out", "grpc_client", ("hd-1",))
        response = self.call(self.broker(ch), "hd-2", "hd-1._ping", "hd-1._ping(1)")
        self.assertEqual(response.result, {"ok": True})
        self.assertEqual(len(ch.delivered), 1)

    def test_directory_query(self) -> None:
        broker = self.broker()
        names = lambda r: [e["name"] for e in r.result["entries"]]  # noqa: E731
        r = self.call(broker, "hd-1", "hd-2._directory", "hd-2._directory(1)",
                      {"group": "health-departments"})
        self.assertEqual(r.id, "1")
        self.assertEqual(names(r), ["hd-1", "hd-2"])
        self.assertEqual(r.result["entries"][0], self.directory.entry_for("hd-1"))
        r = self.call(broker, "hd-1", "hd-2._directory", "hd-2._directory(1)",
                      {"operator": "op-1", "group": ""})
        self.assertEqual(names(r), ["op-1"])
        r = self.call(broker, "hd-1", "hd-2._directory", "hd-2._directory(1)",
                      {"channels": ["eps_server"]})
        self.assertEqual(names(r), ["hd-2"])
        r = self.call(broker, "hd-1", "hd-2._directory", "hd-2._directory(1)",
                      {"channels": []})
        self.assertEqual(names(r), [])
        d = broker.deliver(Request("hd-2._directory", None, "hd-2._directory(1)"),
                           self.client("hd-2"))
        self.assertEqual(len(self.successResultOf(d).result["entries"]), 4)

    def test_directory_bad_query(self) -> None:
        broker = self.broker()
        for params in [{"channels": "grpc_server"}, {"group": 5}, {"channels": [1]}]:
            message = self.fails(broker, "hd-1", "hd-2._directory", "hd-2._directory(1)",
                                 params)
            self.assertTrue(message.startswith("error handling internal request: "), message)

    def test_connection_request_routing(self) -> None:
        plain = FakeChannel("local", "jsonrpc_client", ("hd-2",))
        first = ConnectionChannel("a", "grpc_server", lambda p: defer.succeed(None))
        second = ConnectionChannel("b", "eps_client",
                                   lambda p: Response("x", {"accepted": "b"}))
        third = ConnectionChannel("c", "stdout", lambda p: Response("y", {"accepted": "c"}))
        broker = self.broker(plain, first, second, third)
        response = self.call(broker, "pp-1", "hd-2._connectionRequest",
                             "hd-2._connectionRequest(ff)", {"token": "t"})
        self.assertEqual(response, Response("x", {"accepted": "b"}))
        self.assertEqual(first.offered, second.offered)
        self.assertEqual(first.offered[0]["_client"]["name"], "pp-1")
        self.assertEqual(third.offered, [])
        self.assertEqual(plain.delivered, [])

    def test_connection_request_denied_for_others(self) -> None:
        ch = ConnectionChannel("a", "grpc_server", lambda p: Response("x", {}))
        response = self.call(self.broker(ch), "hd-1", "hd-2._connectionRequest",
                             "hd-2._connectionRequest(ff)")
        self.assertEqual(response.error["code"], PERMISSION_DENIED)
        self.assertEqual(ch.offered, [])

    def test_connection_request_nobody_accepts(self) -> None:
        ch = ConnectionChannel("a", "grpc_server", lambda p: None)
        for broker in [self.broker(ch), self.broker()]:
            message = self.fails(broker, "pp-1", "hd-2._connectionRequest",
                                 "hd-2._connectionRequest(ff)")
            self.assertEqual(message,
                             "error handling internal request: no channel accepted the request")

    def test_connection_request_error_aborts(self) -> None:
        def boom(params: Any) -> Any:
            raise ValueError("socket refused")

        first = ConnectionChannel("a", "grpc_server", boom)
        second = ConnectionChannel("b", "grpc_client", lambda p: Response("x", {}))
        message = self.fails(self.broker(first, second), "pp-1", "hd-2._connectionRequest",
                             "hd-2._connectionRequest(ff)")
        self.assertEqual(message, "error handling internal request: socket refused")
        self.assertEqual(second.offered, [])

    def test_connection_request_async_result_wrapped(self) -> None:
        pending: defer.Deferred[Response] = defer.Deferred()
        ch = ConnectionChannel("a", "grpc_server", lambda p: pending)
        d = self.broker(ch).deliver(
            Request("hd-2._connectionRequest", {}, "hd-2._connectionRequest(ff)"),
            self.client("hd-2"))
        self.assertNoResult(d)
        pending.callback(Response("ff", [1, 2]))
        self.assertEqual(self.successResultOf(d), Response("ff", {"_": [1, 2]}))


class ChannelTests(BrokerTestCase):
    """Steps 10-11: channel selection, errors, result wrapping."""

    def test_first_capable_channel_wins(self) -> None:
        a = FakeChannel("a", "stdout", ("hd-1",))
        b = FakeChannel("b", "jsonrpc_client", ("hd-2",))
        c = FakeChannel("c", "grpc_client", ("hd-2",))
        broker = self.broker(a, b, c)
        self.call(broker, "hd-2", "hd-2.add", "hd-2.add(1)")
        self.assertEqual((len(a.delivered), len(b.delivered), len(c.delivered)), (0, 1, 0))
        self.assertEqual(c.asked, [])
        self.assertEqual(a.asked, [Address("hd-2", "add", "1")])

    def test_channel_error_is_500_without_fallback(self) -> None:
        def boom(request: Request, client: ClientInfo) -> Any:
            return defer.fail(RuntimeError("connection refused"))

        a = FakeChannel("main", "jsonrpc_client", ("hd-2",), boom)
        b = FakeChannel("spare", "grpc_client", ("hd-2",))
        response = self.call(self.broker(a, b), "hd-2", "hd-2.add", "hd-2.add(1)")
        self.assertEqual(response, Response("hd-2.add(1)", error={
            "code": CHANNEL_ERROR,
            "message": "Channel main encountered an error delivering the message: "
                       "connection refused"}))
        self.assertEqual(b.delivered, [])
        self.assertEqual(self.observed[-1][:2], ("add", "channel_error"))

    def test_channel_raising_synchronously_or_bad_answer(self) -> None:
        def raises(request: Request, client: ClientInfo) -> Any:
            raise KeyError("k")

        for answer in [raises, lambda r, c: "not a response"]:
            ch = FakeChannel("main", "jsonrpc_client", ("hd-2",), answer)
            response = self.call(self.broker(ch), "hd-2", "hd-2.add", "hd-2.add(1)")
            self.assertEqual(response.error["code"], CHANNEL_ERROR)

    def test_no_channel(self) -> None:
        ch = FakeChannel("a", "grpc_client", ("hd-1",))
        self.assertEqual(self.fails(self.broker(ch), "hd-2", "hd-2.add", "hd-2.add(1)"),
                         "no channel can deliver this request")
        self.assertEqual(self.observed[-1][:2], ("add", "failed"))

    def test_can_deliver_to_raising(self) -> None:
        ch = FakeChannel("a", "grpc_client", ("hd-1",))
        ch.can_deliver_to = lambda address: 1 / 0  # type: ignore[method-assign]
        message = self.fails(self.broker(ch), "hd-2", "hd-1.add", "hd-1.add(1)")
        self.assertIn("channel a failed to check the address", message)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_results_passed_and_wrapped(self) -> None:
        answers = [
            (None, None),
            (Response("i", {"a": 1}), Response("i", {"a": 1})),
            (Response("i", 5), Response("i", {"_": 5})),
            (Response("i", []), Response("i", {"_": []})),
            (Response("i", None, {"code": 7, "message": "m", "data": "d"}),
             Response("i", None, {"code": 7, "message": "m", "data": {"_": "d"}})),
            (Response("i", None, {"code": 7, "message": "m"}),
             Response("i", None, {"code": 7, "message": "m"})),
        ]
        for given_, expected in answers:
            ch = FakeChannel("a", "jsonrpc_client", ("hd-2",), lambda r, c: given_)
            self.assertEqual(self.call(self.broker(ch), "hd-2", "hd-2.add", "hd-2.add(1)"),
                             expected)

    def test_duplicate_channel_types_refused(self) -> None:
        with self.assertRaises(BrokerError):
            self.broker(FakeChannel("a", "grpc_server"), FakeChannel("b", "eps_server"))

    def test_observe_hook_errors_do_not_break_delivery(self) -> None:
        def broken(*args: Any) -> None:
            raise RuntimeError("metrics down")

        ch = FakeChannel("a", "jsonrpc_client", ("hd-2",))
        response = self.call(self.broker(ch, observe=broken), "hd-2", "hd-2.add",
                             "hd-2.add(1)")
        self.assertEqual(response.result, {"ok": True})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LoopTests(BrokerTestCase):
    """Step 1: loop detection by (caller, id) (SPEC §23.2 #19)."""

    def test_reentry_with_same_caller_and_id_is_a_loop(self) -> None:
        inner: list[Any] = []

        def reenter(request: Request, client: ClientInfo) -> Any:
            d = broker.deliver(Request("hd-2.add", {}, "hd-2.add(1)"), ClientInfo("op-1", {}))
            inner.append(d)
            return d

        ch = FakeChannel("a", "jsonrpc_client", ("hd-2",), reenter)
        broker = self.broker(ch)
        response = self.call(broker, "op-1", "hd-2.add", "hd-2.add(1)")
        self.assertEqual(response.error["code"], CHANNEL_ERROR)
        self.assertIn("request hd-2.add(1) is already being processed (maybe a delivery loop)",
                      response.error["message"])
        self.assertEqual(len(ch.delivered), 1)
        # Over: the same caller and id may come again.
        self.assertEqual(broker._in_transit, set())
        self.call(broker, "op-1", "hd-2.add", "hd-2.add(1)")
        self.assertEqual(len(ch.delivered), 2)

    def test_same_id_from_different_callers_does_not_collide(self) -> None:
        pending: list[defer.Deferred[Response]] = []

        def later(request: Request, client: ClientInfo) -> Any:
            d: defer.Deferred[Response] = defer.Deferred()
            pending.append(d)
            return d

        ch = FakeChannel("a", "jsonrpc_client", ("hd-2",), later)
        broker = self.broker(ch)
        d1 = broker.deliver(Request("hd-2.add", {}, "hd-2.add(1)"), self.client("op-1"))
        d2 = broker.deliver(Request("hd-2.add", {}, "hd-2.add(1)"), self.client("hd-2"))
        d3 = broker.deliver(Request("hd-2.add", {}, "hd-2.add(1)"), self.client("op-1"))
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.assertIn("already being processed", str(self.failureResultOf(d3).value))
        pending[0].callback(Response("hd-2.add(1)", {"n": 1}))
        pending[1].errback(RuntimeError("gone"))
        self.assertEqual(self.successResultOf(d1).result, {"n": 1})
        self.assertEqual(self.successResultOf(d2).error["code"], CHANNEL_ERROR)
        self.assertEqual(broker._in_transit, set())

    def test_in_transit_cleared_after_broker_errors(self) -> None:
        broker = self.broker()
        self.fails(broker, "hd-2", "hd-2.add", "hd-2.add(1)")
        self.fails(broker, "hd-2", "hd-2.add", "hd-2.add(1)")
        self.assertEqual(broker._in_transit, set())

    def test_cancel_passes_through(self) -> None:
        ch = FakeChannel("a", "jsonrpc_client", ("hd-2",), lambda r, c: defer.Deferred())
        broker = self.broker(ch)
        d = broker.deliver(Request("hd-2.add", {}, "hd-2.add(1)"), self.client("hd-2"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(broker._in_transit, set())


class TimestampTests(SynchronousTestCase):
    def test_format(self) -> None:
        self.assertEqual(rfc3339nano(0), "1970-01-01T00:00:00Z")
        self.assertEqual(rfc3339nano(1.5), "1970-01-01T00:00:01.5Z")
        self.assertEqual(rfc3339nano(0.000001), "1970-01-01T00:00:00.000001Z")
        self.assertEqual(rfc3339nano(1_621_245_600.123456), "2021-05-17T10:00:00.123456Z")

    @settings(deadline=None, max_examples=50)
    @given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
    def test_shape(self, seconds: float) -> None:
        text = rfc3339nano(seconds)
        self.assertRegex(text, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,5}[1-9])?Z$")
