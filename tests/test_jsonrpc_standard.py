"""
JSON-RPC 2.0 as generic clients speak it (issue 13), checked with a client that is not
ours: ``jsonrpcclient`` builds the requests and reads the replies, ``httpx`` carries them
over mutual TLS with the test PKI's certificates (in a thread: it blocks).  The same
checks run against a real service directory, a real endpoint server's gateway and the real public
and private proxies' JSON-RPC APIs: a call without params, a notification (204, and the method
ran), a batch mixing calls, notifications and invalid items, a batch of notifications
only, an empty batch, a batch over ``max_batch``, hostile items and bodies.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx
from jsonrpcclient import Error, Ok, notification, parse, request
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from epsproxy.net.jsonrpc.envelope import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    CallContext,
    Dispatcher,
)
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from epsproxy.proxy.tap import Options as ProxyOptions, makeService as make_proxy
from epsproxy.rules.forms import FormError
from epsproxy.sd.settings import SD_SETTINGS
from tests.support.eps import Network, gateway_channel, local_channel, service
from tests.support.pki import pki
from tests.support.proxies import (
    PRIVATE_PROXY,
    PUBLIC_PROXY,
    FakeEPS,
    client as client_info,
    private_section,
    public_section,
    write_settings,
)
from tests.support.sd import base_changes, sign_chain, start_sd, write_sd_settings
from tests.support.tls import tls_block

#: Every server under test allows 4 requests per batch and 64 KiB per body.
CAPS = {"max_batch": 4, "max_body_bytes": 65536}
HD = ("health-departments",)


class StandardClient:
    """
    A generic JSON-RPC 2.0 client over HTTPS with a client certificate: what an
    application written against the standard, not against epsproxy, would use.  Bodies
    are built by ``jsonrpcclient`` (or by hand, for hostile ones) and sent by ``httpx``;
    ``server_name`` is the name the server's certificate is checked against (SNI), the
    connection goes to ``url``'s loopback address.
    """

    def __init__(self, url: str, server_name: str, client_name: str) -> None:
        crt, key = pki().tls(client_name)
        context = ssl.create_default_context(cafile=str(pki().root))
        context.load_cert_chain(str(crt), str(key))
        self.url = url
        self.server_name = server_name
        # No keep-alive: every exchange closes its connection, nothing is left open.
        self.http = httpx.Client(verify=context, timeout=10,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def close(self) -> None:
        self.http.close()

    def _post(self, data: bytes) -> tuple[int, str]:
        response = self.http.post(
            self.url, content=data,
            headers={"Content-Type": "application/json", "Connection": "close"},
            extensions={"sni_hostname": self.server_name},
        )
        return response.status_code, response.text

    def post(self, payload: Any) -> defer.Deferred[tuple[int, str]]:
        """POST ``payload`` (bytes as they are, else JSON); fires with (status, body)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return deferToThread(self._post, data)

    @defer.inlineCallbacks
    def call(self, method: str, params: Any = None) -> Any:
        """One request as ``jsonrpcclient`` builds it; fires with its Ok or Error."""
        status, text = yield self.post(request(method, params))
        return parse(json.loads(text))


