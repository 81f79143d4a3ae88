"""
Whole endpoint servers talking to each other over real loopback sockets and real mutual
TLS (issue 3 "Done means"): calls in both directions between two and three nodes, a node
without a reachable server receiving calls over the link it opened, permission refused,
unknown operator, service down, loops, ``_ping``/``_directory``, pinning refusals, peer
restart with automatic reconnect, and the proxy rendezvous seam.
"""

from __future__ import annotations

import base64
import json
import secrets

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from epsproxy.net import tls
from epsproxy.eps.links import wire
from epsproxy.eps.broker import ClientInfo, Request
from epsproxy.eps.channels.peer import EPSClientChannel
from epsproxy.dev.examples.locations import make_site
from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.net.jsonrpc.server import listen_jsonrpc
from tests.support.eps import (
    Network,
    client_channel,
    gateway_channel,
    gateway_client,
    local_channel,
    server_channel,
    service,
)
from tests.support.tls import tls_block

HD = ("health-departments",)


class NetworkTestCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.net = Network(self)

    @defer.inlineCallbacks
    def locations_service(self) -> str:
        """The example locations service on a free port; its JSON-RPC URL."""
        site, settings = make_site(reactor, bind="127.0.0.1:0")
        port = yield listen_jsonrpc(reactor, site, settings)
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/jsonrpc"


