"""
TLS passthrough end to end (SPEC §21.6, issue 5): real endpoint servers, a real public
and a real private proxy and the example internal server on loopback, and curl as the
client.  hd-1's application announces ``test.internal-server.local`` at the private
proxy; the private proxy claims it at the public proxy; curl then reaches the internal
server through the public proxy's TLS port, verifying the *internal server's*
certificate end to end.  Both forwarding variants: TLS terminated behind the private
proxy, and the raw TLS stream forwarded to an internal TLS server.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

from twisted.internet import defer, reactor, threads, utils
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server
from twisted.trial.unittest import TestCase

from epsproxy.dev.examples.internal_server import listen as listen_internal
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.proxy.tap import Options, makeService
from tests.support.eps import (
    Network,
    client_channel,
    gateway_channel,
    gateway_client,
    local_channel,
    record,
    server_channel,
    service,
)
from tests.support.haproxy import accept_proxy_front, start_haproxy
from tests.support.pki import pki
from tests.support.proxies import public_section, write_settings
from tests.support.tls import tls_block

PUBLIC = "public-proxy-1.ga"
PRIVATE = "private-proxy-1.ga"
DOMAIN = "test.internal-server.local"
HD = ("health-departments",)
ALLOWED = [{"service": "proxy", "settings": {"allowed_domains": [".internal-server.local"]}}]


class _EchoHeaders(resource.Resource):
    """
    An internal server that answers ``/headers`` with the request's headers, as JSON, and
    anything else as the example internal server does.
    """

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        if request.path != b"/headers":
            return json.dumps({"message": "success"}).encode()
        headers = {name.decode().lower(): [v.decode() for v in values]
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        return json.dumps(headers).encode()


def client_to(url: str, name: str, tls: bool = True) -> JSONRPCClient:
    raw = {"endpoint": url, "timeout": 5}
    if tls:
        raw.update({"server_name": name, "tls": tls_block(name)})
    return JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(raw))


class Passthrough:
    """The whole network; ``internal_tls`` chooses the forwarding variant."""

    timeout = 60
    internal_tls = False
    #: Raw forwarding with a PROXY v2 header to a real HAProxy in front of the internal
    #: server (``accept-proxy``), which logs the client address it was given.
    haproxy_front = False
    #: The private proxy's ``pool_size``: 0 tests the brokered path (incomingConnection);
    #: the pooled classes keep idle connections at the public proxy (issue 14).
    pool_size = 0
    #: The public proxy's ``pool_max_per_operator`` (None: its default).
    public_pool_cap: int | None = None
    #: More settings of the private proxy.
    private_extra: dict = {}
    #: A plain HTTP internal server that answers with the request's headers (terminating).
    echo_headers = False

    @defer.inlineCallbacks
    def start_proxy(self, mode: str, section: dict):
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", mode, "--settings",
                              str(write_settings(folder, {mode: section}))])
        top = makeService(options, reactor, exit_on_failure=False)
        top.startService()
        self.addCleanup(top.stopService)
        ports = yield top.services[0].when_ready()
        return top.services[0], ports

    @defer.inlineCallbacks
    def setUp(self):
        if shutil.which("curl") is None:
            self.fail("curl is not installed (make os-deps and CI install it)")
        net = self.net = Network(self)
        net.operator(PUBLIC, ["proxy-providers"], [
            service("proxy", ("proxy-users",), "announceConnections", "getAnnouncements",
                    "requestPoolTokens")])
        net.operator(PRIVATE, ["proxy-users"], [
            service("incoming", ("proxy-providers",), "incomingConnection"),
            service("announcing", HD, "announceConnection", "getAnnouncements")])
        net.operator("hd-1", ["health-departments"], [])
        net.write(record("hd-1", "settings", ALLOWED), record(PRIVATE, "settings", ALLOWED))
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()

        # The internal server: plain HTTP behind a terminating private proxy, or TLS.
        crt, key = pki().tls("internal-server")
        if self.echo_headers:
            internal = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                server.Site(_EchoHeaders()))
        elif self.internal_tls:
            internal = yield listen_internal(reactor, "127.0.0.1:0", str(crt), str(key))
        else:
            internal = yield listen_internal(reactor, "127.0.0.1:0")
        self.addCleanup(internal.stopListening)
        internal_address = f"127.0.0.1:{internal.getHost().port}"
        if self.haproxy_front:
            self.haproxy = start_haproxy(self, accept_proxy_front(internal_address))
            internal_address = f"127.0.0.1:{self.haproxy.port}"

        # Public proxy and its endpoint server.
        cap = {} if self.public_pool_cap is None else {
            "pool_max_per_operator": self.public_pool_cap}
        self.public, ports = yield self.start_proxy(
            "public", public_section(folder / "public", 1, **cap))
        self.public.proxy.internal_endpoint = f"127.0.0.1:{ports.internal.getHost().port}"
        self.public.front.internal_endpoint = self.public.proxy.internal_endpoint
        self.tls_port = ports.tls.getHost().port
        yield net.start(PUBLIC, [
            server_channel(PUBLIC), client_channel(PUBLIC), gateway_channel(PUBLIC),
            local_channel(f"https://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc",
                          tls=tls_block(PUBLIC), server_name=PUBLIC)])
        net.channels(PUBLIC, {"type": "eps_server",
                              "settings": {"address": net.server_address(PUBLIC)}})
        yield self.public.proxy.client.close()
        self.public.proxy.client = client_to(net.gateway_url(PUBLIC), PUBLIC)
        self.addCleanup(self.public.proxy.client.close)

        # Private proxy and its endpoint server.
        endpoint: dict = {"address": internal_address, "timeout": 10}
        if self.haproxy_front:
            endpoint["proxy_protocol"] = True
        if not self.internal_tls:
            endpoint["tls"] = {**tls_block("internal-server"), "verify_client": False}
        private_section = {
            "name": PRIVATE,
            "datastore": {"type": "embedded",
                          "settings": {"path": str(folder / "private.sqlite")}},
            "jsonrpc_server": {"bind_address": "127.0.0.1:0"},
            "jsonrpc_client": {"endpoint": "http://127.0.0.1:1/jsonrpc", "timeout": 5},
            "internal_endpoint": endpoint,
            "shutdown_grace": 0,
            "pool_size": self.pool_size,
            **self.private_extra,
        }
        self.private, private_ports = yield self.start_proxy("private", private_section)
        yield net.start(PRIVATE, [
            server_channel(PRIVATE), client_channel(PRIVATE), gateway_channel(PRIVATE),
            local_channel(f"http://127.0.0.1:{private_ports.jsonrpc.getHost().port}/jsonrpc")])
        net.channels(PRIVATE, {"type": "eps_server",
                               "settings": {"address": net.server_address(PRIVATE)}})
        yield self.private.client.close()
        self.private.client = self.private.proxy.client = self.private.pool.client = client_to(
            net.gateway_url(PRIVATE), PRIVATE)
        self.addCleanup(self.private.proxy.client.close)

        # hd-1: the operator whose application announces the domain.
        yield net.start("hd-1", [client_channel("hd-1"), gateway_channel("hd-1")])
        self.hd1 = gateway_client(self, net.gateway_url("hd-1"))

    @defer.inlineCallbacks
    def announce(self, **extra):
        """hd-1 announces DOMAIN at the public proxy; with a pool, wait until it is full."""
        result = yield self.hd1.call(f"{PRIVATE}.announceConnection",
                                     {"proxy": PUBLIC, "domain": DOMAIN, **extra}, id="a")
        self.assertEqual(result, "ok")
        if self.pool_size and self.public_pool_cap != 0:
            yield self.public.pool.when_idle(PRIVATE, self.pool_size)

    def curl(self, domain: str = DOMAIN, path: str = "/jsonrpc", source: str = "127.0.0.1"):
        return utils.getProcessOutputAndValue("curl", [
            "-sS", "--max-time", "20", "--cacert", str(pki().root), "--interface", source,
            "--resolve", f"{domain}:{self.tls_port}:127.0.0.1",
            f"https://{domain}:{self.tls_port}{path}",
        ], env={"PATH": "/usr/bin:/bin"}, reactor=reactor)

    @defer.inlineCallbacks
    def test_curl_reaches_the_internal_server_after_announcing(self):
        # Not announced yet: the public proxy closes the connection.
        out, err, code = yield self.curl()
        self.assertNotEqual(code, 0)
        result = yield self.hd1.call(f"{PRIVATE}.announceConnection",
                                     {"proxy": PUBLIC, "domain": DOMAIN}, id="a")
        self.assertEqual(result, "ok")
        announced = yield self.hd1.call(f"{PRIVATE}.getAnnouncements", {}, id="g")
        self.assertEqual([a["domain"] for a in announced], [DOMAIN])
        out, err, code = yield self.curl()
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(json.loads(out), {"message": "success"})
        # Twice: every client connection gets its own splice, brokered with a token of
        # its own or (once the private proxy's pool filled) a pooled connection.
        out, err, code = yield self.curl()
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(self.public.rendezvous.pairings + self.public.pool.hits, 2)
        if not self.pool_size:
            self.assertEqual(self.public.rendezvous.pairings, 2)
        self.assertEqual(self.public.rendezvous.pending, 0)

    @defer.inlineCallbacks
    def test_domain_outside_the_allowed_suffixes_is_refused(self):
        with self.assertRaises(JSONRPCError) as e:
            yield self.hd1.call(f"{PRIVATE}.announceConnection",
                                {"proxy": PUBLIC, "domain": "evil.example.org"}, id="x")
        self.assertEqual(e.exception.code, 403)
        out, err, code = yield self.curl("evil.example.org")
        self.assertNotEqual(code, 0)


class TerminatedBehindThePrivateProxy(Passthrough, TestCase):
    internal_tls = False


class RawTLSForwardedToTheInternalServer(Passthrough, TestCase):
    internal_tls = True


class RawForwardedWithTheClientsAddress(Passthrough, TestCase):
    """The client's address travels public proxy -> private proxy -> PROXY v2 header."""

    internal_tls = True
    haproxy_front = True

    @defer.inlineCallbacks
    def test_haproxy_behind_the_private_proxy_sees_the_original_client(self):
        yield self.announce()
        # curl from its own loopback address, so it cannot be taken for a proxy's.
        out, err, code = yield self.curl(source="127.0.0.9")
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(json.loads(out), {"message": "success"})
        # HAProxy logs a TCP session when it ends: wait for the line.
        yield self.haproxy.wait_for(b"client=")
        line = self.haproxy.output.decode().split("client=", 1)[1].splitlines()[0]
        self.assertTrue(line.startswith("127.0.0.9:"), self.haproxy.output[-500:])
        self.assertIn(f"frontend=127.0.0.1:{self.tls_port}", line)  # where the client came in
        # Brokered (incomingConnection) or served from the pool, as the class says.
        self.assertEqual(self.private.proxy.incoming_calls, 0 if self.pool_size else 1)
        self.assertEqual(self.public.pool.hits, 1 if self.pool_size else 0)


