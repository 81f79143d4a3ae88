"""
Tests for the channels to the own operator (``jsonrpc_client``, ``stdout``) and the example
locations service, over real loopback sockets.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

from epsproxy.eps.addresses import parse_address
from epsproxy.eps.broker import ClientInfo, Request, Response
from epsproxy.eps.channels.local import (
    JSONRPCClientChannel,
    LocalChannelError,
    LocalServiceUnreachable,
    StdoutChannel,
)
from epsproxy.dev.examples import locations
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS
from epsproxy.net.jsonrpc.server import listen_jsonrpc
from tests.support.connections import ConnectionTracker

OWN = "ls-1"
CLIENT = ClientInfo("hd-1", {"name": "hd-1"})
OWN_ENTRY = {
    "name": OWN,
    "services": [
        {"name": "locations", "methods": [{"name": "add"}, {"name": "lookup"}]},
        {"name": "other", "methods": [{"name": "secret"}]},
    ],
}


class FakeDirectory:
    """Just the own entry."""

    name = OWN

    def own_entry(self) -> dict[str, Any]:
        return OWN_ENTRY


def request(method: str, params: dict[str, Any] | None, inner: str = "1") -> Request:
    """An EPS request for ``ls-1.<method>`` as the broker hands it to a channel."""
    return Request(method=f"{OWN}.{method}", params=params, id=f"{OWN}.{method}({inner})")


class Hang(resource.Resource):
    """Answers nothing, ever (until the connection goes)."""

    isLeaf = True

    def render_POST(self, request: server.Request) -> int:
        return server.NOT_DONE_YET


class Reply(resource.Resource):
    """Answers every POST with one JSON-RPC reply echoing the request id."""

    isLeaf = True

    def __init__(self, **reply: Any) -> None:
        super().__init__()
        self.reply = reply
        self.seen: list[dict[str, Any]] = []

    def render_POST(self, request: server.Request) -> bytes:
        call = json.loads(request.content.read())
        self.seen.append(call)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"jsonrpc": "2.0", **self.reply, "id": call["id"]}).encode()


class NetworkTestCase(unittest.TestCase):
    """Listeners and channels on loopback, all closed (server connections too) at the end."""

    def setUp(self) -> None:
        self.tracker = ConnectionTracker()
        self.addCleanup(self.tracker.close_all)

    def track(self, factory: Any) -> Any:
        return self.tracker.track(factory)

    @defer.inlineCallbacks
    def listen(self, site: Any) -> Any:
        """Serve ``site`` on 127.0.0.1:<free port>; returns the port number."""
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.track(site))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def locations_service(self) -> Any:
        """The example service, in-process; returns its port."""
        site, settings = locations.make_site(reactor, bind="127.0.0.1:0")
        port = yield listen_jsonrpc(reactor, self.track(site), settings)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def channel(self, port: int, **kw: Any) -> JSONRPCClientChannel:
        settings = {"endpoint": f"http://127.0.0.1:{port}/jsonrpc"}
        if "timeout" in kw:
            settings["timeout"] = kw.pop("timeout")
        channel = JSONRPCClientChannel(
            "local", OWN, JSONRPC_CLIENT_SETTINGS.validate(settings), reactor, **kw)
        # Registered after the connection cleanup, so it runs first (LIFO).
        self.addCleanup(channel.close)
        return channel


class JSONRPCClientChannelTests(NetworkTestCase):
    """The ``jsonrpc_client`` channel against the locations service and stub servers."""

    @defer.inlineCallbacks
    def test_add_then_lookup(self):
        channel = self.channel((yield self.locations_service()))
        client = {"name": "hd-1", "entry": {"name": "hd-1"}}
        added = yield channel.deliver(
            request("add", {"name": "alice", "id": "loc-7", "_client": client}), CLIENT)
        self.assertEqual(added, Response(id="ls-1.add(1)", result={"_": "ok"}))
        found = yield channel.deliver(
            request("lookup", {"name": "alice", "_client": client}, "n:2"), CLIENT)
        self.assertEqual(found, Response(id="ls-1.lookup(n:2)", result={"_": "loc-7"}))

    @defer.inlineCallbacks
    def test_lookup_missing_is_error_2(self):
        channel = self.channel((yield self.locations_service()))
        response = yield channel.deliver(request("lookup", {"name": "bob"}), CLIENT)
        self.assertEqual(response.id, "ls-1.lookup(1)")
        self.assertIsNone(response.result)
        self.assertEqual(response.error, {"code": 2, "message": "not found"})

    @defer.inlineCallbacks
    def test_invalid_params_and_unknown_method(self):
        channel = self.channel((yield self.locations_service()))
        bad = yield channel.deliver(request("add", {"name": "x", "id": 5}), CLIENT)
        self.assertEqual(bad.error["code"], -32602)
        self.assertIsInstance(bad.error["data"], dict)
        unknown = yield channel.deliver(request("nope", {}), CLIENT)
        self.assertEqual(unknown.error, {"code": -32601, "message": "method not found"})

    @defer.inlineCallbacks
    def test_request_on_the_wire(self):
        """Method from the address, params as received, id = the full EPS id."""
        stub = Reply(result={"a": 1})
        channel = self.channel((yield self.listen(server.Site(stub))))
        params = {"x": [1, 2], "_client": {"name": "hd-1", "entry": {}}}
        response = yield channel.deliver(request("check", params, "abc"), CLIENT)
        self.assertEqual(response, Response(id="ls-1.check(abc)", result={"a": 1}))
        self.assertEqual(stub.seen, [{"jsonrpc": "2.0", "method": "check", "params": params,
                                      "id": "ls-1.check(abc)"}])
        # Without params the service still gets an object.
        yield channel.deliver(request("check", None, "2"), CLIENT)
        self.assertEqual(stub.seen[-1]["params"], {})

    @defer.inlineCallbacks
    def test_non_object_results_and_error_data_are_wrapped(self):
        for value in (None, 0, "s", [1, 2], True):
            channel = self.channel((yield self.listen(server.Site(Reply(result=value)))))
            response = yield channel.deliver(request("m", {}), CLIENT)
            self.assertEqual(response.result, {"_": value})
            self.assertIsNone(response.error)
        for data, expected in ((7, {"_": 7}), ({"k": 1}, {"k": 1}), ([1], {"_": [1]})):
            stub = Reply(error={"code": 9, "message": "m", "data": data})
            channel = self.channel((yield self.listen(server.Site(stub))))
            response = yield channel.deliver(request("m", {}), CLIENT)
            self.assertEqual(response.error, {"code": 9, "message": "m", "data": expected})
            self.assertIsNone(response.result)

    @defer.inlineCallbacks
    def test_service_down(self):
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory())
        port = listening.getHost().port
        yield listening.stopListening()
        channel = self.channel(port)
        error = yield self.assertFailure(
            channel.deliver(request("add", {}), CLIENT), LocalServiceUnreachable)
        self.assertIn(f"local service at http://127.0.0.1:{port}/jsonrpc is unreachable",
                      str(error))
        self.assertIn("cannot connect", str(error))

    @defer.inlineCallbacks
    def test_timeout(self):
        channel = self.channel((yield self.listen(server.Site(Hang()))), timeout=0.2)
        error = yield self.assertFailure(
            channel.deliver(request("add", {}), CLIENT), LocalServiceUnreachable)
        self.assertIn("unreachable", str(error))
        self.assertIn("within 0.2s", str(error))

    @defer.inlineCallbacks
    def test_garbled_reply_is_unreachable(self):
        class Garbage(resource.Resource):
            isLeaf = True

            def render_POST(self, request: server.Request) -> bytes:
                return b"<html>not json</html>"

        channel = self.channel((yield self.listen(server.Site(Garbage()))))
        error = yield self.assertFailure(
            channel.deliver(request("add", {}), CLIENT), LocalServiceUnreachable)
        self.assertIn("not a JSON-RPC response", str(error))

    def test_bad_id_fails(self):
        channel = self.channel(1)
        d = channel.deliver(Request("ls-1.add", {}, "not-an-address"), CLIENT)
        self.failureResultOf(d, LocalChannelError)

    def test_can_deliver_to_own_operator_only(self):
        channel = self.channel(1)
        self.assertEqual(channel.type, "jsonrpc_client")
        self.assertEqual(channel.name, "local")
        self.assertTrue(channel.can_deliver_to(parse_address("ls-1.add(1)")))
        self.assertTrue(channel.can_deliver_to(parse_address("ls-1.anything(1)")))
        for other in ("hd-1.add(1)", "ls-1x.add(1)", "ls.add(1)", "a.ls-1.add(1)"):
            self.assertFalse(channel.can_deliver_to(parse_address(other)), other)

    def test_services_filter(self):
        channel = self.channel(1, services=frozenset({"locations"}),
                               directory=FakeDirectory())
        self.assertTrue(channel.can_deliver_to(parse_address("ls-1.add(1)")))
        self.assertTrue(channel.can_deliver_to(parse_address("ls-1.lookup(1)")))
        self.assertFalse(channel.can_deliver_to(parse_address("ls-1.secret(1)")))
        self.assertFalse(channel.can_deliver_to(parse_address("ls-1.unknown(1)")))
        self.assertFalse(channel.can_deliver_to(parse_address("hd-1.add(1)")))
        empty = self.channel(1, services=frozenset(), directory=FakeDirectory())
        self.assertFalse(empty.can_deliver_to(parse_address("ls-1.add(1)")))

    def test_services_filter_needs_directory(self):
        settings = JSONRPC_CLIENT_SETTINGS.validate({"endpoint": "http://127.0.0.1:1/"})
        self.assertRaises(LocalChannelError, JSONRPCClientChannel, "local", OWN, settings,
                          reactor, services=frozenset({"locations"}))


class StdoutChannelTests(unittest.SynchronousTestCase):
    """The ``stdout`` channel."""

    def test_prints_indented_json_and_answers_nothing(self):
        stream = io.StringIO()
        channel = StdoutChannel("out", OWN, stream=stream)
        self.assertEqual(channel.type, "stdout")
        params = {"name": "alice", "_client": {"name": "hd-1", "entry": {}}}
        d = channel.deliver(request("add", params, "7"), CLIENT)
        self.assertIsNone(self.successResultOf(d))
        text = stream.getvalue()
        self.assertEqual(json.loads(text),
                         {"method": "ls-1.add", "params": params, "id": "ls-1.add(7)"})
        self.assertTrue(text.startswith('{\n  "method": "ls-1.add",\n  "params": {\n    '))
        self.assertTrue(text.endswith("\n}\n"))

    def test_null_params(self):
        stream = io.StringIO()
        channel = StdoutChannel("out", OWN, stream=stream)
        self.assertIsNone(self.successResultOf(channel.deliver(request("m", None), CLIENT)))
        self.assertEqual(json.loads(stream.getvalue())["params"], None)

    def test_default_stream_is_stdout(self):
        stream = io.StringIO()
        self.patch(sys, "stdout", stream)
        StdoutChannel("out", OWN).deliver(request("m", {}), CLIENT)
        self.assertIn('"id": "ls-1.m(1)"', stream.getvalue())

    def test_can_deliver_to_own_operator_only(self):
        channel = StdoutChannel("out", OWN, stream=io.StringIO())
        self.assertTrue(channel.can_deliver_to(parse_address("ls-1.x(1)")))
        self.assertFalse(channel.can_deliver_to(parse_address("hd-1.x(1)")))
        self.assertFalse(channel.can_deliver_to(parse_address("ls-1.ga.x(1)")))


class LocationStoreTests(unittest.SynchronousTestCase):
    """The locations store without the network."""

    def test_add_replace_lookup_and_cap(self):
        store = locations.LocationStore(limit=2)
        ctx: Any = None
        self.assertEqual(store.add({"name": "a", "id": "1"}, ctx), "ok")
        self.assertEqual(store.add({"name": "a", "id": "2"}, ctx), "ok")
        self.assertEqual(store.lookup({"name": "a"}, ctx), "2")
        store.add({"name": "b", "id": "3"}, ctx)
        error = self.assertRaises(locations.JSONRPCError, store.add,
                                  {"name": "c", "id": "4"}, ctx)
        self.assertEqual((error.code, error.message), (locations.TOO_MANY,
                                                        "too many locations"))
        # Replacing an existing name is still allowed when full.
        self.assertEqual(store.add({"name": "b", "id": "5"}, ctx), "ok")
        error = self.assertRaises(locations.JSONRPCError, store.lookup, {"name": "c"}, ctx)
        self.assertEqual((error.code, error.message), (2, "not found"))

    def test_params_schema(self):
        dispatcher = locations.make_dispatcher(locations.LocationStore())
        ctx: Any = None
        self.assertEqual(
            dispatcher.handle("add", {"name": "a", "id": "1", "_client": {"x": 1}}, ctx), "ok")
        for bad in ({}, {"name": "a"}, {"name": "", "id": "1"}, {"name": "a", "id": 1},
                    {"name": "a" * 1025, "id": "1"}, {"name": ["a"], "id": "1"}):
            error = self.assertRaises(locations.JSONRPCError, dispatcher.handle, "add",
                                      bad, ctx)
            self.assertEqual(error.code, -32602, bad)
        error = self.assertRaises(locations.JSONRPCError, dispatcher.handle, "lookup",
                                  {"name": None}, ctx)
        self.assertEqual(error.code, -32602)


class _Output(protocol.ProcessProtocol):
    """Collects a child's stdout; ``listening`` fires with the port it logs."""

    def __init__(self) -> None:
        self.out = b""
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        match = re.search(rb"listening on 127\.0\.0\.1:(\d+)/jsonrpc", self.out)
        if match and not self.listening.called:
            self.listening.callback(int(match[1]))

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"exited early: {self.out[-2000:]!r}"))
        self.ended.callback(None)


