"""
Peer-to-peer brokering end to end (SPEC §15, issue 4): real endpoint servers and a real
public proxy on loopback.  hd-2's server is published behind the proxy; hd-1 reaches it
through a brokered, spliced mutual-TLS link that is reused in both directions while it
lives, and brokered again once it is gone.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.proxy.tap import Options, makeService
from tests.support.eps import (
    Network,
    client_channel,
    gateway_channel,
    gateway_client,
    local_channel,
    server_channel,
    service,
)
from tests.support.proxies import public_section, write_settings
from tests.support.tls import tls_block

PROXY = "public-proxy-1.ga"
HD = ("health-departments",)


class PeerToPeer(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        net = self.net = Network(self)
        net.operator(PROXY, ["proxy-providers"], [service("hd-proxy", HD, "requestConnection")])
        for name in ("hd-1", "hd-2"):
            net.operator(name, ["health-departments"], [
                service("internals", HD, "_ping"),
                service("connection-requests", ("proxy-providers",), "_connectionRequest"),
            ])
        # The proxy, then its endpoint server PE; each calls the other's JSON-RPC server.
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(folder, 1)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        self.proxy = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield self.proxy.when_ready()
        self.proxy.proxy.internal_endpoint = f"127.0.0.1:{ports.internal.getHost().port}"
        yield net.start(PROXY, [
            server_channel(PROXY), client_channel(PROXY), gateway_channel(PROXY),
            local_channel(f"https://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc",
                          tls=tls_block(PROXY), server_name=PROXY),
        ])
        net.channels(PROXY, {"type": "eps_server",
                             "settings": {"address": net.server_address(PROXY)}})
        yield self.proxy.proxy.client.close()
        self.proxy.proxy.client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
            "endpoint": net.gateway_url(PROXY), "server_name": PROXY, "timeout": 5,
            "tls": tls_block(PROXY)}))
        self.addCleanup(self.proxy.proxy.client.close)
        # hd-1 and hd-2: servers behind the proxy; both keep a link to PE.
        for name in ("hd-2", "hd-1"):
            net.channels(name, {"type": "eps_server",
                                "settings": {"address": "127.0.0.1:1", "proxy": PROXY}},
                         {"type": "eps_client"})
            yield net.start(name, [
                server_channel(name),
                client_channel(name, reconnect_initial_delay=0.05, reconnect_max_delay=0.2),
                gateway_channel(name),
            ])
            link = yield net.channel(name, "eps_client").keeper_ready(PROXY)
            yield link.when_ready()
        self.hd1 = gateway_client(self, net.gateway_url("hd-1"))
        self.hd2 = gateway_client(self, net.gateway_url("hd-2"), "hd-2")

    @property
    def rendezvous(self):
        return self.proxy.rendezvous

    @defer.inlineCallbacks
    def test_brokered_link_is_reused_both_ways(self):
        result = yield self.hd1.call("hd-2._ping", {"n": 1}, id="1")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(result["params"]["_client"]["name"], "hd-1")
        self.assertEqual((self.rendezvous.pairings, self.rendezvous.pending), (1, 0))
        # hd-1 dialled the link as TLS client, hd-2 served it as TLS server.
        self.assertIsNotNone(self.net.nodes["hd-1"].links.link_to("hd-2", "outgoing"))
        self.assertIsNotNone(self.net.nodes["hd-2"].links.link_to("hd-1", "incoming"))
        # More calls, and calls the other way, ride the same spliced link.
        yield self.hd1.call("hd-2._ping", {"n": 2}, id="2")
        result = yield self.hd2.call("hd-1._ping", {}, id="3")
        self.assertEqual(result["serverInfo"]["name"], "hd-1")
        self.assertEqual(self.rendezvous.pairings, 1)
        self.assertEqual(self.rendezvous.active_splices, 1)
        self.assertGreater(self.rendezvous.bytes_spliced, 0)

    @defer.inlineCallbacks
    def test_next_call_after_the_link_died_brokers_a_new_one(self):
        yield self.hd1.call("hd-2._ping", {}, id="1")
        link = self.net.nodes["hd-1"].links.link_to("hd-2")
        link.close()
        yield link.when_closed()
        result = yield self.hd1.call("hd-2._ping", {}, id="2")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(self.rendezvous.pairings, 2)

    @defer.inlineCallbacks
    def test_connection_request_only_from_proxy_providers(self):
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("hd-2._connectionRequest", {
                "channel": "eps_server", "endpoint": self.proxy.proxy.internal_endpoint,
                "token": "A" * 43 + "=",
            }, id="sneaky")
        self.assertEqual(e.exception.code, 403)
        self.assertEqual(self.rendezvous.pending, 0)

    @defer.inlineCallbacks
    def test_unreachable_target_fails_clearly_and_leaves_nothing_pending(self):
        yield self.net.nodes["hd-2"].stopService()
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call("hd-2._ping", {}, id="1")
        self.assertEqual(e.exception.code, 500)
        self.assertIn(PROXY, e.exception.message)
        self.assertEqual(self.rendezvous.pending, 0)
        self.assertEqual(self.rendezvous.pairings, 0)