class TwoAndThreeNodes(NetworkTestCase):
    """hd-1 (gateway) → ls-1 (locations service), and hd-2 both ways with hd-1."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        net = self.net
        net.operator("hd-1", ["health-departments"], [
            service("internals", HD, "_ping", "_directory"),
            service("notes", HD, "note"),
        ])
        net.operator("hd-2", ["health-departments"], [
            service("internals", HD, "_ping", "_directory"),
            service("notes", HD, "note"),
        ])
        net.operator("ls-1", ["location-services"], [
            service("locations", HD, "add", "lookup"),
            service("admin", ("location-administrators",), "wipe"),
        ])
        self.locations = yield self.locations_service()
        yield net.start("ls-1", [server_channel("ls-1"), client_channel("ls-1"),
                                 local_channel(self.locations)])
        yield net.start("hd-2", [server_channel("hd-2"), client_channel("hd-2"),
                                 gateway_channel("hd-2"), {"name": "out", "type": "stdout"}])
        yield net.start("hd-1", [server_channel("hd-1"), client_channel("hd-1"),
                                 gateway_channel("hd-1"), {"name": "out", "type": "stdout"}])
        for name in ("ls-1", "hd-2", "hd-1"):
            net.channels(name, {"type": "eps_client"},
                         {"type": "eps_server", "settings": {"address": net.server_address(name)}})
        self.hd1 = gateway_client(self, net.gateway_url("hd-1"))

    @defer.inlineCallbacks
    def test_getting_started_add_then_lookup(self):
        result = yield self.hd1.call("ls-1.add", {"name": "Berlin", "id": "b-1"}, id="1")
        self.assertEqual(result, "ok")
        result = yield self.hd1.call("ls-1.lookup", {"name": "Berlin"}, id=2)
        self.assertEqual(result, "b-1")
        # The service's own error comes back with its code.
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("ls-1.lookup", {"name": "Hamburg"}, id="3")
        self.assertEqual((e.exception.code, e.exception.message), (2, "not found"))

    @defer.inlineCallbacks
    def test_one_link_carries_calls_both_ways(self):
        hd2 = gateway_client(self, self.net.gateway_url("hd-2"), "hd-2")
        result = yield self.hd1.call("hd-2._ping", {"x": 1}, id="p")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(result["params"]["_client"]["name"], "hd-1")
        self.assertEqual(result["params"]["x"], 1)
        links = self.net.nodes["hd-1"].links
        self.assertEqual(links.count("outgoing"), 1)
        # hd-2 answers hd-1 over the link hd-1 opened: no second connection.
        result = yield hd2.call("hd-1._ping", {}, id="q")
        self.assertEqual(result["serverInfo"]["name"], "hd-1")
        self.assertEqual(self.net.nodes["hd-2"].links.count("outgoing"), 0)
        self.assertEqual(self.net.nodes["hd-2"].links.count("incoming"), 1)

    @defer.inlineCallbacks
    def test_many_calls_in_flight_share_one_link(self):
        results = yield defer.gatherResults([
            self.hd1.call("hd-2._ping", {"n": i}, id=f"c{i}") for i in range(40)
        ])
        self.assertEqual([r["params"]["n"] for r in results], list(range(40)))
        self.assertEqual(self.net.nodes["hd-1"].links.count("outgoing"), 1)

    @defer.inlineCallbacks
    def test_delivery_without_response_is_submitted(self):
        result = yield self.hd1.call("hd-2.note", {"text": "hello"}, id="n1")
        self.assertEqual(result, {"message": "submitted"})
        printed = json.loads(self.net.outputs["hd-2"].getvalue())
        self.assertEqual(printed["method"], "hd-2.note")
        self.assertEqual(printed["params"]["_client"]["name"], "hd-1")

    @defer.inlineCallbacks
    def test_directory(self):
        result = yield self.hd1.call("hd-2._directory", {"operator": "ls-1"}, id="d")
        self.assertEqual([e["name"] for e in result["entries"]], ["ls-1"])

    @defer.inlineCallbacks
    def test_permission_refused(self):
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("ls-1.wipe", {}, id="w")
        self.assertEqual(e.exception.code, 403)
        self.assertIn("Permission denied for method 'wipe' and client 'hd-1'",
                      e.exception.message)

    @defer.inlineCallbacks
    def test_unknown_operator(self):
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("nobody._ping", {}, id="u")
        self.assertEqual(e.exception.code, 1)
        self.assertIn("nobody", e.exception.message)

    @defer.inlineCallbacks
    def test_service_down(self):
        # ls-1's local service goes away: the caller gets a clear error, not a hang.
        local = self.net.channel("ls-1", "jsonrpc_client")
        local._client._endpoint = local._endpoint = "http://127.0.0.1:9/jsonrpc"
        local._client._url = b"http://127.0.0.1:9/jsonrpc"
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("ls-1.add", {"name": "a", "id": "b"}, id="down")
        self.assertEqual(e.exception.code, 500)
        self.assertIn("unreachable", e.exception.message)

    @defer.inlineCallbacks
    def test_forged_client_is_replaced(self):
        result = yield self.hd1.call(
            "hd-2._ping", {"_client": {"name": "ls-1", "entry": {}}}, id="f")
        self.assertEqual(result["params"]["_client"]["name"], "hd-1")
        self.assertEqual(result["params"]["_client"]["entry"]["name"], "hd-1")

    @defer.inlineCallbacks
    def test_method_and_id_must_agree_over_the_wire(self):
        # A peer cannot get _ping authorised and something else delivered (§23.2 #18).
        client = self.net.channel("hd-1", "eps_client")
        link = yield client.link_for("hd-2")
        response = yield link.call("hd-2.note", {}, id="hd-2._ping(1)")
        self.assertEqual(response.error["code"], 400)
        self.assertEqual(self.net.outputs["hd-2"].getvalue(), "")

    @defer.inlineCallbacks
    def test_loop_is_refused(self):
        # The same caller sending the same id while it is still being handled.
        client = self.net.channel("hd-1", "eps_client")
        link = yield client.link_for("hd-2")
        broker = self.net.nodes["hd-2"].broker
        broker._in_transit.add(("hd-1", "hd-2._ping(loop)"))
        self.addCleanup(broker._in_transit.discard, ("hd-1", "hd-2._ping(loop)"))
        response = yield link.call("hd-2._ping", {}, id="hd-2._ping(loop)")
        self.assertEqual(response.error["code"], -100)
        self.assertIn("already being processed", response.error["message"])

    @defer.inlineCallbacks
    def test_peer_restart_then_next_call_reconnects(self):
        yield self.hd1.call("hd-2._ping", {}, id="1")
        address = self.net.server_address("hd-2")
        node = self.net.nodes["hd-2"]
        yield node.stopService()
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("hd-2._ping", {}, id="2")
        self.assertEqual(e.exception.code, 500)
        # Same port again, as a restarted server would have.
        yield self.net.start("hd-2", [server_channel("hd-2", bind_address=address),
                                      client_channel("hd-2")])
        result = yield self.hd1.call("hd-2._ping", {}, id="3")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")


class ServerlessNode(NetworkTestCase):
    """op-1 has no reachable server: it keeps a link to hd-1, which calls it over it."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        net = self.net
        net.operator("hd-1", ["health-departments"], [
            service("internals", ("operators",), "_ping"),
        ])
        # op-1 may be called by health departments, so it keeps a link to them.
        net.operator("op-1", ["operators"], [service("ops", HD, "_ping", "status")])
        yield net.start("hd-1", [server_channel("hd-1"), client_channel("hd-1"),
                                 gateway_channel("hd-1")])
        net.channels("hd-1", {"type": "eps_server",
                              "settings": {"address": net.server_address("hd-1")}})
        net.channels("op-1", {"type": "eps_client"})
        yield net.start("op-1", [client_channel("op-1", reconnect_initial_delay=0.05,
                                                reconnect_max_delay=0.2),
                                 {"name": "out", "type": "stdout"}])
        self.client: EPSClientChannel = net.channel("op-1", "eps_client")
        yield self.client.keeper_ready("hd-1")
        self.hd1 = gateway_client(self, net.gateway_url("hd-1"))

    @defer.inlineCallbacks
    def test_call_arrives_over_the_link_op1_opened(self):
        self.assertEqual(self.client.wanted_peers(),
                         {"hd-1": self.net.server_address("hd-1")})
        result = yield self.hd1.call("op-1._ping", {}, id="1")
        self.assertEqual(result["serverInfo"]["name"], "op-1")
        result = yield self.hd1.call("op-1.status", {"ok": True}, id="2")
        self.assertEqual(result, {"message": "submitted"})
        self.assertIn('"op-1.status"', self.net.outputs["op-1"].getvalue())

    @defer.inlineCallbacks
    def test_kept_link_comes_back_after_the_server_restarts(self):
        address = self.net.server_address("hd-1")
        yield self.net.nodes["hd-1"].stopService()
        yield self.net.start("hd-1", [server_channel("hd-1", bind_address=address),
                                      gateway_channel("hd-1")])
        self.hd1 = gateway_client(self, self.net.gateway_url("hd-1"))
        link = yield self.client.keeper_ready("hd-1")
        yield link.when_ready()
        result = yield self.hd1.call("op-1._ping", {}, id="again")
        self.assertEqual(result["serverInfo"]["name"], "op-1")

    def test_public_server_with_client_peers_keeps_no_links(self):
        # hd-1 is reachable and op-1 has an eps_client: hd-1 keeps nothing.
        client = self.net.channel("hd-1", "eps_client")
        self.assertEqual(client.wanted_peers(), {})