class PooledWithTheClientsAddress(RawForwardedWithTheClientsAddress):
    """The same through a pooled connection: its PROXY v2 header carries the client."""

    pool_size = 2


class Pooled(Passthrough):
    """Clients served from the private proxy's pool of pre-dialled connections (issue 14)."""

    pool_size = 2

    @defer.inlineCallbacks
    def test_clients_served_from_the_pool_which_refills(self):
        yield self.announce()
        for served in (1, 2, 3):
            out, err, code = yield self.curl()
            self.assertEqual(code, 0, err.decode())
            self.assertEqual(json.loads(out), {"message": "success"})
            # Served without brokering: no incomingConnection, no token pairing.
            self.assertEqual(self.private.proxy.incoming_calls, 0)
            self.assertEqual(self.private.pool.served, served)
            self.assertEqual((self.public.pool.hits, self.public.pool.misses), (served, 0))
            self.assertEqual(self.public.rendezvous.pairings, 0)
            # The used connection is replaced: both ends see the pool full again.
            yield self.public.pool.when_idle(PRIVATE, self.pool_size)
            yield self.private.pool.when_idle(PUBLIC, self.pool_size)

    @defer.inlineCallbacks
    def test_expired_announcement_empties_the_pool(self):
        expires = datetime.now(timezone.utc) + timedelta(seconds=3)
        yield self.announce(expires_at=expires.isoformat().replace("+00:00", "Z"))
        yield self.private.pool.when_idle(PUBLIC, 0)  # closed once the announcement expired
        out, err, code = yield self.curl()
        self.assertNotEqual(code, 0)  # nobody holds the name any more
        self.assertEqual(self.public.pool.idle(PRIVATE), 0)
        self.assertEqual(self.public.pool.hits, 0)
        self.assertEqual(self.private.proxy.incoming_calls, 0)


