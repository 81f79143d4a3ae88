"""
Tests for epsproxy.eps.links.registry and epsproxy.eps.inbox without sockets: links built
by the registry's factories over StringTransport, a Clock for the time.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.directory.jsondir import DirectoryError
from epsproxy.eps.broker import BrokerError, ClientInfo, Request, Response
from epsproxy.eps.inbox import (
    NO_MATCHING_CLIENT,
    Inbox,
    ProxyRefused,
    call,
    request_connection,
)
from epsproxy.eps.links import wire
from epsproxy.eps.links.registry import INCOMING, OUTGOING, LinkRegistry
from epsproxy.rules.certificates import load_certificate_file
from tests.support.pki import pki


class Directory:
    """Pins the encryption certificates of hd-1 and hd-2."""

    def entry_for(self, name: str) -> dict[str, Any]:
        if name not in ("hd-1", "hd-2"):
            raise DirectoryError(f"no entry for {name}")
        return {"name": name, "certificates": [
            {"fingerprint": pki().fingerprints(name)["encryption"], "key_usage": "encryption"}]}


class RegistryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.served: list = []
        self.registry = LinkRegistry(self.clock, Directory(), "hd-2", self.serve)
        self.changes: list = []
        self.registry.add_listener(lambda *change: self.changes.append(change))

    def serve(self, request, peer):
        self.served.append((request.method, peer.name))
        return {"ok": True}

    def link(self, factory, peer="hd-1"):
        link = factory.buildProtocol(None)
        link.peer_certificate = lambda: load_certificate_file(pki().tls(peer)[0])
        transport = StringTransport()
        link.makeConnection(transport)
        link.handshakeCompleted()
        link.dataReceived(wire.encode(wire.Hello(1, peer)))
        transport.clear()
        return link, transport

    def test_links_found_by_peer_and_direction(self):
        incoming, _ = self.link(self.registry.server_factory())
        outgoing, _ = self.link(self.registry.client_factory(kept=True))
        self.assertIs(self.registry.link_to("hd-1"), outgoing)
        self.assertIs(self.registry.link_to("hd-1", INCOMING), incoming)
        self.assertEqual(self.registry.count(INCOMING), 1)
        self.assertEqual(self.registry.count(OUTGOING), 1)
        self.assertTrue(self.registry.record(outgoing).kept)
        self.assertFalse(self.registry.record(incoming).kept)
        self.assertEqual(self.changes, [("hd-1", INCOMING, True), ("hd-1", OUTGOING, True)])

    def test_closed_link_forgotten(self):
        link, _ = self.link(self.registry.server_factory())
        link.connectionLost(None)
        self.assertIsNone(self.registry.link_to("hd-1"))
        self.assertIsNone(self.registry.record(link))
        self.assertEqual(self.changes[-1], ("hd-1", INCOMING, False))

    def test_refused_link_never_listed(self):
        link = self.registry.server_factory().buildProtocol(None)
        link.peer_certificate = lambda: None
        link.makeConnection(StringTransport())
        link.handshakeCompleted()
        link.connectionLost(None)
        self.assertEqual(list(self.registry.links()), [])
        self.assertEqual(self.changes, [])

    def test_call_notes_last_use(self):
        link, transport = self.link(self.registry.client_factory())
        self.clock.advance(42)
        d = call(self.registry, link, Request("hd-1.m", {"a": 1}, "hd-1.m(1)"), None)
        self.assertEqual(self.registry.record(link).last_used, 42)
        self.assertIn(b'"id":"hd-1.m(1)"', transport.value())
        link.dataReceived(wire.encode(wire.Response("hd-1.m(1)", {"b": 2})))
        self.assertEqual(self.successResultOf(d), Response("hd-1.m(1)", {"b": 2}))

    def test_requests_go_to_serve(self):
        link, transport = self.link(self.registry.server_factory())
        link.dataReceived(wire.encode(wire.Request("7", "x", {})))
        self.assertEqual(self.served, [("x", "hd-1")])
        self.assertEqual(transport.value(), wire.encode(wire.Response("7", {"ok": True})))

    def test_close_all(self):
        link, transport = self.link(self.registry.server_factory())
        d = self.registry.close_all()
        self.assertTrue(transport.disconnecting)
        link.connectionLost(None)
        self.successResultOf(d)


class FakeBroker:
    def __init__(self, answer: Any):
        self.answer = answer
        self.asked: list = []

    def deliver_now(self, request, client):
        self.asked.append((request, client))
        return self.answer

    def deliver(self, request, client):
        self.asked.append((request, client))
        return defer.succeed(self.answer)


class InboxTests(SynchronousTestCase):
    peer = type("Peer", (), {"name": "hd-1", "entry": {"name": "hd-1"}})()

    def test_closed_inbox_refuses(self):
        inbox = Inbox()
        response = inbox.serve(wire.Request("1", "hd-2.x", {}), self.peer)
        self.assertEqual(response.error["code"], NO_MATCHING_CLIENT)
        self.failureResultOf(inbox.deliver(Request("hd-2.x", {}, "hd-2.x(1)"), None),
                             BrokerError)

    def test_open_once(self):
        inbox = Inbox()
        inbox.open(FakeBroker(None))
        self.assertRaises(RuntimeError, inbox.open, FakeBroker(None))

    def test_peer_request_to_broker_as_the_peer(self):
        inbox = Inbox()
        broker = FakeBroker(Response("hd-2.x(1)", {"r": 1}))
        inbox.open(broker)
        response = inbox.serve(wire.Request("hd-2.x(1)", "hd-2.x", {"a": 1}), self.peer)
        self.assertEqual(response, wire.Response("hd-2.x(1)", {"r": 1}))
        self.assertEqual(broker.asked[0][1], ClientInfo("hd-1", {"name": "hd-1"}))

    def test_respond_goes_to_async_calls(self):
        class Calls:
            def result_arrived(self, operator, params):
                return {"from": operator}
        inbox = Inbox()
        inbox.open(FakeBroker(None), Calls())
        response = inbox.serve(wire.Request("9", "_respond", {}), self.peer)
        self.assertEqual(response.result, {"from": "hd-1"})

    def test_request_connection(self):
        inbox = Inbox()
        token = base64.b64encode(b"x" * 32).decode()
        broker = FakeBroker(Response("x", {"token": token, "endpoint": "pp:1"}))
        inbox.open(broker)
        ask = request_connection(inbox, "hd-1", lambda: {"name": "hd-1"})
        self.assertEqual(self.successResultOf(ask("pp-1", "hd-2")), (b"x" * 32, "pp:1"))
        request, client = broker.asked[0]
        self.assertEqual(request.method, "pp-1.requestConnection")
        self.assertEqual(request.params, {"to": "hd-2", "channel": "eps_server"})
        self.assertEqual(client.name, "hd-1")

    def test_request_connection_refused(self):
        inbox = Inbox()
        inbox.open(FakeBroker(Response("x", error={"code": 403, "message": "no"})))
        ask = request_connection(inbox, "hd-1", lambda: {})
        failure = self.failureResultOf(ask("pp-1", "hd-2"), ProxyRefused)
        self.assertIn("refused a connection to hd-2: no", str(failure.value))
        inbox = Inbox()
        inbox.open(FakeBroker(Response("x", {"token": "short", "endpoint": "pp:1"})))
        ask = request_connection(inbox, "hd-1", lambda: {})
        failure = self.failureResultOf(ask("pp-1", "hd-2"), ProxyRefused)
        self.assertIn("answered nonsense", str(failure.value))
