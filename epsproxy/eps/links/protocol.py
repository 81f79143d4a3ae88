"""
The Twisted side of one EPS link: :class:`EPSConnection` feeds a
:class:`~epsproxy.eps.links.session.Session` with the transport's bytes, the TLS
handshake and the clock, writes what it says, keeps the one timer it asks for, and turns
its events into Deferreds.  The rules of the link live in the session.
"""

from __future__ import annotations

from functools import partial
from types import CoroutineType
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net import tls
from epsproxy.eps.links import wire
from epsproxy.eps.links.peers import Directory, PeerIdentity
from epsproxy.eps.links.session import LinkError, Session

__all__ = ["Handler", "EPSConnection", "EPSServerFactory", "EPSClientFactory"]

log = Logger()

Handler = Callable[[wire.Request, PeerIdentity], Any]
"""``handler(request, peer) -> Response | dict | None`` or a Deferred of one."""


@implementer(IHandshakeListener)
class EPSConnection(Protocol):
    """
    One EPS link on a TLS connection.  Owners wait on :meth:`when_ready` (fires with
    the peer's :class:`PeerIdentity` after the hellos, fails with ``PeerRefused`` or
    ``PeerGone``) and :meth:`when_closed`, and call the peer with :meth:`call`.
    ``handler`` answers the peer's calls; ``on_refused(reason)`` counts a refused peer.
    """

    def __init__(self, directory: Directory, own_name: str, handler: Handler,
                 clock: IReactorTime, *, on_refused: Callable[[str], None] | None = None,
                 **options: Any) -> None:
        self.handler = handler
        self.clock = clock
        self.on_refused = on_refused
        self.session = Session(directory, own_name, self, **options)
        self._ready: list[defer.Deferred[PeerIdentity]] = []
        self._closed: list[defer.Deferred[None]] | None = []
        self._outcome: Failure | PeerIdentity | None = None
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._receiving = False
        self._now = 0.0
        self._write: Callable[[bytes], Any] | None = None

    peer = property(lambda self: self.session.peer, doc="The peer once open, or None.")
    identities = property(lambda self: self.session.identities)
    version = property(lambda self: self.session.version)
    refusal = property(lambda self: self.session.refusal)
    is_open = property(lambda self: self.session.is_open, doc="The link carries calls.")
    last_received = property(lambda self: self.session.last_received,
                             doc="When the peer last sent a whole frame (clock time).")

    # -- owners -------------------------------------------------------------------------

    def when_ready(self) -> defer.Deferred[PeerIdentity]:
        """Fires with the peer identity after the hellos; fails if it never gets there."""
        if self._outcome is None:
            d: defer.Deferred[PeerIdentity] = defer.Deferred()
            self._ready.append(d)
            return d
        if isinstance(self._outcome, Failure):
            return defer.fail(self._outcome)
        return defer.succeed(self._outcome)

    def when_closed(self) -> defer.Deferred[None]:
        """Fires (with None) once the connection is closed."""
        if self._closed is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed.append(d)
        return d

    def call(self, method: str, params: dict[str, Any], id: str | None = None,
             timeout: float | None = None) -> defer.Deferred[wire.Response]:
        """
        Call ``method`` on the peer: fires with its :class:`wire.Response`, or fails with
        ``PeerGone``, ``CallTimeout`` or :class:`wire.WireError` (not sendable).

        :raises ValueError: ``id`` is already in flight on this link.
        """
        session = self.session
        if id is None:
            id = session.new_call_id()
        d: defer.Deferred[wire.Response] = defer.Deferred(lambda _: session.forget(id))
        now = self._now if self._receiving else self.clock.seconds()
        try:
            session.call(id, method, params, d, now, timeout)
        except (LinkError, wire.WireError) as e:
            return defer.fail(e)
        self._after(now)
        return d

    def close(self, code: int = wire.ERR_SHUTDOWN, message: str = "shutting down") -> None:
        """Send an error frame (best effort) and close the connection."""
        now = self.clock.seconds()
        self.session.close(code, message, now)
        self._after(now)

    def peer_certificate(self) -> Any:
        """The peer's verified leaf certificate (a seam for socket-free tests)."""
        return tls.peer_certificate(self.transport)

    # -- Twisted callbacks --------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            # Twisted's BufferingTLSTransport delays every write to a callLater(0), one
            # more reactor turn per answer.  The session batches the lines of each read,
            # so hand them to the TLS layer at once (all our writes take this path, so
            # lines keep their order).
            self._write = partial(TLSMemoryBIOProtocol.write, transport)
        else:
            self._write = transport.write
        try:
            # Small frames, answered at once: no Nagle delay (the TLS layer passes
            # unknown attributes to the TCP transport under it).
            transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError, OSError):
            pass
        now = self.clock.seconds()
        self.session.connection_made(now)
        self._after(now)

    def handshakeCompleted(self) -> None:
        if self.session.is_handshaking:
            now = self.clock.seconds()
            self.session.handshake_done(self.peer_certificate(), now)
            self._after(now)

    def dataReceived(self, data: bytes) -> None:
        if self._receiving:  # re-entered from a handler: the outer call sends
            self.session.receive(data, self._now)
            return
        self._receiving = True
        self._now = now = self.clock.seconds()
        try:
            self.session.receive(data, now)
        finally:
            self._receiving = False
            self._after(now)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._receiving = False
        self.session.connection_lost(
            reason.getErrorMessage() if reason is not None else "closed")
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.transport = None
        closed, self._closed = self._closed or [], None
        for d in closed:
            d.callback(None)

    # -- the session's events (SessionEvents) -------------------------------------------

    def link_ready(self, peer: PeerIdentity) -> None:
        self._settle(peer)

    def link_not_ready(self, error: Exception) -> None:
        self._settle(Failure(error))

    def link_refused(self, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                log.failure("counting a refused EPS peer failed")

    def serve(self, request: wire.Request) -> None:
        try:
            peer: Any = self.session.peer  # set: requests are only served on open links
            result = self.handler(request, peer)
        except BaseException:
            result = Failure()
        # A handler that answers at once is answered at once, without a Deferred.
        if type(result) is CoroutineType:
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            result.addBoth(self._answer, request)
        else:
            self._answer(result, request)

    def answered(self, handle: defer.Deferred[wire.Response], response: wire.Response) -> None:
        handle.callback(response)

    def call_failed(self, handle: defer.Deferred[wire.Response], error: LinkError) -> None:
        handle.errback(error)

    def disconnect(self, abort: bool) -> None:
        self._flush()
        transport = self.transport
        if transport is None:  # a failed TLS write may have closed it already
            return
        if abort:
            getattr(transport, "abortConnection", transport.loseConnection)()
        else:
            transport.loseConnection()

    # -- writing and the timer ----------------------------------------------------------

    def _answer(self, result: Any, request: wire.Request) -> None:
        receiving = self._receiving
        now = self._now if receiving else self.clock.seconds()
        try:
            self.session.answer(request, result, now)
        except BaseException:
            log.failure("answering an EPS request failed")
        if not receiving:
            self._after(now)

    def _after(self, now: float) -> None:
        """After an input outside a read: send what the session wrote, re-arm the timer."""
        if self._receiving:
            return
        self._flush()
        due = self.session.next_deadline()
        timer = self._timer
        if due is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
        elif timer is None or due < self._timer_at:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer_at = due
            self._timer = self.clock.callLater(max(0.0, due - now), self._timer_fired)

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.transport is not None:
            (self._write or self.transport.write)(data)

    def _timer_fired(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        self.session.timer_due(now)
        self._after(now)

    def _settle(self, outcome: Failure | PeerIdentity) -> None:
        self._outcome = outcome
        waiting, self._ready = self._ready, []
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)


class _EPSFactory(Factory):
    """
    Builds :class:`EPSConnection` protocols sharing one configuration; ``track(link)``,
    if given, is told of every link built (the registry's bookkeeping).
    """

    protocol = EPSConnection
    noisy = False  # links log their own coming and going (the registry)

    def __init__(self, directory: Directory, own_name: str, handler: Handler,
                 clock: IReactorTime, *, track: Callable[[EPSConnection], Any] | None = None,
                 **options: Any) -> None:
        self.directory = directory
        self.own_name = own_name
        self.handler = handler
        self.clock = clock
        self.track = track
        self.options = options

    def buildProtocol(self, addr: Any) -> Optional[EPSConnection]:
        connection = self.protocol(
            self.directory, self.own_name, self.handler, self.clock, **self.options
        )
        connection.factory = self
        if self.track is not None:
            self.track(connection)
        return connection


class EPSServerFactory(_EPSFactory):
    """Factory for accepted EPS links (behind a mutual TLS listener)."""


class EPSClientFactory(_EPSFactory):
    """Factory for outgoing EPS links (through a mutual TLS client endpoint)."""