class PooledTerminated(Pooled, TestCase):
    internal_tls = False


class PooledRaw(Pooled, TestCase):
    internal_tls = True


class FallbackWhenThePoolIsEmpty(Passthrough, TestCase):
    """The public proxy grants no pooled connection: every client is brokered."""

    internal_tls = True
    pool_size = 2
    public_pool_cap = 0

    @defer.inlineCallbacks
    def test_brokered_when_no_pooled_connection_is_idle(self):
        yield self.announce()
        out, err, code = yield self.curl()
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(json.loads(out), {"message": "success"})
        self.assertEqual(self.public.pool.misses, 1)
        self.assertEqual(self.public.front.pool_fallbacks, 1)
        self.assertEqual(self.public.rendezvous.pairings, 1)
        self.assertEqual(self.private.proxy.incoming_calls, 1)
        self.assertEqual(self.private.pool.served, 0)


class LimitedPerRealClient(Passthrough, TestCase):
    """The private proxy limits forwards per real client, named by the pooled header."""

    internal_tls = True
    pool_size = 2
    private_extra = {"max_connections_per_client": 1}

    def hold(self, source: str) -> ssl.SSLSocket:
        """A TLS connection from ``source`` through both proxies, handshake done (blocking)."""
        sock = socket.create_connection(("127.0.0.1", self.tls_port), timeout=10,
                                        source_address=(source, 0))
        context = ssl.create_default_context(cafile=str(pki().root))
        return context.wrap_socket(sock, server_hostname=DOMAIN)

    @defer.inlineCallbacks
    def test_a_second_connection_of_one_client_is_refused(self):
        yield self.announce()
        held = yield threads.deferToThread(self.hold, "127.0.0.9")
        self.addCleanup(held.close)
        forwarder = self.private.forwarder
        self.assertEqual(forwarder._per_client, {"127.0.0.9": 1})
        out, err, code = yield self.curl(source="127.0.0.9")
        self.assertNotEqual(code, 0)  # over its limit: the pooled connection is closed
        self.assertEqual(forwarder.client_limited, 1)
        self.assertEqual(self.private.pool.closed.get("client_limit"), 1)
        out, err, code = yield self.curl(source="127.0.0.10")  # another client is served
        self.assertEqual(code, 0, err.decode())
        # Once the first connection ends, its client is served again.
        ends = [item.done for item in forwarder.active if hasattr(item, "done")]
        held.close()
        yield defer.DeferredList(ends)
        yield self.public.pool.when_idle(PRIVATE, self.pool_size)
        out, err, code = yield self.curl(source="127.0.0.9")
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(json.loads(out), {"message": "success"})
        self.assertEqual(self.private.proxy.incoming_calls, 0)


