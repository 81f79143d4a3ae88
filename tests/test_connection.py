"""
Tests for epsproxy.eps.links.peers and epsproxy.eps.links.protocol: peer identification, and the
EPS line protocol over real loopback mutual TLS (plus Clock-driven heartbeat tests).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epsproxy.net import tls
from epsproxy.rules.certificates import load_certificate_file
from epsproxy.directory.jsondir import JSONDirectory
from epsproxy.eps.links import session as conn_module
from epsproxy.eps.links import wire
from epsproxy.eps.links.peers import PeerIdentity, PeerRefused, identify_peer
from epsproxy.eps.links.protocol import EPSClientFactory, EPSConnection, EPSServerFactory
from epsproxy.eps.links.session import CallTimeout, PeerGone
from tests.support.pki import pki


def tls_block(name: str, *, source: str = "main", alt: bool = False) -> dict:
    """A ``tls`` settings block with ``name``'s TLS identity, trusting the main root."""
    crt, key = (pki() if source == "main" else pki(source)).tls(name, alt=alt)
    return {
        "ca_certificate_files": [str(pki().root)],
        "certificate_file": str(crt),
        "key_file": str(key),
    }


def make_directory(test, names=("hd-1", "hd-2"), own="hd-1") -> JSONDirectory:
    """A JSON directory pinning the encryption certificates of ``names``."""
    folder = Path(tempfile.mkdtemp(prefix="eps-conn-dir-"))
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    records = [
        {
            "section": "certificates",
            "created_at": "2024-01-01T00:00:00+00:00",
            "name": name,
            "data": [
                {"fingerprint": pki().fingerprints(name)["encryption"],
                 "key_usage": "encryption"},
            ],
        }
        for name in names
    ]
    (folder / "001_certificates.json").write_text(json.dumps({"records": records}))
    return JSONDirectory(folder, own)


def leaf(name: str, alt: bool = False):
    return load_certificate_file(pki().tls(name, alt=alt)[0])


# ------------------------------------------------------------------- identify_peer


class IdentifyPeerTests(SynchronousTestCase):
    def setUp(self):
        self.directory = make_directory(self)

    def test_pinned_certificate(self):
        found = identify_peer(leaf("hd-1"), self.directory)
        # CN and the DNS SAN are both "hd-1": duplicates kept, wildcard skipped.
        self.assertEqual([p.name for p in found], ["hd-1", "hd-1"])
        self.assertIsInstance(found[0], PeerIdentity)
        self.assertEqual(found[0].entry["name"], "hd-1")

    def test_missing_certificate(self):
        with self.assertRaises(PeerRefused) as e:
            identify_peer(None, self.directory)
        self.assertEqual(e.exception.reason, "certificate missing")

    def test_unpinned_certificate_names_the_names(self):
        with self.assertRaises(PeerRefused) as e:
            identify_peer(leaf("hd-1", alt=True), self.directory)
        self.assertIn("no name of the certificate is pinned", e.exception.reason)
        self.assertIn("hd-1, hd-1, *.hd-1.local", e.exception.reason)

    def test_no_entry(self):
        with self.assertRaises(PeerRefused):
            identify_peer(leaf("sd-1"), self.directory)

    def test_signing_pin_does_not_count(self):
        class Dir:
            def entry_for(self, name):
                return {"name": name, "certificates": [
                    {"fingerprint": pki().fingerprints("hd-1")["encryption"],
                     "key_usage": "signing"}]}
        with self.assertRaises(PeerRefused):
            identify_peer(leaf("hd-1"), Dir())

    def test_wildcard_never_matches(self):
        fp = pki().fingerprints("hd-1")["encryption"]

        class Dir:
            asked: list = []

            def entry_for(self, name):
                self.asked.append(name)
                return {"certificates": [{"fingerprint": fp, "key_usage": "encryption"}]}
        d = Dir()
        found = identify_peer(leaf("hd-1"), d)
        self.assertNotIn("*.hd-1.local", d.asked)
        self.assertNotIn("*.hd-1.local", [p.name for p in found])


# ------------------------------------------------------------------- loopback TLS


def echo_handler(request: wire.Request, peer: PeerIdentity):
    if request.method == "fail":
        raise RuntimeError("handler broke")
    if request.method == "none":
        return None
    if request.method == "bad-result":
        return ["not", "an", "object"]
    return defer.succeed(wire.Response(request.id, {"echo": request.params, "from": peer.name}))