class Refusals(NetworkTestCase):
    """The TLS and pinning rules, seen from a whole node."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        net = self.net
        net.operator("hd-1", ["health-departments"], [service("internals", HD, "_ping")])
        net.operator("hd-2", ["health-departments"], [service("internals", HD, "_ping")])
        yield net.start("hd-2", [server_channel("hd-2")])
        net.channels("hd-2", {"type": "eps_server",
                              "settings": {"address": net.server_address("hd-2")}})

    @defer.inlineCallbacks
    def call_with(self, block: dict, server_name: str = "hd-2"):
        endpoint = tls.client_endpoint(reactor, self.net.server_address("hd-2"), block,
                                       server_name)
        links = self.net.nodes["hd-2"].links
        from epsproxy.eps.links.protocol import EPSClientFactory
        factory = EPSClientFactory(links.directory, "hd-1", lambda r, p: None, reactor)
        try:
            link = yield endpoint.connect(factory)
        except Exception as e:
            return e
        try:
            yield link.when_ready()
        except Exception as e:
            return e
        finally:
            if link.transport is not None:
                link.transport.loseConnection()
        return None

    @defer.inlineCallbacks
    def test_unpinned_alt_certificate_refused(self):
        error = yield self.call_with(tls_block("hd-1", alt=True))
        self.assertIsNotNone(error)
        self.assertEqual(self.net.nodes["hd-2"].links.count("incoming"), 0)

    @defer.inlineCallbacks
    def test_foreign_ca_refused(self):
        error = yield self.call_with(tls_block("hd-1", source="foreign"))
        self.assertIsNotNone(error)

    @defer.inlineCallbacks
    def test_name_mismatch_refused_at_dial(self):
        # hd-1's directory says ls-1 lives where hd-2 listens: the dial is refused.
        self.net.operator("ls-1", ["location-services"], [])
        self.net.channels("ls-1", {"type": "eps_server",
                                   "settings": {"address": self.net.server_address("hd-2")}})
        yield self.net.start("hd-1", [client_channel("hd-1")])
        client = self.net.channel("hd-1", "eps_client")
        with self.assertRaises(Exception) as e:
            yield client.link_for("ls-1")
        self.assertIn("ls-1", str(e.exception))

    @defer.inlineCallbacks
    def test_pinned_peer_accepted(self):
        error = yield self.call_with(tls_block("hd-1"))
        self.assertIsNone(error)


class _Splicer(Protocol):
    """A minimal stand-in for a proxy's internal endpoint: pair by token, relay."""

    def connectionMade(self):
        self.buffer = b""
        self.partner = None

    def dataReceived(self, data):
        if self.partner is not None:
            self.partner.transport.write(data)
            return
        self.buffer += data
        if len(self.buffer) < 32:
            return
        token, rest = self.buffer[:32], self.buffer[32:]
        waiting = self.factory.waiting.pop(token, None)
        if waiting is None:
            self.factory.waiting[token] = self
            self.rest = rest
            return
        self.partner, waiting.partner = waiting, self
        if waiting.rest:
            self.transport.write(waiting.rest)
        if rest:
            waiting.transport.write(rest)
        self.factory.pairings += 1

    def connectionLost(self, reason=None):
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.loseConnection()


