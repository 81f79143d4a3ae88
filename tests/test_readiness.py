"""
``readiness()`` of each service (issue 12): what is not ready, by check name, before
start, once started, when a listener, the store, the directory or the own endpoint
server fails, and once stopping.  Real services on loopback with real TLS.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from epsproxy.directory.api import STALE_AFTER_PERIODS
from epsproxy.eps.service import EndpointServerService
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.net.metrics import metrics_service
from epsproxy.proxy.tap import Options as ProxyOptions
from epsproxy.proxy.tap import makeService as make_proxy
from epsproxy.sd.tap import Options as SDOptions
from epsproxy.sd.tap import makeService as make_sd
from tests.support.eps import Network, gateway_channel, server_channel, service
from tests.support.metrics import request, samples, start_listener
from tests.support.pki import pki
from tests.support.proxies import (
    PUBLIC_PROXY,
    FakeEPS,
    caller_client,
    client,
    private_section,
    public_section,
    write_settings,
)
from tests.support.sd import change, sd_client, sign_chain, start_sd, write_sd_settings
from tests.support.tls import tls_block
from tests.support.waiting import until

HD = ("health-departments",)


@defer.inlineCallbacks
def dead_port() -> Any:
    """A loopback port where nothing listens any more."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol))
    number = port.getHost().port
    yield port.stopListening()
    return number


