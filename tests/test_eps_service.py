"""
``twistd eps`` as an operator runs it: built by Options/makeService from a settings
folder, with the api directory against a real SD (signed records, verified cache), the
SD going away (warm cache keeps the node serving, also across a restart), metrics, and
the real ``twistd -n eps`` process.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import yaml
from twisted.internet import defer, reactor, threads, utils
from twisted.trial.unittest import TestCase

from epsproxy.eps.links.protocol import EPSClientFactory
from epsproxy.eps.tap import Options, makeService
from epsproxy.net import tls
from tests.support.eps import Network, gateway_client, service
from tests.support.pki import pki
from tests.support.sd import change, sd_client, sign_chain, start_sd, write_sd_settings
from tests.support.tls import tls_block
from tests.support.twistd import TWISTD, TwistdProcess

HD = ("health-departments",)


def signed_directory(addresses: dict[str, str]) -> list[dict]:
    """hd-1 (sd-admin) and hd-2, with pins, groups, services and eps_server channels."""
    changes = []
    for name in ("hd-1", "hd-2"):
        fingerprints = pki().fingerprints(name)
        changes += [
            change(name, "certificates", [
                {"fingerprint": fingerprints["signing"], "key_usage": "signing"},
                {"fingerprint": fingerprints["encryption"], "key_usage": "encryption"},
            ]),
            change(name, "groups", ["health-departments"]),
            change(name, "services", [service("internals", HD, "_ping", "_directory")]),
            change(name, "channels", [
                {"type": "eps_client"},
                {"type": "eps_server", "settings": {"address": addresses[name]}},
            ]),
        ]
    return sign_chain(changes)


def eps_settings(folder: Path, name: str, sd_port: int, server: str, metrics: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "name": name,
        "directory": {"type": "api", "settings": {
            "endpoints": [f"https://127.0.0.1:{sd_port}/jsonrpc"],
            "server_names": ["sd-1"],
            "cache_file": str(folder.parent / f"{name}-cache.json"),
            "jsonrpc_client": {"tls": tls_block(name), "timeout": 5},
            "ca_certificate_files": [str(pki().root)],
            "ca_intermediate_certificate_files": [str(pki().intermediate)],
        }},
        "channels": [
            {"name": "server", "type": "eps_server",
             "settings": {"bind_address": server, "tls": tls_block(name)}},
            {"name": "client", "type": "eps_client", "settings": {"tls": tls_block(name)}},
            {"name": "gateway", "type": "jsonrpc_server",
             "settings": {"bind_address": "127.0.0.1:0", "tls": tls_block(name)}},
        ],
    }
    if metrics:
        settings["metrics"] = {"bind_address": "127.0.0.1:0"}
    (folder / "eps.yml").write_text(yaml.safe_dump(settings))
    return folder


@defer.inlineCallbacks
def start_eps(folder: Path):
    """Options → makeService → start, exactly as twistd does; fires with the tree."""
    options = Options()
    options.parseOptions(["--settings", str(folder)])
    top = makeService(options, reactor, exit_on_failure=False)
    top.startService()
    node = top.services[0]
    yield node.when_ready()
    return top


def port_of(node, kind: str) -> int:
    for channel in node.channels:
        if channel.type == kind:
            return channel.port.getHost().port
    raise LookupError(kind)


class WithServiceDirectory(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        self.base = base
        self.sd = yield start_sd(write_sd_settings(base / "sd"))
        self.addCleanup(self.stop_sd)
        # The nodes listen on fixed-after-first-bind ports: bind 0, then publish.
        self.trees = {}
        for name in ("hd-2", "hd-1"):
            folder = eps_settings(base / name, name, self.sd.port_number, "127.0.0.1:0",
                                  metrics=(name == "hd-1"))
            tree = yield start_eps(folder)
            self.trees[name] = tree
            self.addCleanup(self.stop_tree, name)
        addresses = {n: f"127.0.0.1:{port_of(t.services[0], 'eps_server')}"
                     for n, t in self.trees.items()}
        client = sd_client(self.sd.port_number)
        self.addCleanup(client.close)
        result = yield client.call("submitRecords", {"records": signed_directory(addresses)})
        self.assertEqual(result, "ok")
        for tree in self.trees.values():
            changed = yield tree.services[0].directory.update()
            self.assertTrue(changed)

    def stop_sd(self):
        if self.sd is not None:
            sd, self.sd = self.sd, None
            return sd.stop()

    def stop_tree(self, name):
        tree = self.trees.pop(name, None)
        if tree is not None and tree.running:
            return tree.stopService()

    def gateway(self, name="hd-1"):
        node = self.trees[name].services[0]
        return gateway_client(self, f"https://127.0.0.1:{port_of(node, 'jsonrpc_server')}/jsonrpc",
                              name)

    @defer.inlineCallbacks
    def test_calls_with_verified_directory_then_warm_cache_without_sd(self):
        result = yield self.gateway().call("hd-2._ping", {}, id="1")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        yield self.stop_sd()
        # The SD is gone: the node keeps serving from memory ...
        result = yield self.gateway().call("hd-2._ping", {}, id="2")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        # ... and after a restart, from its verified cache file.
        yield self.stop_tree("hd-1")
        folder = self.base / "hd-1"
        self.trees["hd-1"] = yield start_eps(folder)
        node = self.trees["hd-1"].services[0]
        self.assertIsNone(node.directory.last_success)
        result = yield self.gateway().call("hd-2._ping", {}, id="3")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(result["params"]["_client"]["name"], "hd-1")

    @defer.inlineCallbacks
    def test_metrics(self):
        yield self.gateway().call("hd-2._ping", {}, id="1")
        yield self.assertFailure(self.gateway().call("hd-2.nothing", {}, id="2"), Exception)
        tree = self.trees["hd-1"]
        ports: list = []
        # Read the port without taking the result away from the service's Deferred.
        tree.services[1]._waitingForPort.addCallback(lambda p: ports.append(p) or p)
        port = ports[0].getHost().port
        body = yield threads.deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            .read().decode())
        self.assertIn('eps_requests_total{method="_ping",outcome="ok"} 1.0', body)
        self.assertIn('eps_peer_links{direction="outgoing"} 1.0', body)
        self.assertIn("eps_request_seconds_bucket", body)
        self.assertRegex(body, r"eps_directory_age_seconds \d")
        self.assertIn("eps_directory_entries 2.0", body)
        # Unknown method names do not become labels.
        self.assertNotIn('method="nothing"', body)


class TwistdEPS(TestCase):
    """The real ``twistd -n eps`` process with a json directory."""

    timeout = 60

    @defer.inlineCallbacks
    def test_serves_then_stops_on_sigterm(self):
        net = Network(self)
        net.operator("hd-1", ["health-departments"], [service("internals", HD, "_ping")])
        net.operator("hd-2", ["health-departments"], [])
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "eps.yml").write_text(yaml.safe_dump({
            "name": "hd-1",
            "directory": {"type": "json", "settings": {"path": str(net.folder)}},
            "channels": [{"name": "server", "type": "eps_server",
                          "settings": {"bind_address": "127.0.0.1:0",
                                       "tls": tls_block("hd-1")}}],
        }))
        process = TwistdProcess(r"eps_server channel server listening on [\d.]+:(\d+)")
        reactor.spawnProcess(process, TWISTD, [TWISTD, "-n", "--pidfile=", "eps"],
                             env=dict(os.environ, EPS_SETTINGS=str(folder)), path="/")
        match = yield process.matched
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{match.group(1)}",
                                       tls_block("hd-2"), "hd-1")
        link = yield endpoint.connect(
            EPSClientFactory(net_directory(net, "hd-2"), "hd-2", lambda r, p: None, reactor))
        yield link.when_ready()
        response = yield link.call("hd-1._ping", {}, id="hd-1._ping(1)")
        self.assertEqual(response.result["serverInfo"]["name"], "hd-1")
        self.assertEqual(response.result["params"]["_client"]["name"], "hd-2")
        process.transport.signalProcess(signal.SIGTERM)
        yield process.ended
        # twistd shuts down cleanly, then ends itself with the signal it received.
        self.assertIn("EPS link to hd-2 is down", process.output.decode())
        self.assertIn("Server Shut Down.", process.output.decode())
        yield link.when_closed()

    @defer.inlineCallbacks
    def test_bad_channel_settings_give_one_clear_message(self):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "eps.yml").write_text(yaml.safe_dump({
            "name": "hd-1",
            "directory": {"type": "json", "settings": {"path": str(folder)}},
            "channels": [{"name": "x", "type": "eps_server",
                          "settings": {"bind_adress": "127.0.0.1:0"}}],
        }))
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "eps", "--settings", str(folder)],
            env=dict(os.environ), path="/", reactor=reactor)
        text = (out + err).decode()
        self.assertNotEqual(code, 0)
        self.assertNotIn("Traceback", text)
        self.assertIn("channels[x].settings.bind_adress: unknown key", text)

    @defer.inlineCallbacks
    def test_unknown_channel_type(self):
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "eps.yml").write_text(yaml.safe_dump({
            "name": "hd-1",
            "directory": {"type": "json", "settings": {"path": str(folder)}},
            "channels": [{"name": "x", "type": "carrier_pigeon"}],
        }))
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "eps", "--settings", str(folder)],
            env=dict(os.environ), path="/", reactor=reactor)
        text = (out + err).decode()
        self.assertNotEqual(code, 0)
        self.assertIn("unknown channel type", text)
        self.assertIn("eps_server", text)


def net_directory(net: Network, own: str):
    from epsproxy.directory.jsondir import JSONDirectory

    return JSONDirectory(net.folder, own)



class TwistdEPSStartFailure(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_port_in_use_ends_the_process_with_the_reason(self):
        from twisted.internet.protocol import Factory, Protocol

        taken = yield reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        (folder / "eps.yml").write_text(yaml.safe_dump({
            "name": "hd-1",
            "directory": {"type": "json", "settings": {"path": str(folder)}},
            "channels": [{"name": "server", "type": "eps_server", "settings": {
                "bind_address": f"127.0.0.1:{taken.getHost().port}",
                "tls": tls_block("hd-1")}}],
        }))
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "eps", "--settings", str(folder)],
            env=dict(os.environ), path="/", reactor=reactor)
        text = (out + err).decode()
        self.assertIn("endpoint server hd-1 could not start", text)
        self.assertIn("Address already in use", text)