class RendezvousSeam(NetworkTestCase):
    """
    ``_connectionRequest`` and the client side of brokering, with a stand-in splicer
    (the real public proxy is the next issue): hd-2 sits behind "proxy" ls-1.
    """

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        factory = Factory.forProtocol(_Splicer)
        factory.waiting, factory.pairings = {}, 0
        port = yield reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.splicer = factory
        self.endpoint = f"127.0.0.1:{port.getHost().port}"
        net = self.net
        net.operator("hd-1", ["health-departments"], [service("internals", HD, "_ping")])
        net.operator("hd-2", ["health-departments"], [
            service("internals", HD, "_ping"),
            service("connection-requests", ("proxy-providers",), "_connectionRequest"),
        ])
        yield net.start("hd-2", [server_channel("hd-2"), client_channel("hd-2")])
        yield net.start("hd-1", [client_channel("hd-1"), gateway_channel("hd-1")])
        net.channels("hd-2", {"type": "eps_server",
                              "settings": {"address": "127.0.0.1:1", "proxy": "ls-1"}})

    @defer.inlineCallbacks
    def test_connection_request_then_client_side_meets_it(self):
        token = secrets.token_bytes(32)
        hd2 = self.net.nodes["hd-2"]
        # What the proxy's EPS would send: hd-2 dials, presents the token, serves TLS.
        response = yield hd2.broker.deliver(
            Request("hd-2._connectionRequest", {
                "channel": "eps_server", "endpoint": self.endpoint,
                "token": base64.b64encode(token).decode(), "client": {"name": "hd-1"},
            }, "hd-2._connectionRequest(1)"),
            ClientInfo("hd-2", hd2.directory.own_entry()),
        )
        self.assertEqual(response.result, {})
        # hd-1 meets it as TLS client, the way its eps_client does after requestConnection.
        from epsproxy.net.token import dial_with_token
        links = self.net.nodes["hd-1"].links
        link = yield dial_with_token(reactor, self.endpoint, token, tls_block("hd-1"),
                                     links.client_factory(), tls_client_for="hd-2")
        peer = yield link.when_ready()
        self.assertEqual(peer.name, "hd-2")
        self.assertEqual(self.splicer.pairings, 1)
        answer = yield link.call("hd-2._ping", {}, id="hd-2._ping(x)")
        self.assertEqual(answer.result["serverInfo"]["name"], "hd-2")

    @defer.inlineCallbacks
    def test_bad_connection_requests_are_refused(self):
        hd2 = self.net.nodes["hd-2"]
        own = ClientInfo("hd-2", hd2.directory.own_entry())
        for params, reason in [
            ({"channel": "eps_server", "endpoint": self.endpoint, "token": "short"},
             "token"),
            ({"channel": "eps_server", "endpoint": self.endpoint,
              "token": base64.b64encode(b"x" * 31).decode()}, "32 bytes"),
            ({"channel": "eps_server", "endpoint": "127.0.0.1:1",
              "token": base64.b64encode(b"x" * 32).decode()}, "cannot reach"),
            ({"endpoint": self.endpoint}, "invalid connection request"),
        ]:
            with self.assertRaises(Exception) as e:
                yield hd2.broker.deliver(
                    Request("hd-2._connectionRequest", params, "hd-2._connectionRequest(2)"),
                    own)
            self.assertIn(reason, str(e.exception))

    @defer.inlineCallbacks
    def test_proxied_peer_without_a_proxy_answer_fails_clearly(self):
        hd1 = gateway_client(self, self.net.gateway_url("hd-1"))
        with self.assertRaises(JSONRPCError) as e:
            yield hd1.call("hd-2._ping", {}, id="1")
        self.assertEqual(e.exception.code, 500)
        self.assertIn("ls-1", e.exception.message)