class TerminatedWithTheClientsAddress(Passthrough, TestCase):
    """TLS ends at the private proxy: the internal server learns the client from headers."""

    internal_tls = False
    echo_headers = True
    pool_size = 2

    @defer.inlineCallbacks
    def test_forwarded_headers_name_the_real_client(self):
        yield self.announce()
        # What the client claims of itself is replaced, not passed on.
        out, err, code = yield utils.getProcessOutputAndValue("curl", [
            "-sS", "--max-time", "20", "--cacert", str(pki().root), "--interface", "127.0.0.9",
            "-H", "X-Forwarded-For: 6.6.6.6", "-H", "Forwarded: for=6.6.6.6",
            "--resolve", f"{DOMAIN}:{self.tls_port}:127.0.0.1",
            f"https://{DOMAIN}:{self.tls_port}/headers",
        ], env={"PATH": "/usr/bin:/bin"}, reactor=reactor)
        self.assertEqual(code, 0, err.decode())
        headers = json.loads(out)
        self.assertEqual(headers["x-forwarded-for"], ["127.0.0.9"])
        self.assertEqual(headers["forwarded"], ["for=127.0.0.9;proto=https"])
        self.assertEqual(headers["x-forwarded-proto"], ["https"])
        # Through a pooled connection, or brokered, as the class says.
        self.assertEqual(self.private.pool.served, 1 if self.pool_size else 0)
        self.assertEqual(self.private.proxy.incoming_calls, 0 if self.pool_size else 1)


class TerminatedBrokeredWithTheClientsAddress(TerminatedWithTheClientsAddress):
    """The same when the connection is brokered (incomingConnection's client_address)."""

    pool_size = 0
