"""
``twistd proxy --mode private``: settings, the JSON-RPC methods over real HTTP with a fake
own endpoint server, re-announcing at start, ``incomingConnection`` refusals, and both
forwarding variants end to end over real sockets: a real :class:`Rendezvous` listener
stands in for the public proxy's internal endpoint, a small "front" plays the public
proxy's SNI listener (parks the client connection and calls ``incomingConnection``), and
a real TLS client verifies the *internal server's* certificate through it all.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import ssl
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor, tcp, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from epsproxy.dev.examples import internal_server
from epsproxy.net.jsonrpc.client import BULK_READ_BYTES, JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import INTERNAL_ERROR, INVALID_PARAMS, CallContext, JSONRPCError
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from epsproxy.proxy.private.api import NOT_FOUND
from epsproxy.proxy.private.forwarding import proxy_v2_header
from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.proxy.settings import PROXY_SETTINGS
from epsproxy.proxy.tap import Options, makeService
from epsproxy.rules.settings import SettingsError, load_settings

from .support.garbage import garbage_names, watch_new_garbage
from .support.pki import pki
from .support.proxies import Collect, private_section, write_settings
from .support.tls import handshake_then_close
from .support.twistd import TWISTD, TwistdProcess

NAME = "private-proxy-1.ga"
PUBLIC = "public-proxy-1.ga"
DOMAIN = "test.internal-server.local"
ROLE = Path(__file__).parent.parent / "conf" / "dev" / "roles" / "private-proxy-1"


def rfc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tls_block(name: str, **extra: Any) -> dict[str, Any]:
    crt, key = pki().tls(name)
    return {"ca_certificate_files": [str(pki().root)], "certificate_file": str(crt),
            "key_file": str(key), **extra}


def client_info(name: str = "hd-1", allowed: Any = (".internal-server.local",)
                ) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name}
    if allowed is not None:
        entry["settings"] = [{"service": "proxy", "settings": {
            "allowed_domains": list(allowed) if isinstance(allowed, tuple) else allowed}}]
    return {"name": name, "entry": entry}


class FakeEPS:
    """The private proxy's own endpoint server over plain HTTP; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.answer: Callable[[str, dict[str, Any]], Any] = (
            lambda method, params: [None] * len(params["connections"]))
        self.port: Any = None
        self._waiting: list[Deferred[None]] = []

    def handle(self, method: str, params: dict[str, Any], context: CallContext) -> Any:
        self.calls.append((method, params))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return self.answer(method, params)

    def next_call(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    @inlineCallbacks
    def start(self, test: unittest.TestCase):
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        self.port = yield listen_jsonrpc(reactor, jsonrpc_site(self, settings, reactor=reactor),
                                         settings)
        test.addCleanup(self.port.stopListening)
        return self.port.getHost().port


def rpc_client(port: int) -> JSONRPCClient:
    return JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(
        {"endpoint": f"http://127.0.0.1:{port}/jsonrpc", "timeout": 10}))


# ------------------------------------------------------------------------ settings


