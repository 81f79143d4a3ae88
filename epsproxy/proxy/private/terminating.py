"""
Terminated forwarding for the private proxy (SPEC §14.5): with ``internal_endpoint.tls``
an accepted ``incomingConnection`` is dialled like a raw one (token first), but TLS ends
here: a twisted.web ``Site`` inside ``TLSMemoryBIOProtocol`` reads each HTTP request and
forwards it to the internal server (or JSON-RPC calls at ``jsonrpc_path`` to
``internal_endpoint.jsonrpc_client``), copying status, headers and body back; failures
are 502.

Better than the reference (SPEC §23.1 #7, #9): a terminated connection serves requests
with keep-alive until it is idle for ``timeout`` seconds (the reference served exactly
one), each upstream request has the same timeout, bodies are capped both ways, the
JSON-RPC body is forwarded as received (integer ids stay integers), and the JSON-RPC
upstream uses its configured TLS.  A response body streams to the client as it arrives
(the upstream paused while the client's side is full), so memory stays one read per
request however large the response; over ``max_response_bytes`` it is 502 when the
upstream declares it, else the client's connection is cut (never a body that looks
complete).

A pooled connection (:mod:`epsproxy.proxy.private.pool`) runs the same TLS server once
its header is read, the bytes after the header (the ClientHello) replayed into it.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from zope.interface import implementer

from epsproxy.net import tls
from epsproxy.net.jsonrpc.client import POOL_IDLE_SECONDS, BulkConnectionPool
from epsproxy.net.jsonrpc.envelope import JSONRPCError, parse_request, response_object
from epsproxy.net.jsonrpc.server import CappedRequest, json_body
from epsproxy.net.hostport import parse_host_port
from epsproxy.net.logs import debug_enabled
from epsproxy.net.proxy_protocol import ProxyHeader
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import dial_with_token, token_tag
from epsproxy.proxy.private.forwarding import Forwarder, address_text, blurred_client
from epsproxy.rules.text import shorten

__all__ = ["TerminatingForwarder", "forwarded_headers"]

log = Logger()

# Headers that belong to one HTTP connection, never forwarded (RFC 9110 §7.6.1).
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


# Set by the proxy, never passed on from the client: what it says of itself is not proof.
_SET_HERE = frozenset({b"host", b"content-length", b"forwarded", b"x-forwarded-for",
                       b"x-forwarded-proto"})


def forwarded_headers(client: str | None) -> list[tuple[bytes, bytes]]:
    """
    The headers that tell the internal server who the client is (TLS ends here, so there
    is no PROXY header): ``X-Forwarded-For`` with the real client's IP address and
    RFC 7239 ``Forwarded: for=...;proto=https`` (an IPv6 address quoted in brackets), and
    ``X-Forwarded-Proto: https``.  The client's own versions of these are dropped.
    """
    found = [(b"x-forwarded-proto", b"https")]
    if client:
        try:
            host, _ = parse_host_port(client)
        except ValueError:
            host = ""
        if host:
            node = f'"[{host}]"' if ":" in host else host
            found += [(b"x-forwarded-for", host.encode("ascii")),
                      (b"forwarded", f"for={node};proto=https".encode("ascii"))]
    return found


class _Request(CappedRequest):
    """A request whose body may not exceed the site's ``max_body_bytes`` (413 otherwise)."""

    def refusal(self, limit: int) -> bytes:
        return b'{"message":"request body too large"}'


