"""
Reloading settings in a running service (issue 12, SIGHUP): ``service.reload(settings)``
called in-process over real loopback TLS.  (The signal path itself is tested with a real
twistd by the lifecycle tests.)

- hd-1's TLS certificate is rotated (new files at the same paths) while a spliced P2P
  link through the public proxy carries calls: the link keeps working, and the next new
  link and the next connection to hd-1's listener present the new certificate, pinned
  first through a ``certificates`` record.
- A reload that cannot apply (a key that does not belong to the certificate, a changed
  listen address) raises ReloadError and the old settings keep working.
- Rate limits and CORS of a JSON-RPC listener reload for the next connection/request.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.net import tls
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import Dispatcher, TransportError
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, JSONRPCListener, jsonrpc_site
from epsproxy.net.lifecycle import ReloadError
from epsproxy.rules.certificates import fingerprint, load_certificates_file
from tests.support.eps import record
from tests.support.p2p import start_p2p_network
from tests.support.pki import pki
from tests.support.tls import server_certificate, tls_block


def _fingerprint(path: str | Path) -> str:
    return fingerprint(load_certificates_file(str(path))[0])


class CertificateRotation(TestCase):
    """hd-1 and hd-2 behind a public proxy, linked by a spliced P2P link (as test_p2p)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # hd-1's TLS files are copies, so the test can rotate them in place.
        self.files = Path(self.mktemp()).absolute()
        self.files.mkdir(parents=True)
        crt, key = pki().tls("hd-1")
        self.crt, self.key = self.files / "hd-1.crt", self.files / "hd-1.key"
        shutil.copyfile(crt, self.crt)
        shutil.copyfile(key, self.key)
        self.old_fingerprint = _fingerprint(crt)
        self.new_fingerprint = _fingerprint(pki().tls("hd-1", alt=True)[0])

        p2p = yield start_p2p_network(self, Path(self.mktemp()).absolute(), tls={
            "hd-1": tls_block("hd-1", certificate_file=str(self.crt), key_file=str(self.key))})
        self.net, self.proxy, self.hd1 = p2p.net, p2p.proxy, p2p.hd1
        self.node = self.net.nodes["hd-1"]

    def incoming_from_hd1(self) -> Any:
        link = self.net.nodes["hd-2"].links.link_to("hd-1", "incoming")
        self.assertIsNotNone(link)
        return link

    def presented(self, link: Any) -> str:
        return fingerprint(tls.peer_certificate(link.transport))

    @defer.inlineCallbacks
    def test_rotation_keeps_the_splice_and_new_links_present_the_new_certificate(self):
        rendezvous = self.proxy.rendezvous
        yield self.hd1.call("hd-2._ping", {"n": 1}, id="1")
        spliced = self.incoming_from_hd1()
        self.assertEqual(self.presented(spliced), self.old_fingerprint)
        # Pin the new certificate first, next to the old one.
        self.net.write(record("hd-1", "certificates", [
            {"fingerprint": self.old_fingerprint, "key_usage": "encryption"},
            {"fingerprint": self.new_fingerprint, "key_usage": "encryption"},
        ]))
        # Rotate: new files at the same paths, then reload the same settings.
        alt_crt, alt_key = pki().tls("hd-1", alt=True)
        shutil.copyfile(alt_crt, self.crt)
        shutil.copyfile(alt_key, self.key)
        in_flight = self.hd1.call("hd-2._ping", {"n": 2}, id="2")
        self.node.reload(copy.deepcopy(self.node.settings))
        yield in_flight
        # The splice carries on: same link, one pairing, calls both ways.
        result = yield self.hd1.call("hd-2._ping", {"n": 3}, id="3")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertIs(self.incoming_from_hd1(), spliced)
        self.assertEqual((rendezvous.pairings, rendezvous.active_splices), (1, 1))
        # hd-1's listener presents the new certificate to a new connection.
        certificate = yield server_certificate(
            self.net.server_address("hd-1"), "hd-2", "hd-1")
        self.assertEqual(fingerprint(certificate), self.new_fingerprint)
        # The next new link (brokered again) presents the new certificate.
        outgoing = self.node.links.link_to("hd-2", "outgoing")
        outgoing.close()
        yield outgoing.when_closed()
        result = yield self.hd1.call("hd-2._ping", {"n": 4}, id="4")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(rendezvous.pairings, 2)
        self.assertEqual(self.presented(self.incoming_from_hd1()), self.new_fingerprint)

    @defer.inlineCallbacks
    def test_a_key_that_does_not_match_is_refused_and_the_old_files_keep_working(self):
        settings = copy.deepcopy(self.node.settings)
        server = next(c for c in settings["channels"] if c["type"] == "eps_server")
        server["settings"]["tls"]["key_file"] = str(pki().tls("hd-2")[1])
        with self.assertRaises(ReloadError) as caught:
            self.node.reload(settings)
        self.assertIn("channels[eps-server].settings.tls", str(caught.exception))
        self.assertIn("does not belong", str(caught.exception))
        self.assertNotEqual(self.node.settings, settings)
        certificate = yield server_certificate(
            self.net.server_address("hd-1"), "hd-2", "hd-1")
        self.assertEqual(fingerprint(certificate), self.old_fingerprint)
        result = yield self.hd1.call("hd-2._ping", {}, id="after")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")

    @defer.inlineCallbacks
    def test_a_changed_listen_address_needs_a_restart(self):
        settings = copy.deepcopy(self.node.settings)
        gateway = next(c for c in settings["channels"] if c["type"] == "jsonrpc_server")
        gateway["settings"]["bind_address"] = "127.0.0.1:1"
        settings["name"] = "hd-9"
        with self.assertRaises(ReloadError) as caught:
            self.node.reload(settings)
        message = str(caught.exception)
        self.assertIn("channels[gateway].settings.bind_address: changing it needs a restart",
                      message)
        self.assertIn("name: changing it needs a restart", message)
        self.assertEqual(self.node.name, "hd-1")
        result = yield self.hd1.call("hd-2._ping", {}, id="after")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")