class Loopback:
    """Helpers: an EPS listener and clients over real mutual TLS on 127.0.0.1:0."""

    timeout = 20

    def setUp(self):
        self.directory = make_directory(self)
        self.events: list = []
        self.patch(conn_module, "log", Logger(observer=self.events.append))
        self.servers: list[EPSConnection] = []

    @defer.inlineCallbacks
    def listen(self, name="hd-2", handler=echo_handler, **options):
        factory = EPSServerFactory(self.directory, name, handler, reactor, **options)
        built = factory.buildProtocol

        def record(addr):
            p = built(addr)
            self.servers.append(p)
            return p
        factory.buildProtocol = record
        port = yield tls.listen_endpoint(reactor, "127.0.0.1:0", tls_block(name)).listen(factory)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        return self.port

    @defer.inlineCallbacks
    def connect(self, name="hd-1", server="hd-2", handler=echo_handler, block=None,
                protocol=None):
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{self.port}",
                                       block or tls_block(name), server)
        if protocol is None:
            factory = EPSClientFactory(self.directory, name, handler, reactor)
        else:
            factory = Factory.forProtocol(protocol)
        client = yield endpoint.connect(factory)
        self.addCleanup(self.close, client)
        return client

    def close(self, protocol):
        if protocol.transport is not None:
            protocol.transport.loseConnection()
            return protocol.when_closed() if hasattr(protocol, "when_closed") else None

    def server_closed(self):
        return defer.gatherResults([s.when_closed() for s in self.servers])


class LoopbackTests(Loopback, TestCase):
    @defer.inlineCallbacks
    def test_calls_in_both_directions(self):
        yield self.listen()
        client = yield self.connect()
        peer = yield client.when_ready()
        self.assertEqual(peer.name, "hd-2")
        server = self.servers[0]
        server_peer = yield server.when_ready()
        self.assertEqual(server_peer.name, "hd-1")
        # Both sides use id "1" at once: the id spaces do not mix.
        r1, r2 = yield defer.gatherResults([
            client.call("hi", {"x": 1}, "1"),
            server.call("hey", {"y": 2}, "1"),
        ])
        self.assertEqual(r1.result, {"echo": {"x": 1}, "from": "hd-1"})
        self.assertEqual(r2.result, {"echo": {"y": 2}, "from": "hd-2"})
        self.assertEqual(client.version, 1)

    @defer.inlineCallbacks
    def test_handler_none_and_exception(self):
        yield self.listen()
        client = yield self.connect()
        empty = yield client.call("none", {})
        self.assertEqual(empty.result, {})
        broken = yield client.call("fail", {})
        self.assertEqual(broken.error, {"code": -100, "message": "handler broke"})
        bad = yield client.call("bad-result", {})
        self.assertEqual(bad.error["code"], -100)
        self.flushLoggedErrors(RuntimeError, wire.MalformedFrame)
        still = yield client.call("hi", {})
        self.assertEqual(still.result["from"], "hd-1")

    @defer.inlineCallbacks
    def test_fifty_concurrent_calls_matched_by_id(self):
        def slow(request, peer):
            # Answer in reverse order of arrival.
            d = defer.Deferred()
            reactor.callLater(0.001 * (50 - request.params["i"]), d.callback,
                              wire.Response(request.id, {"i": request.params["i"]}))
            return d
        yield self.listen(handler=slow)
        client = yield self.connect()
        results = yield defer.gatherResults(
            [client.call("n", {"i": i}, f"id-{i}") for i in range(50)])
        self.assertEqual([r.result["i"] for r in results], list(range(50)))
        self.assertEqual([r.id for r in results], [f"id-{i}" for i in range(50)])

    @defer.inlineCallbacks
    def test_duplicate_id_in_flight_refused_locally(self):
        never = defer.Deferred()
        yield self.listen(handler=lambda r, p: never)
        client = yield self.connect()
        yield client.when_ready()
        first = client.call("wait", {}, "7")
        self.assertRaises(ValueError, client.call, "wait", {}, "7")
        first.addErrback(lambda f: f.trap(PeerGone))
        never.callback(None)
        yield first

    @defer.inlineCallbacks
    def test_unpinned_certificate_refused(self):
        yield self.listen()
        client = yield self.connect(block=tls_block("hd-1", alt=True))
        server = self.servers[0]
        yield self.assertFailure(server.when_ready(), PeerRefused)
        # The client sees the error frame then the close.
        yield self.assertFailure(client.when_ready(), PeerGone)
        yield client.when_closed()
        refusals = [e for e in self.events if e.get("log_format", "").startswith("refused")]
        self.assertEqual(len(refusals), 1)
        self.assertIn("hd-1", refusals[0]["reason"])
        self.assertIn("is pinned in the directory", refusals[0]["reason"])

    @defer.inlineCallbacks
    def test_foreign_ca_refused_by_tls(self):
        yield self.listen()
        client = yield self.connect(block=tls_block("hd-1", source="foreign"))
        yield self.assertFailure(client.when_ready(), PeerGone)
        yield self.server_closed()
        self.assertEqual(self.servers[0].identities, [])
        self.assertIsNone(self.servers[0].peer)

    @defer.inlineCallbacks
    def test_name_mismatch_in_hello_refused(self):
        yield self.listen()
        # hd-1's certificate, but it says hello as hd-2.
        endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{self.port}", tls_block("hd-1"),
                                       "hd-2")
        client = yield endpoint.connect(
            EPSClientFactory(self.directory, "hd-2", echo_handler, reactor))
        self.addCleanup(self.close, client)
        # The client may already have the server's hello: only the server refuses.
        yield client.when_closed()
        yield self.assertFailure(self.servers[0].when_ready(), PeerGone)
        self.assertIsNone(self.servers[0].peer)
        self.assertTrue(any("not one of" in e.get("log_format", "") for e in self.events))

    @defer.inlineCallbacks
    def test_pending_calls_fail_when_peer_disconnects(self):
        never = defer.Deferred()
        yield self.listen(handler=lambda r, p: never)
        client = yield self.connect()
        yield client.when_ready()
        calls = [client.call("wait", {}) for _ in range(3)]
        yield self.servers[0].when_ready()
        self.servers[0].transport.loseConnection()
        for d in calls:
            yield self.assertFailure(d, PeerGone)
        yield self.assertFailure(client.call("late", {}), PeerGone)

    @defer.inlineCallbacks
    def test_call_timeout_then_late_response_dropped(self):
        gate = defer.Deferred()
        yield self.listen(handler=lambda r, p: gate)
        client = yield self.connect()
        yield client.when_ready()
        d = client.call("slow", {}, timeout=0.05)
        yield self.assertFailure(d, CallTimeout)
        gate.callback(None)
        # The late response is dropped; the connection still works afterwards.
        self.servers[0].handler = echo_handler
        ok = yield client.call("hi", {})
        self.assertEqual(ok.result["from"], "hd-1")
        self.assertTrue(any("unknown id" in e.get("log_format", "") for e in self.events))