class SettingsTests(unittest.SynchronousTestCase):
    def test_dev_role(self) -> None:
        private = load_settings([ROLE], PROXY_SETTINGS)["private"]
        self.assertEqual(private["name"], NAME)
        self.assertEqual(private["jsonrpc_server"]["bind_address"], "localhost:8877")
        self.assertNotIn("tls", private["jsonrpc_server"])
        self.assertEqual(private["jsonrpc_client"]["endpoint"], "https://localhost:7766/jsonrpc")
        endpoint = private["internal_endpoint"]
        self.assertEqual(endpoint["address"], "localhost:7777")
        self.assertTrue(endpoint["tls"]["certificate_file"].endswith("internal-server.crt"))
        self.assertFalse(endpoint["tls"]["verify_client"])
        self.assertTrue(private["datastore"]["settings"]["path"].endswith(
            "run/private-proxy-1/announcements.sqlite"))
        self.assertEqual(load_settings([ROLE], PROXY_SETTINGS)["metrics"],
                         {"bind_address": "localhost:2118"})

    def test_defaults_and_refusals(self) -> None:
        folder = write_settings(Path(self.mktemp()), {"private": private_section(Path("/x"), 1)})
        private = load_settings([folder], PROXY_SETTINGS)["private"]
        self.assertEqual(private["internal_endpoint"]["address"], "localhost:8888")
        self.assertEqual(private["internal_endpoint"]["jsonrpc_path"], "/jsonrpc")
        self.assertEqual(private["internal_endpoint"]["timeout"], 30.0)
        self.assertFalse(private["internal_endpoint"]["proxy_protocol"])
        self.assertEqual(private["reannounce_interval"], 600.0)
        for key, value in [("name", ""), ("internal_endpoint", {"address": "nohost"}),
                           ("internal_endpoint", {"timeout": 3001}),
                           ("internal_endpoint", {"tls_typo": {}}),
                           ("reannounce_interval", 0), ("max_connections", 0),
                           ("typo", 1)]:
            folder = write_settings(Path(self.mktemp()), {
                "private": private_section(Path("/x"), 1, **{key: value})})
            with self.assertRaises(SettingsError) as caught:
                load_settings([folder], PROXY_SETTINGS)
            self.assertIn(f"private.{key}", str(caught.exception))

    def test_options(self) -> None:
        folder = write_settings(Path(self.mktemp()).absolute(),
                                {"private": private_section(Path("/x"), 1)})
        options = Options()
        options.parseOptions(["--mode", "private", "--settings", str(folder)])
        self.assertEqual(options.settings["private"]["name"], NAME)
        empty = write_settings(Path(self.mktemp()).absolute(), {"metrics": {
            "bind_address": "127.0.0.1:0"}})
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--mode", "private", "--settings", str(empty)])
        self.assertIn("no 'private' section", str(caught.exception.code))
        bad = private_section(Path("/x"), 1, internal_endpoint={"tls": {
            "ca_certificate_files": ["/nonexistent.pem"]}})
        folder = write_settings(Path(self.mktemp()).absolute(), {"private": bad})
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--mode", "private", "--settings", str(folder)])
        self.assertIn("private.internal_endpoint.tls.ca_certificate_files[0]: no such file",
                      str(caught.exception.code))

    def test_proxy_v2_header(self) -> None:
        signature = b"\r\n\r\n\x00\r\nQUIT\n"
        self.assertEqual(proxy_v2_header(), signature + b"\x20\x00\x00\x00")
        self.assertEqual(
            proxy_v2_header("192.0.2.1:4000", "198.51.100.2:443"),
            signature + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 2])
            + (4000).to_bytes(2, "big") + (443).to_bytes(2, "big"))
        v6 = proxy_v2_header("[2001:db8::1]:5")
        self.assertEqual(v6[12:16], b"\x21\x21\x00\x24")
        self.assertEqual(v6[16 + 16:16 + 32], bytes(16))
        for bad in [("nohost:1", None), ("192.0.2.1:1", "[::1]:2"), ("192.0.2.1", None)]:
            self.assertRaises(ValueError, proxy_v2_header, *bad)


# ------------------------------------------------------------------ network helpers


class Front(Protocol):
    """
    The public proxy's SNI listener, as far as the private proxy sees it: park the client
    connection at the rendezvous under a new token and call ``incomingConnection``.
    """

    def __init__(self, test: ServiceTests) -> None:
        self.test = test

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        token = secrets.token_bytes(32)
        self.test.rv.park(token, self, b"")
        self.test.incoming.append(self.test.call("incomingConnection", {
            "token": base64.b64encode(token).decode(), "domain": DOMAIN,
            "endpoint": f"127.0.0.1:{self.test.rv_port}",
            "_client": client_info(PUBLIC, None)}))


