"""
Tests for epsproxy.net.jsonrpc: the envelope rules without sockets, then server and client
over real loopback connections (mutual TLS with the test PKI, plain HTTP for stub servers).
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.resource import Resource

from epsproxy.rules import forms

from epsproxy.net import tls
from epsproxy.rules.certificates import certificate_names
from epsproxy.net.jsonrpc.client import (
    BULK_READ_BYTES,
    JSONRPC_CLIENT_SETTINGS,
    BulkConnectionPool,
    JSONRPCClient,
    QuietConnectionPool,
)
from epsproxy.net.jsonrpc.envelope import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_RESULT,
    PARSE_ERROR,
    CallContext,
    Dispatcher,
    JSONRPCError,
    TransportError,
    id_from_internal,
    id_to_internal,
    RPCRequest,
    parse_body,
    parse_request,
    random_id,
    response_object,
)
from epsproxy.net.jsonrpc.server import (
    JSONRPC_SERVER_SETTINGS,
    JSONRPCListener,
    jsonrpc_site,
    listen_jsonrpc,
)
from tests.support.connections import ConnectionTracker
from tests.support.pki import pki

HEX32 = re.compile(r"[0-9a-f]{32}")


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def request(id: Any = "1", **changes: Any) -> dict:
    value = {"jsonrpc": "2.0", "method": "echo", "params": {"a": 1}, "id": id}
    value.update(changes)
    return value


# ----------------------------------------------------------------------------- ids


class IdConversionTests(SynchronousTestCase):
    """SPEC §11.2 and the §22.6 vectors."""

    def test_vectors(self) -> None:
        for sent, internal in [("1", "1"), (1, "n:1"), ("n:1", "nn:1"), ("nnn:7", "nnnnnn:7"),
                               (-5, "n:-5"), ("abc", "abc"), ("nn:-3", "nnnn:-3")]:
            self.assertEqual(id_to_internal(sent), internal)
            self.assertEqual(id_from_internal(internal), sent)
            self.assertIs(type(id_from_internal(internal)), type(sent))

    def test_absent_ids_become_random(self) -> None:
        for raw in (None, ""):
            first, second = id_to_internal(raw), id_to_internal(raw)
            self.assertRegex(first, HEX32)
            self.assertNotEqual(first, second)
            self.assertEqual(id_from_internal(first), first)
        self.assertRegex(random_id(), HEX32)

    def test_lookalikes_are_not_escaped(self) -> None:
        # Unicode digits, a trailing newline, 33 digits, a missing number: plain strings.
        for text in ("n:\u0661", "n:1\n", "n:" + "1" * 33, "n:", ":1", "nx:1", "N:1"):
            self.assertEqual(id_to_internal(text), text)
            self.assertEqual(id_from_internal(text), text)

    def test_odd_runs_come_back_unchanged(self) -> None:
        self.assertEqual(id_from_internal("nnn:5"), "nnn:5")

    def test_refuses_other_types(self) -> None:
        for raw in (True, 1.5, [], {}):
            self.assertRaises(TypeError, id_to_internal, raw)

    @hsettings(deadline=None, max_examples=200)
    @given(st.one_of(st.text(min_size=1, max_size=40),
                     st.from_regex(r"\An{1,6}:-?[0-9]{1,32}\Z"),
                     st.integers(-(2**31), 2**31 - 1)))
    def test_round_trip(self, raw: Any) -> None:
        back = id_from_internal(id_to_internal(raw))
        self.assertEqual(back, raw)
        self.assertIs(type(back), type(raw))


# ------------------------------------------------------------------------- envelope


class ParseRequestTests(SynchronousTestCase):
    """SPEC §11.2: content type, body, schema."""

    def assertCode(self, code: int, content_type: str | None, data: bytes) -> JSONRPCError:
        error = self.assertRaises(JSONRPCError, parse_request, content_type, data)
        self.assertEqual(error.code, code)
        return error

    def test_valid(self) -> None:
        call = parse_request("application/json", body(request(id=3)))
        self.assertEqual((call.method, call.params, call.id), ("echo", {"a": 1}, "n:3"))

    def test_content_types(self) -> None:
        for ok in ("application/json", "Application/JSON", "application/json; charset=utf-8",
                   "application/json;"):
            parse_request(ok, body(request()))
        for bad in (None, "", "text/plain", "application/jsonx", "application/json-rpc",
                    " application/json", "text/plain; application/json"):
            error = self.assertCode(PARSE_ERROR, bad, body(request()))
            self.assertEqual(error.message, "JSON required")

    def test_bodies_that_are_not_an_object(self) -> None:
        for data in (b"", b"   ", b"[]", b"[" + body(request()) + b"]", b'"x"', b"1", b"null",
                     b'{"jsonrpc": "2.0"', b"{'a': 1}", b"\xff\xfe{}", b'{"a": NaN}',
                     b'{"a": Infinity}', b"[" * 100000, b'{"a": ' + b"9" * 5000 + b"}"):
            self.assertCode(PARSE_ERROR, "application/json", data)

    def test_only_the_first_value_is_read(self) -> None:
        call = parse_request("application/json", b"\n " + body(request()) + b" trailing junk")
        self.assertEqual(call.method, "echo")

    def test_schema_violations(self) -> None:
        cases = {
            "jsonrpc": [request(jsonrpc="2.0,"), request(jsonrpc=2.0), request(jsonrpc=None)],
            "method": [request(method=""), request(method="m" * 101), request(method=5),
                       request(method=None)],
            "params": [request(params=[1]), request(params=None), request(params="x")],
            "id": [request(id=1.5), request(id=2**31), request(id=-(2**31) - 1),
                   request(id=True), request(id="x" * 1025), request(id={}), request(id=[])],
        }
        for key, values in cases.items():
            for value in values:
                error = self.assertCode(INVALID_REQUEST, "application/json", body(value))
                self.assertTrue(error.message.startswith("invalid request: "), error.message)
                self.assertEqual(error.data["path"], key)

    def test_params_may_be_left_out(self) -> None:
        missing = request(id=2)
        del missing["params"]
        call = parse_request("application/json", body(missing))
        self.assertEqual((call.method, call.params, call.id, call.notification),
                         ("echo", {}, "n:2", False))
        # Present, it must still be an object (by-position arrays stay refused).
        for bad in ([], [1], None, "", 0):
            error = self.assertCode(INVALID_REQUEST, "application/json",
                                    body(request(params=bad)))
            self.assertEqual(error.data["path"], "params")

    def test_notifications(self) -> None:
        value = request()
        del value["id"]
        call = parse_request("application/json", body(value))
        self.assertTrue(call.notification)
        self.assertRegex(call.id, HEX32)
        # A null id is an id: answered (with a random id), as in the reference.
        for raw_id in (None, "", 0, "x"):
            self.assertFalse(parse_request("application/json",
                                           body(request(id=raw_id))).notification)

    def test_limits_are_inclusive(self) -> None:
        parse_request("application/json", body(request(method="m" * 100, id="x" * 1024)))
        parse_request("application/json", body(request(id=2**31 - 1)))
        parse_request("application/json", body(request(id=-(2**31))))

    def test_unknown_keys_dropped_and_null_id_random(self) -> None:
        value = request(id=None, extra=1)
        call = parse_request("application/json", body(value))
        self.assertRegex(call.id, HEX32)

    @hsettings(deadline=None, max_examples=150)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_never_crash(self, data: bytes) -> None:
        try:
            parse_request("application/json", data)
        except JSONRPCError as e:
            self.assertIn(e.code, (PARSE_ERROR, INVALID_REQUEST))


class ParseBodyTests(SynchronousTestCase):
    """JSON-RPC 2.0 batches (§6), read without sockets: items in order, the caps."""

    def parse(self, value: Any, max_batch: int = 32) -> Any:
        return parse_body("application/json", body(value), max_batch)

    def assertRefused(self, code: int, data: bytes, max_batch: int = 32) -> JSONRPCError:
        error = self.assertRaises(JSONRPCError, parse_body, "application/json", data,
                                  max_batch)
        self.assertEqual(error.code, code)
        return error

    def test_single_request_as_parse_request(self) -> None:
        call = self.parse(request(id=3))
        self.assertIsInstance(call, RPCRequest)
        self.assertEqual((call.method, call.id), ("echo", "n:3"))
        self.assertRefused(INVALID_REQUEST, body(request(params=[1])))
        for data in (b"1", b'"x"', b"null", b"{", b""):
            self.assertRefused(PARSE_ERROR, data)
        error = self.assertRaises(JSONRPCError, parse_body, "text/plain", b"[]")
        self.assertEqual((error.code, error.message), (PARSE_ERROR, "JSON required"))

    def test_batch_items_in_order(self) -> None:
        notification = request(method="note")
        del notification["id"]
        items = self.parse([request(id=1), notification, 5, [request()], request(id=2**31),
                            {"method": "x"}, request(id="last", params=None)])
        self.assertEqual(len(items), 7)
        self.assertEqual((items[0].id, items[0].notification), ("n:1", False))
        self.assertEqual((items[1].method, items[1].notification), ("note", True))
        top = "(top level)"
        for index, path in ((2, top), (3, top), (4, "id"), (5, "jsonrpc"), (6, "params")):
            error = items[index]
            self.assertIsInstance(error, JSONRPCError, index)
            self.assertEqual(error.code, INVALID_REQUEST, index)
            self.assertTrue(error.message.startswith("invalid request: "), error.message)
            self.assertEqual(error.data["path"], path, index)

    def test_empty_batch(self) -> None:
        error = self.assertRefused(INVALID_REQUEST, b"[]")
        self.assertEqual(error.message, "invalid request: empty batch")
        self.assertRefused(INVALID_REQUEST, b" [ ] trailing")

    def test_batch_cap(self) -> None:
        self.assertEqual(len(self.parse([request()] * 3, max_batch=3)), 3)
        error = self.assertRefused(INVALID_REQUEST, body([request()] * 4), max_batch=3)
        self.assertEqual(error.message,
                         "invalid request: a batch of 4 requests, over the limit of 3")
        self.assertEqual(error.data, {"max_batch": 3})
        # Counted before any item is read: a huge batch of junk costs one len().
        error = self.assertRefused(INVALID_REQUEST, b"[" + b"0," * 200000 + b"0]")
        self.assertIn("200001 requests", error.message)

    def test_hostile_bodies(self) -> None:
        # Nested too deeply for the parser: not JSON as far as we are concerned.
        self.assertRefused(PARSE_ERROR, b"[" * 100000 + b"]" * 100000)
        # Nested arrays, huge numbers, odd values inside a batch: one error each.
        items = self.parse([[[[]]], 1e308, {"id": 10**30}, request(id=10**30),
                            request(id=1.5), request(method="m" * 101),
                            request(params={"deep": [[[]]]})])
        self.assertEqual([getattr(i, "code", None) for i in items[:6]], [INVALID_REQUEST] * 6)
        self.assertEqual(items[6].params, {"deep": [[[]]]})
        for data in (b'[{"jsonrpc": "2.0", "method": "x", "id": ' + b"9" * 5000 + b"}]",
                     b'[{"a": NaN}]', b"[1, 2", b'["\\ud800"'):
            self.assertRefused(PARSE_ERROR, data)

    @hsettings(deadline=None, max_examples=150)
    @given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5),
                              st.dictionaries(st.sampled_from(["jsonrpc", "method", "params",
                                                               "id"]),
                                              st.one_of(st.just("2.0"), st.text(max_size=3),
                                                        st.integers(), st.none(),
                                                        st.just({}))),
                              st.just(request())),
                    min_size=1, max_size=10))
    def test_arbitrary_batches(self, value: list) -> None:
        items = self.parse(value)
        self.assertEqual(len(items), len(value))
        for item in items:
            if isinstance(item, JSONRPCError):
                self.assertEqual(item.code, INVALID_REQUEST)
            else:
                self.assertIsInstance(item.params, dict)


class ResponseObjectTests(SynchronousTestCase):
    """SPEC §11.3."""

    def test_result_and_no_result(self) -> None:
        self.assertEqual(response_object("n:1", result=None),
                         {"jsonrpc": "2.0", "result": None, "id": 1})
        self.assertEqual(response_object("nn:1"), {"jsonrpc": "2.0", "id": "n:1"})

    def test_error(self) -> None:
        error = JSONRPCError(5, "five", {"x": 1})
        self.assertEqual(response_object(None, result=3, error=error),
                         {"jsonrpc": "2.0", "error": {"code": 5, "message": "five",
                                                      "data": {"x": 1}}, "id": None})
        self.assertEqual(JSONRPCError(1, "m").as_dict(), {"code": 1, "message": "m"})


class DispatcherTests(SynchronousTestCase):
    """SPEC §11.4."""

    def setUp(self) -> None:
        self.dispatcher = Dispatcher()
        self.context = CallContext("1", None, None)
        schema = forms.Map({"n": forms.Required(forms.Integer(min=0))})
        self.dispatcher.register("double", schema, lambda params, ctx: params["n"] * 2)
        self.dispatcher.register("raw", None, lambda params, ctx: params)

    def test_dispatch(self) -> None:
        self.assertEqual(self.dispatcher.handle("double", {"n": 4, "x": 1}, self.context), 8)
        self.assertEqual(self.dispatcher.handle("raw", {"x": 1}, self.context), {"x": 1})

    def test_unknown_method(self) -> None:
        error = self.assertRaises(JSONRPCError, self.dispatcher.handle, "nope", {}, self.context)
        self.assertEqual((error.code, error.message), (METHOD_NOT_FOUND, "method not found"))

    def test_invalid_params(self) -> None:
        error = self.assertRaises(JSONRPCError, self.dispatcher.handle, "double", {"n": -1},
                                  self.context)
        self.assertEqual((error.code, error.message), (INVALID_PARAMS, "invalid params"))
        self.assertEqual(error.data["path"], "n")

    def test_register_twice(self) -> None:
        self.assertRaises(ValueError, self.dispatcher.register, "raw", None, lambda p, c: 1)


class SettingsTests(SynchronousTestCase):
    """The settings schemas are strict and fill in defaults."""

    def test_server_defaults(self) -> None:
        value = JSONRPC_SERVER_SETTINGS.validate({"bind_address": ":0"})
        self.assertEqual(value["path"], "/jsonrpc")
        self.assertEqual(value["max_body_bytes"], 4 * 1024 * 1024)
        self.assertEqual(value["timeout"], 30.0)
        self.assertEqual(value["tcp_rate_limits"], [])
        self.assertEqual(value["max_batch"], 32)
        self.assertEqual(JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": ":0", "max_batch": 1000})["max_batch"], 1000)

    def test_server_refusals(self) -> None:
        for bad in ({}, {"bind_address": ":0", "typo": 1},
                    {"bind_address": ":0", "path": "jsonrpc"},
                    {"bind_address": ":0", "max_body_bytes": 0},
                    {"bind_address": ":0", "max_batch": 0},
                    {"bind_address": ":0", "max_batch": 1001},
                    {"bind_address": ":0", "max_batch": "32"},
                    {"bind_address": ":0", "max_batch": 2.5},
                    {"bind_address": ":0", "cors": {"allowed_hosts": ["("]}},
                    {"bind_address": ":0", "cors": {"allowed_methods": ["TRACE"]}},
                    {"bind_address": ":0", "tls": {"validate_client": True}}):
            self.assertRaises(forms.FormError, JSONRPC_SERVER_SETTINGS.validate, bad)

    def test_cors_defaults(self) -> None:
        value = JSONRPC_SERVER_SETTINGS.validate({"bind_address": ":0", "cors": {}})
        self.assertEqual(value["cors"]["allowed_methods"],
                         ["GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"])
        self.assertEqual(value["cors"]["allowed_hosts"], [])

    def test_client(self) -> None:
        value = JSONRPC_CLIENT_SETTINGS.validate({"endpoint": "https://sd-1:3322/jsonrpc"})
        self.assertEqual((value["timeout"], value["max_response_bytes"]), (30.0, 16 * 2**20))
        for bad in ({}, {"endpoint": "sd-1:3322"}, {"endpoint": "ftp://x/"},
                    {"endpoint": "https://:80/"}, {"endpoint": "http://x:99999/"},
                    {"endpoint": "http://x/", "timeout": 0}, {"endpoint": "http://x/", "y": 1}):
            self.assertRaises(forms.FormError, JSONRPC_CLIENT_SETTINGS.validate, bad)


# ------------------------------------------------------------------ network helpers


def the_pki(label: str) -> Any:
    # pki() and pki("main") are different lru_cache keys: always call pki() for main.
    return pki() if label == "main" else pki(label)


def server_tls(label: str = "main", name: str = "sd-1") -> dict:
    crt, key = the_pki(label).tls(name)
    return {"ca_certificate_files": [str(pki().root)], "certificate_file": str(crt),
            "key_file": str(key)}


def client_tls(label: str = "main", name: str = "hd-1", trust: str = "main") -> dict:
    crt, key = the_pki(label).tls(name)
    return {"ca_certificate_files": [str(the_pki(trust).root)], "certificate_file": str(crt),
            "key_file": str(key)}


class Collector(Protocol):
    """Records everything received; ``lost`` fires with it when the connection closes."""

    def __init__(self, send: bytes = b"") -> None:
        self.send = send
        self.data = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(self.data)


def parse_http(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        rest = rest[: int(headers["content-length"])]
    return status, headers, rest


def http_request(method: str = "POST", path: str = "/jsonrpc", data: bytes = b"",
                 headers: dict[str, str] | None = None, length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sd-1", "Connection: close"]
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    if length:
        all_headers.setdefault("Content-Length", str(len(data)))
    lines += [f"{k}: {v}" for k, v in all_headers.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class Echo:
    """A handler recording the contexts it sees."""

    def __init__(self) -> None:
        self.contexts: list[CallContext] = []
        self.methods: list[str] = []
        self.pending: list[Deferred] = []
        #: Fired (and replaced) at each call of ``later``: the test knows it started.
        self.later_called: Deferred = Deferred()

    def handle(self, method: str, params: dict, context: CallContext) -> Any:
        self.contexts.append(context)
        self.methods.append(method)
        if method == "echo":
            return params
        if method == "context":
            cert = context.peer_certificate
            return {"id": context.request_id, "host": context.peer_host,
                    "peer": certificate_names(cert)[0] if cert is not None else None}
        if method == "nothing":
            return NO_RESULT
        if method == "null":
            return None
        if method == "refuse":
            raise JSONRPCError(404, "not found", {"why": params.get("why")})
        if method == "crash":
            raise ValueError("a bug")
        if method == "not-json":
            return {"x": object()}
        if method == "big":
            return "x" * params["size"]
        if method == "later":
            d: Deferred = Deferred()
            self.pending.append(d)
            called, self.later_called = self.later_called, Deferred()
            called.callback(None)
            return d
        if method == "never":
            return Deferred()
        raise JSONRPCError(METHOD_NOT_FOUND, "method not found")


class NetworkTestCase(TestCase):
    """Starts servers and clients, and tears every connection down after the test."""

    def setUp(self) -> None:
        self.handler = Echo()
        self.tracker = ConnectionTracker()
        self.connections = self.tracker.closed  # server-side ends, in order

    def track(self, factory: Any) -> Any:
        return self.tracker.track(factory)

    async def serve(self, use_tls: bool = True, **extra: Any) -> tuple[dict, int]:
        settings = {"bind_address": "127.0.0.1:0", **extra}
        if use_tls:
            settings.setdefault("tls", server_tls())
        settings = JSONRPC_SERVER_SETTINGS.validate(settings)
        site = self.track(jsonrpc_site(self.handler, settings, reactor=reactor))
        port = await listen_jsonrpc(reactor, site, settings)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.tracker.close_all)
        return settings, port.getHost().port

    def client(self, port: int, scheme: str = "https", **extra: Any) -> JSONRPCClient:
        settings = {"endpoint": f"{scheme}://127.0.0.1:{port}/jsonrpc", "server_name": "sd-1"}
        if scheme == "https":
            settings["tls"] = client_tls()
        settings.update(extra)
        client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(settings))
        self.addCleanup(client.close)
        return client

    async def raw(self, port: int, data: bytes, use_tls: bool = True,
                  tls_settings: dict | None = None) -> bytes:
        endpoint = tls.client_endpoint(
            reactor, f"127.0.0.1:{port}", (tls_settings or client_tls()) if use_tls else None,
            server_name="sd-1")
        collector = Collector(data)
        await connectProtocol(endpoint, collector)
        return await collector.lost

    async def exchange(self, port: int, data: bytes, **kw: Any) -> tuple[int, dict, Any]:
        status, headers, content = parse_http(await self.raw(port, data, **kw))
        return status, headers, json.loads(content) if content else None


# ------------------------------------------------------------------- server tests


class ServerTests(NetworkTestCase):
    """The HTTP server over mutual TLS (SPEC §11.1-§11.5)."""

    @defer.inlineCallbacks
    def test_call_and_context(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port)
        result = yield client.call("context", {}, id=7)
        self.assertEqual(result, {"id": "n:7", "host": "127.0.0.1", "peer": "hd-1"})
        self.assertEqual((yield client.call("echo", {"b": [1, "2"]})), {"b": [1, "2"]})

    @defer.inlineCallbacks
    def test_id_vectors_end_to_end(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port)
        for sent, internal in [("1", "1"), (1, "n:1"), ("n:1", "nn:1"), ("nnn:7", "nnnnnn:7")]:
            result = yield client.call("context", {}, id=sent)  # the client checks the id
            self.assertEqual(result["id"], internal)
        for raw_id in (None, ""):
            status, _, reply = yield defer.ensureDeferred(
                self.exchange(port, http_request(data=body(request(id=raw_id,
                                                                   method="context")))))
            self.assertEqual(status, 200)
            self.assertRegex(reply["id"], HEX32)
            self.assertEqual(reply["result"]["id"], reply["id"])
        for bad in (1.5, 2147483648):
            error = yield self.assertFailure(client.call("echo", {}, id=bad), JSONRPCError)
            self.assertEqual(error.code, INVALID_REQUEST)

    @defer.inlineCallbacks
    def test_response_shapes(self):
        _, port = yield defer.ensureDeferred(self.serve())
        status, headers, reply = yield defer.ensureDeferred(
            self.exchange(port, http_request(data=body(request(method="nothing", id=2)))))
        self.assertEqual((status, reply), (200, {"jsonrpc": "2.0", "id": 2}))
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(headers["server"], "epsproxy")
        # A lone surrogate from a \u escape is echoed as an escape, still valid JSON.
        data = b'{"jsonrpc": "2.0", "method": "echo", "params": {"s": "\\ud800"}, "id": 1}'
        status, _, reply = yield defer.ensureDeferred(self.exchange(port, http_request(data=data)))
        self.assertEqual((status, reply["result"]), (200, {"s": "\ud800"}))
        _, _, reply = yield defer.ensureDeferred(
            self.exchange(port, http_request(data=body(request(method="null")))))
        self.assertEqual(reply, {"jsonrpc": "2.0", "result": None, "id": "1"})
        client = self.client(port)
        self.assertIsNone((yield client.call("nothing", {})))

    @defer.inlineCallbacks
    def test_errors(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port)
        error = yield self.assertFailure(client.call("refuse", {"why": "w"}), JSONRPCError)
        self.assertEqual((error.code, error.message, error.data), (404, "not found", {"why": "w"}))
        error = yield self.assertFailure(client.call("unknown", {}), JSONRPCError)
        self.assertEqual(error.code, METHOD_NOT_FOUND)
        status, _, reply = yield defer.ensureDeferred(
            self.exchange(port, http_request(data=body(request(method="crash", id=9)))))
        self.assertEqual((status, reply["error"], reply["id"]),
                         (400, {"code": INTERNAL_ERROR, "message": "internal error"}, 9))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        error = yield self.assertFailure(client.call("not-json", {}), JSONRPCError)
        self.assertEqual((error.code, error.message), (INTERNAL_ERROR, "internal error"))

    @defer.inlineCallbacks
    def test_early_errors(self):
        _, port = yield defer.ensureDeferred(self.serve())
        for data, headers in [(body(request()), {"Content-Type": "text/plain"}),
                              (b"[" + body(request()), {}),
                              (b"7", {}),
                              (body(request()), {"Content-Type": None}),
                              (b'{"jsonrpc": "2.0", "method": "echo", "par', {})]:
            status, _, reply = yield defer.ensureDeferred(
                self.exchange(port, http_request(data=data, headers=headers)))
            self.assertEqual((status, reply), (400, {
                "jsonrpc": "2.0", "error": {"code": PARSE_ERROR, "message": "JSON required"},
                "id": None}))
        status, _, reply = yield defer.ensureDeferred(
            self.exchange(port, http_request(data=body(request(params=[1], id=5)))))
        self.assertEqual((status, reply["jsonrpc"], reply["id"]), (400, "2.0", None))
        self.assertEqual(reply["error"]["code"], INVALID_REQUEST)
        self.assertEqual(reply["error"]["data"]["path"], "params")

    async def post(self, port: int, value: Any) -> tuple[int, dict, Any]:
        data = value if isinstance(value, bytes) else body(value)
        return await self.exchange(port, http_request(data=data))

    @defer.inlineCallbacks
    def test_params_left_out(self):
        _, port = yield defer.ensureDeferred(self.serve())
        status, _, reply = yield defer.ensureDeferred(
            self.post(port, {"jsonrpc": "2.0", "method": "echo", "id": 1}))
        self.assertEqual((status, reply), (200, {"jsonrpc": "2.0", "result": {}, "id": 1}))

    @defer.inlineCallbacks
    def test_notifications_get_no_reply(self):
        _, port = yield defer.ensureDeferred(self.serve())
        for method in ("echo", "refuse", "crash", "unknown", "nothing"):
            status, headers, reply = yield defer.ensureDeferred(
                self.post(port, {"jsonrpc": "2.0", "method": method, "params": {"n": 1}}))
            self.assertEqual((status, reply), (204, None), method)
            self.assertNotIn("content-type", headers)
        self.assertEqual(self.handler.methods, ["echo", "refuse", "crash", "unknown", "nothing"])
        self.assertRegex(self.handler.contexts[0].request_id, HEX32)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # crash: still logged
        # An invalid notification is not a notification: it is refused as today.
        status, _, reply = yield defer.ensureDeferred(
            self.post(port, {"jsonrpc": "2.0", "method": "echo", "params": [1]}))
        self.assertEqual((status, reply["error"]["code"], reply["id"]),
                         (400, INVALID_REQUEST, None))

    @defer.inlineCallbacks
    def test_batch_replies_in_request_order(self):
        _, port = yield defer.ensureDeferred(self.serve())
        note = {"jsonrpc": "2.0", "method": "echo", "params": {"note": 1}}
        status, headers, reply = yield defer.ensureDeferred(self.post(port, [
            request(id=1, params={"first": 1}), note, 5, request(method="refuse", id="r"),
            request(method="nothing", id="n:2"), {"jsonrpc": "2.0", "method": "echo", "id": 3},
            [request()], request(method="crash", id=4),
        ]))
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual([r["id"] for r in reply], [1, None, "r", "n:2", 3, None, 4])
        self.assertEqual(reply[0], {"jsonrpc": "2.0", "result": {"first": 1}, "id": 1})
        self.assertEqual(reply[1]["error"]["code"], INVALID_REQUEST)
        self.assertEqual(reply[2]["error"], {"code": 404, "message": "not found",
                                             "data": {"why": None}})
        self.assertEqual(reply[3], {"jsonrpc": "2.0", "id": "n:2"})
        self.assertEqual(reply[4]["result"], {})
        self.assertEqual(reply[5]["error"]["code"], INVALID_REQUEST)
        self.assertEqual(reply[6]["error"]["code"], INTERNAL_ERROR)
        self.assertEqual(self.handler.methods, ["echo", "echo", "refuse", "nothing", "echo",
                                                "crash"])
        self.assertEqual([c.request_id for c in self.handler.contexts][3], "nn:2")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    @defer.inlineCallbacks
    def test_batch_of_notifications_and_refused_batches(self):
        _, port = yield defer.ensureDeferred(self.serve(max_batch=3))
        note = {"jsonrpc": "2.0", "method": "echo", "params": {}}
        status, _, reply = yield defer.ensureDeferred(self.post(port, [note, note, note]))
        self.assertEqual((status, reply), (204, None))
        self.assertEqual(len(self.handler.contexts), 3)
        status, _, reply = yield defer.ensureDeferred(self.post(port, b" [ ] "))
        self.assertEqual((status, reply), (400, {"jsonrpc": "2.0", "error": {
            "code": INVALID_REQUEST, "message": "invalid request: empty batch"}, "id": None}))
        status, _, reply = yield defer.ensureDeferred(self.post(port, [request()] * 4))
        self.assertEqual((status, reply["id"]), (400, None))
        self.assertEqual(reply["error"], {
            "code": INVALID_REQUEST, "data": {"max_batch": 3},
            "message": "invalid request: a batch of 4 requests, over the limit of 3"})
        self.assertEqual(len(self.handler.contexts), 3)  # nothing of it ran
        # One item that is not an object: a batch of one error, not a parse error.
        status, _, reply = yield defer.ensureDeferred(self.post(port, [[]]))
        self.assertEqual((status, len(reply), reply[0]["error"]["code"]),
                         (200, 1, INVALID_REQUEST))

    @defer.inlineCallbacks
    def test_batch_items_run_one_after_another(self):
        _, port = yield defer.ensureDeferred(self.serve())
        started = self.handler.later_called
        answer = defer.ensureDeferred(self.post(port, [
            request(method="later", id=1), request(method="echo", id=2)]))
        yield started
        self.assertEqual(self.handler.methods, ["later"])  # echo waits for later
        self.handler.pending[0].callback("done")
        status, _, reply = yield answer
        self.assertEqual([r.get("result") for r in reply], ["done", {"a": 1}])
        self.assertEqual(self.handler.methods, ["later", "echo"])

    @defer.inlineCallbacks
    def test_batch_dropped_when_the_client_goes_away(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, port = yield defer.ensureDeferred(self.serve())
        started = self.handler.later_called
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}", client_tls(),
                                       server_name="sd-1")
        note = {"jsonrpc": "2.0", "method": "echo"}
        collector = Collector(http_request(data=body([
            request(method="later", id=1), note, request(method="echo", id=2)])))
        yield connectProtocol(endpoint, collector)
        yield started
        lost = self.handler.contexts[0].connection_lost
        collector.transport.abortConnection()
        yield lost  # the handler is told, as for a single request
        yield collector.lost
        self.handler.pending[0].callback("too late")
        self.assertEqual(self.handler.methods, ["later"])
        dropped = [e["count"] for e in events if "items not run" in e.get("log_format", "")]
        self.assertEqual(dropped, [2])

    @defer.inlineCallbacks
    def test_one_log_line_per_batch_item(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, port = yield defer.ensureDeferred(self.serve())
        note = {"jsonrpc": "2.0", "method": "refuse", "params": {}}
        yield defer.ensureDeferred(self.post(port, [request(id=1), note, 7]))
        lines = [(e["method"], e["caller"], e["outcome"], e["notification"]) for e in events
                 if e.get("log_format", "").startswith("JSON-RPC {method} from")]
        self.assertEqual(lines, [("echo", "hd-1", "ok", False),
                                 ("refuse", "hd-1", "error 404", True),
                                 ("-", "hd-1", "error -32600", False)])

    @defer.inlineCallbacks
    def test_batch_cap_reloads(self):
        settings = JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": "127.0.0.1:0", "tls": server_tls(), "max_batch": 1})
        site = self.track(jsonrpc_site(self.handler, settings, reactor=reactor))
        listener = JSONRPCListener(reactor, site, settings)
        port = (yield listener.listen()).getHost().port
        self.addCleanup(listener.port.stopListening)
        self.addCleanup(self.tracker.close_all)
        status, _, reply = yield defer.ensureDeferred(self.post(port, [request()] * 2))
        self.assertIn("over the limit of 1", reply["error"]["message"])
        listener.reconfigure(JSONRPC_SERVER_SETTINGS.validate({**settings, "max_batch": 2}))
        status, _, reply = yield defer.ensureDeferred(self.post(port, [request()] * 2))
        self.assertEqual((status, len(reply)), (200, 2))

    @defer.inlineCallbacks
    def test_paths_and_methods(self):
        _, port = yield defer.ensureDeferred(self.serve())
        for method, path in [("POST", "/other"), ("GET", "/"), ("POST", "/jsonrpc/x")]:
            status, _, reply = yield defer.ensureDeferred(
                self.exchange(port, http_request(method, path, body(request()))))
            self.assertEqual((status, reply), (404, {"message": "not found"}))
        for method in ("GET", "PUT", "DELETE", "OPTIONS"):
            status, headers, reply = yield defer.ensureDeferred(
                self.exchange(port, http_request(method, data=body(request()))))
            self.assertEqual(status, 405, method)
            self.assertEqual(headers["allow"], "POST")
            self.assertEqual(reply["error"]["code"], INVALID_REQUEST)
        status, _, reply = yield defer.ensureDeferred(
            self.exchange(port, http_request("POST", "/jsonrpc?x=1", body(request()))))
        self.assertEqual((status, reply["result"]), (200, {"a": 1}))

    async def _body_cap_by_content_length(self, use_tls: bool) -> None:
        _, port = await self.serve(use_tls=use_tls, max_body_bytes=1000)
        data = http_request(headers={"Content-Length": "1001", "Expect": "100-continue"})
        received = await self.raw(port, data, use_tls=use_tls)
        self.assertTrue(received.startswith(b"HTTP/1.1 413"), received[:40])
        status, _, content = parse_http(received)
        reply = json.loads(content)
        self.assertEqual((reply["jsonrpc"], reply["error"]["code"], reply["id"]),
                         ("2.0", INVALID_REQUEST, None))
        self.assertNotIn(b"100 Continue", received)
        self.assertEqual(self.handler.contexts, [])

    def test_body_cap_by_content_length(self):
        return Deferred.fromCoroutine(self._body_cap_by_content_length(use_tls=True))

    def test_body_cap_by_content_length_plain(self):
        return Deferred.fromCoroutine(self._body_cap_by_content_length(use_tls=False))

    @defer.inlineCallbacks
    def test_body_cap_at_the_limit(self):
        _, port = yield defer.ensureDeferred(self.serve(max_body_bytes=1000))
        data = body(request(id=4))
        data += b" " * (1000 - len(data))
        status, _, reply = yield defer.ensureDeferred(self.exchange(port, http_request(data=data)))
        self.assertEqual((status, reply["id"]), (200, 4))

    @defer.inlineCallbacks
    def test_body_cap_chunked(self):
        _, port = yield defer.ensureDeferred(self.serve(max_body_bytes=1000))
        chunk = b"%x\r\n%s\r\n" % (600, b" " * 600)
        head = http_request(headers={"Transfer-Encoding": "chunked"}, length=False)
        received = yield defer.ensureDeferred(self.raw(port, head + chunk + chunk))
        self.assertEqual(parse_http(received)[0], 413)
        self.assertEqual(self.handler.contexts, [])
        # Under the cap, chunked bodies work.
        small = body(request(id=1))
        ok = head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
        status, _, reply = yield defer.ensureDeferred(self.exchange(port, ok))
        self.assertEqual((status, reply["result"]), (200, {"a": 1}))

    @defer.inlineCallbacks
    def test_idle_connection_closed(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, port = yield defer.ensureDeferred(self.serve(timeout=0.2))
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{port}", client_tls(),
                                       server_name="sd-1")
        collector = Collector(b"POST /jsonrpc HTTP/1.1\r\nHost: sd-1\r\n")
        yield connectProtocol(endpoint, collector)
        received = yield collector.lost  # fails by the test timeout if never closed
        self.assertEqual(received, b"")
        texts = [formatEvent(e) for e in events]
        self.assertIn("closing an idle HTTP connection", texts)
        self.assertFalse([t for t in texts if "127.0.0.1" in t], "peer address logged")

    test_idle_connection_closed.timeout = 10  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_cors(self):
        cors = {"allowed_hosts": [r"^http(?:s)?://localhost\:\d+$"],
                "allowed_headers": ["X-Custom", "Content-Type"],
                "allowed_methods": ["POST", "OPTIONS"]}
        _, port = yield defer.ensureDeferred(self.serve(cors=cors))
        preflight = http_request("OPTIONS", headers={
            "Origin": "http://localhost:8080",
            "Access-Control-Request-Headers": "Content-Type, X-Other,content-type"})
        status, headers, reply = yield defer.ensureDeferred(self.exchange(port, preflight))
        self.assertEqual((status, reply), (200, None))
        self.assertEqual(headers["access-control-allow-origin"], "http://localhost:8080")
        self.assertEqual(headers["access-control-max-age"], "60")
        self.assertEqual(headers["access-control-allow-headers"],
                         "content-type, x-other, x-custom")
        self.assertEqual(headers["access-control-allow-methods"], "POST, OPTIONS")
        for origin in ("http://localhost:80.evil.example", "https://evil.example", None):
            status, headers, reply = yield defer.ensureDeferred(self.exchange(
                port, http_request("OPTIONS", headers={"Origin": origin})))
            self.assertEqual(status, 403)
            self.assertNotIn("access-control-allow-origin", headers)
        status, headers, reply = yield defer.ensureDeferred(self.exchange(
            port, http_request(data=body(request()), headers={"Origin": "https://localhost:1"})))
        self.assertEqual((status, reply["result"]), (200, {"a": 1}))
        self.assertEqual(headers["access-control-allow-origin"], "https://localhost:1")
        self.assertEqual(headers["access-control-allow-headers"], "x-custom, content-type")
        self.assertEqual(headers["vary"], "Origin")

    @defer.inlineCallbacks
    def test_client_certificates(self):
        _, port = yield defer.ensureDeferred(self.serve())
        no_cert = {"ca_certificate_files": [str(pki().root)]}
        foreign = client_tls(label="foreign")
        for tls_settings in (no_cert, foreign):
            client = self.client(port, tls=tls_settings)
            error = yield self.assertFailure(client.call("echo", {}), TransportError)
            self.assertIn("127.0.0.1", str(error))
        self.assertEqual(self.handler.contexts, [])
        # The server is not trusted by a client of the foreign CA either.
        client = self.client(port, tls=client_tls(trust="foreign"))
        yield self.assertFailure(client.call("echo", {}), TransportError)

    @defer.inlineCallbacks
    def test_optional_client_certificate(self):
        tls_settings = dict(server_tls(), verify_client=False)
        _, port = yield defer.ensureDeferred(self.serve(tls=tls_settings))
        client = self.client(port, tls={"ca_certificate_files": [str(pki().root)]})
        self.assertIsNone((yield client.call("context", {}))["peer"])

    @defer.inlineCallbacks
    def test_plain_http(self):
        _, port = yield defer.ensureDeferred(self.serve(use_tls=False))
        client = self.client(port, scheme="http")
        result = yield client.call("context", {}, id="x")
        self.assertEqual(result, {"id": "x", "host": "127.0.0.1", "peer": None})

    @defer.inlineCallbacks
    def test_client_disconnects_before_the_answer(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port)
        call = client.call("later", {}, timeout=0.1)
        yield self.assertFailure(call, TransportError)
        yield defer.gatherResults(self.connections)  # the server saw the disconnect
        self.handler.pending[0].callback({"late": True})  # answering now is harmless

    @defer.inlineCallbacks
    def test_rate_limits(self):
        _, port = yield defer.ensureDeferred(
            self.serve(tcp_rate_limits=[{"type": "hour", "limit": 1}]))
        status, _, _ = yield defer.ensureDeferred(
            self.exchange(port, http_request(data=body(request()))))
        self.assertEqual(status, 200)
        client = self.client(port)
        yield self.assertFailure(client.call("echo", {}), TransportError)

    @defer.inlineCallbacks
    def test_bind_failure(self):
        _, port = yield defer.ensureDeferred(self.serve())
        settings = JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": f"127.0.0.1:{port}", "tls": server_tls()})
        site = jsonrpc_site(self.handler, settings, reactor=reactor)
        yield self.assertFailure(listen_jsonrpc(reactor, site, settings),
                                 CannotListenError)

    @defer.inlineCallbacks
    def test_curl_mutual_tls(self):
        curl = shutil.which("curl")
        if curl is None:
            self.skipTest("curl is not installed")
        _, port = yield defer.ensureDeferred(self.serve())
        crt, key = pki().tls("hd-1")
        out, err, code = yield getProcessOutputAndValue(curl, [
            "-sS", "--max-time", "10", "--cacert", str(pki().root), "--cert", str(crt),
            "--key", str(key), "--resolve", f"sd-1:{port}:127.0.0.1",
            "-H", "Content-Type: application/json", "-d", body(request(id=1, method="context")),
            f"https://sd-1:{port}/jsonrpc"])
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {"jsonrpc": "2.0", "id": 1, "result": {
            "id": "n:1", "host": "127.0.0.1", "peer": "hd-1"}})
        out, err, code = yield getProcessOutputAndValue(curl, [
            "-sS", "--max-time", "10", "--cacert", str(pki().root),
            "--resolve", f"sd-1:{port}:127.0.0.1", "-d", "{}", f"https://sd-1:{port}/jsonrpc"])
        self.assertNotEqual(code, 0)  # no client certificate: refused


# ------------------------------------------------------------------- client tests


class Stub(Resource):
    """A misbehaving HTTP server: answers every request with ``reply``."""

    isLeaf = True

    def __init__(self, reply: bytes, status: int = 200, chunked: bool = False) -> None:
        super().__init__()
        self.reply, self.status, self.chunked = reply, status, chunked

    def render_POST(self, request: server.Request) -> bytes | int:
        request.setResponseCode(self.status)
        if not self.chunked:
            return self.reply
        for start in range(0, len(self.reply), 1000):
            request.write(self.reply[start:start + 1000])
        request.finish()
        return server.NOT_DONE_YET


class ClientTests(NetworkTestCase):
    """JSONRPCClient against good, bad and absent servers."""

    async def stub(self, reply: bytes, **kw: Any) -> int:
        site = self.track(server.Site(Stub(reply, **kw)))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.tracker.close_all)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_keep_alive(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port)
        for n in range(3):
            self.assertEqual((yield client.call("echo", {"n": n})), {"n": n})
        self.assertEqual(len(self.connections), 1)

    def test_unusable_tls_settings_fail_at_construction(self):
        settings = JSONRPC_CLIENT_SETTINGS.validate({
            "endpoint": "https://sd-1:1/jsonrpc",
            "tls": {"ca_certificate_files": [self.mktemp()]}})
        self.assertRaises(tls.TLSSettingsError, JSONRPCClient, reactor, settings)

    @defer.inlineCallbacks
    def test_timeout(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port, timeout=0.2)
        error = yield self.assertFailure(client.call("never", {}), TransportError)
        self.assertIn("within 0.2s", str(error))
        # The per-call timeout overrides the settings.
        error = yield self.assertFailure(client.call("never", {}, timeout=0.1), TransportError)
        self.assertIn("within 0.1s", str(error))

    @defer.inlineCallbacks
    def test_closed_port(self):
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(Resource()))
        port = listening.getHost().port
        yield listening.stopListening()
        client = self.client(port)
        error = yield self.assertFailure(client.call("echo", {}), TransportError)
        self.assertIn("cannot connect", str(error))

    @defer.inlineCallbacks
    def test_response_cap(self):
        _, port = yield defer.ensureDeferred(self.serve())
        client = self.client(port, max_response_bytes=1000)
        self.assertEqual(len((yield client.call("big", {"size": 900}))), 900)
        error = yield self.assertFailure(client.call("big", {"size": 5000}), TransportError)
        self.assertIn("larger than 1000 bytes", str(error))
        # Without a Content-Length the body is cut off while it streams in.
        big = body({"jsonrpc": "2.0", "result": "x" * 20000, "id": "1"})
        port = yield defer.ensureDeferred(self.stub(big, chunked=True))
        client = self.client(port, scheme="http", max_response_bytes=5000)
        error = yield self.assertFailure(client.call("x", {}, id="1"), TransportError)
        self.assertIn("larger than 5000 bytes", str(error))
        client = self.client(port, scheme="http")
        self.assertEqual(len((yield client.call("x", {}, id="1"))), 20000)

    @defer.inlineCallbacks
    def test_bad_replies(self):
        cases = [
            (b"<html>oops</html>", 502, "HTTP 502"),
            (b"[1, 2]", 200, "not a JSON-RPC response"),
            (body({"jsonrpc": "2.0", "result": 1, "id": "other"}), 200, "another request id"),
            (body({"jsonrpc": "2.0", "result": 1, "id": 1}), 200, "another request id"),
            (body({"jsonrpc": "2.0", "result": 1}), 200, "another request id"),
            (body({"jsonrpc": "2.0", "error": {"code": "x", "message": "m"}, "id": "1"}), 400,
             "malformed error"),
            (body({"jsonrpc": "2.0", "error": {"code": 1, "message": "m"}, "id": "2"}), 400,
             "another request id"),
        ]
        for reply, status, expected in cases:
            port = yield defer.ensureDeferred(self.stub(reply, status=status))
            client = self.client(port, scheme="http")
            error = yield self.assertFailure(client.call("m", {}, id="1"), TransportError)
            self.assertIn(expected, str(error))

    @defer.inlineCallbacks
    def test_error_reply_with_null_id(self):
        reply = body({"jsonrpc": "2.0,", "error": {"code": -32700, "message": "JSON required"},
                      "id": None})
        port = yield defer.ensureDeferred(self.stub(reply, status=400))
        client = self.client(port, scheme="http")
        error = yield self.assertFailure(client.call("m", {}), JSONRPCError)
        self.assertEqual((error.code, error.message, error.data),
                         (PARSE_ERROR, "JSON required", None))

    @defer.inlineCallbacks
    def test_request_format(self):
        seen = []

        class Recorder(Resource):
            isLeaf = True

            def render_POST(self, request: server.Request) -> bytes:
                seen.append((request.getHeader(b"content-type"), request.getHeader(b"accept"),
                             json.loads(request.content.read())))
                return body({"jsonrpc": "2.0", "result": "ok", "id": 5})

        site = self.track(server.Site(Recorder()))
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        self.addCleanup(self.tracker.close_all)
        client = self.client(listening.getHost().port, scheme="http")
        self.assertEqual((yield client.call("do", {"p": 1}, id=5)), "ok")
        self.assertEqual(seen, [(b"application/json", b"application/json",
                                 {"jsonrpc": "2.0", "method": "do", "params": {"p": 1},
                                  "id": 5})])


class BulkConnectionPoolTests(SynchronousTestCase):
    """The terminating private proxy's upstream pool reads large pieces at a time."""

    def connection(self, pool: Any, transport: Any) -> Any:
        protocol = pool._factory(lambda _: None, "test").buildProtocol(None)
        protocol.makeConnection(transport)
        return protocol

    def test_the_socket_is_read_in_bulk_also_under_tls(self) -> None:
        for layers in (0, 1):  # http: the socket itself; https: TLS over the socket
            socket = FileDescriptor(reactor)
            transport: Any = socket
            if layers:
                transport = Protocol()  # a layer that is not a socket, over it
                transport.transport = socket
            self.connection(BulkConnectionPool(reactor), transport)
            self.assertEqual(socket.bufferSize, BULK_READ_BYTES)

    def test_other_pools_keep_twisteds_reads(self) -> None:
        socket = FileDescriptor(reactor)
        self.connection(QuietConnectionPool(reactor), socket)
        self.assertEqual(socket.bufferSize, 64 * 1024)
