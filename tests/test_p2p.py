"""
Peer-to-peer brokering end to end (SPEC §15, issue 4): real endpoint servers and a real
public proxy on loopback.  hd-2's server is published behind the proxy; hd-1 reaches it
through a brokered, spliced mutual-TLS link that is reused in both directions while it
lives, and brokered again once it is gone.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from epsproxy.net.jsonrpc.envelope import JSONRPCError
from tests.support.p2p import PROXY, start_p2p_network


class PeerToPeer(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # The proxy and its endpoint server PE; hd-1 and hd-2 published behind the proxy,
        # both keeping a link to PE.
        p2p = yield start_p2p_network(self, Path(self.mktemp()).absolute())
        self.net, self.proxy, self.hd1, self.hd2 = p2p.net, p2p.proxy, p2p.hd1, p2p.hd2

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
