"""
Rotating an endpoint server's TLS certificate in a running network, as docs/operating.md
tells an operator to (issue 12): a real SD with records signed by an sd-admin, a public
proxy splicing hd-1's link to hd-2, and hd-1 as a real ``twistd eps`` process.

1. hd-1 calls hd-2 through the splice, and keeps calling (one call after another) for the
   whole rotation;
2. a ``certificates`` record listing hd-1's old and new fingerprints, signed by hd-1 (the
   sd-admin), is submitted to the SD and read by hd-2;
3. hd-1's certificate and key files are overwritten with the new ones and hd-1 gets
   SIGHUP: it logs the reload, the spliced link and every call carry on, hd-1's listener
   presents the new certificate, and the next new link does too (and hd-2 accepts it,
   because it was pinned first);
4. a key that does not match is refused on the next SIGHUP: hd-1 logs why and keeps
   presenting the certificate it had.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from epsproxy.eps.service import EndpointServerService
from epsproxy.eps.settings import EPS_SETTINGS
from epsproxy.net import tls
from epsproxy.net.jsonrpc.client import JSONRPCClient
from epsproxy.rules.certificates import fingerprint, load_certificates_file
from tests.support.eps import gateway_client, service
from tests.support.p2p import (
    HD,
    HD_DIRECTORY_CHANNELS,
    HD_SERVICES,
    PROXY,
    answer_through,
    hd_channels,
    proxy_channels,
    start_public_proxy,
)
from tests.support.pki import pki
from tests.support.sd import change, sd_client, sign_chain, start_sd, write_sd_settings
from tests.support.tls import server_certificate, tls_block
from tests.support.twistd import spawn_twistd, stop_twistd

RELOADED = r"reloaded settings from "
REFUSED = r"reload refused, still running with the previous settings: (.*)\n"


def _fingerprint(path: str | Path) -> str:
    return fingerprint(load_certificates_file(str(path))[0])


class _Traffic:
    """hd-1's gateway calling hd-2._ping, one call after another, until stopped."""

    def __init__(self, client: JSONRPCClient) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[str] = []
        self._stopping = False
        self.done: defer.Deferred[None] = self._run()

    @defer.inlineCallbacks
    def _run(self) -> Any:
        n = 0
        while not self._stopping:
            n += 1
            try:
                result = yield self.client.call("hd-2._ping", {"n": n}, id=f"t{n}")
            except Exception as e:
                self.failures.append(f"call {n}: {e}")
            else:
                if result["serverInfo"]["name"] == "hd-2":
                    self.ok += 1
                else:
                    self.failures.append(f"call {n}: answered by {result['serverInfo']}")

    def stop(self) -> defer.Deferred[None]:
        self._stopping = True
        return self.done

    @defer.inlineCallbacks
    def more(self, count: int) -> Any:
        """Wait until ``count`` more calls have succeeded (fails after 15 s)."""
        target = self.ok + count
        for _ in range(300):
            if self.ok >= target:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"traffic stalled at {self.ok} calls: {self.failures}")


