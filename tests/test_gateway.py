"""
Tests for the gateway (``jsonrpc_server`` channel, SPEC §12.1) and asynchronous calls over
real sockets: an EPS gateway for ``hd-1`` over HTTPS with client certificates from the dev
PKI, a Broker over the dev directory, and a small real JSON-RPC service behind a
``jsonrpc_client`` channel.  The ``respond`` flows run on one EPS (caller and callee are
the same operator), so no EPS-to-EPS link is needed.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from epsproxy.net import tls
from epsproxy.directory.jsondir import JSONDirectory
from epsproxy.eps.asynccalls import AsyncCalls
from epsproxy.eps.asyncrpc import AcknowledgingChannel
from epsproxy.eps.broker import Broker
from epsproxy.eps.channels.gateway import (
    GATEWAY_SETTINGS,
    GatewayError,
    JSONRPCServerChannel,
    prefer_wait,
)
from epsproxy.eps.channels.local import JSONRPCClientChannel, StdoutChannel
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import Dispatcher, JSONRPCError
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site
from tests.support.connections import ConnectionTracker
from tests.support.pki import pki

OWN = "hd-1"
DEV_DIRECTORY = Path(__file__).resolve().parent.parent / "conf" / "dev" / "directory"


def server_tls() -> dict[str, Any]:
    crt, key = pki().tls(OWN)
    return {"ca_certificate_files": [str(pki().root)], "certificate_file": str(crt),
            "key_file": str(key)}


def client_tls(with_certificate: bool = True) -> dict[str, Any]:
    settings: dict[str, Any] = {"ca_certificate_files": [str(pki().root)]}
    if with_certificate:
        crt, key = pki().tls("hd-2")
        settings.update(certificate_file=str(crt), key_file=str(key))
    return settings


@implementer(IPolicyForHTTPS)
class Policy:
    """Client TLS that expects the server to be ``hd-1`` whatever the URL says."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return tls.client_options(self.settings, OWN)