@implementer(IHandshakeListener)
class _Channel(http.HTTPChannel):
    """An HTTP channel on a terminated connection; tells the forwarder when its TLS
    handshake is done (a pooled client's set-up) and when it is gone."""

    site: _Site  # set by the site that builds it
    #: The real client's ``"ip:port"`` (the pooled header's, or ``incomingConnection``'s
    #: ``client_address``), for the forwarded requests' headers; None when unknown.
    client_address: str | None = None
    #: A pooled client's set-up: fired when its handshake is done or it is gone.
    set_up: Deferred[None] | None = None

    def handshakeCompleted(self) -> None:
        self.site.forwarder._set_up(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        # HTTPChannel made itself its TLS transport's producer and never undoes it:
        # the channel, the TLS transport and the TCP transport were left in reference
        # cycles, 13 objects per connection for the garbage collector, whose passes
        # made the slow connections of a terminating proxy's tail (issue 14).
        tls_transport: Any = self.transport  # the TLS transport: a consumer
        if tls_transport is not None:
            tls_transport.unregisterProducer()
        self.site.forwarder._set_up(self)
        self.site.forwarder._terminated_lost(self)


class _Site(server.Site):
    """The HTTP server inside each terminated connection: every request is forwarded."""

    protocol = _Channel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 wrapper
    requestFactory = _Request
    displayTracebacks = False

    def __init__(
        self, resource: Resource, forwarder: TerminatingForwarder, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self.forwarder = forwarder
        self.max_body_bytes = forwarder.endpoint["max_body_bytes"]

    def log(self, request: http.Request) -> None:
        # No access log with client addresses; the forwarder logs what it forwards.
        pass


class _ForwardResource(Resource):
    """Every request on a terminated connection: forwarded by the forwarder."""

    isLeaf = True

    def __init__(self, forwarder: TerminatingForwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def render(self, request: server.Request) -> int:
        d = ensureDeferred(self.forwarder._forward_request(request))
        d.addErrback(lambda f: log.failure("forwarding a request failed", f))
        return server.NOT_DONE_YET


def _reply(request: server.Request, status: int, value: Any) -> None:
    """Answer ``request`` with the JSON ``value`` and finish it."""
    request.write(json_body(request, status, value))
    request.finish()


class _RelayedBody(Protocol):
    """
    Writes an upstream response body (``response.deliverBody``) to the client's
    ``request`` as it arrives, the upstream registered as the request's streaming
    producer (paused while the client's transport is full); ``done`` fires at the end,
    or fails when the body is cut off or grows over ``limit`` bytes.
    """

    def __init__(self, request: server.Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.size = 0
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(ValueError(f"response over max_response_bytes ({self.limit})"))
            cast(IPushProducer, self.transport).stopProducing()
            return
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.request.producer is not None:
            self.request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(ValueError(f"body cut off after {self.size} bytes"))


class _Dropped(Protocol):
    """Reads no response body: closes the upstream connection at once."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


class TerminatingForwarder(Forwarder):
    """
    A :class:`~epsproxy.proxy.private.forwarding.Forwarder` that terminates TLS with
    ``endpoint["tls"]`` and forwards each HTTP request over a pool of upstream
    connections; ``requests`` counts the forwarded requests.  ``limits`` are the
    keyword arguments of :class:`~epsproxy.proxy.private.forwarding.Forwarder`.
    """

    terminate = True

    def __init__(self, reactor: IReactor, endpoint: dict[str, Any], **limits: Any) -> None:
        super().__init__(reactor, endpoint, **limits)
        self.requests = 0
        # Fail at start-up, not at the first connection.
        self._server_tls = tls.server_options(endpoint["tls"])
        self.site = _Site(
            _ForwardResource(self), self, timeout=endpoint["timeout"], reactor=reactor
        )
        # Responses are relayed as they arrive, read in large pieces (BULK_READ_BYTES).
        self._pool = BulkConnectionPool(reactor, persistent=True)
        self._pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
        # Under load every forwarded request needs an upstream connection: keep as many
        # as may be forwarded at once instead of Twisted's 2 (make soak: 502 bursts).
        self._pool.maxPersistentPerHost = self.max_connections
        self._jsonrpc: dict[str, Any] | None = endpoint.get("jsonrpc_client")
        policy: IPolicyForHTTPS = BrowserLikePolicyForHTTPS()
        if self._jsonrpc is not None and self._jsonrpc.get("tls") is not None:
            policy = tls.MutualTLSPolicy(self._jsonrpc["tls"], self._jsonrpc.get("server_name"))
        self._agent = Agent(
            reactor, contextFactory=policy, pool=self._pool, connectTimeout=self.connect_timeout
        )

    def reconfigure(
        self, endpoint: dict[str, Any], *, max_connections: int, connect_timeout: float,
        idle_timeout: float, max_connections_per_client: int | None = None,
    ) -> None:
        """
        As :meth:`Forwarder.reconfigure`, checking the new ``tls`` files first (raises
        :class:`epsproxy.net.tls.TLSSettingsError` having changed nothing); the upstream
        ``jsonrpc_client`` is fixed at start.
        """
        server_tls = tls.server_options(endpoint["tls"])
        super().reconfigure(endpoint, max_connections=max_connections,
                            connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                            max_connections_per_client=max_connections_per_client)
        self._server_tls = server_tls
        self.site.timeOut = endpoint["timeout"]

    async def _serve(self, endpoint: str, token: bytes, proxy_header: bytes | None,
                     client: str | None = None) -> None:
        """Dial with the token and run the TLS server side on the connection."""
        channel = await dial_with_token(
            self.reactor, endpoint, token, self.endpoint["tls"], self.site,
            tls_client_for=None, timeout=self.connect_timeout,
        )
        if self._closing:
            channel.transport.abortConnection()
            return
        channel.client_address = client
        self.forwarded += 1
        self._track(channel, client)
        log.info("terminating incoming connection {tag}", tag=token_tag(token))

    def serve_pooled(self, pooled: Any, header: ProxyHeader, tag: str) -> Deferred[None]:
        """
        Run the TLS server side on the pooled connection, its first bytes replayed;
        fires when the client's TLS handshake is done or the connection is gone, its
        set-up (:attr:`~epsproxy.proxy.private.forwarding.Forwarder.setting_up`); at once
        when it could not be served (a failure is logged, never raised).
        """
        try:
            return self._terminate_pooled(pooled, header, tag)
        except Exception as e:
            self._failed_pooled(header, tag, str(e) or e.__class__.__name__)
        return succeed(None)

    def _terminate_pooled(self, pooled: Any, header: ProxyHeader, tag: str
                          ) -> Deferred[None]:
        transport = pooled.transport
        if pooled.gone or self._closing or transport is None:
            if transport is not None and not pooled.gone:
                transport.abortConnection()
            raise ConnectionError("the pooled connection was lost before it was served")
        factory = tls.BulkTLSFactory(self._server_tls, False, self.site)
        tls_protocol: Any = factory.buildProtocol(transport.getPeer())
        transport.protocol = tls_protocol  # a TCP transport: from now on TLS hears it
        tls_protocol.makeConnection(transport)
        channel = tls_protocol.wrappedProtocol
        channel.client_address = address_text(header.source)
        self.forwarded += 1
        self.pooled += 1
        self._track(channel, header.source)  # before any byte: it may end on them
        set_up = channel.set_up = Deferred()
        self.setting_up += 1
        # The normal case, counted (private_proxy_pool_served): debug, as raw forwarding.
        if debug_enabled():
            log.debug("terminating pooled connection {tag} from client {client}", tag=tag,
                      client=blurred_client(address_text(header.source)))
        first = header.rest + b"".join(pooled.received)
        if first:
            tls_protocol.dataReceived(first)
        if pooled.eof:  # the client sent its ClientHello and nothing more can come
            transport.loseConnection()
        else:
            transport.resumeProducing()
        return set_up

    def _set_up(self, channel: _Channel) -> None:
        """A pooled client's handshake is done, or it is gone (whichever comes first)."""
        set_up, channel.set_up = channel.set_up, None
        if set_up is not None:
            self.setting_up -= 1
            set_up.callback(None)

    def _terminated_lost(self, channel: Any) -> None:
        self._forget(channel)

    async def _forward_request(self, request: server.Request) -> None:
        self.requests += 1
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        body = b"" if request.content is None else request.content.read()
        if self._jsonrpc is not None:
            if request.path != self.endpoint["jsonrpc_path"].encode("utf-8"):
                _reply(request, 404, {"message": "not found"})
                return
            content_type = request.getHeader(b"content-type")
            try:
                parse_request(
                    None if content_type is None else content_type.decode("latin-1"), body
                )
            except JSONRPCError as e:
                _reply(request, 400, response_object(None, error=e))
                return
            url = self._jsonrpc["endpoint"].encode("utf-8")
            limit = self._jsonrpc["max_response_bytes"]
        else:
            url = b"http://" + self.endpoint["address"].encode("ascii") + request.uri
            limit = self.endpoint["max_response_bytes"]
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in _SET_HERE:
                continue
            headers.setRawHeaders(name, values)
        for name, value in forwarded_headers(getattr(request.channel, "client_address", None)):
            headers.setRawHeaders(name, [value])
        producer = FileBodyProducer(BytesIO(body)) if body else None
        d = self._agent.request(request.method, url, headers, producer)
        timer = self.reactor.callLater(self.endpoint["timeout"], d.cancel)
        try:
            response = await d  # the timeout bounds the wait for the response's head
        except Exception as e:
            if not gone:
                log.warn("upstream request failed: {error}",
                         error=shorten(str(e) or repr(e), 300))
                _reply(request, 502, {"message": "bad gateway"})
            return
        finally:
            if timer.active():
                timer.cancel()
        declared = response.length if isinstance(response.length, int) else None
        if gone or (declared is not None and declared > limit):
            response.deliverBody(_Dropped())
            if not gone:
                log.warn("upstream response of {size} bytes is over max_response_bytes",
                         size=declared)
                _reply(request, 502, {"message": "bad gateway"})
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower == b"content-length":
                continue
            request.responseHeaders.setRawHeaders(name, values)
        if declared is not None:
            request.setHeader(b"content-length", str(declared).encode())
        # The body goes to the client as it arrives (no length known: chunked), the
        # upstream paused while the client's side has bytes waiting: memory stays one
        # read per request, however large the response.
        relay = _RelayedBody(request, limit)
        response.deliverBody(relay)
        try:
            await relay.done
        except Exception as e:
            if gone:  # the client left: the upstream was stopped with it
                return
            log.warn("upstream response cut off: {error}", error=shorten(str(e), 300))
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()  # a cut body must not look complete
            return
        if not gone:
            request.finish()

    def close(self) -> Deferred[None]:
        """Stop: refuse new forwards, close every forwarded connection and the pool."""
        closed = super().close()
        return defer.gatherResults(
            [closed, self._pool.closeCachedConnections()]
        ).addCallback(lambda _: None)