class RotationUnderTraffic(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        # hd-1's TLS files are copies, rotated in place by the test.
        files = base / "hd-1-files"
        files.mkdir(parents=True)
        self.crt, self.key = files / "hd-1.crt", files / "hd-1.key"
        crt, key = pki().tls("hd-1")
        shutil.copyfile(crt, self.crt)
        shutil.copyfile(key, self.key)
        self.old_fingerprint = _fingerprint(crt)
        self.new_fingerprint = _fingerprint(pki().tls("hd-1", alt=True)[0])

        sd = yield start_sd(write_sd_settings(base / "sd"))
        self.addCleanup(lambda: sd.service.running and sd.stop())
        self.sd_port = sd.port_number
        self.submitter = sd_client(self.sd_port)
        self.addCleanup(self.submitter.close)
        self.tip = ""

        # The public proxy and its operator's endpoint server (in this process).
        self.proxy, ports = yield start_public_proxy(self, base / "proxy")
        proxy_eps = yield self.node(PROXY, proxy_channels(ports))
        yield answer_through(self, self.proxy, self.gateway_url(proxy_eps))

        # The directory, signed by hd-1 (the sd-admin of the test PKI).
        p = pki()
        changes = [
            change(PROXY, "certificates", [
                {"fingerprint": p.fingerprints(PROXY)["encryption"], "key_usage": "encryption"}]),
            change(PROXY, "groups", ["proxy-providers"]),
            change(PROXY, "services", [service("hd-proxy", HD, "requestConnection")]),
            change(PROXY, "channels", [{"type": "eps_server", "settings": {
                "address": self.server_address(proxy_eps)}}]),
        ]
        for name in ("hd-1", "hd-2"):
            fingerprints = p.fingerprints(name)
            changes += [
                change(name, "certificates", [
                    {"fingerprint": fingerprints["signing"], "key_usage": "signing"},
                    {"fingerprint": fingerprints["encryption"], "key_usage": "encryption"}]),
                change(name, "groups", list(HD)),
                change(name, "services", HD_SERVICES),
                change(name, "channels", list(HD_DIRECTORY_CHANNELS)),
            ]
        yield self.submit(changes)
        yield proxy_eps.directory.update()

        self.hd2 = yield self.node("hd-2", hd_channels("hd-2"))

        # hd-1: a real twistd, its peer TLS from the copied files.
        own = tls_block("hd-1", certificate_file=str(self.crt), key_file=str(self.key))
        self.hd1_settings = base / "hd-1"
        self.hd1_settings.mkdir()
        # JSON is YAML without the aliases the settings loader refuses.
        (self.hd1_settings / "eps.yml").write_text(json.dumps({
            "name": "hd-1",
            "directory": self.api_directory("hd-1"),
            "channels": hd_channels("hd-1", own),
        }))
        self.hd1 = spawn_twistd(["eps", "--settings", str(self.hd1_settings)])
        self.addCleanup(stop_twistd, self.hd1)
        peers = yield self.hd1.wait_for(r"eps_server channel eps-server listening on [\d.]+:(\d+)")
        gateway = yield self.hd1.wait_for(r"gateway gateway listening on [\d.]+:(\d+)")
        self.hd1_peer_address = f"127.0.0.1:{peers.group(1)}"
        self.hd1_gateway = gateway_client(
            self, f"https://127.0.0.1:{gateway.group(1)}/jsonrpc")
        # The first call: once hd-1 has read the directory and linked to the proxy.
        for attempt in range(200):
            try:
                yield self.hd1_gateway.call("hd-2._ping", {}, id=f"first-{attempt}")
                break
            except Exception:
                yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(f"hd-1 never reached hd-2:\n{self.hd1.output}")

    # -- helpers --------------------------------------------------------------------------

    def api_directory(self, name: str) -> dict[str, Any]:
        return {"type": "api", "settings": {
            "endpoints": [f"https://127.0.0.1:{self.sd_port}/jsonrpc"],
            "server_names": ["sd-1"],
            "cache_entries_for": 1,
            "jsonrpc_client": {"tls": tls_block(name), "timeout": 5},
            "ca_certificate_files": [str(pki().root)],
            "ca_intermediate_certificate_files": [str(pki().intermediate)],
        }}

    @defer.inlineCallbacks
    def node(self, name: str, channels: list[dict[str, Any]]) -> Any:
        settings = EPS_SETTINGS.validate({
            "name": name, "directory": self.api_directory(name), "channels": channels})
        node = EndpointServerService(reactor, settings)
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        yield node.when_ready()
        return node

    @staticmethod
    def server_address(node: Any) -> str:
        channel = next(c for c in node.channels if c.type == "eps_server")
        return f"127.0.0.1:{channel.port.getHost().port}"

    @staticmethod
    def gateway_url(node: Any) -> str:
        channel = next(c for c in node.channels if c.type == "jsonrpc_server")
        return f"https://127.0.0.1:{channel.port.getHost().port}/jsonrpc"

    @defer.inlineCallbacks
    def submit(self, changes: list[dict[str, Any]]) -> Any:
        records = sign_chain(changes, parent_hash=self.tip)
        answer = yield self.submitter.call("submitRecords", {"records": records})
        self.assertEqual(answer, "ok")
        self.tip = records[-1]["hash"]

    def incoming_from_hd1(self) -> Any:
        link = self.hd2.links.link_to("hd-1", "incoming")
        self.assertIsNotNone(link, "hd-2 has no link from hd-1")
        return link

    def presented(self, link: Any) -> str:
        return fingerprint(tls.peer_certificate(link.transport))

    # -- the test -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_sighup_rotates_hd1_under_traffic_and_a_bad_key_is_refused(self):
        rendezvous = self.proxy.rendezvous
        spliced = self.incoming_from_hd1()
        self.assertEqual(self.presented(spliced), self.old_fingerprint)
        self.assertEqual((rendezvous.pairings, rendezvous.active_splices), (1, 1))
        traffic = _Traffic(self.hd1_gateway)
        self.addCleanup(traffic.stop)
        yield traffic.more(5)

        # 1. Pin the new certificate beside the old one: a signed record, read by hd-2.
        yield self.submit([change("hd-1", "certificates", [
            {"fingerprint": pki().fingerprints("hd-1")["signing"], "key_usage": "signing"},
            {"fingerprint": self.old_fingerprint, "key_usage": "encryption"},
            {"fingerprint": self.new_fingerprint, "key_usage": "encryption"},
        ])])
        yield self.hd2.directory.update()

        # 2. Rotate the files in place and send SIGHUP, calls still running.
        alt_crt, alt_key = pki().tls("hd-1", alt=True)
        shutil.copyfile(alt_crt, self.crt)
        shutil.copyfile(alt_key, self.key)
        self.hd1.signal("HUP")
        yield self.hd1.wait_for(RELOADED + str(self.hd1_settings))
        yield traffic.more(10)

        # The splice carried on: the same link, one pairing, nothing failed.
        self.assertIs(self.incoming_from_hd1(), spliced)
        self.assertEqual((rendezvous.pairings, rendezvous.active_splices), (1, 1))
        self.assertEqual(traffic.failures, [])
        # hd-1's listener presents the new certificate to a new connection.
        certificate = yield server_certificate(self.hd1_peer_address, "hd-2", "hd-1")
        self.assertEqual(fingerprint(certificate), self.new_fingerprint)

        # 3. The next new link (brokered again) presents the new certificate, and hd-2
        # accepts it because it was pinned first.
        yield traffic.stop()
        self.assertEqual(traffic.failures, [])
        spliced.close()
        yield spliced.when_closed()
        result = yield self.hd1_gateway.call("hd-2._ping", {}, id="after-rotation")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(rendezvous.pairings, 2)
        self.assertEqual(self.presented(self.incoming_from_hd1()), self.new_fingerprint)

        # 4. A key that does not belong to the certificate: refused, nothing changes.
        shutil.copyfile(pki().tls("hd-2")[1], self.key)
        self.hd1.signal("HUP")
        refused = yield self.hd1.wait_for(REFUSED)
        self.assertIn("channels[eps-server].settings.tls", refused.group(1))
        certificate = yield server_certificate(self.hd1_peer_address, "hd-2", "hd-1")
        self.assertEqual(fingerprint(certificate), self.new_fingerprint)
        result = yield self.hd1_gateway.call("hd-2._ping", {}, id="after-refusal")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertNotIn("Traceback", self.hd1.output)
