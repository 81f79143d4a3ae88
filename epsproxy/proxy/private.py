"""
The private proxy (SPEC §14.5; issue 5): an operator without a public address receives
TLS connections for its announced domains through a public proxy.

Three parts, wired by :class:`PrivateProxyService`:

- :class:`PrivateProxy` holds the JSON-RPC methods the own endpoint server calls:
  ``announceConnection`` (checked against the *caller's* directory settings, stored,
  and forwarded to the public proxy as ``"<proxy>.announceConnections"``),
  ``incomingConnection`` (from the public proxy the domain was announced to) and
  ``getAnnouncements``.  All live announcements are re-sent at start and every
  ``reannounce_interval`` seconds, one call per public proxy (failures are logged and
  retried the next round).
- :class:`Forwarder` serves an accepted ``incomingConnection``: it dials the public
  proxy's internal endpoint, writes the 32 raw token bytes, and then either
  **(a)** relays the raw TLS stream to ``internal_endpoint.address`` (the internal server
  does the handshake with the client; optionally preceded by a PROXY protocol v2 header),
  or **(b)** with ``internal_endpoint.tls`` terminates TLS itself (a twisted.web ``Site``
  inside ``TLSMemoryBIOProtocol``) and forwards each HTTP request to the internal server
  (or JSON-RPC calls at ``jsonrpc_path`` to ``internal_endpoint.jsonrpc_client``),
  copying status, headers and body back; failures are 502.
- The announcement table (:class:`epsproxy.proxy.announcements.PrivateAnnouncements`),
  kept in the datastore.

Better than the reference (SPEC §23.1 #7, #9):

- expired announcements are not re-announced; the store is written only on changes;
- a terminated connection serves requests with keep-alive until it is idle for
  ``timeout`` seconds (the reference served exactly one), each upstream request has the
  same timeout, bodies are capped both ways, the JSON-RPC body is forwarded as received
  (integer ids stay integers), and the JSON-RPC upstream uses its configured TLS;
- concurrent forwarded connections are capped (``max_connections``, 503 beyond).

The PROXY protocol header (raw forwarding with ``proxy_protocol: true``): the private
proxy does not know the client's address unless the public proxy passes it in the
optional ``incomingConnection`` params ``client_address`` (``"ip:port"``, and
``server_address`` for the address the client connected to).  With a client address the
header is a v2 ``PROXY`` command over TCP (unknown server address: the family's zero
address, port 0); without one it is a ``LOCAL`` command, so the internal server uses the
connection's own addresses.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from epsproxy.net.lifecycle import AsyncStartService
from epsproxy.rules import forms
from epsproxy.net import tls
from epsproxy.net.hostport import parse_host_port
from epsproxy.rules.certificates import certificate_names
from epsproxy.net.token import TokenError, decode_token, dial_with_token, token_tag
from epsproxy.net.jsonrpc.client import CappedBody, JSONRPCClient, QuietConnectionPool
from epsproxy.net.jsonrpc.envelope import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallContext,
    Dispatcher,
    JSONRPCError,
    TransportError,
    parse_request,
    random_id,
    response_object,
)
from epsproxy.net.jsonrpc.server import CappedRequest, jsonrpc_site, listen_jsonrpc
from epsproxy.net.metrics import RPCMetrics
from ..store import Store, open_store
from .announcements import (
    CLIENT_INFO,
    DOMAIN,
    GET_ANNOUNCEMENTS_PARAMS,
    AnnouncementError,
    PrivateAnnouncements,
    allowed_domains,
    domain_allowed,
    parse_expires_at,
)
from .settings import DEFAULT_PRIVATE_DATASTORE_FILE
from .splice import splice

__all__ = [
    "NOT_FOUND",
    "TOO_MANY_CONNECTIONS",
    "ANNOUNCE_CONNECTION_PARAMS",
    "INCOMING_CONNECTION_PARAMS",
    "proxy_v2_header",
    "Forwarder",
    "PrivateProxy",
    "PrivateProxyPorts",
    "PrivateProxyService",
]

log = Logger()

#: ``incomingConnection`` for a domain not (or no longer) announced to the caller.
NOT_FOUND = 404
#: ``incomingConnection`` while ``max_connections`` connections are being forwarded.
TOO_MANY_CONNECTIONS = 503
#: Error code of a call that does not come from the own endpoint server.
NOT_AUTHORIZED = 403

# An operator name that makes a valid "<proxy>.announceConnections" method (SPEC §9.2).
_OPERATOR = r"[^\s().]+(?:\.[^\s().]+)*"
_ADDRESS_TEXT = forms.String(min_length=1, max_length=300)

ANNOUNCE_CONNECTION_PARAMS = forms.Map(
    {
        "proxy": forms.Required(forms.String(pattern=_OPERATOR, max_length=253)),
        "domain": forms.Required(DOMAIN),
        "expires_at": forms.Optional(forms.String(max_length=64)),
        "_client": forms.Optional(CLIENT_INFO),
    }
)
"""Params of ``announceConnection`` (SPEC §14.5)."""

INCOMING_CONNECTION_PARAMS = forms.Map(
    {
        "token": forms.Required(forms.String(max_length=128)),
        "endpoint": forms.Required(_ADDRESS_TEXT),
        "domain": forms.Required(DOMAIN),
        "client_address": forms.Optional(_ADDRESS_TEXT),
        "server_address": forms.Optional(_ADDRESS_TEXT),
        "_client": forms.Optional(CLIENT_INFO),
    }
)
"""Params of ``incomingConnection`` (SPEC §14.5, plus the optional client address)."""

# Headers that belong to one HTTP connection, never forwarded (RFC 9110 §7.6.1).
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
_JSON = b"application/json; charset=utf-8"
_PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _ip_port(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = parse_host_port(text)
    return ipaddress.ip_address(host), port


def proxy_v2_header(client: str | None = None, server: str | None = None) -> bytes:
    """
    A PROXY protocol v2 header: a ``PROXY`` command over TCP from ``client`` to
    ``server`` (``"ip:port"`` texts; an absent server is the family's zero address, port
    0), or a ``LOCAL`` command when ``client`` is None.  Raises ValueError for an address
    that is not ``ip:port`` or families that differ.
    """
    if client is None:
        return _PROXY_V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    source, source_port = _ip_port(client)
    if server is None:
        target: Any = ipaddress.ip_address(0 if source.version == 4 else "::")
        target_port = 0
    else:
        target, target_port = _ip_port(server)
    if source.version != target.version:
        raise ValueError("client and server addresses are of different families")
    family = 0x11 if source.version == 4 else 0x21
    body = source.packed + target.packed + struct.pack("!HH", source_port, target_port)
    return _PROXY_V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


# ---------------------------------------------------------------- raw forwarding


@implementer(IHalfCloseableProtocol)
class _Hold(Protocol):
    """
    One outbound connection of a raw forward until it is spliced: writes ``first`` (the
    token, a PROXY header), stays paused, and remembers anything that arrives anyway.
    """

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.received: list[bytes] = []
        self.eof = False
        self.gone = False

    def connectionMade(self) -> None:
        transport = self.transport
        # Endpoints put a wrapper between the transport and us; splice() needs to take
        # the transport over from the protocol the transport talks to.
        if getattr(transport, "protocol", self) is not self:
            transport.protocol = self
        transport.pauseProducing()
        if self.first:
            transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone = True


# ------------------------------------------------------------ terminated forwarding


class _Request(CappedRequest):
    """A request whose body may not exceed the site's ``max_body_bytes`` (413 otherwise)."""

    def refusal(self, limit: int) -> bytes:
        return b'{"message":"request body too large"}'