class ListenerReload(TestCase):
    """Rate limits and CORS of a JSON-RPC listener, reloaded for the next connection."""

    timeout = 30

    @defer.inlineCallbacks
    def start(self, **settings: Any):
        dispatcher = Dispatcher()
        dispatcher.register("echo", None, lambda params, context: params)
        self.settings = JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": "127.0.0.1:0", **settings})
        site = jsonrpc_site(dispatcher, self.settings, reactor=reactor)
        self.listener = JSONRPCListener(reactor, site, self.settings, name="test")
        port = yield self.listener.listen()
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def client(self, tls_on: bool = True) -> JSONRPCClient:
        scheme = "https" if tls_on else "http"
        raw: dict[str, Any] = {"endpoint": f"{scheme}://127.0.0.1:{self.port}/jsonrpc",
                               "timeout": 5}
        if tls_on:
            raw.update(tls=tls_block("hd-1"), server_name="sd-1")
        client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(raw))
        self.addCleanup(client.close)
        return client

    def reconfigure(self, **changes: Any) -> None:
        self.listener.reconfigure(JSONRPC_SERVER_SETTINGS.validate({**self.settings, **changes}))

    @defer.inlineCallbacks
    def test_rate_limits_apply_from_the_next_connection(self):
        yield self.start(tls=tls_block("sd-1"))
        for i in range(3):  # no limit yet: a new connection each time
            client = self.client()
            yield client.call("echo", {"i": i})
            yield client.close()
        self.reconfigure(tcp_rate_limits=[{"type": "hour", "limit": 1}])
        first = self.client()
        self.assertEqual((yield first.call("echo", {"n": 1})), {"n": 1})
        second = self.client()
        with self.assertRaises(TransportError):
            yield second.call("echo", {"n": 2})
        # And back: no limits, the same peer connects again.
        self.reconfigure(tcp_rate_limits=[])
        third = self.client()
        self.assertEqual((yield third.call("echo", {"n": 3})), {"n": 3})

    @defer.inlineCallbacks
    def test_cors_reloads(self):
        yield self.start(cors={"allowed_hosts": ["^https://old\\.example$"]})
        url = f"http://127.0.0.1:{self.port}/jsonrpc"

        @defer.inlineCallbacks
        def preflight(origin: str) -> Any:
            response = yield treq.request("OPTIONS", url, headers={"Origin": [origin]},
                                          persistent=False)
            yield response.content()
            return response.code, response.headers.getRawHeaders(
                "access-control-allow-origin")

        self.assertEqual((yield preflight("https://old.example")),
                         (200, ["https://old.example"]))
        self.assertEqual((yield preflight("https://new.example"))[0], 403)
        self.reconfigure(cors={"allowed_hosts": ["^https://new\\.example$"]})
        self.assertEqual((yield preflight("https://new.example")),
                         (200, ["https://new.example"]))
        self.assertEqual((yield preflight("https://old.example"))[0], 403)

    @defer.inlineCallbacks
    def test_address_change_is_refused(self):
        yield self.start()
        with self.assertRaises(ValueError) as caught:
            self.reconfigure(bind_address="127.0.0.1:1", max_body_bytes=10)
        self.assertIn("bind_address", str(caught.exception))
        # Nothing changed: a body over 10 bytes is still accepted.
        result = yield self.client(tls_on=False).call("echo", {"text": "x" * 100})
        self.assertEqual(result, {"text": "x" * 100})