class StandardChecks:
    """
    The checks, for any server: a subclass starts one in ``start`` (setting
    ``self.rpc``) and says which of its methods to use.
    """

    #: A method that needs no params, and one the server does not have (with the code
    #: it answers for it).
    NO_PARAMS: str
    UNKNOWN: tuple[str, int]
    rpc: StandardClient

    timeout = 30

    def start(self) -> defer.Deferred[None]:
        raise NotImplementedError

    def notification_with_effect(self) -> dict[str, Any]:
        """A notification whose effect :meth:`check_effect` can see."""
        raise NotImplementedError

    def check_effect(self) -> defer.Deferred[None]:
        raise NotImplementedError

    def check_no_params_result(self, result: Any) -> None:
        raise NotImplementedError

    def setUp(self) -> defer.Deferred[None]:
        return self.start()

    def client(self, url: str, server_name: str, client_name: str) -> StandardClient:
        client = StandardClient(url, server_name, client_name)
        self.addCleanup(client.close)  # type: ignore[attr-defined]  # mixed into a TestCase
        return client

    @defer.inlineCallbacks
    def test_call_without_params(self):
        built = request(self.NO_PARAMS)
        self.assertNotIn("params", built)  # what the library sends when there are none
        reply = yield self.rpc.call(self.NO_PARAMS)
        self.assertIsInstance(reply, Ok, reply)
        self.check_no_params_result(reply.result)

    @defer.inlineCallbacks
    def test_notification_gets_204_and_runs(self):
        note = self.notification_with_effect()
        self.assertNotIn("id", note)
        status, text = yield self.rpc.post(note)
        self.assertEqual((status, text), (204, ""))
        yield self.check_effect()
        # Refused methods and params are not answered either.
        status, text = yield self.rpc.post(notification(self.UNKNOWN[0]))
        self.assertEqual((status, text), (204, ""))

    @defer.inlineCallbacks
    def test_mixed_batch(self):
        first = request(self.NO_PARAMS)
        unknown = request(self.UNKNOWN[0], {"x": 1})
        status, text = yield self.rpc.post([
            first, notification(self.NO_PARAMS), unknown, {"jsonrpc": "2.0", "id": 77}])
        self.assertEqual(status, 200)
        replies = list(parse(json.loads(text)))
        self.assertEqual([r.id for r in replies], [first["id"], unknown["id"], None])
        self.assertIsInstance(replies[0], Ok)
        self.check_no_params_result(replies[0].result)
        self.assertIsInstance(replies[1], Error)
        self.assertEqual(replies[1].code, self.UNKNOWN[1])
        self.assertEqual(replies[2].code, INVALID_REQUEST)

    @defer.inlineCallbacks
    def test_batch_of_notifications(self):
        status, text = yield self.rpc.post([notification(self.NO_PARAMS)] * 2)
        self.assertEqual((status, text), (204, ""))

    @defer.inlineCallbacks
    def test_empty_batch(self):
        status, text = yield self.rpc.post([])
        self.assertEqual(status, 400)
        reply = parse(json.loads(text))  # one error object, not an array
        self.assertEqual(reply, Error(INVALID_REQUEST, "invalid request: empty batch", None,
                                      None))

    @defer.inlineCallbacks
    def test_batch_cap(self):
        status, text = yield self.rpc.post([request(self.NO_PARAMS) for _ in range(5)])
        self.assertEqual(status, 400)
        reply = parse(json.loads(text))
        self.assertIsInstance(reply, Error)
        self.assertEqual((reply.code, reply.id, reply.data),
                         (INVALID_REQUEST, None, {"max_batch": 4}))
        self.assertIn("over the limit of 4", reply.message)
        status, text = yield self.rpc.post([request(self.NO_PARAMS) for _ in range(4)])
        self.assertEqual((status, len(json.loads(text))), (200, 4))

    @defer.inlineCallbacks
    def test_hostile_items(self):
        def valid(**changes: Any) -> dict[str, Any]:
            return {"jsonrpc": "2.0", "method": self.NO_PARAMS, "id": 1, **changes}

        last = request(self.NO_PARAMS)
        for items in ([[[[[]]]], [], 1, last], ["x", None, True, last],
                      [valid(id=10**30), valid(id="i" * 2000), valid(id=1.5), last],
                      [valid(params=[1, 2]), valid(jsonrpc="1.0"), valid(method=""), last]):
            status, text = yield self.rpc.post(items)
            self.assertEqual(status, 200, items)
            replies = list(parse(json.loads(text)))
            self.assertEqual(len(replies), 4)
            for reply in replies[:3]:
                self.assertEqual((reply.code, reply.id), (INVALID_REQUEST, None), items)
            self.assertEqual(replies[3].id, last["id"])
            self.assertIsInstance(replies[3], Ok)
        # Whole bodies: nested past the parser, cut off, over the body cap.
        for data in (b"[" * 30000 + b"]" * 30000, b"[" + json.dumps(last).encode(),
                     b'[{"jsonrpc": "2.0", "method": "m", "id": ' + b"9" * 5000 + b"}]"):
            status, text = yield self.rpc.post(data)
            self.assertEqual(status, 400)
            self.assertEqual(json.loads(text)["error"]["code"], PARSE_ERROR)
        big = [request(self.NO_PARAMS, {"pad": "p" * 40000}) for _ in range(2)]
        status, text = yield self.rpc.post(big)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(text)["error"]["code"], INVALID_REQUEST)


