"""
The metrics every program serves (issue 12, item 6), scraped over real sockets: process
metrics, ``<program>_build_info{version}``, no ``_created`` series, and the per-peer
link state of an endpoint server (``eps_peer_link_up``, ``eps_peer_last_seen_seconds``)
over a real mutual-TLS link between two endpoint servers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy import __version__
from epsproxy.eps.links.protocol import EPSClientFactory
from epsproxy.eps.links.registry import MAX_REMEMBERED_PEERS, LinkRegistry
from epsproxy.net import tls
from epsproxy.net.metrics import metrics_service
from tests.support.eps import (
    Network,
    client_channel,
    gateway_channel,
    gateway_client,
    server_channel,
    service,
)
from tests.support.metrics import names, request, samples, start_listener
from tests.support.tls import tls_block

HD = ("health-departments",)


class ProgramMetrics(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def scrape(self, program: str = "sd") -> defer.Deferred[bytes]:
        registry = CollectorRegistry()
        # a counter of the program's own, which would bring a _created series
        Counter("sd_things", "things", ["kind"], registry=registry).labels("a").inc()
        port = yield start_listener(self, metrics_service(
            reactor, {"bind_address": "127.0.0.1:0"}, registry, program=program))
        answer = yield request(port, "/metrics")
        self.assertEqual(answer.status, 200)
        return answer.body

    @defer.inlineCallbacks
    def test_process_metrics(self):
        body = yield self.scrape()
        found = samples(body)
        present = names(body)
        for name in ("process_open_fds", "process_max_fds", "process_start_time_seconds",
                     "process_resident_memory_bytes", "process_cpu_seconds_total"):
            self.assertIn(name, present)
        # (the scrape itself opens and closes descriptors: a bound, not an equality)
        self.assertGreater(found[("process_open_fds", ())], 3)
        self.assertLessEqual(found[("process_open_fds", ())],
                             found[("process_max_fds", ())])
        start = found[("process_start_time_seconds", ())]
        self.assertLess(start, reactor.seconds())
        self.assertGreater(start, reactor.seconds() - 24 * 3600)

    @defer.inlineCallbacks
    def test_build_info_names_the_program_and_version(self):
        body = yield self.scrape("proxy")
        self.assertEqual(samples(body)[("proxy_build_info", (("version", __version__),))], 1.0)
        self.assertNotIn("sd_build_info", names(body))

    @defer.inlineCallbacks
    def test_no_created_series(self):
        body = yield self.scrape()
        self.assertIn(b"sd_things_total", body)
        self.assertIn(b"metrics_http_refusals_total", body)
        self.assertEqual([line for line in body.splitlines() if b"_created" in line], [])

    def test_a_program_that_cannot_prefix_a_metric_is_refused(self):
        for program in ("", "1sd", "sd-1", "sd{x}", "sd\n"):
            with self.assertRaises(ValueError, msg=repr(program)):
                metrics_service(reactor, {"bind_address": "127.0.0.1:0"},
                                CollectorRegistry(), program=program)


class PeerLinkMetrics(TestCase):
    """hd-1 calls hd-2 over a real link; both report the peer's link state."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        net = self.net = Network(self)
        for name in ("hd-1", "hd-2"):
            net.operator(name, ["health-departments"],
                         [service("internals", HD, "_ping")])
        yield net.start("hd-2", [server_channel("hd-2"), client_channel("hd-2")])
        yield net.start("hd-1", [server_channel("hd-1"), client_channel("hd-1"),
                                 gateway_channel("hd-1")])
        for name in ("hd-1", "hd-2"):
            net.channels(name, {"type": "eps_client"},
                         {"type": "eps_server",
                          "settings": {"address": net.server_address(name)}})
        self.registries = {}
        for name in ("hd-1", "hd-2"):
            self.registries[name] = registry = CollectorRegistry()
            registry.register(net.nodes[name].links.collector())

    def sample(self, node: str, name: str, **labels: str) -> float | None:
        return self.registries[node].get_sample_value(name, labels)

    @defer.inlineCallbacks
    def test_link_up_and_last_seen_on_both_sides(self):
        self.assertIsNone(self.sample("hd-1", "eps_peer_link_up", peer="hd-2",
                                      direction="outgoing"))
        before = reactor.seconds()
        hd1 = gateway_client(self, self.net.gateway_url("hd-1"))
        yield hd1.call("hd-2._ping", {}, id="p1")
        after = reactor.seconds()
        self.assertEqual(self.sample("hd-1", "eps_peer_link_up", peer="hd-2",
                                     direction="outgoing"), 1.0)
        self.assertEqual(self.sample("hd-1", "eps_peer_link_up", peer="hd-2",
                                     direction="incoming"), 0.0)
        self.assertEqual(self.sample("hd-2", "eps_peer_link_up", peer="hd-1",
                                     direction="incoming"), 1.0)
        for node, peer in (("hd-1", "hd-2"), ("hd-2", "hd-1")):
            seen = self.sample(node, "eps_peer_last_seen_seconds", peer=peer)
            self.assertIsNotNone(seen)
            self.assertTrue(before <= seen <= after, (node, before, seen, after))
        # nobody else is named
        peers = {labels for (name, labels) in samples_of(self.registries["hd-1"])
                 if name == "eps_peer_last_seen_seconds"}
        self.assertEqual(peers, {(("peer", "hd-2"),)})

        # hd-2 goes away: hd-1 says the link is down and still knows when it saw hd-2
        link = self.net.nodes["hd-1"].links.link_to("hd-2")
        closed = link.when_closed()
        seen = self.sample("hd-1", "eps_peer_last_seen_seconds", peer="hd-2")
        yield self.net.nodes["hd-2"].stopService()
        yield closed
        self.assertEqual(self.sample("hd-1", "eps_peer_link_up", peer="hd-2",
                                     direction="outgoing"), 0.0)
        self.assertGreaterEqual(
            self.sample("hd-1", "eps_peer_last_seen_seconds", peer="hd-2"), seen)

    @defer.inlineCallbacks
    def test_a_refused_peer_is_never_a_label(self):
        # a certificate of our CA for hd-1 that the directory does not pin
        endpoint = tls.client_endpoint(reactor, self.net.server_address("hd-2"),
                                       tls_block("hd-1", alt=True), "hd-2")
        links = self.net.nodes["hd-2"].links
        factory = EPSClientFactory(links.directory, "hd-1", lambda r, p: None, reactor)
        link = yield endpoint.connect(factory)
        closed = link.when_closed()
        with self.assertRaises(Exception):
            yield link.when_ready()
        yield closed
        self.assertEqual([s for s in samples_of(self.registries["hd-2"])
                          if s[0].startswith("eps_peer_")], [])

    @defer.inlineCallbacks
    def test_the_endpoint_server_serves_them_in_its_registry(self):
        # (the registry its metrics listener serves)
        hd1 = gateway_client(self, self.net.gateway_url("hd-1"))
        yield hd1.call("hd-2._ping", {}, id="p2")
        self.assertEqual(self.net.nodes["hd-1"].registry.get_sample_value(
            "eps_peer_link_up", {"peer": "hd-2", "direction": "outgoing"}), 1.0)


def samples_of(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [(s.name, tuple(sorted(s.labels.items())))
            for family in registry.collect() for s in family.samples]


class RememberedPeers(TestCase):
    """Peers whose links closed are remembered up to a cap, least recently seen first out."""

    def test_the_cap(self):
        links = LinkRegistry(reactor, None, "hd-1", lambda r, p: None)  # type: ignore[arg-type]  # no link is built
        for i in range(MAX_REMEMBERED_PEERS + 10):
            links._remember(f"peer-{i}", float(i))
        peers = links.peers()
        self.assertEqual(len(peers), MAX_REMEMBERED_PEERS)
        self.assertNotIn("peer-9", peers)
        self.assertIn("peer-10", peers)
        links._remember("peer-10", 5.0)  # an older time never moves last-seen back
        self.assertEqual(links.peers()["peer-10"], (set(), 10.0))