class Raw(Protocol):
    """A bare TLS client that records what it receives."""

    def connectionMade(self):
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)

    def when_closed(self):
        return self.lost


class HostileInputTests(Loopback, TestCase):
    @defer.inlineCallbacks
    def raw(self):
        client = yield self.connect(protocol=Raw)
        client.transport.write(wire.encode(wire.Hello(1, "hd-1")))
        return client

    def frames(self, client):
        return [wire.parse_frame(json.loads(line)) for line in client.received.splitlines()]

    @defer.inlineCallbacks
    def test_oversized_line_closes_only_that_connection(self):
        yield self.listen(max_line=1000)
        good = yield self.connect()
        yield good.when_ready()
        bad = yield self.raw()
        bad.transport.write(b'{"t":"req","id":"1","m":"x","p":{"a":"' + b"x" * 2000)
        yield bad.lost
        frames = self.frames(bad)
        self.assertEqual(frames[0], wire.Hello(1, "hd-2"))
        self.assertEqual(frames[-1].code, wire.ERR_LINE_TOO_LONG)
        self.assertNotIn(b"xxxx", bad.received)
        response = yield good.call("hi", {"still": True})
        self.assertEqual(response.result["echo"], {"still": True})

    @defer.inlineCallbacks
    def test_malformed_line_closes(self):
        yield self.listen()
        bad = yield self.raw()
        bad.transport.write(b"{not json}\n")
        yield bad.lost
        self.assertEqual(self.frames(bad)[-1].code, wire.ERR_MALFORMED)

    @defer.inlineCallbacks
    def test_request_before_hello_is_protocol_error(self):
        yield self.listen()
        bad = yield self.connect(protocol=Raw)
        bad.transport.write(wire.encode(wire.Request("1", "x", {})))
        yield bad.lost
        self.assertEqual(self.frames(bad)[-1].code, wire.ERR_PROTOCOL)

    @defer.inlineCallbacks
    def test_duplicate_incoming_id_is_protocol_error(self):
        yield self.listen(handler=lambda r, p: defer.Deferred())
        bad = yield self.raw()
        bad.transport.write(wire.encode(wire.Request("1", "x", {})) * 2)
        yield bad.lost
        self.assertEqual(self.frames(bad)[-1].code, wire.ERR_PROTOCOL)

    @defer.inlineCallbacks
    def test_version_zero_refused(self):
        yield self.listen()
        bad = yield self.connect(protocol=Raw)
        bad.transport.write(wire.encode(wire.Hello(0, "hd-1")))
        yield bad.lost
        self.assertEqual(self.frames(bad)[-1].code, wire.ERR_VERSION)