class MalformedFrames(NetworkTestCase):
    """Hostile bytes on a node's eps_server listener harm no other link."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        net = self.net
        net.operator("hd-1", ["health-departments"], [service("internals", HD, "_ping")])
        net.operator("hd-2", ["health-departments"], [service("internals", HD, "_ping")])
        yield net.start("hd-2", [server_channel("hd-2", max_line_bytes=4096)])
        net.channels("hd-2", {"type": "eps_server",
                              "settings": {"address": net.server_address("hd-2")}})
        yield net.start("hd-1", [client_channel("hd-1")])

    @defer.inlineCallbacks
    def raw_link(self):
        """A TLS connection to hd-2 as hd-1 that writes whatever the test wants."""

        class Raw(Protocol):
            def connectionMade(self):
                self.received = b""
                self.closed = defer.Deferred()

            def dataReceived(self, data):
                self.received += data

            def connectionLost(self, reason=None):
                self.closed.callback(self.received)

        endpoint = tls.client_endpoint(reactor, self.net.server_address("hd-2"),
                                       tls_block("hd-1"), "hd-2")
        raw = yield endpoint.connect(Factory.forProtocol(Raw))
        return raw

    @defer.inlineCallbacks
    def test_oversized_and_garbage_lines_close_only_that_link(self):
        client = self.net.channel("hd-1", "eps_client")
        good = yield client.link_for("hd-2")
        for payload, code in [(b"x" * 5000, wire.ERR_LINE_TOO_LONG),
                              (b"{not json}\n", wire.ERR_MALFORMED)]:
            raw = yield self.raw_link()
            raw.transport.write(payload)
            received = yield raw.closed
            frames = [json.loads(line) for line in received.splitlines() if line]
            self.assertEqual(frames[-1]["t"], "err")
            self.assertEqual(frames[-1]["code"], code)
        answer = yield good.call("hd-2._ping", {}, id="hd-2._ping(ok)")
        self.assertEqual(answer.result["serverInfo"]["name"], "hd-2")


class _Service:
    """A local JSON-RPC service that records calls and fires a Deferred per call."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls: list = []
        self.waiting: list = []

    def handle(self, method, params, context):
        self.calls.append((method, params, context.request_id))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            reactor.callLater(0, d.callback, (method, params, context.request_id))
        return self.answers.get(method, {})

    def next_call(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


class AsyncAcrossNodes(NetworkTestCase):
    """hd-1's app calls ls-1.later; ls-1's service acknowledges, then responds later."""

    @defer.inlineCallbacks
    def start_service(self, answers):
        from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site

        service_ = _Service(answers)
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        port = yield listen_jsonrpc(reactor, jsonrpc_site(service_, settings, reactor=reactor),
                                    settings)
        self.addCleanup(port.stopListening)
        return service_, f"http://127.0.0.1:{port.getHost().port}/jsonrpc"

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        net = self.net
        net.operator("hd-1", ["health-departments"], [])
        net.operator("ls-1", ["location-services"], [service("async", HD, "later")])
        self.ls_service, ls_url = yield self.start_service(
            {"later": {"_async": True, "message": "queued"}})
        self.hd_service, hd_url = yield self.start_service({"respond": "thanks"})
        yield net.start("ls-1", [server_channel("ls-1"), client_channel("ls-1"),
                                 gateway_channel("ls-1"), local_channel(ls_url)])
        net.channels("ls-1", {"type": "eps_client"},
                     {"type": "eps_server", "settings": {"address": net.server_address("ls-1")}})
        yield net.start("hd-1", [client_channel("hd-1"), gateway_channel("hd-1"),
                                 local_channel(hd_url)])
        self.hd1 = gateway_client(self, net.gateway_url("hd-1"))
        self.ls1 = gateway_client(self, net.gateway_url("ls-1"), "ls-1")

    @defer.inlineCallbacks
    def test_result_is_pushed_to_the_callers_service(self):
        ack = yield self.hd1.call("ls-1.later", {"job": 7}, id="job-7")
        self.assertEqual(ack, {"_async": True, "message": "queued"})
        method, params, eps_id = self.ls_service.calls[-1]
        self.assertEqual((method, eps_id), ("later", "ls-1.later(job-7)"))
        self.assertEqual(params["_client"]["name"], "hd-1")
        pushed = self.hd_service.next_call()
        answer = yield self.ls1.call("respond", {"result": {"done": True}}, id=eps_id)
        self.assertEqual(answer, {"message": "delivered"})
        method, params, request_id = yield pushed
        self.assertEqual(method, "respond")
        self.assertEqual(params["id"], "job-7")
        self.assertEqual(params["result"], {"done": True})
        self.assertEqual(request_id, eps_id)
        # Only once.
        with self.assertRaises(JSONRPCError) as e:
            yield self.ls1.call("respond", {"result": {}}, id=eps_id)
        self.assertEqual(e.exception.code, 404)

    @defer.inlineCallbacks
    def test_waiting_request_gets_the_real_result(self):
        from twisted.web.client import Agent, HTTPConnectionPool
        from treq.client import HTTPClient
        from epsproxy.net.tls import MutualTLSPolicy as _TLSPolicy

        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, contextFactory=_TLSPolicy(tls_block("hd-1"), "hd-1"),
                                pool=pool))
        # The acknowledgement has passed both nodes once hd-1 expects the result.
        calls = self.net.nodes["hd-1"].async_calls
        expected = defer.Deferred()
        expect = calls.expect

        def expecting(*args):
            expect(*args)
            expected.callback(args)

        calls.expect = expecting
        body = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "ls-1.later",
                           "params": {"job": 3}}).encode()
        app = http.post(self.net.gateway_url("hd-1"), data=body, headers={
            b"Content-Type": [b"application/json"], b"Prefer": [b"wait=10"]})
        operator, eps_id, _ = yield expected
        self.assertEqual((operator, eps_id), ("ls-1", "ls-1.later(n:3)"))
        answer = yield self.ls1.call("respond", {"error": {"code": 7, "message": "no"}},
                                     id=eps_id)
        self.assertEqual(answer, {"message": "delivered"})
        response = yield app
        reply = json.loads((yield response.content()))
        self.assertEqual(reply["id"], 3)
        self.assertEqual(reply["error"]["code"], 7)
        self.assertEqual(self.hd_service.calls, [])