class Service:
    """
    A small local JSON-RPC service: ``add`` (a number: wrapped and unwrapped on the way),
    ``obj``, ``fail`` (error with non-object data), ``later`` (acknowledges) and
    ``respond`` (where pushed results arrive).
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any], str]] = []
        self.pushed: list[tuple[dict[str, Any], str]] = []
        self.push_arrived: defer.Deferred[Any] = defer.Deferred()
        self.dispatcher = Dispatcher()
        for name in ("add", "obj", "fail", "later", "respond"):
            self.dispatcher.register(name, None, getattr(self, name))

    def add(self, params: dict[str, Any], context: Any) -> Any:
        self.seen.append(("add", params, context.request_id))
        return params["a"] + params["b"]

    def obj(self, params: dict[str, Any], context: Any) -> Any:
        return {"x": [1, 2]}

    def fail(self, params: dict[str, Any], context: Any) -> Any:
        raise JSONRPCError(7, "nope", "why")

    def later(self, params: dict[str, Any], context: Any) -> Any:
        self.seen.append(("later", params, context.request_id))
        return {"_async": True, "message": "later"}

    def respond(self, params: dict[str, Any], context: Any) -> Any:
        self.pushed.append((params, context.request_id))
        d, self.push_arrived = self.push_arrived, defer.Deferred()
        reactor.callLater(0, d.callback, params)
        return "ok"


class GatewayTestCase(unittest.TestCase):
    """Builds the EPS of ``hd-1``; every listener and connection is closed at the end."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        shutil.copy(DEV_DIRECTORY / "001_base.json", folder / "001_base.json")
        self.directory = JSONDirectory(folder, OWN)
        self.service = Service()
        self.tracker = ConnectionTracker()
        self.addCleanup(self.tracker.close_all)

    def track(self, factory: Any) -> Any:
        return self.tracker.track(factory)

    @defer.inlineCallbacks
    def start_service(self) -> Any:
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        site = jsonrpc_site(self.service.dispatcher, settings, reactor=reactor)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.track(site))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/jsonrpc"

    def local_client(self, endpoint: str) -> JSONRPCClient:
        client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({"endpoint": endpoint}))
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def start_eps(self, stdout: bool = False, **gateway_settings: Any) -> Any:
        """The gateway of hd-1 with a broker; returns the gateway's URL."""
        self.calls = AsyncCalls(reactor, OWN)
        settings = GATEWAY_SETTINGS.validate(
            {"bind_address": "127.0.0.1:0", "tls": server_tls(), **gateway_settings})
        self.gateway = JSONRPCServerChannel(
            "gateway", OWN, settings, None, self.directory, reactor, async_calls=self.calls)
        channels: list[Any] = [self.gateway]
        if stdout:
            self.stdout = io.StringIO()
            channels.append(StdoutChannel("print", OWN, self.stdout))
        else:
            endpoint = yield self.start_service()
            local = JSONRPCClientChannel(
                "local", OWN, JSONRPC_CLIENT_SETTINGS.validate({"endpoint": endpoint}),
                reactor)
            self.addCleanup(local.close)
            channels.append(AcknowledgingChannel(local, self.calls))
            pusher = self.local_client(endpoint)
            pushes: list[defer.Deferred[Any]] = []

            def push(method: str, params: dict[str, Any], id: str) -> defer.Deferred[Any]:
                d = pusher.call(method, params, id=id)
                pushes.append(d)
                return d

            self.calls.push = push
            # Runs before the client is closed: a push still on its way finishes first.
            self.addCleanup(lambda: defer.DeferredList(pushes))
        self.gateway.broker = Broker(self.directory, channels, reactor)
        port = yield self.gateway.start()
        self.addCleanup(self.gateway.stop)
        return f"https://127.0.0.1:{port.getHost().port}/jsonrpc"

    def http(self, with_certificate: bool = True) -> Any:
        from treq.client import HTTPClient

        pool = HTTPConnectionPool(reactor, persistent=False)
        return HTTPClient(Agent(reactor, contextFactory=Policy(client_tls(with_certificate)),
                                pool=pool))

    @defer.inlineCallbacks
    def post(self, url: str, body: Any, headers: dict[bytes, list[bytes]] | None = None,
             client: Any = None) -> Any:
        """POST ``body`` (JSON-encoded unless bytes); returns (status, decoded reply)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {b"Content-Type": [b"application/json"], **(headers or {})}
        response = yield (client or self.http()).post(url, data=data, headers=all_headers)
        content = yield response.content()
        return response.code, json.loads(content) if content else None

    def call(self, url: str, method: str, params: Any = None, id: Any = 1,
             **kw: Any) -> defer.Deferred[Any]:
        body = {"jsonrpc": "2.0", "method": method, "params": {} if params is None else params}
        if id is not None:
            body["id"] = id
        return self.post(url, body, **kw)


class GatewayTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_add_unwraps_result(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "hd-1.add", {"a": 2, "b": 3})
        self.assertEqual((status, reply), (200, {"jsonrpc": "2.0", "result": 5, "id": 1}))
        method, params, seen_id = self.service.seen[0]
        self.assertEqual(seen_id, "hd-1.add(n:1)")
        self.assertEqual(params["_client"]["name"], OWN)
        self.assertEqual(params["_client"]["entry"]["name"], OWN)

    @defer.inlineCallbacks
    def test_id_rewriting(self):
        url = yield self.start_eps()
        for sent, inner in (("abc", "abc"), ("n:1", "nn:1"), (-5, "n:-5"),
                            ("a(b", "a(b"), ("a.b", "a.b")):
            status, reply = yield self.call(url, "hd-1.add", {"a": 1, "b": 1}, id=sent)
            self.assertEqual((status, reply["id"], reply["result"]), (200, sent, 2))
            self.assertEqual(self.service.seen[-1][2], f"hd-1.add({inner})")
        # A null id is answered with a random one (leaving "id" out is a notification).
        status, reply = yield self.post(url, {"jsonrpc": "2.0", "method": "hd-1.add",
                                              "params": {"a": 1, "b": 1}, "id": None})
        self.assertEqual(self.service.seen[-1][2], f"hd-1.add({reply['id']})")
        self.assertRegex(reply["id"], r"^[0-9a-f]{32}$")

    @defer.inlineCallbacks
    def test_object_result(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "hd-1.obj", id="o")
        self.assertEqual(reply, {"jsonrpc": "2.0", "result": {"x": [1, 2]}, "id": "o"})

    @defer.inlineCallbacks
    def test_error_data_unwrapped(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "hd-1.fail", id=3)
        self.assertEqual((status, reply), (400, {
            "jsonrpc": "2.0", "error": {"code": 7, "message": "nope", "data": "why"}, "id": 3}))

    @defer.inlineCallbacks
    def test_unknown_local_method(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "hd-1.nothing")
        self.assertEqual(reply["error"], {"code": -32601, "message": "method not found"})

    @defer.inlineCallbacks
    def test_ping_internal(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "hd-1._ping", {"x": 1}, id="p")
        self.assertEqual((status, reply["id"]), (200, "p"))
        self.assertEqual(reply["result"]["params"]["x"], 1)
        self.assertEqual(reply["result"]["serverInfo"]["name"], OWN)

    @defer.inlineCallbacks
    def test_no_response_is_submitted(self):
        url = yield self.start_eps(stdout=True)
        status, reply = yield self.call(url, "hd-1.add", {"a": 1}, id=4)
        self.assertEqual((status, reply), (200, {"jsonrpc": "2.0",
                                                 "result": {"message": "submitted"}, "id": 4}))
        printed = json.loads(self.stdout.getvalue())
        self.assertEqual((printed["method"], printed["id"]), ("hd-1.add", "hd-1.add(n:4)"))

    @defer.inlineCallbacks
    def test_broker_errors_are_code_1(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "nobody.add", id=5)
        self.assertEqual(status, 400)
        self.assertEqual(reply["error"]["code"], 1)
        self.assertEqual(reply["error"]["data"], {})
        self.assertIn("nobody", reply["error"]["message"])
        self.assertEqual(reply["id"], 5)
        status, reply = yield self.call(url, "hd-2.add")
        self.assertEqual(reply["error"],
                         {"code": 1, "message": "no channel can deliver this request",
                          "data": {}})

    @defer.inlineCallbacks
    def test_bad_method_names(self):
        url = yield self.start_eps()
        for method in ("add", "hd-1.", ".add", "hd-1.a(b", "hd-1\n.add"):
            status, reply = yield self.call(url, method)
            self.assertEqual(status, 400, method)
            self.assertEqual(reply["error"]["code"], 400, method)
            self.assertTrue(reply["error"]["message"].startswith("invalid request: "), method)
        # Ids that would not parse back into the same address.
        for bad_id in ("a)b", "a.b(c"):
            status, reply = yield self.call(url, "hd-1.add", id=bad_id)
            self.assertEqual((reply["error"]["code"], reply["id"]), (400, bad_id))
        self.assertEqual(self.service.seen, [])
        status, reply = yield self.call(url, "x" * 101 + ".add")
        self.assertEqual(reply["error"]["code"], -32600)

    @defer.inlineCallbacks
    def test_malformed_requests(self):
        url = yield self.start_eps()
        status, reply = yield self.post(url, b"{not json")
        self.assertEqual((status, reply["error"]["code"]), (400, -32700))
        status, reply = yield self.post(url, b'[{"jsonrpc": "2.0", "method": "hd-1.add"}')
        self.assertEqual(reply["error"]["code"], -32700)
        status, reply = yield self.post(url, {"jsonrpc": "2.0", "method": "hd-1.add",
                                              "params": [1, 2], "id": 1})
        self.assertEqual(reply["error"]["code"], -32600)
        status, reply = yield self.post(url, {"jsonrpc": "2.0", "method": "hd-1.add",
                                              "params": {}, "id": 1.5})
        self.assertEqual(reply["error"]["code"], -32600)
        self.assertEqual(self.service.seen, [])

    @defer.inlineCallbacks
    def test_oversized_body(self):
        url = yield self.start_eps(max_body_bytes=512)
        status, reply = yield self.call(url, "hd-1.add", {"a": "x" * 1000, "b": ""})
        self.assertEqual(status, 413)
        self.assertEqual(reply["error"]["code"], -32600)
        self.assertEqual(self.service.seen, [])

    @defer.inlineCallbacks
    def test_client_certificate_required(self):
        url = yield self.start_eps()
        with self.assertRaises(Exception):
            yield self.call(url, "hd-1.add", {"a": 1, "b": 1},
                            client=self.http(with_certificate=False))
        self.assertEqual(self.service.seen, [])

    @defer.inlineCallbacks
    def test_never_a_delivery_target(self):
        url = yield self.start_eps()
        self.assertFalse(self.gateway.can_deliver_to(object()))
        self.failureResultOf(self.gateway.deliver(None, None), GatewayError)
        # Without a broker the gateway refuses politely.
        self.gateway.broker = None
        status, reply = yield self.call(url, "hd-1.add", {"a": 1, "b": 1})
        self.assertEqual(reply["error"]["code"], 1)


class PreferWaitTests(unittest.SynchronousTestCase):
    def test_parse(self) -> None:
        def wait(*values: bytes, limit: float = 300) -> float:
            return prefer_wait(Headers({b"Prefer": list(values)}), limit)

        self.assertEqual(wait(b"wait=5"), 5)
        self.assertEqual(wait(b"respond-async, wait=10"), 10)
        self.assertEqual(wait(b"handling=lenient", b"WAIT = 7"), 7)
        self.assertEqual(wait(b'wait="8"; x=1'), 8)
        self.assertEqual(wait(b"wait=5000"), 300)
        self.assertEqual(wait(b"wait=5", limit=0.5), 0.5)
        for bad in (b"wait=-1", b"wait=1.5", b"wait=", b"wait=abc", b"nowait=5",
                    b"wait=99999999999"):
            self.assertEqual(wait(bad), 0, bad)
        self.assertEqual(prefer_wait(None, 10), 0)
        self.assertEqual(prefer_wait(Headers(), 10), 0)


class RespondTests(GatewayTestCase):
    """Asynchronous calls end to end on one EPS (caller = callee = hd-1)."""

    def when_expected(self) -> defer.Deferred[Any]:
        """Fires once the gateway has registered an acknowledgement it passed on."""
        d: defer.Deferred[Any] = defer.Deferred()
        expect = self.calls.expect

        def expecting(*args: Any) -> None:
            expect(*args)
            if not d.called:
                d.callback(args)

        self.calls.expect = expecting  # type: ignore[method-assign]
        return d

    @defer.inlineCallbacks
    def test_waiting_request_gets_result(self):
        url = yield self.start_eps()
        expected = self.when_expected()
        app = self.call(url, "hd-1.later", {"q": 1}, id=9,
                        headers={b"Prefer": [b"wait=5"]})
        operator, eps_id, local_id = yield expected
        self.assertEqual((operator, eps_id, local_id), (OWN, "hd-1.later(n:9)", "n:9"))
        self.assertEqual(self.service.seen[-1][2], eps_id)
        # The service answers through its own gateway, with the id it received.
        status, reply = yield self.call(url, "respond", {"result": 42}, id=eps_id)
        self.assertEqual((status, reply),
                         (200, {"jsonrpc": "2.0", "result": {"message": "delivered"},
                                "id": eps_id}))
        status, reply = yield app
        self.assertEqual((status, reply), (200, {"jsonrpc": "2.0", "result": 42, "id": 9}))
        self.assertEqual(self.service.pushed, [])
        # Only once.
        status, reply = yield self.call(url, "respond", {"result": 43}, id=eps_id)
        self.assertEqual(reply["error"]["code"], 404)

    @defer.inlineCallbacks
    def test_waiting_request_gets_error(self):
        url = yield self.start_eps()
        expected = self.when_expected()
        app = self.call(url, "hd-1.later", id="w", headers={b"Prefer": [b"wait=5"]})
        _, eps_id, _ = yield expected
        error = {"code": 12, "message": "too late", "data": [1]}
        status, reply = yield self.call(url, "respond", {"id": eps_id, "error": error},
                                        id=77)
        self.assertEqual((reply["result"], reply["id"]), ({"message": "delivered"}, 77))
        status, reply = yield app
        self.assertEqual((status, reply),
                         (400, {"jsonrpc": "2.0", "error": error, "id": "w"}))

    @defer.inlineCallbacks
    def test_result_is_pushed(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "hd-1.later", {"q": 1}, id=9)
        self.assertEqual(reply, {"jsonrpc": "2.0",
                                 "result": {"_async": True, "message": "later"}, "id": 9})
        eps_id = self.service.seen[-1][2]
        pushed = self.service.push_arrived
        status, reply = yield self.call(url, "respond", {"result": {"sum": 3}}, id=eps_id)
        self.assertEqual(reply["result"], {"message": "delivered"})
        params = yield pushed
        self.assertEqual(params, {"id": 9, "result": {"sum": 3}})
        self.assertEqual(self.service.pushed[0][1], eps_id)

    @defer.inlineCallbacks
    def test_wait_times_out_then_push(self):
        url = yield self.start_eps(async_wait_max=0.05)
        status, reply = yield self.call(url, "hd-1.later", id="slow",
                                        headers={b"Prefer": [b"wait=30"]})
        self.assertEqual(reply["result"], {"_async": True, "message": "later"})
        eps_id = self.service.seen[-1][2]
        pushed = self.service.push_arrived
        status, reply = yield self.call(url, "respond", {"id": eps_id, "result": "fine"},
                                        id=None)
        self.assertEqual((status, reply), (204, None))  # a notification: run, not answered
        params = yield pushed
        self.assertEqual(params, {"id": "slow", "result": "fine"})

    @defer.inlineCallbacks
    def test_application_gone_then_push(self):
        url = yield self.start_eps()
        expected = self.when_expected()
        cancelled: defer.Deferred[Any] = defer.Deferred()
        wait = self.calls.wait

        def waiting(*args: Any) -> Any:
            d = wait(*args)
            d.addErrback(lambda f: cancelled.callback(f.trap(defer.CancelledError)) or f)
            return d

        self.calls.wait = waiting  # type: ignore[method-assign]
        app = self.call(url, "hd-1.later", id=5, headers={b"Prefer": [b"wait=60"]})
        app.addErrback(lambda f: None)
        _, eps_id, _ = yield expected
        app.cancel()
        yield cancelled
        pushed = self.service.push_arrived
        yield self.call(url, "respond", {"result": 1}, id=eps_id)
        params = yield pushed
        self.assertEqual(params, {"id": 5, "result": 1})

    @defer.inlineCallbacks
    def test_respond_refusals(self):
        url = yield self.start_eps()
        status, reply = yield self.call(url, "respond", {"result": 1}, id="hd-1.later(n:1)")
        self.assertEqual((status, reply["error"]["code"]), (400, 404))
        self.assertIn("is waiting for a response", reply["error"]["message"])
        yield self.call(url, "hd-1.later", id=1)
        for params, id in (({"result": 1, "error": {"code": 1, "message": "m"}},
                            "hd-1.later(n:1)"),
                           ({}, "hd-1.later(n:1)"),
                           ({"result": 1}, 1),
                           ({"result": 1, "id": 5}, 1),
                           ({"result": 1, "id": "hd-1.later(n:2)"}, "hd-1.later(n:1)"),
                           ({"error": {"code": "x", "message": "m"}}, "hd-1.later(n:1)"),
                           ({"result": 1, "id": "x" * 5000}, 1)):
            status, reply = yield self.call(url, "respond", params, id=id)
            self.assertEqual(reply["error"]["code"], -32602, params)
        # After all of that the call can still be answered, once.
        pushed = self.service.push_arrived
        status, reply = yield self.call(url, "respond", {"result": 1}, id="hd-1.later(n:1)")
        self.assertEqual(reply["result"], {"message": "delivered"})
        yield pushed

    @defer.inlineCallbacks
    def test_respond_without_async_calls(self):
        url = yield self.start_eps()
        self.gateway.async_calls = None
        status, reply = yield self.call(url, "respond", {"result": 1}, id="hd-1.x(1)")
        self.assertEqual(reply["error"]["code"], -32601)
        # And acknowledgements are passed on as plain results.
        status, reply = yield self.call(url, "hd-1.later", id=2)
        self.assertEqual(reply["result"], {"_async": True, "message": "later"})
        self.assertEqual(self.calls.pending_expected, 0)

    @defer.inlineCallbacks
    def test_stop_closes_waiting_connections(self):
        url = yield self.start_eps()
        expected = self.when_expected()
        app = self.call(url, "hd-1.later", id=6, headers={b"Prefer": [b"wait=60"]})
        failures: list[Any] = []
        app.addErrback(failures.append)
        yield expected
        started = reactor.seconds()
        yield self.gateway.stop()
        yield app
        self.assertEqual(len(failures), 1)
        # At once, not after the grace period of idle connections.
        self.assertLess(reactor.seconds() - started, 1.5)
        # The result is still expected: it will be pushed.
        self.assertEqual(self.calls.pending_expected, 1)
        pushed = self.service.push_arrived
        self.calls.respond("hd-1.later(n:6)", {"late": True})
        self.assertEqual((yield pushed), {"id": 6, "result": {"late": True}})
