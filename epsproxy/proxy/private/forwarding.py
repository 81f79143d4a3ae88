"""
Raw forwarding for the private proxy (SPEC §14.5): an accepted ``incomingConnection`` is
served by dialling the public proxy's internal endpoint, writing the 32 raw token bytes,
and relaying the raw TLS stream to ``internal_endpoint.address``; the internal server does
the handshake with the client.  :class:`Forwarder` also keeps the forwards in progress
(at most ``max_connections``), drains and closes them;
:class:`epsproxy.proxy.private.terminating.TerminatingForwarder` terminates TLS instead.

The PROXY protocol header (raw forwarding with ``proxy_protocol: true``): the private
proxy does not know the client's address unless the public proxy passes it in the
optional ``incomingConnection`` params ``client_address`` (``"ip:port"``, and
``server_address`` for the address the client connected to).  With a client address the
header is a v2 ``PROXY`` command over TCP (unknown server address: the family's zero
address, port 0); without one it is a ``LOCAL`` command, so the internal server uses the
connection's own addresses (:func:`proxy_v2_header`).

A pooled connection (:mod:`epsproxy.proxy.private.pool`) is served the same way once its
header is read (:meth:`Forwarder.serve_pooled`): the PROXY v2 header towards the internal
server is made from the pooled header's addresses (the real client's), and the bytes
after the pooled header (the ClientHello) go first.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.dial import Dialled, dial, write_at_once
from epsproxy.net.hostport import format_host_port, host_key, parse_host_port, truncate_ip
from epsproxy.net.logs import debug_enabled
from epsproxy.net.proxy_protocol import ProxyHeader, proxy_v2_header
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import token_tag
from epsproxy.proxy.splice import IdleSweep, splice
from epsproxy.proxy.splice_engine import SpliceEngine
from epsproxy.rules.text import shorten

__all__ = ["proxy_v2_header", "Forwarder", "address_text", "blurred_client"]

log = Logger()

# ---------------------------------------------------------------- raw forwarding


def address_text(address: Any) -> str | None:
    """``"ip:port"`` of an ``IPv4Address``/``IPv6Address`` (a PROXY header's), else None."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    return format_host_port(host, port)


def _client_key(client: str | Any | None) -> str | None:
    """
    The per-client limit's key of a client: an ``"ip:port"`` text (``incomingConnection``)
    or an address object with ``host`` (a pooled header's, read per client: no text made
    and parsed again); IPv6 by /64.  None if unusable.
    """
    if not client:
        return None
    if isinstance(client, str):
        try:
            host, _ = parse_host_port(client)
        except ValueError:
            return None
    else:
        found = getattr(client, "host", None)
        if not isinstance(found, str):
            return None
        host = found
    return host_key(host) if host else None


def blurred_client(client: str | None) -> str:
    """A client's ``"ip:port"`` as logs may name it (truncated), or ``"unknown"``."""
    if not client:
        return "unknown"
    try:
        host, _ = parse_host_port(client)
    except ValueError:
        return "unknown"
    return truncate_ip(host)


def _abort(protocol: Protocol) -> None:
    # Both ends of a raw forward are TCP connections: their transports can abort.
    cast(ITCPTransport, protocol.transport).abortConnection()


@implementer(IHalfCloseableProtocol)
class _Hold(Dialled):
    """
    One outbound connection of a raw forward until it is spliced: writes ``first`` (the
    token; a PROXY header goes with the splice's first bytes instead), stays paused
    unless its dial's callback spliced it at once, and remembers anything that arrives
    anyway.
    """

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.received: list[bytes] = []
        self.eof = False
        self.gone = False

    def connectionMade(self) -> None:
        transport: Any = self.transport  # a TCP transport, or the wrapper of one
        # Endpoints put a wrapper between the transport and us; splice() needs to take
        # the transport over from the protocol the transport talks to.
        if getattr(transport, "protocol", self) is not self:
            transport.protocol = self
        if self.first:
            write_at_once(transport, self.first)
        super().connectionMade()  # fires the dial: a pooled client is spliced right here
        if transport.protocol is self and not self.gone:
            # Not spliced yet (the other side is still being dialled): hold it, before
            # the reactor can deliver anything.  A spliced one is read by its splice.
            transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True


class Forwarder:
    """
    Serves accepted incoming connections (SPEC §14.5) by relaying raw TLS: dial the public
    proxy's ``endpoint``, present the token, splice it with a connection to
    ``endpoint["address"]`` (``internal_endpoint``, validated settings).  At most
    ``max_connections`` forwards at once; :meth:`drain` and :meth:`close` end them.
    """

    #: Whether TLS is terminated here (no PROXY protocol header then).
    terminate = False

    def __init__(
        self,
        reactor: IReactor,
        endpoint: dict[str, Any],
        *,
        max_connections: int = 1000,
        max_connections_per_client: int | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 3600.0,
        engine: SpliceEngine | None = None,
    ) -> None:
        self.reactor = reactor
        #: Relays pairs of TCP connections in C when given (else the Python splice).
        self.engine = engine
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self._per_client: dict[str, int] = {}  # client key -> forwards in progress
        self._client_of: dict[Any, str] = {}  # forward item -> its client's key
        self.client_limited = 0
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._sweep = IdleSweep(reactor)  # the idle timeouts of all its splices
        self.active: set[Any] = set()  # forwards in progress: tokens, splices, channels
        self.forwarded = 0
        self.failed = 0
        self.pooled = 0  # forwarded connections that came from the pool
        #: Pooled clients being set up: served and not yet spliced (or, when TLS is
        #: terminated here, not yet through their handshake).  The pool keeper tops up
        #: after a client's set-up when no other is in it (PoolKeeper).
        self.setting_up = 0
        self._closing = False
        self._drained: list[Deferred[None]] = []

    def reconfigure(
        self, endpoint: dict[str, Any], *, max_connections: int, connect_timeout: float,
        idle_timeout: float, max_connections_per_client: int | None = None,
    ) -> None:
        """
        Forward the next connections with ``endpoint`` (validated ``internal_endpoint``)
        and these limits; connections being forwarded keep going.
        """
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    @property
    def busy(self) -> bool:
        """Whether no further connection may be forwarded now."""
        return self._closing or len(self.active) >= self.max_connections

    @property
    def per_client_cap(self) -> int:
        """Forwards one client (an IPv4 address, an IPv6 /64) may have at once."""
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return max(1, self.max_connections // 4)

    def admits(self, client: str | Any | None) -> bool:
        """
        Whether a connection from ``client`` (the real client's: an address from the
        pooled header, ``"ip:port"`` from ``incomingConnection``) may be forwarded now: fewer than
        :attr:`per_client_cap` of its forwards in progress.  A refusal is counted
        (``client_limited``); an unknown client is not limited here (``busy`` still is).
        """
        key = _client_key(client)
        if key is None or self._per_client.get(key, 0) < self.per_client_cap:
            return True
        self.client_limited += 1
        return False

    def _track(self, item: Any, client: str | Any | None) -> None:
        """A forward in progress (a marker, a splice, a TLS channel) of ``client`` (as
        :meth:`admits` takes it)."""
        self.active.add(item)
        key = _client_key(client)
        if key is not None:
            self._client_of[item] = key
            self._per_client[key] = self._per_client.get(key, 0) + 1

    def forward(
        self, endpoint: str, token: bytes, proxy_header: bytes | None = None,
        client: str | None = None,
    ) -> Deferred[None]:
        """
        Serve one incoming connection in the background; the Deferred fires when it is
        connected (or has failed, which is logged, never raised).  ``client`` is the
        client's ``"ip:port"`` when known (logged blurred).
        """
        marker = object()
        self._track(marker, client)
        d = ensureDeferred(self._serve(endpoint, token, proxy_header, client))

        def failed(failure: Failure) -> None:
            self.failed += 1
            log.warn(
                "cannot serve the incoming connection {tag} from {endpoint} (client "
                "{client}): {error}",
                tag=token_tag(token), endpoint=shorten(endpoint), client=blurred_client(client),
                error=shorten(failure.getErrorMessage(), 300),
            )

        def done(_: Any) -> None:
            self._forget(marker)

        return d.addErrback(failed).addBoth(done)

    def serve_pooled(self, pooled: Any, header: ProxyHeader, tag: str) -> Deferred[None]:
        """
        Serve a pooled connection whose header has been read (the caller checked the
        name and :attr:`busy`): ``pooled`` is its protocol (``received``, ``eof`` and
        ``gone`` say what happened since), ``header`` the pooled header with
        the client's addresses and the bytes after it.  Connect to the internal server
        and splice; fires when spliced (a failure is logged, never raised): the client's
        set-up (:attr:`setting_up`) is done.  Callbacks, not a coroutine, and one pair of
        them: this runs for every client served from the pool, and over loopback the
        dial has fired before they are added.
        """
        marker = object()
        self._track(marker, header.source)
        internal = _Hold(b"")
        d = self._connect(self.endpoint["address"], internal)
        self.setting_up += 1

        def cut(error: str) -> None:
            for end in (pooled, internal):
                if not end.gone:
                    _abort(end)
            self._forget(marker)
            self._failed_pooled(header, tag, error)

        def connected(_: Any) -> None:
            self.setting_up -= 1
            if pooled.gone or internal.gone or self._closing:
                cut("a connection was lost before it was spliced")
                return
            # The PROXY header (if on) and the ClientHello go out in one send, as the
            # splice's first bytes.
            try:
                s = splice(
                    self.reactor, pooled, internal,
                    to_right=(self._proxy_header(header) + header.rest
                              + b"".join(pooled.received)),
                    to_left=b"".join(internal.received),
                    left_eof=pooled.eof, right_eof=internal.eof,
                    idle_timeout=self.idle_timeout, tag=tag, sweep=self._sweep,
                    engine=self.engine,
                )
            except Exception as e:  # a bug: this client is cut, the others go on
                log.failure("splicing pooled connection {tag} failed", tag=tag)
                cut(str(e) or e.__class__.__name__)
                return
            self.forwarded += 1
            self.pooled += 1
            self._track(s, header.source)
            self._forget(marker)  # after the splice is tracked: a drain waits for both
            s.done.addBoth(lambda _: self._forget(s))
            # Served from the pool is the normal case, counted
            # (private_proxy_pool_served): debug, as the public proxy's pairings; a
            # brokered forward is logged at info.
            if debug_enabled():
                log.debug("forwarding pooled connection {tag} from client {client} to "
                          "{address}", tag=tag,
                          client=blurred_client(address_text(header.source)),
                          address=self.endpoint["address"])

        def not_connected(failure: Failure) -> None:
            self.setting_up -= 1
            self._forget(marker)
            _abort(pooled)
            self._failed_pooled(header, tag, failure.getErrorMessage())

        return d.addCallbacks(connected, not_connected)

    def _failed_pooled(self, header: ProxyHeader, tag: str, error: str) -> None:
        self.failed += 1
        log.warn("cannot serve pooled connection {tag} (client {client}): {error}",
                 tag=tag, client=blurred_client(address_text(header.source)),
                 error=shorten(error, 300))

    def _proxy_header(self, header: ProxyHeader) -> bytes:
        """
        The PROXY v2 header for the internal server (if on) naming the real client (from
        the pooled header's addresses; a destination that does not fit is left out, a
        source that is not an IP address makes it LOCAL).
        """
        if not self.endpoint["proxy_protocol"]:
            return b""
        for source, target in ((header.source, header.destination), (header.source, None)):
            try:
                return proxy_v2_header(source, target)
            except ValueError:
                pass
        return proxy_v2_header(None)

    def _connect(self, address: str, protocol: Dialled) -> Deferred[Any]:
        # Not read once connected: a _Hold is spliced in its dial's callback, or held
        # paused until its splice reads it.
        host, port = parse_host_port(address)
        return dial(self.reactor, host, port, self.connect_timeout, protocol, read=False)

    async def _serve(self, endpoint: str, token: bytes, proxy_header: bytes | None,
                     client: str | None = None) -> None:
        """Connect both sides of one forward and splice them (raw TLS)."""
        public = _Hold(token)
        await self._connect(endpoint, public)
        internal = _Hold(b"")  # its PROXY header goes with the first bytes, in one send
        try:
            await self._connect(self.endpoint["address"], internal)
        except BaseException:
            _abort(public)
            raise
        if public.gone or internal.gone or self._closing:
            for end in (public, internal):
                if not end.gone:
                    _abort(end)
            raise ConnectionError("a connection was lost before it was spliced")
        s = splice(
            self.reactor, public, internal,
            to_right=(proxy_header or b"") + b"".join(public.received),
            to_left=b"".join(internal.received),
            left_eof=public.eof, right_eof=internal.eof,
            idle_timeout=self.idle_timeout, tag=token_tag(token), sweep=self._sweep,
            engine=self.engine,
        )
        self.forwarded += 1
        self._track(s, client)
        s.done.addBoth(lambda _: self._forget(s))
        log.info("forwarding incoming connection {tag} to {address}",
                 tag=token_tag(token), address=self.endpoint["address"])

    def _forget(self, item: Any) -> None:
        """A forward ended: forget it, and tell a waiting drain when none is left."""
        self.active.discard(item)
        key = self._client_of.pop(item, None)
        if key is not None:
            left = self._per_client[key] - 1
            if left:
                self._per_client[key] = left
            else:
                del self._per_client[key]
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

        def give_up() -> None:
            if not drained.called:
                drained.callback(None)

        timer = self.reactor.callLater(grace, give_up)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(stop_timer)

    def close(self) -> Deferred[None]:
        """Stop: refuse new forwards and close every forwarded connection."""
        self._closing = True
        waits: list[Deferred[Any]] = []
        for item in list(self.active):
            done = getattr(item, "done", None)
            if done is not None:  # a splice
                waits.append(done)
                item.abort()
            elif hasattr(item, "transport") and item.transport is not None:
                item.transport.abortConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)