class _Channel(http.HTTPChannel):
    """An HTTP channel on a terminated connection; tells the forwarder when it is gone."""

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.site.forwarder._terminated_lost(self)


class _Site(server.Site):
    protocol = _Channel
    requestFactory = _Request
    displayTracebacks = False

    def __init__(self, resource: Resource, forwarder: Forwarder, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.forwarder = forwarder
        self.max_body_bytes = forwarder.endpoint["max_body_bytes"]

    def log(self, request: server.Request) -> None:
        # No access log with client addresses; the forwarder logs what it forwards.
        pass


class _ForwardResource(Resource):
    """Every request on a terminated connection: forwarded by the :class:`Forwarder`."""

    isLeaf = True

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def render(self, request: server.Request) -> int:
        d = ensureDeferred(self.forwarder._forward_request(request))
        d.addErrback(lambda f: log.failure("forwarding a request failed", f))
        return server.NOT_DONE_YET


def _json_reply(request: server.Request, status: int, value: bytes) -> None:
    request.setResponseCode(status)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"content-length", str(len(value)).encode())
    request.write(value)
    request.finish()


class Forwarder:
    """
    Serves accepted incoming connections (SPEC §14.5): dial the public proxy's endpoint,
    present the token, then relay raw TLS or terminate it and forward HTTP, as
    ``internal_endpoint`` (validated settings) says.  At most ``max_connections`` at once.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: dict[str, Any],
        *,
        max_connections: int = 1000,
        connect_timeout: float = 10.0,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.terminate = endpoint.get("tls") is not None
        self.active: set[Any] = set()  # forwards in progress: tokens, splices, channels
        self.forwarded = 0
        self.failed = 0
        self.requests = 0
        self._closing = False
        self._drained: list[Deferred[None]] = []
        self._server_tls: Any = None
        if self.terminate:
            # Fail at start-up, not at the first connection.
            self._server_tls = tls.server_options(endpoint["tls"])
            self.site = _Site(
                _ForwardResource(self), self, timeout=endpoint["timeout"], reactor=reactor
            )
        self._pool = QuietConnectionPool(reactor, persistent=True)
        self._pool.cachedConnectionTimeout = 20
        # Under load every forwarded request needs an upstream connection: keep as many
        # as may be forwarded at once instead of Twisted's 2 (make soak: 502 bursts).
        self._pool.maxPersistentPerHost = max_connections
        self._agent = Agent(reactor, pool=self._pool, connectTimeout=connect_timeout)
        self._jsonrpc: dict[str, Any] | None = endpoint.get("jsonrpc_client")
        if self._jsonrpc is not None:
            policy: Any = BrowserLikePolicyForHTTPS()
            if self._jsonrpc.get("tls") is not None:
                policy = tls.MutualTLSPolicy(
                    self._jsonrpc["tls"], self._jsonrpc.get("server_name")
                )
            self._agent = Agent(
                reactor, contextFactory=policy, pool=self._pool, connectTimeout=connect_timeout
            )

    @property
    def busy(self) -> bool:
        """Whether no further connection may be forwarded now."""
        return self._closing or len(self.active) >= self.max_connections

    def forward(
        self, endpoint: str, token: bytes, proxy_header: bytes | None = None
    ) -> Deferred[None]:
        """
        Serve one incoming connection in the background; the Deferred fires when it is
        connected (or has failed, which is logged, never raised).
        """
        marker = object()
        self.active.add(marker)
        if self.terminate:
            work = self._terminated(endpoint, token)
        else:
            work = self._raw(endpoint, token, proxy_header)
        d = ensureDeferred(work)

        def failed(failure: Failure) -> None:
            self.failed += 1
            log.warn(
                "cannot serve the incoming connection {tag} from {endpoint}: {error}",
                tag=token_tag(token), endpoint=_short(endpoint),
                error=_short(failure.getErrorMessage(), 300),
            )

        def done(_: Any) -> None:
            self._forget(marker)

        return d.addErrback(failed).addBoth(done)

    def _connect(self, address: str, protocol: Protocol) -> Deferred[Any]:
        host, port = parse_host_port(address)
        return connectProtocol(
            HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout), protocol
        )

    async def _raw(self, endpoint: str, token: bytes, proxy_header: bytes | None) -> None:
        public = _Hold(token)
        await self._connect(endpoint, public)
        internal = _Hold(proxy_header or b"")
        try:
            await self._connect(self.endpoint["address"], internal)
        except BaseException:
            public.transport.abortConnection()
            raise
        if public.gone or internal.gone or self._closing:
            for end in (public, internal):
                if not end.gone:
                    end.transport.abortConnection()
            raise ConnectionError("a connection was lost before it was spliced")
        s = splice(
            self.reactor, public, internal,
            to_right=b"".join(public.received), to_left=b"".join(internal.received),
            left_eof=public.eof, right_eof=internal.eof,
            idle_timeout=self.idle_timeout, tag=token_tag(token),
        )
        self.forwarded += 1
        self.active.add(s)
        s.done.addBoth(lambda _: self._forget(s))
        log.info("forwarding incoming connection {tag} to {address}",
                 tag=token_tag(token), address=self.endpoint["address"])

    async def _terminated(self, endpoint: str, token: bytes) -> None:
        channel = await dial_with_token(
            self.reactor, endpoint, token, self.endpoint["tls"], self.site,
            tls_client_for=None, timeout=self.connect_timeout,
        )
        if self._closing:
            channel.transport.abortConnection()
            return
        self.forwarded += 1
        self.active.add(channel)
        log.info("terminating incoming connection {tag}", tag=token_tag(token))

    def _terminated_lost(self, channel: Any) -> None:
        self._forget(channel)

    def _forget(self, item: Any) -> None:
        """A forward ended: forget it, and tell a waiting drain when none is left."""
        self.active.discard(item)
        if not self.active and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def drain(self, grace: float) -> Deferred[None]:
        """
        Refuse new forwards (``incomingConnection`` answers 503); fires once every
        forward in progress has ended by itself, or after ``grace`` seconds.
        """
        self._closing = True
        if not self.active or grace <= 0:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        timer = self.reactor.callLater(grace, lambda: drained.called or drained.callback(None))

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(stop_timer)

    async def _forward_request(self, request: server.Request) -> None:
        self.requests += 1
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        body = request.content.read()
        if self._jsonrpc is not None:
            if request.path != self.endpoint["jsonrpc_path"].encode("utf-8"):
                _json_reply(request, 404, b'{"message":"not found"}')
                return
            content_type = request.getHeader(b"content-type")
            try:
                parse_request(
                    None if content_type is None else content_type.decode("latin-1"), body
                )
            except JSONRPCError as e:
                reply = response_object(None, error=e)
                _json_reply(request, 400, json.dumps(reply).encode("utf-8"))
                return
            url = self._jsonrpc["endpoint"].encode("utf-8")
            limit = self._jsonrpc["max_response_bytes"]
        else:
            url = b"http://" + self.endpoint["address"].encode("ascii") + request.uri
            limit = self.endpoint["max_response_bytes"]
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in (b"host", b"content-length"):
                continue
            headers.setRawHeaders(name, values)
        producer = FileBodyProducer(BytesIO(body)) if body else None
        d = self._agent.request(request.method, url, headers, producer)
        timer = self.reactor.callLater(self.endpoint["timeout"], d.cancel)
        try:
            response = await d
            collector = CappedBody(limit, response.length)
            response.deliverBody(collector)
            data = await collector.done
        except Exception as e:
            if gone:
                return
            log.warn("upstream request failed: {error}", error=_short(str(e) or repr(e), 300))
            _json_reply(request, 502, b'{"message":"bad gateway"}')
            return
        finally:
            if timer.active():
                timer.cancel()
        if gone:
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower == b"content-length":
                continue
            request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()

    def close(self) -> Deferred[None]:
        """Stop: refuse new forwards, close every forwarded connection and the pool."""
        self._closing = True
        waits: list[Deferred[Any]] = []
        for item in list(self.active):
            done = getattr(item, "done", None)
            if done is not None:  # a splice
                waits.append(done)
                item.abort()
            elif hasattr(item, "transport") and item.transport is not None:
                item.transport.abortConnection()
        waits.append(self._pool.closeCachedConnections())
        return defer.gatherResults(waits).addCallback(lambda _: None)


# ------------------------------------------------------------------ JSON-RPC methods


def _as_rpc(e: AnnouncementError) -> JSONRPCError:
    return JSONRPCError(e.code, e.message, e.data)


class PrivateProxy:
    """
    The JSON-RPC methods of a private proxy named ``name`` (SPEC §14.5).

    ``client`` calls the own endpoint server (which routes ``"<proxy>.announceConnections"``
    to the public proxy).  With ``verify_caller`` a call is served only if the caller's
    (verified) certificate names ``name``: the own endpoint server.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        announcements: PrivateAnnouncements,
        client: JSONRPCClient,
        forwarder: Forwarder,
        *,
        proxy_protocol: bool = False,
        verify_caller: bool = False,
        call_timeout: float | None = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.announcements = announcements
        self.client = client
        self.forwarder = forwarder
        self.proxy_protocol = proxy_protocol
        self.verify_caller = verify_caller
        self.call_timeout = call_timeout
        self.reannounced = 0
        self.reannounce_failures = 0

    def dispatcher(self) -> Dispatcher:
        """A dispatcher serving this proxy's methods."""
        dispatcher = Dispatcher()
        dispatcher.register(
            "announceConnection", ANNOUNCE_CONNECTION_PARAMS, self.announce_connection
        )
        dispatcher.register(
            "incomingConnection", INCOMING_CONNECTION_PARAMS, self.incoming_connection
        )
        dispatcher.register("getAnnouncements", GET_ANNOUNCEMENTS_PARAMS, self.get_announcements)
        return dispatcher

    def _caller(self, params: dict[str, Any], context: CallContext) -> dict[str, Any]:
        if self.verify_caller:
            certificate = context.peer_certificate
            if certificate is None or self.name not in certificate_names(certificate):
                raise JSONRPCError(
                    NOT_AUTHORIZED,
                    "not authorized: only the proxy's own endpoint server may call it",
                )
        client = params.get("_client")
        if client is None:
            raise JSONRPCError(
                NOT_AUTHORIZED, "not authorized: _client is needed (call through the "
                "endpoint server)",
            )
        return client

    def get_announcements(
        self, params: dict[str, Any], context: CallContext
    ) -> list[dict[str, Any]]:
        """``getAnnouncements``: the live announcements ``{expires_at, proxy, domain}``."""
        return self.announcements.announcements()

    def announce_connection(
        self, params: dict[str, Any], context: CallContext
    ) -> Deferred[str]:
        """
        ``announceConnection {proxy, domain, expires_at?}``: store the announcement and
        send it to ``proxy``; ``"ok"``.  Errors: 400 (proxy is this proxy), 403 (caller
        not authorized, or domain not allowed: ``data.allowed_domains``), 500 (invalid
        directory settings), -32602 (expires_at), -32603 (store or forwarding failed),
        and per-item refusals of the public proxy (403, 409) passed on.
        """
        client = self._caller(params, context)
        proxy, domain = params["proxy"], params["domain"].lower()
        if proxy == self.name:
            raise JSONRPCError(400, "trying to announce with private proxy name")
        try:
            allowed = allowed_domains(client, self.name)
            if not domain_allowed(domain, allowed):
                raise JSONRPCError(
                    403, "not allowed to forward this domain", {"allowed_domains": allowed}
                )
            expires_at, expires_ns = parse_expires_at(
                params.get("expires_at"), self.reactor.seconds()
            )
        except AnnouncementError as e:
            raise _as_rpc(e) from None
        return ensureDeferred(self._announce(client["name"], domain, proxy, expires_at, expires_ns))

    async def _announce(
        self, caller: str, domain: str, proxy: str, expires_at: str | None,
        expires_ns: int | None,
    ) -> str:
        try:
            announcement = await self.announcements.upsert(domain, proxy, expires_at, expires_ns)
        except AnnouncementError as e:
            raise _as_rpc(e) from None
        log.info("{caller} announced {domain} at {proxy} (expires {expires})",
                 caller=_short(caller), domain=domain, proxy=_short(proxy),
                 expires=expires_at or "never")
        try:
            results = await self.client.call(
                f"{proxy}.announceConnections", {"connections": [announcement.connection()]},
                id=random_id(), timeout=self.call_timeout,
            )
        except JSONRPCError as e:
            log.warn("{proxy} refused the announcement of {domain}: {message} ({code})",
                     proxy=_short(proxy), domain=domain, message=_short(e.message), code=e.code)
            raise JSONRPCError(e.code, e.message, e.data) from None
        except TransportError as e:
            log.warn("cannot announce {domain} at {proxy}: {error}",
                     domain=domain, proxy=_short(proxy), error=_short(str(e), 300))
            raise JSONRPCError(
                INTERNAL_ERROR, f"cannot reach {proxy} through the proxy's endpoint server"
            ) from None
        item = results[0] if isinstance(results, list) and len(results) == 1 else None
        if isinstance(item, dict) and isinstance(item.get("code"), int):
            message = item.get("message")
            raise JSONRPCError(item["code"], message if isinstance(message, str) else "refused")
        return "ok"

    def incoming_connection(
        self, params: dict[str, Any], context: CallContext
    ) -> dict[str, str]:
        """
        ``incomingConnection {token, endpoint, domain}`` from the public proxy the domain
        was announced to: ``{"message": "ok"}``, then the connection is served in the
        background.  404 without a live announcement to the caller, 503 when busy.
        """
        client = self._caller(params, context)
        domain = params["domain"]
        try:
            token = decode_token(params["token"])
        except TokenError as e:
            raise JSONRPCError(INVALID_PARAMS, f"invalid params: {e}") from None
        try:
            parse_host_port(params["endpoint"])
        except ValueError:
            raise JSONRPCError(INVALID_PARAMS, "invalid params: endpoint is not host:port") \
                from None
        header = None
        if self.proxy_protocol and not self.forwarder.terminate:
            try:
                header = proxy_v2_header(params.get("client_address"),
                                         params.get("server_address"))
            except ValueError:
                header = proxy_v2_header(None)
        if not self.announcements.is_live(domain, client["name"]):
            raise JSONRPCError(NOT_FOUND, "no matching connection found")
        if self.forwarder.busy:
            raise JSONRPCError(TOO_MANY_CONNECTIONS, "too many connections, try again later")
        self.forwarder.forward(params["endpoint"], token, header)
        return {"message": "ok"}

    def reannounce(self) -> Deferred[None]:
        """
        Send every live announcement again, one call per public proxy; failures are
        logged (and retried at the next round), never raised.
        """
        return ensureDeferred(self._reannounce())

    async def _reannounce(self) -> None:
        for proxy, items in sorted(self.announcements.by_proxy().items()):
            connections = [a.connection() for a in items]
            try:
                results = await self.client.call(
                    f"{proxy}.announceConnections", {"connections": connections},
                    id=random_id(), timeout=self.call_timeout,
                )
            except defer.CancelledError:
                raise
            except Exception as e:
                self.reannounce_failures += 1
                log.warn("cannot re-announce {count} domain(s) at {proxy}: {error}",
                         count=len(connections), proxy=_short(proxy),
                         error=_short(str(e), 300))
                continue
            self.reannounced += 1
            refused = [
                (a.domain, r) for a, r in zip(items, results if isinstance(results, list) else [])
                if r is not None
            ]
            for domain, result in refused:
                log.warn("{proxy} refused the announcement of {domain}: {result}",
                         proxy=_short(proxy), domain=domain, result=_short(str(result)))
            log.info("re-announced {count} domain(s) at {proxy}",
                     count=len(connections), proxy=_short(proxy))