# ------------------------------------------------------------------- state machine


class FakeCertConnection(EPSConnection):
    """EPSConnection with a fixed peer certificate (no TLS)."""

    certificate = None

    def peer_certificate(self):
        return self.certificate


class HeartbeatTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.directory = make_directory(self)
        self.proto = FakeCertConnection(self.directory, "hd-2", echo_handler, self.clock,
                                        hello_timeout=10, ping_interval=30, dead_after=90)
        self.proto.certificate = leaf("hd-1")
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.handshakeCompleted()

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        return [wire.parse_frame(json.loads(line)) for line in data.splitlines()]

    def open(self):
        self.assertEqual(self.sent(), [wire.Hello(1, "hd-2")])
        ready = self.proto.when_ready()
        self.proto.dataReceived(wire.encode(wire.Hello(1, "")))
        self.assertEqual(self.successResultOf(ready).name, "hd-1")

    def test_hello_timeout(self):
        self.sent()
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(self.sent()[-1].code, wire.ERR_TIMEOUT)
        self.assertTrue(self.transport.disconnecting)

    def test_ping_after_idle_and_pong_answered(self):
        self.open()
        self.clock.advance(29)
        self.assertEqual(self.sent(), [])
        self.clock.advance(1)
        self.assertEqual(self.sent(), [wire.Ping("1")])
        self.proto.dataReceived(wire.encode(wire.Ping("abc")))
        self.assertEqual(self.sent(), [wire.Pong("abc")])

    def test_sending_postpones_ping(self):
        self.open()
        self.clock.advance(20)
        self.proto.call("x", {})
        self.sent()
        self.clock.advance(20)
        self.assertEqual(self.sent(), [])
        self.clock.advance(10)
        self.assertEqual(self.sent(), [wire.Ping("1")])

    def test_dead_peer_closed_and_calls_fail(self):
        self.open()
        d = self.proto.call("x", {})
        for _ in range(3):
            self.clock.advance(30)
        frames = self.sent()
        self.assertEqual(frames[-1], wire.ErrorFrame(wire.ERR_TIMEOUT, "peer silent for too long"))
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(None)
        self.failureResultOf(d, PeerGone)

    def test_received_frames_keep_peer_alive(self):
        self.open()
        for _ in range(5):
            self.clock.advance(60)
            self.proto.dataReceived(wire.encode(wire.Pong("1")))
        self.assertFalse(self.transport.disconnecting)

    def test_trickle_of_bytes_is_not_a_sign_of_life(self):
        self.open()
        for _ in range(9):
            self.clock.advance(10)
            self.proto.dataReceived(b" ")
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_unknown_hello_name(self):
        self.sent()
        ready = self.proto.when_ready()
        self.proto.dataReceived(wire.encode(wire.Hello(1, "hd-3")))
        self.assertEqual(self.sent()[-1].code, wire.ERR_IDENTITY)
        self.proto.connectionLost(None)
        self.failureResultOf(ready, PeerGone)

    def test_call_before_hello_is_sent_after(self):
        self.sent()
        d = self.proto.call("early", {}, "e1")
        self.assertEqual(self.sent(), [])
        self.proto.dataReceived(wire.encode(wire.Hello(2, "hd-1")))
        self.assertEqual(self.sent(), [wire.Request("e1", "early", {})])
        self.assertEqual(self.proto.version, 1)
        self.proto.dataReceived(wire.encode(wire.Response("e1", {"ok": True})))
        self.assertEqual(self.successResultOf(d).result, {"ok": True})

    def test_oversized_request_fails_locally(self):
        self.open()
        d = self.proto.call("x", {"a": "x" * (wire.DEFAULT_MAX_LINE + 1)})
        self.failureResultOf(d, wire.LineTooLong)
        self.assertFalse(self.transport.disconnecting)

    def test_refused_without_certificate(self):
        proto = FakeCertConnection(self.directory, "hd-2", echo_handler, self.clock)
        transport = StringTransport()
        proto.makeConnection(transport)
        ready = proto.when_ready()
        proto.handshakeCompleted()
        self.assertEqual(self.failureResultOf(ready, PeerRefused).value.reason,
                         "certificate missing")
        self.assertIn(b'"code":5', transport.value())
        self.assertTrue(transport.disconnecting)