class ThroughConnectProxy(NetworkTestCase):
    """eps_client with ``proxy_url``: links to peers go through a real HTTP CONNECT proxy."""

    @defer.inlineCallbacks
    def setUp(self):
        from tests.support.connectproxy import Tinyproxy, clean_environment

        super().setUp()
        clean_environment(self)
        self.proxy = Tinyproxy(self)
        yield defer.ensureDeferred(self.proxy.start())
        net = self.net
        net.operator("hd-1", ["health-departments"], [])
        net.operator("hd-2", ["health-departments"], [service("internals", HD, "_ping")])
        yield net.start("hd-2", [server_channel("hd-2")])
        net.channels("hd-2", {"type": "eps_server",
                              "settings": {"address": net.server_address("hd-2")}})
        yield net.start("hd-1", [client_channel("hd-1", proxy_url=self.proxy.url),
                                 gateway_channel("hd-1")])

    @defer.inlineCallbacks
    def test_call_travels_through_the_tunnel(self):
        hd1 = gateway_client(self, self.net.gateway_url("hd-1"))
        result = yield hd1.call("hd-2._ping", {}, id="1")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(self.proxy.requests(),
                         [f"CONNECT {self.net.server_address('hd-2')} HTTP/1.1"])


class ReferenceChannelNames(NetworkTestCase):
    """Settings and directory data written for the reference (grpc_server/grpc_client)."""

    @defer.inlineCallbacks
    def test_grpc_aliases_in_settings_and_directory(self):
        net = self.net
        net.operator("hd-1", ["health-departments"], [])
        net.operator("hd-2", ["health-departments"], [service("internals", HD, "_ping")])
        server = server_channel("hd-2")
        server["type"] = "grpc_server"
        yield net.start("hd-2", [server])
        net.channels("hd-2", {"type": "grpc_server",
                              "settings": {"address": net.server_address("hd-2")}},
                      {"type": "grpc_client"})
        client = client_channel("hd-1", useProxy=False)
        client["type"] = "grpc_client"
        yield net.start("hd-1", [client, gateway_channel("hd-1")])
        self.assertFalse(net.channel("hd-1", "eps_client").use_proxy)
        result = yield gateway_client(self, net.gateway_url("hd-1")).call(
            "hd-2._ping", {}, id="1")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