# -------------------------------------------------------------------------- service


class _Collector:
    """Prometheus view of the private proxy's counters."""

    def __init__(self, service: PrivateProxyService) -> None:
        self.service = service

    def collect(self) -> Any:
        proxy = self.service.proxy
        forwarder = self.service.forwarder
        if proxy is None or forwarder is None:
            return
        yield GaugeMetricFamily(
            "private_proxy_announcements", "live announcements",
            value=len(proxy.announcements.announcements()),
        )
        yield GaugeMetricFamily(
            "private_proxy_active_connections", "incoming connections being forwarded",
            value=len(forwarder.active),
        )
        yield CounterMetricFamily(
            "private_proxy_forwarded_connections", "incoming connections forwarded",
            value=forwarder.forwarded,
        )
        yield CounterMetricFamily(
            "private_proxy_failed_connections", "incoming connections that could not be served",
            value=forwarder.failed,
        )
        yield CounterMetricFamily(
            "private_proxy_reannounce_failures", "re-announcement calls that failed",
            value=proxy.reannounce_failures,
        )


@dataclass(frozen=True)
class PrivateProxyPorts:
    """The listener of a started private proxy."""

    jsonrpc: IListeningPort


class PrivateProxyService(AsyncStartService[PrivateProxyPorts]):
    """
    A private proxy: the JSON-RPC server, the client to the own endpoint server, the
    announcement store and the forwarder.  ``settings`` is the validated ``private``
    section.  Like :class:`epsproxy.proxy.public.PublicProxyService`, it starts
    asynchronously (:meth:`when_ready`) and can stop the reactor if it cannot start.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: dict[str, Any],
        registry: CollectorRegistry | None = None,
        *,
        stop_reactor_on_failure: bool = False,
        datastore_dir: Path | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.datastore_dir = datastore_dir
        self.store: Store | None = None
        self.client: JSONRPCClient | None = None
        self.forwarder: Forwarder | None = None
        self.proxy: PrivateProxy | None = None
        self.ports: list[IListeningPort] = []
        self._loop: LoopingCall | None = None
        self._reannouncing: Deferred[None] | None = None
        self.registry.register(_Collector(self))

    async def _start(self) -> PrivateProxyPorts:
        settings = self.settings
        default_dir = self.datastore_dir if self.datastore_dir is not None else Path.cwd()
        self.store = await open_store(
            self.reactor, settings["datastore"],
            default_path=default_dir / DEFAULT_PRIVATE_DATASTORE_FILE,
        )
        announcements = PrivateAnnouncements(self.reactor, self.store)
        await announcements.load()
        self.client = JSONRPCClient(self.reactor, settings["jsonrpc_client"])
        self.forwarder = Forwarder(
            self.reactor, settings["internal_endpoint"],
            max_connections=settings["max_connections"],
            connect_timeout=settings["connect_timeout"],
            idle_timeout=settings["idle_timeout"],
        )
        server_settings = settings["jsonrpc_server"]
        server_tls = server_settings.get("tls")
        verify_caller = server_tls is not None and server_tls["verify_client"]
        if not verify_caller:
            self.log.warn(
                "the JSON-RPC server does not verify client certificates: any caller that "
                "reaches {address} can claim any _client",
                address=server_settings["bind_address"],
            )
        self.proxy = PrivateProxy(
            self.reactor, settings["name"], announcements, self.client, self.forwarder,
            proxy_protocol=settings["internal_endpoint"]["proxy_protocol"],
            verify_caller=verify_caller,
            call_timeout=settings["jsonrpc_client"]["timeout"],
        )
        dispatcher = self.proxy.dispatcher()
        site = jsonrpc_site(
            dispatcher, server_settings, reactor=self.reactor,
            metrics=RPCMetrics(self.registry, "private_proxy", dispatcher.__contains__),
        )
        port = await listen_jsonrpc(self.reactor, site, server_settings)
        self.ports.append(port)
        loop = self._loop = LoopingCall(self._reannounce)
        loop.clock = self.reactor
        loop.start(settings["reannounce_interval"], now=True)
        host = port.getHost()
        endpoint = settings["internal_endpoint"]
        self.log.info(
            "private proxy {name} serving: JSON-RPC on {host}:{port}{path}; incoming "
            "connections {how} {address}",
            name=settings["name"], host=host.host, port=host.port,
            path=server_settings["path"],
            how="terminated and forwarded as HTTP to" if endpoint.get("tls") is not None
            else "relayed as raw TLS to",
            address=endpoint["address"],
        )
        return PrivateProxyPorts(port)

    def _reannounce(self) -> Deferred[None]:
        # Never let an error stop the loop for good.
        proxy = self.proxy
        if proxy is None:
            return succeed(None)
        d = self._reannouncing = proxy.reannounce()

        def done(result: Any) -> None:
            self._reannouncing = None
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self.log.failure("re-announcing failed", result)

        return d.addBoth(done)

    def _describe(self) -> str:
        return "private proxy"

    async def _close(self, grace: float = 0.0) -> None:
        """
        Stop re-announcing and listening, give forwarded connections up to ``grace``
        seconds to end by themselves, then close them, the client and the store.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._reannouncing is not None:
            self._reannouncing.cancel()  # closes its connection to the endpoint server
        ports, self.ports = self.ports, []
        for port in ports:
            await maybeDeferred(port.stopListening)
        if self.forwarder is not None:
            active = len(self.forwarder.active)
            if active and grace > 0:
                self.log.info("draining {count} forwarded connection(s) for up to {grace:g} s",
                              count=active, grace=grace)
                await self.forwarder.drain(grace)
            await self.forwarder.close()
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()

    async def _stop(self) -> None:
        await self._close(self.settings["shutdown_grace"])