def http_body(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


class Held(Resource):
    """An upstream answering ``first``, then ``rest`` once ``release`` fires."""

    isLeaf = True

    def __init__(self, first: bytes, rest: bytes, length: int | None = None) -> None:
        super().__init__()
        self.first, self.rest, self.length = first, rest, length
        self.release: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> Any:
        if self.length is not None:
            request.setHeader(b"content-length", str(self.length).encode())
        request.write(self.first)

        def rest(_: Any) -> None:
            request.write(self.rest)
            request.finish()

        self.release.addCallback(rest)
        return NOT_DONE_YET


class Watch(Collect):
    """:class:`Collect` that also fires ``seen`` once ``marker`` has arrived."""

    def __init__(self, send: bytes, marker: bytes) -> None:
        super().__init__(send)
        self.marker = marker
        self.seen: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.marker in self.received and not self.seen.called:
            self.seen.callback(None)


class ServiceTests(unittest.TestCase):
    timeout = 30

    @inlineCallbacks
    def start_proxy(self, folder: Path | None = None, **changes: Any):
        if not hasattr(self, "fake"):
            self.fake = FakeEPS()
            self.eps_port = yield self.fake.start(self)
        folder = folder or Path(self.mktemp()).absolute()
        # These tests are about the brokered path; the pool is tests/test_pool_private.py's.
        changes.setdefault("pool_size", 0)
        options = Options()
        options.parseOptions(["--mode", "private", "--settings", str(write_settings(
            folder, {"private": private_section(folder, self.eps_port, **changes)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        self.service = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        self.top = top
        ports = yield self.service.when_ready()
        self.client = rpc_client(ports.jsonrpc.getHost().port)
        self.addCleanup(self.client.close)
        return folder

    def call(self, method: str, params: dict[str, Any]) -> Deferred[Any]:
        return self.client.call(method, params)

    def announce(self, **params: Any) -> Deferred[Any]:
        params.setdefault("proxy", PUBLIC)
        params.setdefault("domain", DOMAIN)
        params.setdefault("_client", client_info())
        return self.call("announceConnection", params)

    @inlineCallbacks
    def assertRPCError(self, d: Deferred[Any], code: int) -> Any:
        try:
            yield d
        except JSONRPCError as e:
            self.assertEqual(e.code, code, e)
            return e
        self.fail(f"expected JSON-RPC error {code}")

    # -- JSON-RPC methods

    @inlineCallbacks
    def test_announce_forwards_and_lists(self):
        yield self.start_proxy()
        expires = rfc(reactor.seconds() + 3600)
        self.assertEqual((yield self.announce(expires_at=expires)), "ok")
        self.assertEqual(self.fake.calls, [(f"{PUBLIC}.announceConnections", {
            "connections": [{"domain": DOMAIN, "expires_at": expires}]})])
        listing = yield self.call("getAnnouncements", {"_client": client_info()})
        self.assertEqual(listing, [{"expires_at": expires, "proxy": PUBLIC, "domain": DOMAIN}])

    @inlineCallbacks
    def test_announce_refusals(self):
        yield self.start_proxy()
        error = yield self.assertRPCError(self.announce(proxy=NAME), 400)
        self.assertIn("private proxy name", error.message)
        error = yield self.assertRPCError(self.announce(_client=client_info(allowed=None)), 403)
        self.assertEqual(error.message, "not authorized")
        yield self.assertRPCError(self.announce(_client=client_info(allowed=["x"])), 500)
        error = yield self.assertRPCError(self.announce(domain="test.example.org"), 403)
        self.assertEqual(error.message, "not allowed to forward this domain")
        self.assertEqual(error.data, {"allowed_domains": [".internal-server.local"]})
        yield self.assertRPCError(self.announce(expires_at=rfc(reactor.seconds() + 8 * 86400)),
                                  INVALID_PARAMS)
        yield self.assertRPCError(self.announce(expires_at="soon"), INVALID_PARAMS)
        yield self.assertRPCError(self.announce(domain="a b"), INVALID_PARAMS)
        yield self.assertRPCError(self.announce(proxy="x.y(1)"), INVALID_PARAMS)
        params = {"proxy": PUBLIC, "domain": DOMAIN}
        yield self.assertRPCError(self.call("announceConnection", params), 403)
        self.assertEqual(self.fake.calls, [])
        self.assertEqual(self.service.proxy.announcements.announcements(), [])

    @inlineCallbacks
    def test_public_refusal_and_unreachable_eps(self):
        yield self.start_proxy()
        self.fake.answer = lambda method, params: [{"code": 409, "message": "already taken"}]
        error = yield self.assertRPCError(self.announce(), 409)
        self.assertEqual(error.message, "already taken")
        yield self.service.proxy.client.close()
        self.service.proxy.client = rpc_client(1)  # nothing listens there
        self.addCleanup(self.service.proxy.client.close)
        error = yield self.assertRPCError(self.announce(domain="b.internal-server.local"),
                                          INTERNAL_ERROR)
        self.assertIn(PUBLIC, error.message)
        # stored anyway: the next re-announcement round tries again
        self.assertTrue(self.service.proxy.announcements.is_live(
            "b.internal-server.local", PUBLIC))

    @inlineCallbacks
    def test_reannounce_at_start(self):
        folder = yield self.start_proxy()
        yield self.announce()
        yield self.announce(domain="old.internal-server.local",
                            expires_at=rfc(reactor.seconds() - 10))
        yield self.announce(proxy="other-public.ga", domain="b.internal-server.local")
        yield self.top.stopService()
        self.fake.calls.clear()
        first = self.fake.next_call()
        yield self.start_proxy(folder)
        yield first
        while len(self.fake.calls) < 2:
            yield self.fake.next_call()
        self.assertEqual(sorted(self.fake.calls), [
            ("other-public.ga.announceConnections",
             {"connections": [{"domain": "b.internal-server.local"}]}),
            (f"{PUBLIC}.announceConnections", {"connections": [{"domain": DOMAIN}]}),
        ])

    @inlineCallbacks
    def test_incoming_connection_404s(self):
        yield self.start_proxy()
        token = base64.b64encode(os.urandom(32)).decode()
        params = {"token": token, "endpoint": "127.0.0.1:9", "domain": DOMAIN,
                  "_client": client_info(PUBLIC, None)}
        error = yield self.assertRPCError(self.call("incomingConnection", params), NOT_FOUND)
        self.assertEqual(error.message, "no matching connection found")
        yield self.announce(proxy="other-public.ga")
        yield self.announce(domain="old.internal-server.local",
                            expires_at=rfc(reactor.seconds() - 10))
        yield self.assertRPCError(self.call("incomingConnection", params), NOT_FOUND)
        yield self.assertRPCError(self.call("incomingConnection", dict(
            params, domain="old.internal-server.local")), NOT_FOUND)
        for bad in (dict(params, token="short"), dict(params, token=base64.b64encode(
                b"x" * 31).decode()), dict(params, endpoint="nohost"),
                dict(params, domain="a b")):
            yield self.assertRPCError(self.call("incomingConnection", bad), INVALID_PARAMS)
        no_client = dict(params)
        del no_client["_client"]
        yield self.assertRPCError(self.call("incomingConnection", no_client), 403)
        self.assertEqual(self.service.forwarder.forwarded, 0)

    # -- forwarding end to end

    @inlineCallbacks
    def start_chain(self, internal_tls: bool, **endpoint: Any):
        """Internal server, rendezvous, front, and the private proxy; returns front port."""
        crt, key = pki().tls("internal-server")
        server_port = yield internal_server.listen(
            reactor, "127.0.0.1:0", str(crt) if internal_tls else None, str(key))
        self.addCleanup(server_port.stopListening)
        self.server_port = server_port.getHost().port
        endpoint.setdefault("address", f"127.0.0.1:{self.server_port}")
        self.rv = Rendezvous(reactor, accept_timeout=5, read_timeout=5)
        rv_port = reactor.listenTCP(0, self.rv.factory(), interface="127.0.0.1")
        self.addCleanup(rv_port.stopListening)
        self.addCleanup(self.rv.close_all)
        self.rv_port = rv_port.getHost().port
        self.incoming: list[Deferred[Any]] = []
        front = reactor.listenTCP(0, Factory.forProtocol(lambda: Front(self)),
                                  interface="127.0.0.1")
        self.addCleanup(front.stopListening)
        yield self.start_proxy(internal_endpoint=endpoint)
        yield self.announce()
        return front.getHost().port

    def tls_request(self, port: int, request: bytes) -> Deferred[bytes]:
        """A real TLS client for DOMAIN through the front; verifies the internal server."""
        root = Certificate.loadPEM(Path(pki().root).read_bytes())
        creator = optionsForClientTLS(DOMAIN, trustRoot=root)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        collector = Collect(request)
        return connectProtocol(endpoint, collector).addCallback(lambda _: collector.done)

    def get(self, path: bytes = b"/") -> bytes:
        return (b"GET " + path + b" HTTP/1.1\r\nHost: " + DOMAIN.encode()
                + b"\r\nConnection: close\r\n\r\n")

    def post(self, path: bytes, body: bytes) -> bytes:
        return (b"POST " + path + b" HTTP/1.1\r\nHost: " + DOMAIN.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    @inlineCallbacks
    def test_raw_tls_forwarding(self):
        port = yield self.start_chain(internal_tls=True)
        raw = yield self.tls_request(port, self.get())
        status, headers, body = http_body(raw)
        self.assertEqual((status, json.loads(body)), (200, {"message": "success"}))
        self.assertEqual((yield self.incoming[0]), {"message": "ok"})
        raw = yield self.tls_request(port, self.post(b"/echo", b'{"a": [1, 2]}'))
        self.assertEqual(json.loads(http_body(raw)[2]), {"a": [1, 2]})
        self.assertEqual(self.service.forwarder.forwarded, 2)
        self.assertEqual(self.rv.pairings, 2)

    @inlineCallbacks
    def test_terminated_http_forwarding(self):
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False))
        status, headers, body = http_body((yield self.tls_request(port, self.get(b"/x?y=1"))))
        self.assertEqual((status, json.loads(body)), (200, {"message": "success"}))
        self.assertEqual(headers[b"content-type"], b"application/json; charset=utf-8")
        status, _, body = http_body((yield self.tls_request(
            port, self.post(b"/echo", b'{"n": 1}'))))
        self.assertEqual((status, json.loads(body)), (200, {"n": 1}))
        status, _, body = http_body((yield self.tls_request(
            port, self.post(b"/echo", b"not json"))))
        self.assertEqual(status, 400)
        self.assertEqual(self.service.forwarder.requests, 3)

    def held_upstream(self, resource: Resource) -> str:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    def watch(self, port: int, marker: bytes) -> Watch:
        root = Certificate.loadPEM(Path(pki().root).read_bytes())
        endpoint = wrapClientTLS(optionsForClientTLS(DOMAIN, trustRoot=root),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        watch = Watch(self.get(b"/stream"), marker)
        connectProtocol(endpoint, watch)
        return watch

    @inlineCallbacks
    def test_terminated_responses_stream_as_they_arrive(self):
        first, rest = b"A" * 300_000 + b"<first>", b"B" * 300_000 + b"<rest>"
        upstream = Held(first, rest)
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False),
            address=self.held_upstream(upstream))
        watch = self.watch(port, b"<first>")
        # The first part reaches the client while the upstream still holds the rest:
        # nothing waits for the whole response.
        yield watch.seen
        self.assertNotIn(b"<rest>", watch.received)
        upstream.release.callback(None)
        raw = yield watch.done
        status, headers, body = http_body(raw)
        self.assertEqual((status, headers[b"transfer-encoding"]), (200, b"chunked"))
        self.assertTrue(body.endswith(b"0\r\n\r\n"))  # the chunked body ended properly
        self.assertEqual(body.count(b"A"), 300_000)
        self.assertIn(b"<rest>", body)

    @inlineCallbacks
    def test_a_large_response_is_read_from_the_upstream_in_bulk_and_arrives_whole(self):
        first = bytes(range(256)) * 8192 + b"<first>"  # 2 MiB and a marker
        upstream = Held(first, b"<end>", length=len(first) + 5)
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False),
            address=self.held_upstream(upstream))
        watch = self.watch(port, b"<first>")
        yield watch.seen
        upstream.release.callback(None)
        status, headers, body = http_body((yield watch.done))
        self.assertEqual((status, body), (200, first + b"<end>"))
        # The upstream connection, kept for the next request, reads 256 KiB at a time
        # (Twisted's default is 64 KiB).
        pool = self.service.forwarder._pool
        kept = [c for cs in pool._connections.values() for c in cs]
        self.assertEqual([c.transport.bufferSize for c in kept], [BULK_READ_BYTES])
        self.assertEqual(BULK_READ_BYTES, 256 * 1024)

    @inlineCallbacks
    def test_a_request_cut_without_close_notify_is_not_forwarded(self):
        # The server takes a TCP close without a TLS close_notify as a close (see
        # epsproxy.net.tls); what was cut short is still not acted on: HTTP's framing
        # says the request is incomplete.
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False))
        cut = self.post(b"/echo", b'{"n": 1}' * 20)[:-40]  # the body 40 bytes short

        def client() -> None:
            context = ssl.create_default_context(cafile=str(pki().root))
            with socket.create_connection(("127.0.0.1", port)) as raw:
                tls_socket = context.wrap_socket(raw, server_hostname=DOMAIN)
                tls_socket.sendall(cut)
                tls_socket.close()  # no unwrap(): no close_notify

        yield threads.deferToThread(client)
        forwarder = self.service.forwarder
        self.assertEqual(forwarder.forwarded, 1)  # served: its handshake was done
        yield forwarder.drain(30)  # the connection ended (drained: nothing more comes)
        self.assertEqual(forwarder.active, set())
        self.assertEqual(forwarder.requests, 0)

    @inlineCallbacks
    def test_a_closed_terminated_connection_leaves_nothing_for_the_garbage_collector(self):
        # Freed as it closes, by reference counts: no cycle of the channel, its TLS
        # transport and its TCP transport waits for a collector's pass.  One client
        # sends a request, one only shakes hands (as a benchmark's clients do).
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False))
        watch_new_garbage(self)
        status, _, _ = http_body((yield self.tls_request(port, self.get())))
        self.assertEqual(status, 200)
        yield threads.deferToThread(handshake_then_close, port, DOMAIN)
        forwarder = self.service.forwarder
        self.assertEqual(forwarder.forwarded, 2)
        yield forwarder.drain(30)  # both terminated connections have ended
        yield deferLater(reactor, 0, lambda: None)  # and the close's calls have returned
        left = garbage_names(lambda o: isinstance(o, (TLSMemoryBIOProtocol, tcp.Server,
                                                      tcp.Client))
                             or type(o).__module__.startswith("epsproxy."))
        self.assertEqual(left, [])

    @inlineCallbacks
    def test_a_declared_length_over_the_cap_is_502(self):
        upstream = Held(b"x" * 100, b"", length=2000)
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False), max_response_bytes=1000,
            address=self.held_upstream(upstream))
        status, _, body = http_body((yield self.tls_request(port, self.get(b"/stream"))))
        self.assertEqual((status, json.loads(body)), (502, {"message": "bad gateway"}))

    @inlineCallbacks
    def test_a_body_growing_over_the_cap_is_cut_not_completed(self):
        upstream = Held(b"x" * 600 + b"<first>", b"y" * 600)
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False), max_response_bytes=1000,
            address=self.held_upstream(upstream))
        watch = self.watch(port, b"<first>")
        yield watch.seen
        upstream.release.callback(None)
        raw = yield watch.done
        status, _, body = http_body(raw)
        self.assertEqual(status, 200)  # the head went out before the body grew too large
        self.assertNotIn(b"y", body)
        self.assertFalse(body.endswith(b"0\r\n\r\n"))  # aborted: it does not look complete

    @inlineCallbacks
    def test_terminated_upstream_down_is_502(self):
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False), address="127.0.0.1:1")
        status, _, body = http_body((yield self.tls_request(port, self.get())))
        self.assertEqual(status, 502)

    @inlineCallbacks
    def test_terminated_jsonrpc_forwarding(self):
        port = yield self.start_chain(internal_tls=False, tls=tls_block(
            "internal-server", verify_client=False))
        self.service.forwarder._jsonrpc = JSONRPC_CLIENT_SETTINGS.validate(
            {"endpoint": f"http://127.0.0.1:{self.server_port}/jsonrpc"})
        call = b'{"jsonrpc": "2.0", "method": "x", "params": {}, "id": 1}'
        status, _, body = http_body((yield self.tls_request(port, self.post(b"/jsonrpc", call))))
        self.assertEqual((status, json.loads(body)),
                         (200, {"jsonrpc": "2.0", "result": {"message": "success"}, "id": 1}))
        status, _, _ = http_body((yield self.tls_request(port, self.post(b"/other", call))))
        self.assertEqual(status, 404)
        status, _, body = http_body((yield self.tls_request(
            port, self.post(b"/jsonrpc", b'{"id": 1}'))))
        self.assertEqual(status, 400)
        self.assertIn("error", json.loads(body))

    @inlineCallbacks
    def test_proxy_protocol_header_first(self):
        captured: list[Collect] = []

        class Capture(Collect):
            """Reads the header and the first byte after it, then hangs up."""

            def connectionMade(self) -> None:
                captured.append(self)

            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if len(self.received) > len(proxy_v2_header()):
                    self.transport.loseConnection()

        listener = reactor.listenTCP(0, Factory.forProtocol(lambda: Capture(b"")),
                                     interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        port = yield self.start_chain(internal_tls=True, proxy_protocol=True,
                                      address=f"127.0.0.1:{listener.getHost().port}")
        raw = yield self.tls_request(port, self.get())
        self.assertEqual(raw, b"")
        [capture] = captured
        received = yield capture.done
        self.assertTrue(received.startswith(proxy_v2_header()), received[:20])
        self.assertEqual(received[len(proxy_v2_header())], 0x16)  # then the ClientHello


class TwistdTests(unittest.TestCase):
    timeout = 30

    @inlineCallbacks
    def test_serve_and_stop(self):
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        write_settings(folder, {"private": private_section(folder, eps_port)})
        protocol = TwistdProcess(r"JSON-RPC on [\d.]+:(\d+)/jsonrpc")
        env = dict(os.environ, PROXY_SETTINGS=str(folder))
        reactor.spawnProcess(protocol, TWISTD,
                             [TWISTD, "-n", "--pidfile=", "proxy", "--mode", "private"],
                             env=env, path="/")
        ended = []
        self.addCleanup(lambda: ended or protocol.transport.signalProcess(signal.SIGKILL))
        match = yield protocol.matched
        client = rpc_client(int(match.group(1)))
        self.addCleanup(client.close)
        self.assertEqual((yield client.call("getAnnouncements", {})), [])
        yield client.close()
        protocol.transport.signalProcess(signal.SIGTERM)
        yield protocol.ended
        ended.append(True)
        output = protocol.output.decode()
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