class RestartKeys(TestCase):
    """Which changed settings need a restart (epsproxy.net.reloading), on plain values."""

    OLD = {
        "name": "hd-1",
        "server": {"bind_address": "127.0.0.1:1", "tls": {"key_file": "a", "ca": ["x"]},
                   "limits": [{"type": "second", "limit": 1}]},
        "channels": [{"name": "gw", "type": "t", "settings": {"bind_address": "b"}}],
    }
    RESTART = ("name", "server.bind_address", "server.tls?", "channels[*]?",
               "channels[*].settings.bind_address")

    def changed(self, edit: Any) -> list[str]:
        from epsproxy.net.reloading import restart_keys

        new = copy.deepcopy(self.OLD)
        edit(new)
        return restart_keys(self.OLD, new, self.RESTART)

    def test_reloadable_changes_are_not_restart_keys(self):
        def edit(s: dict[str, Any]) -> None:
            s["server"]["tls"]["key_file"] = "b"
            s["server"]["tls"]["ca"].append("y")
            s["server"]["limits"][0]["limit"] = 5
            s["server"]["limits"].append({"type": "hour", "limit": 9})

        self.assertEqual(self.changed(edit), [])

    def test_restart_keys_are_named(self):
        def edit(s: dict[str, Any]) -> None:
            s["name"] = "hd-2"
            del s["server"]["tls"]
            s["channels"][0]["settings"]["bind_address"] = "c"
            s["channels"].append({"name": "new", "type": "t"})

        self.assertEqual(self.changed(edit), [
            "channels[gw].settings.bind_address", "channels[new]", "name", "server.tls"])

    def test_odd_names_and_shapes(self):
        from epsproxy.net.lifecycle import ReloadError
        from epsproxy.net.reloading import changed_keys, flatten, refuse_restart_changes

        # Names with pattern characters are literal; duplicate names fall back to indexes.
        old = {"channels": [{"name": "a.*[x]", "v": 1}, {"name": "a.*[x]", "v": 2}]}
        new = {"channels": [{"name": "a.*[x]", "v": 1}, {"name": "a.*[x]", "v": 3}]}
        self.assertEqual(changed_keys(old, new), ["channels[1].v"])
        self.assertEqual(flatten({"list": [1, "a"], "empty": []}),
                         {"list": [1, "a"], "empty": []})
        # A value replaced by a block of another type is a change of that key.
        self.assertEqual(changed_keys({"a": 1}, {"a": {"b": 1}}), ["a", "a.b"])
        with self.assertRaises(ReloadError) as caught:
            refuse_restart_changes({"a": 1}, {"a": {"b": 1}}, ["a"])
        self.assertEqual(str(caught.exception), "a: changing it needs a restart")
        refuse_restart_changes(self.OLD, copy.deepcopy(self.OLD), self.RESTART)