class ServiceDirectory(StandardChecks, TestCase):
    """A real SD (built as twistd builds it)."""

    NO_PARAMS = "getTip"
    UNKNOWN = ("noSuchMethod", METHOD_NOT_FOUND)

    @defer.inlineCallbacks
    def start(self):
        folder = write_sd_settings(Path(self.mktemp()).absolute(), jsonrpc_server=CAPS)
        sd = yield start_sd(folder)
        self.addCleanup(sd.stop)
        self.service = sd.sd
        self.rpc = self.client(f"https://127.0.0.1:{sd.port_number}/jsonrpc", "sd-1", "hd-1")
        self.records = sign_chain(base_changes())

    def check_no_params_result(self, result: Any) -> None:
        self.assertTrue(result is None or "hash" in result, result)

    def notification_with_effect(self) -> dict[str, Any]:
        return notification("submitRecords", {"records": self.records})

    @defer.inlineCallbacks
    def check_effect(self):
        tip = yield self.rpc.call("getTip")
        self.assertEqual(tip.result["hash"], self.records[-1]["hash"])

    @defer.inlineCallbacks
    def test_invalid_params_inside_a_batch(self):
        bad = request("getRecords", {"after": "not a hash"})
        status, text = yield self.rpc.post([bad, request("getEntries")])
        replies = list(parse(json.loads(text)))
        self.assertEqual((status, replies[0].code, replies[0].id),
                         (200, INVALID_PARAMS, bad["id"]))
        self.assertEqual(replies[1].result, [])


    @defer.inlineCallbacks
    def test_batch_cap_reloads(self):
        current = self.service.settings
        self.service.reload(SD_SETTINGS.validate(
            {**current, "jsonrpc_server": {**current["jsonrpc_server"], "max_batch": 5}}))
        status, text = yield self.rpc.post([request("getTip") for _ in range(5)])
        self.assertEqual((status, len(json.loads(text))), (200, 5))
        with self.assertRaises(FormError):
            SD_SETTINGS.validate({**current, "jsonrpc_server": {
                **current["jsonrpc_server"], "max_batch": 0}})


class Gateway(StandardChecks, TestCase):
    """A real endpoint server's gateway, delivering to the operator's own service."""

    NO_PARAMS = "hd-1._ping"
    UNKNOWN = ("nope", 400)  # not operator.method: the gateway's own refusal (SPEC §12.1)

    @defer.inlineCallbacks
    def start(self):
        self.notes: list[dict[str, Any]] = []
        dispatcher = Dispatcher()

        def note(params: dict[str, Any], context: CallContext) -> str:
            self.notes.append(params)
            return "noted"

        dispatcher.register("note", None, note)
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        port = yield listen_jsonrpc(reactor, jsonrpc_site(dispatcher, settings, reactor=reactor),
                                    settings)
        self.addCleanup(port.stopListening)
        net = Network(self)
        net.operator("hd-1", list(HD), [service("internals", HD, "_ping"),
                                        service("notes", HD, "note")])
        yield net.start("hd-1", [
            gateway_channel("hd-1", **CAPS),
            local_channel(f"http://127.0.0.1:{port.getHost().port}/jsonrpc"),
        ])
        self.rpc = self.client(net.gateway_url("hd-1"), "hd-1", "hd-1")

    def check_no_params_result(self, result: Any) -> None:
        self.assertEqual(set(result["params"]), {"_client"})  # {} plus what the broker adds
        self.assertEqual(result["serverInfo"]["name"], "hd-1")

    def notification_with_effect(self) -> dict[str, Any]:
        return notification("hd-1.note", {"text": "hello"})

    def check_effect(self) -> defer.Deferred[None]:
        # The gateway answers once the service has: the note has arrived by now.
        self.assertEqual([n["text"] for n in self.notes], ["hello"])
        return defer.succeed(None)