class CommandLineTests(NetworkTestCase):
    """``python -m epsproxy.dev.examples.locations`` as a real process."""

    def test_bad_bind_is_a_usage_error(self):
        self.patch(sys, "stderr", io.StringIO())
        for bad in ("nonsense", "127.0.0.1:abc", "127.0.0.1:99999", "a:b:c"):
            error = self.assertRaises(SystemExit, locations.main, ["--bind", bad])
            self.assertEqual(error.code, 2)
            self.assertIn("--bind:", sys.stderr.getvalue())

    @defer.inlineCallbacks
    def test_runs_and_serves(self):
        output = _Output()
        process = reactor.spawnProcess(
            output, sys.executable,
            [sys.executable, "-m", "epsproxy.dev.examples.locations", "--bind", "127.0.0.1:0"],
            env=dict(os.environ))

        def stop() -> defer.Deferred[Any]:
            if not output.ended.called:
                process.signalProcess("TERM")
            return output.ended

        self.addCleanup(stop)
        port = yield output.listening
        channel = self.channel(port)
        added = yield channel.deliver(request("add", {"name": "n", "id": "i"}), CLIENT)
        self.assertEqual(added.result, {"_": "ok"})
        found = yield channel.deliver(request("lookup", {"name": "n"}), CLIENT)
        self.assertEqual(found.result, {"_": "i"})
