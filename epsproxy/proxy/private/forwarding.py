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
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.hostport import parse_host_port
from epsproxy.net.proxy_protocol import proxy_v2_header
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import token_tag
from epsproxy.proxy.splice import splice
from epsproxy.rules.text import shorten

__all__ = ["proxy_v2_header", "Forwarder"]

log = Logger()

# ---------------------------------------------------------------- raw forwarding


def _abort(protocol: Protocol) -> None:
    # Both ends of a raw forward are TCP connections: their transports can abort.
    cast(ITCPTransport, protocol.transport).abortConnection()


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
        transport: Any = self.transport  # a TCP transport, or the wrapper of one
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
        connect_timeout: float = 10.0,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.active: set[Any] = set()  # forwards in progress: tokens, splices, channels
        self.forwarded = 0
        self.failed = 0
        self._closing = False
        self._drained: list[Deferred[None]] = []

    def reconfigure(
        self, endpoint: dict[str, Any], *, max_connections: int, connect_timeout: float,
        idle_timeout: float,
    ) -> None:
        """
        Forward the next connections with ``endpoint`` (validated ``internal_endpoint``)
        and these limits; connections being forwarded keep going.
        """
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

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
        d = ensureDeferred(self._serve(endpoint, token, proxy_header))

        def failed(failure: Failure) -> None:
            self.failed += 1
            log.warn(
                "cannot serve the incoming connection {tag} from {endpoint}: {error}",
                tag=token_tag(token), endpoint=shorten(endpoint),
                error=shorten(failure.getErrorMessage(), 300),
            )

        def done(_: Any) -> None:
            self._forget(marker)

        return d.addErrback(failed).addBoth(done)

    def _connect(self, address: str, protocol: Protocol) -> Deferred[Any]:
        host, port = parse_host_port(address)
        return connectProtocol(
            HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout), protocol
        )

    async def _serve(self, endpoint: str, token: bytes, proxy_header: bytes | None) -> None:
        """Connect both sides of one forward and splice them (raw TLS)."""
        public = _Hold(token)
        await self._connect(endpoint, public)
        internal = _Hold(proxy_header or b"")
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
            to_right=b"".join(public.received), to_left=b"".join(internal.received),
            left_eof=public.eof, right_eof=internal.eof,
            idle_timeout=self.idle_timeout, tag=token_tag(token),
        )
        self.forwarded += 1
        self.active.add(s)
        s.done.addBoth(lambda _: self._forget(s))
        log.info("forwarding incoming connection {tag} to {address}",
                 tag=token_tag(token), address=self.endpoint["address"])

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