class PublicProxy(StandardChecks, TestCase):
    """A real public proxy's JSON-RPC API (its own endpoint server is a stand-in)."""

    NO_PARAMS = "getAnnouncements"
    UNKNOWN = ("noSuchMethod", METHOD_NOT_FOUND)
    DOMAIN = "app.internal-server.local"

    @defer.inlineCallbacks
    def start(self):
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        server = {"bind_address": "127.0.0.1:0", "tls": tls_block(PUBLIC_PROXY), **CAPS}
        options = ProxyOptions()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(folder, eps_port, jsonrpc_server=server)}))])
        top = make_proxy(options, reactor, exit_on_failure=False)
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield top.services[0].when_ready()
        # The proxy answers only its own endpoint server: its certificate is the caller's.
        self.rpc = self.client(f"https://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc",
                               PUBLIC_PROXY, PUBLIC_PROXY)

    def check_no_params_result(self, result: Any) -> None:
        self.assertIsInstance(result, list)

    def notification_with_effect(self) -> dict[str, Any]:
        return notification("announceConnections", {
            "connections": [{"domain": self.DOMAIN}],
            "_client": client_info("private-proxy-1.ga")})

    @defer.inlineCallbacks
    def check_effect(self):
        listing = yield self.rpc.call("getAnnouncements")
        self.assertEqual([(a["operator"], a["domain"]) for a in listing.result],
                         [("private-proxy-1.ga", self.DOMAIN)])


class PrivateProxy(StandardChecks, TestCase):
    """A real private proxy's JSON-RPC API over mutual TLS (its own EPS is a stand-in)."""

    NO_PARAMS = "getAnnouncements"
    UNKNOWN = ("noSuchMethod", METHOD_NOT_FOUND)
    DOMAIN = "app.internal-server.local"

    @defer.inlineCallbacks
    def start(self):
        self.fake = FakeEPS()  # answers the forwarded announcements, one result each
        self.fake.answer = lambda params: [None] * len(params.get("connections", []))
        eps_port = yield self.fake.start(self)
        folder = Path(self.mktemp()).absolute()
        section = private_section(
            folder, eps_port,
            jsonrpc_server={"bind_address": "127.0.0.1:0", "tls": tls_block(PRIVATE_PROXY),
                            **CAPS},
            jsonrpc_client={"endpoint": f"https://127.0.0.1:{eps_port}/jsonrpc",
                            "server_name": PUBLIC_PROXY, "timeout": 5,
                            "tls": tls_block(PRIVATE_PROXY)})
        options = ProxyOptions()
        options.parseOptions(["--mode", "private", "--settings",
                              str(write_settings(folder, {"private": section}))])
        top = make_proxy(options, reactor, exit_on_failure=False)
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield top.services[0].when_ready()
        self.rpc = self.client(f"https://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc",
                               PRIVATE_PROXY, PRIVATE_PROXY)

    def check_no_params_result(self, result: Any) -> None:
        self.assertIsInstance(result, list)

    def notification_with_effect(self) -> dict[str, Any]:
        return notification("announceConnection", {
            "proxy": PUBLIC_PROXY, "domain": self.DOMAIN, "_client": client_info()})

    @defer.inlineCallbacks
    def check_effect(self):
        listing = yield self.rpc.call("getAnnouncements")
        self.assertEqual([(a["proxy"], a["domain"]) for a in listing.result],
                         [(PUBLIC_PROXY, self.DOMAIN)])
        forwarded = [params["connections"] for method, params, _ in self.fake.calls
                     if method == f"{PUBLIC_PROXY}.announceConnections"]
        self.assertIn([{"domain": self.DOMAIN}], forwarded)