class SDReadiness(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_before_start_started_store_failing_and_stopping(self):
        options = SDOptions()
        options.parseOptions(["--settings", str(write_sd_settings(
            Path(self.mktemp()).absolute()))])
        top = make_sd(options, reactor, exit_on_failure=False)
        sd = top.services[0]
        self.assertEqual(sd.readiness(), {"start": "starting"})
        top.startService()
        self.addCleanup(lambda: top.running and top.stopService())
        yield sd.when_ready()
        self.assertEqual(sd.readiness(), {})
        # The store stops answering: the next periodic read says so.
        yield sd.store.close()
        yield sd._refresher.f()
        self.assertIn("the last read failed", sd.readiness()["store"])
        yield top.stopService()
        self.assertEqual(sd.readiness(), {"stop": "stopping"})


    @defer.inlineCallbacks
    def test_newest_record_age_metric(self):
        sd = yield start_sd(write_sd_settings(Path(self.mktemp()).absolute()))
        self.addCleanup(sd.stop)
        registry = sd.sd.registry
        self.assertEqual(registry.get_sample_value("sd_newest_record_age_seconds"), -1.0)
        fingerprints = pki().fingerprints("hd-1")
        records = sign_chain([
            change("hd-1", "certificates", [
                {"fingerprint": fingerprints["signing"], "key_usage": "signing"},
            ], created_at="2025-01-01T10:00:00Z"),
            change("hd-1", "groups", ["health-departments"],
                   created_at="2025-01-02T10:00:00Z"),
        ])
        submitter = sd_client(sd.port_number)
        self.addCleanup(submitter.close)
        yield submitter.call("submitRecords", {"records": records})
        newest = 1735812000.0  # 2025-01-02T10:00:00Z
        age = registry.get_sample_value("sd_newest_record_age_seconds")
        self.assertLess(abs(age - (reactor.seconds() - newest)), 5)


class EPSReadiness(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_listener_that_stops_is_named(self):
        net = Network(self)
        net.operator("hd-1", ["health-departments"], [service("internals", HD, "_ping")])
        node = yield net.start("hd-1", [server_channel("hd-1"), gateway_channel("hd-1")])
        self.assertEqual(node.readiness(), {})
        yield net.channel("hd-1", "jsonrpc_server").stop()
        self.assertEqual(node.readiness(), {"listener gateway": "not listening"})

    @defer.inlineCallbacks
    def test_directory_own_entry_then_ready_then_stale_then_stopping(self):
        base = Path(self.mktemp()).absolute()
        sd = yield start_sd(write_sd_settings(base / "sd"))
        self.addCleanup(lambda: sd.service.running and sd.stop())
        settings = EPS_SETTINGS.validate({
            "name": "hd-1",
            "directory": {"type": "api", "settings": {
                "endpoints": [f"https://127.0.0.1:{sd.port_number}/jsonrpc"],
                "server_names": ["sd-1"],
                "cache_entries_for": 1,
                "jsonrpc_client": {"tls": tls_block("hd-1"), "timeout": 2},
                "ca_certificate_files": [str(pki().root)],
                "ca_intermediate_certificate_files": [str(pki().intermediate)],
            }},
            "channels": [server_channel("hd-1")],
        })
        registry = CollectorRegistry()
        node = EndpointServerService(reactor, settings, registry)
        self.assertEqual(node.readiness(), {"start": "starting"})
        # /readyz of the node's metrics listener says the same at every step.
        port = yield start_listener(self, metrics_service(
            reactor, {"bind_address": "127.0.0.1:0"}, registry, program="eps",
            readiness=node.readiness))

        @defer.inlineCallbacks
        def readyz() -> Any:
            answer = yield request(port, "/readyz")
            scrape = yield request(port, "/metrics")
            # eps_ready says the same as /readyz, for alert rules.
            ready = samples(scrape.body)[("eps_ready", ())]
            self.assertEqual(ready, 1.0 if answer.status == 200 else 0.0)
            return answer.status, answer.json()["checks"]

        self.assertEqual((yield readyz()), (503, {"start": "starting"}))
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        yield node.when_ready()
        # The SD answered, but the directory has no entry for hd-1 yet.
        self.assertIn("no entry for hd-1", node.readiness()["directory"])
        fingerprints = pki().fingerprints("hd-1")
        records = sign_chain([
            change("hd-1", "certificates", [
                {"fingerprint": fingerprints["signing"], "key_usage": "signing"},
                {"fingerprint": fingerprints["encryption"], "key_usage": "encryption"},
            ]),
            change("hd-1", "groups", ["health-departments"]),
        ])
        submitter = sd_client(sd.port_number)
        self.addCleanup(submitter.close)
        self.assertEqual((yield submitter.call("submitRecords", {"records": records})), "ok")
        yield node.directory.update()
        self.assertEqual(node.readiness(), {})
        self.assertEqual((yield readyz()), (200, {}))
        # The SD goes away: after STALE_AFTER_PERIODS update periods, not ready.  (A
        # stopped SD still answers on connections open before; a reload of the SD
        # client settings replaces the clients, and with them those connections.)
        yield sd.stop()
        changed = copy.deepcopy(node.settings)
        changed["directory"]["settings"]["jsonrpc_client"]["timeout"] = 1
        node.reload(changed)
        limit = STALE_AFTER_PERIODS * 1
        yield until(lambda: "directory" in node.readiness(), limit=limit + 10)
        reason = node.readiness()["directory"]
        self.assertIn("stale: no successful update from the SD for", reason)
        self.assertIn(f"(limit {limit:g} s)", reason)
        status, checks = yield readyz()
        self.assertEqual(status, 503)
        self.assertIn("stale: no successful update from the SD for", checks["directory"])
        yield node.stopService()
        self.assertEqual(node.readiness(), {"stop": "stopping"})


class ProxyReadiness(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def start(self, mode: str, section: dict[str, Any]) -> Any:
        folder = Path(self.mktemp()).absolute()
        options = ProxyOptions()
        options.parseOptions(["--mode", mode, "--settings", str(write_settings(
            folder, {mode: section}))])
        top = make_proxy(options, reactor, exit_on_failure=False)
        proxy = top.services[0]
        self.assertEqual(proxy.readiness(), {"start": "starting"})
        top.startService()
        self.addCleanup(lambda: top.running and top.stopService())
        ports = yield proxy.when_ready()
        return top, proxy, ports

    @defer.inlineCallbacks
    def test_public_proxy_follows_its_endpoint_server(self):
        folder = Path(self.mktemp()).absolute()
        top, proxy, ports = yield self.start(
            "public", public_section(folder, (yield dead_port())))
        self.assertEqual(proxy.readiness(), {})  # no call yet: nothing known against it
        caller = caller_client(ports.jsonrpc.getHost().port)
        self.addCleanup(caller.close)
        with self.assertRaises(JSONRPCError):
            yield caller.call("requestConnection", {
                "to": "hd-2", "channel": "eps_server", "_client": client("hd-1")})
        self.assertIn("the last call got no answer", proxy.readiness()["endpoint_server"])
        # A reload pointing the client at a live endpoint server: ready again.
        fake = FakeEPS()
        port = yield fake.start(self)
        settings = copy.deepcopy(proxy.settings)
        settings["jsonrpc_client"]["endpoint"] = f"https://127.0.0.1:{port}/jsonrpc"
        proxy.reload(settings)
        self.assertEqual(proxy.readiness(), {})
        result = yield caller.call("requestConnection", {
            "to": "hd-2", "channel": "eps_server", "_client": client("hd-1")})
        self.assertIn("token", result)
        self.assertEqual(proxy.readiness(), {})
        self.assertEqual(fake.calls[-1][0], "hd-2._connectionRequest")
        yield top.stopService()
        self.assertEqual(proxy.readiness(), {"stop": "stopping"})

    @defer.inlineCallbacks
    def test_private_proxy_unreachable_endpoint_server(self):
        folder = Path(self.mktemp()).absolute()
        top, proxy, ports = yield self.start(
            "private", private_section(folder, (yield dead_port())))
        # The re-announcement at start had nothing to announce: no call made yet.
        self.assertEqual(proxy.readiness(), {})
        caller = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
            "endpoint": f"http://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc",
            "timeout": 10}))
        self.addCleanup(caller.close)
        with self.assertRaises(JSONRPCError):
            yield caller.call("announceConnection", {
                "proxy": PUBLIC_PROXY, "domain": "a.internal-server.local",
                "_client": client("hd-1")})
        self.assertIn("the last call got no answer", proxy.readiness()["endpoint_server"])
        yield top.stopService()
        self.assertEqual(proxy.readiness(), {"stop": "stopping"})
