"""
The endpoint server's status page (issue 16): loaded in real headless Chromium against a
running network where a public proxy brokers hd-1 <-> hd-2, and its pieces on plain
values.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.eps.status_page import EndpointServerPage, describe_checkpoint, route_of
from tests.support.metrics import request
from tests.support.p2p import PROXY, start_p2p_network
from tests.support.pages import dump_dom, serve_page


def _row(dom: str, first_cell: str) -> str:
    """The text of the table row whose first cell is ``first_cell``."""
    for row in re.findall(r"<tr>(.*?)</tr>", dom, re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
        if cells and re.sub(r"<[^>]+>", "", cells[0]).strip() == first_cell:
            return re.sub(r"<[^>]+>", " ", row)
    raise AssertionError(f"no row for {first_cell!r} in the page")


class EndpointServerPageInBrowser(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.p2p = yield start_p2p_network(self, Path(self.mktemp()).absolute())
        node = self.p2p.net.nodes["hd-1"]
        self.page = EndpointServerPage(node, reactor, node.registry)
        self.port = yield serve_page(self, node.registry, self.page, node.readiness)

    @defer.inlineCallbacks
    def test_hd1_shows_hd2_linked_through_the_public_proxy(self):
        yield self.p2p.hd1.call("hd-2._ping", {}, id="1")
        yield self.p2p.hd2.call("hd-1._ping", {}, id="2")
        dom = yield dump_dom(self, f"http://127.0.0.1:{self.port}/")
        self.assertIn("<h1>Endpoint server hd-1</h1>", dom)
        hd2 = _row(dom, "hd-2")
        self.assertIn("up", hd2)
        self.assertIn(f"outgoing, through {PROXY}", hd2)
        # hd-1 called hd-2 once, hd-2 called hd-1 once over the same link
        self.assertRegex(hd2, r"through public-proxy-1\.ga\s+1\s+1\s")
        proxy = _row(dom, PROXY)
        self.assertIn("outgoing, direct", proxy)
        self.assertIn("health-departments", _row(dom, "groups"))
        self.assertIn("ready", dom)
        self.assertIn("Certificates", dom)
        self.assertIn("calls/s", dom)  # the sparkline captions
        self.assertIn("<svg", dom)
        self.assertIn("none", _row(dom, "checkpoint"))  # a json directory has none

    @defer.inlineCallbacks
    def test_refused_calls_are_listed_with_their_method_escaped(self):
        method = "hd-2.<b>bold</b>"
        with self.assertRaises(Exception):
            yield self.p2p.hd1.call(method, {}, id="1")
        dom = yield dump_dom(self, f"http://127.0.0.1:{self.port}/")
        self.assertIn("<title>Endpoint server hd-1</title>", dom)
        self.assertNotIn("<b>", dom)
        self.assertIn("<td>&lt;b&gt;bold&lt;/b&gt;</td>", dom)
        self.assertRegex(dom, r"<td>call</td><td>(failed|error_response)</td><td>1</td>")

    @defer.inlineCallbacks
    def test_a_failed_call_is_the_peers_last_error(self):
        node = self.p2p.net.nodes["hd-1"]
        yield self.p2p.hd1.call("hd-2._ping", {}, id="1")
        link = node.links.link_to("hd-2")
        failing = node.links.call(link, "_ping", {}, timeout=5)
        link.close()
        with self.assertRaises(Exception):
            yield failing
        answer = yield request(self.port, "/")
        text = answer.body.decode()
        self.assertIn("last error", text)
        self.assertEqual(node.links.activity("hd-2").calls_out, 2)
        self.assertIsNotNone(node.links.activity("hd-2").last_error)


class RoutesAndCheckpoints(TestCase):
    """The page's rules on plain values."""

    def test_route_of_a_dialled_link_is_the_peers_proxy(self):
        peer = {"channels": [{"type": "eps_server",
                              "settings": {"address": "x:1", "proxy": "p.ga"}}]}
        own = {"channels": [{"type": "eps_server", "settings": {"address": "y:1"}}]}
        self.assertEqual(route_of("outgoing", own, peer), "through p.ga")
        self.assertEqual(route_of("incoming", own, peer), "direct")
        self.assertEqual(route_of("incoming", peer, own), "through p.ga")
        self.assertEqual(route_of("outgoing", own, None), "direct")
        self.assertEqual(route_of("outgoing", own, {"channels": "junk"}), "direct")
        self.assertEqual(route_of("outgoing", own, {"channels": [{"type": "grpc_server",
                                                                  "settings": None}]}),
                         "direct")

    def test_describe_checkpoint(self):
        class Checkpoint:
            origin, size, head, time = "sd.example", 12, b"\x00" * 32, 1700000000

        class Verified:
            checkpoint = Checkpoint()

        self.assertEqual(describe_checkpoint(None), "none")
        line = describe_checkpoint(Verified())
        self.assertIn("sd.example, 12 records, head AAAAAAAAAAAAAAAA...", line)
        self.assertIn("2023-11-14 22:13:20 UTC", line)
        self.assertEqual(describe_checkpoint("x" * 1000), "x" * 300)
