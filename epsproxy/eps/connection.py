"""
One EPS-to-EPS connection over mutual TLS (docs/protocol.md), on either side.

:class:`EPSConnection` is the same protocol for the accepting and the connecting EPS:
after the TLS handshake it identifies the peer from its certificate (SPEC §12.5,
:mod:`epsproxy.eps.peers`), exchanges ``hello`` frames, then carries calls in both
directions (matched by id), answers the peer's calls through an injected ``handler``,
and keeps the link alive with heartbeats.  Frame parsing is :mod:`epsproxy.eps.wire`;
this module only moves frames and keeps per-connection state (no business logic).
"""

from __future__ import annotations

from functools import partial
from itertools import count
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
from epsproxy.eps import wire
from epsproxy.eps.peers import PeerIdentity, PeerRefused, identify_peer

__all__ = [
    "ConnectionError",
    "PeerGone",
    "CallTimeout",
    "Handler",
    "EPSConnection",
    "EPSServerFactory",
    "EPSClientFactory",
    "HANDLER_ERROR",
    "PEER_REFUSAL_REASONS",
]

log = Logger()

#: Error code of a response whose handler raised (the reference's reverse-stream code).
HANDLER_ERROR = -100

Handler = Callable[[wire.Request, PeerIdentity], Any]
"""``handler(request, peer) -> Response | dict | None`` or a Deferred of one."""

#: Why a connection refused its peer, as given to ``on_refused`` (and counted as
#: ``eps_peer_refusals_total{reason}``): the TLS handshake failed (another CA, no client
#: certificate, not TLS at all, or the peer left during it); the certificate is not one
#: the directory pins for the peer, or the hello names another operator; no hello
#: (handshake included) within ``hello_timeout`` of connecting; a line over ``max_line``;
#: a frame that is not valid or breaks the protocol.  ``rate_limited`` is the listener's
#: (:mod:`epsproxy.net.ratelimit`), before any connection object exists.
PEER_REFUSAL_REASONS = (
    "handshake_failed", "identity", "hello_timeout", "line_too_long", "malformed",
    "rate_limited",
)


class ConnectionError(Exception):
    """Base of this module's errors."""


class PeerGone(ConnectionError):
    """The connection closed (or never opened) while a call waited for its answer."""


class CallTimeout(ConnectionError):
    """A call got no response within its timeout; a late response is dropped."""


_HANDSHAKE, _HELLO, _OPEN, _CLOSED = "handshake", "hello", "open", "closed"


@implementer(IHandshakeListener)
class EPSConnection(Protocol):
    """
    The EPS line protocol on one TLS connection.

    Owners wait on :meth:`when_ready` (fires with the peer's :class:`PeerIdentity` after
    the hello exchange, fails with :class:`PeerRefused` or :class:`PeerGone`) and on
    :meth:`when_closed`; they call the peer with :meth:`call`.

    ``hello_timeout`` runs from the TCP connection (``connectionMade``, which the TLS
    layer calls before its handshake) to the peer's hello, so a peer that never finishes
    the handshake is cut too.  ``on_refused(reason)``, if given, is called once when the
    connection refuses its peer (:data:`PEER_REFUSAL_REASONS`).
    """

    def __init__(
        self,
        directory: Any,
        own_name: str,
        handler: Handler,
        clock: IReactorTime,
        *,
        hello_timeout: float = 10,
        ping_interval: float = 30,
        dead_after: float = 90,
        max_line: int = wire.DEFAULT_MAX_LINE,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = directory
        self.own_name = own_name
        self.handler = handler
        self.clock = clock
        self.hello_timeout = hello_timeout
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.max_line = max_line
        self.on_refused = on_refused
        self.refusal: str | None = None
        self.state = _HANDSHAKE
        self.identities: list[PeerIdentity] = []
        self.peer: PeerIdentity | None = None
        self.version: int | None = None
        self._decoder = wire.LineDecoder(max_line)
        self._ready: list[defer.Deferred[PeerIdentity]] = []
        self._closed: list[defer.Deferred[None]] = []
        self._outcome: Failure | PeerIdentity | None = None
        self._pending: dict[str, tuple[defer.Deferred[wire.Response], IDelayedCall | None]] = {}
        self._queued: list[tuple[str, bytes]] = []
        self._serving: set[str] = set()
        self._ids = count(1)
        self._nonces = count(1)
        self._timer: IDelayedCall | None = None
        self._last_sent = self._last_received = 0.0
        # Lines written while dataReceived runs, sent together when it returns.
        self._batch: list[bytes] | None = None
        self._transport_write: Callable[[bytes], Any] | None = None

    # -- owners -------------------------------------------------------------------------

    def when_ready(self) -> defer.Deferred[PeerIdentity]:
        """Fires with the peer identity after the hellos; fails if the peer is refused."""
        d: defer.Deferred[PeerIdentity] = defer.Deferred()
        if self._outcome is None:
            self._ready.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    def when_closed(self) -> defer.Deferred[None]:
        """Fires (with None) once the connection is closed."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.state == _CLOSED and self.transport is None:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

    def call(
        self,
        method: str,
        params: dict[str, Any],
        id: str | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred[wire.Response]:
        """
        Call ``method`` on the peer; the Deferred fires with its :class:`wire.Response`
        (application errors are in ``response.error``).  Calls made before the hellos
        are sent once they are done.

        :raises ValueError: ``id`` is already in flight on this connection.
        The Deferred fails with :class:`PeerGone` when the connection closes first,
        :class:`CallTimeout` after ``timeout`` seconds, or :class:`wire.WireError` when
        the request cannot be sent (too long, not JSON) — the connection is unaffected.
        """
        if id is None:
            id = str(next(self._ids))
            while id in self._pending:
                id = str(next(self._ids))
        if id in self._pending:
            raise ValueError(f"request id {id!r} is already in flight")
        if self.state == _CLOSED:
            return defer.fail(PeerGone("connection closed"))
        try:
            line = wire.encode(wire.Request(id, method, params), self.max_line)
        except wire.WireError as e:
            return defer.fail(e)
        d: defer.Deferred[wire.Response] = defer.Deferred(lambda _: self._forget(id))
        timer = None
        if timeout is not None:
            timer = self.clock.callLater(timeout, self._time_out, id, timeout)
        self._pending[id] = (d, timer)
        if self.state == _OPEN:
            self._write(line)
        else:
            self._queued.append((id, line))
        return d

    def close(self, code: int = wire.ERR_SHUTDOWN, message: str = "shutting down") -> None:
        """Send an error frame (best effort) and close the connection."""
        self._abort(code, message)

    # -- Twisted callbacks --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._last_sent = self._last_received = self.clock.seconds()
        transport = self.transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            # Twisted's BufferingTLSTransport delays every write to a callLater(0), one
            # more reactor turn per answer.  We batch the lines of each dataReceived
            # ourselves (see _write), so hand them to the TLS layer at once.  All our
            # writes take this path, so lines keep their order.
            self._transport_write = partial(TLSMemoryBIOProtocol.write, transport)
        else:
            self._transport_write = transport.write
        try:
            # Small frames, answered at once: no Nagle delay (the TLS layer passes
            # unknown attributes to the TCP transport under it).
            transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError, OSError):
            pass
        # The hello deadline covers the TLS handshake too (a silent or trickling peer).
        self._timer = self.clock.callLater(self.hello_timeout, self._hello_timed_out)

    def peer_certificate(self) -> Any:
        """The peer's verified leaf certificate (a seam for socket-free tests)."""
        return tls.peer_certificate(self.transport)

    def handshakeCompleted(self) -> None:
        """TLS is up: identify the peer, then say hello and wait for the peer's."""
        if self.state != _HANDSHAKE:
            return
        self.state = _HELLO  # TLS is up: frames can be sent (a refusal's error frame)
        try:
            self.identities = identify_peer(self.peer_certificate(), self.directory)
        except PeerRefused as e:
            log.warn("refused EPS peer: {reason}", reason=e.reason)
            self._refused("identity")
            self._settle(Failure(e))
            self._abort(wire.ERR_IDENTITY, "peer certificate not accepted")
            return
        self._send(wire.Hello(wire.PROTOCOL_VERSION, self.own_name))
        if self._timer is None:  # connectionMade started it, unless a test skipped it
            self._timer = self.clock.callLater(self.hello_timeout, self._hello_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.state not in (_HELLO, _OPEN):
            return  # before identification, or after closing: read nothing
        if self._batch is not None:  # re-entered from a handler: the outer call sends
            self._receive(data)
            return
        self._batch = []
        try:
            self._receive(data)
        finally:
            self._flush()

    def _receive(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except wire.WireError as e:
            for frame in e.frames:
                self._handle(frame)
                if self.state == _CLOSED:
                    return
            log.warn("bad frame from EPS peer {peer}: {reason}",
                     peer=self._peer_name(), reason=e.reason)
            self._refused("line_too_long" if isinstance(e, wire.LineTooLong) else "malformed")
            frame = wire.error_frame_for(e)
            self._abort(frame.code, frame.message)
            return
        if frames:
            # Whole frames are signs of life; a trickle of bytes is not.
            self._last_received = self.clock.seconds()
        for frame in frames:
            if self.state == _CLOSED:
                return
            self._handle(frame)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.state == _HANDSHAKE:
            # Closed before the handshake completed, and not by our deadline: TLS
            # refused the peer (another CA, no certificate, not TLS) or it went away.
            log.info("EPS connection closed during the TLS handshake: {reason}",
                     reason=reason.getErrorMessage() if reason is not None else "closed")
            self._refused("handshake_failed")
        self.state = _CLOSED
        self._batch = None
        self._cancel_timer()
        pending, self._pending, self._queued = self._pending, {}, []
        for d, timer in pending.values():
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(PeerGone(f"connection to {self._peer_name()} lost"))
        self._settle(Failure(PeerGone("connection closed before the hello exchange")))
        self.transport = None
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    # -- frames -------------------------------------------------------------------------

    def _handle(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.ErrorFrame):
            log.info("EPS peer {peer} closed with error {code}: {message}",
                     peer=self._peer_name(), code=frame.code, message=frame.message)
            self.state = _CLOSED
            self._lose()
        elif self.state == _HELLO:
            if isinstance(frame, wire.Hello):
                self._hello(frame)
            else:
                self._refused("malformed")
                self._abort(wire.ERR_PROTOCOL, "expected hello first")
        elif isinstance(frame, wire.Request):
            self._serve(frame)
        elif isinstance(frame, wire.Response):
            self._answer(frame)
        elif isinstance(frame, wire.Ping):
            self._send(wire.Pong(frame.nonce))
        elif isinstance(frame, wire.Hello):
            self._refused("malformed")
            self._abort(wire.ERR_PROTOCOL, "second hello")
        # Pong: the sign of life was already counted.

    def _hello(self, hello: wire.Hello) -> None:
        self._cancel_timer()
        if hello.version < 1:
            self._refused("malformed")
            self._abort(wire.ERR_VERSION, f"unsupported protocol version {hello.version}")
            return
        if hello.name == "":
            peer = self.identities[0]
        else:
            matching = [i for i in self.identities if i.name == hello.name]
            if not matching:
                log.warn("EPS peer says hello as {name}, not one of its certificate's"
                         " names {names}", name=hello.name,
                         names=[i.name for i in self.identities])
                self._refused("identity")
                self._abort(wire.ERR_IDENTITY, "hello name is not a name of the certificate")
                return
            peer = matching[0]
        self.peer = peer
        self.version = min(wire.PROTOCOL_VERSION, hello.version)
        self.state = _OPEN
        queued, self._queued = self._queued, []
        for id, line in queued:
            if id in self._pending:
                self._write(line)
        self._schedule_heartbeat()
        self._settle(peer)

    def _answer(self, response: wire.Response) -> None:
        entry = self._pending.pop(response.id, None)
        if entry is None:
            log.info("dropped response with unknown id from EPS peer {peer}",
                     peer=self._peer_name())
            return
        d, timer = entry
        if timer is not None and timer.active():
            timer.cancel()
        d.callback(response)

    def _serve(self, request: wire.Request) -> None:
        if request.id in self._serving:
            self._refused("malformed")
            self._abort(wire.ERR_PROTOCOL, "duplicate request id in flight")
            return
        self._serving.add(request.id)
        try:
            result = self.handler(request, self.peer)
        except BaseException:
            result = Failure()
        # A handler that answers at once is answered at once, without a Deferred.
        if type(result) is CoroutineType:
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            result.addBoth(self._answered, request)
        else:
            self._answered(result, request)

    def _answered(self, result: Any, request: wire.Request) -> None:
        """Send the answer to ``request``: the handler's result or failure."""
        try:
            if isinstance(result, Failure):
                response = self._handler_failed(result, request)
            else:
                try:
                    response = self._result(result, request)
                except BaseException:
                    # A result that is not a valid response object counts as a handler
                    # failure.
                    response = self._handler_failed(Failure(), request)
            self._respond(response, request)
        except BaseException:
            log.failure("answering an EPS request failed")

    def _result(self, result: Any, request: wire.Request) -> wire.Response:
        if result is None:
            return wire.Response(request.id, {})
        if isinstance(result, wire.Response):
            if type(result) is wire.Response and result.id == request.id:
                return result  # already validated when it was built
            return wire.Response(request.id, result.result, result.error)
        return wire.Response(request.id, result)

    def _handler_failed(self, failure: Failure, request: wire.Request) -> wire.Response:
        log.failure("handler of {method} failed", failure, method=request.method)
        message = str(failure.value)[: wire.MAX_MESSAGE]
        return wire.Response(request.id, error={"code": HANDLER_ERROR, "message": message})

    def _respond(self, response: wire.Response, request: wire.Request) -> None:
        self._serving.discard(request.id)
        if self.state != _OPEN:
            return
        try:
            line = wire.encode(response, self.max_line)
        except wire.WireError as e:
            log.warn("response to {method} not sent: {reason}",
                     method=request.method, reason=e.reason)
            error = {"code": HANDLER_ERROR, "message": f"response not sendable: {e.reason}"}
            line = wire.encode(wire.Response(request.id, error=error), self.max_line)
        self._write(line)

    # -- sending, closing, timers -------------------------------------------------------

    def _send(self, frame: wire.Frame) -> None:
        self._write(wire.encode(frame, self.max_line))

    def _write(self, line: bytes) -> None:
        if self._batch is not None:
            self._batch.append(line)
            return
        self._last_sent = self.clock.seconds()
        write = self._transport_write
        if write is None:
            write = self.transport.write
        write(line)

    def _flush(self) -> None:
        """Send the lines written since dataReceived began, in one write."""
        batch, self._batch = self._batch, None
        if batch and self.transport is not None:
            self._write(b"".join(batch) if len(batch) > 1 else batch[0])

    def _lose(self) -> None:
        """Close the transport after sending what is batched."""
        self._flush()
        if self.transport is not None:  # a failed TLS write may have closed it already
            self.transport.loseConnection()

    def _abort(self, code: int, message: str) -> None:
        if self.state == _CLOSED or self.transport is None:
            return
        if self.state == _HANDSHAKE:
            # No frame can go out before the handshake, and a graceful TLS close would
            # wait for it: cut the connection.
            self.state = _CLOSED
            self._cancel_timer()
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()
            return
        self._send(wire.ErrorFrame(code, message))
        self.state = _CLOSED
        self._cancel_timer()
        self._lose()

    def _settle(self, outcome: Failure | PeerIdentity) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        waiting, self._ready = self._ready, []
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _forget(self, id: str) -> None:
        entry = self._pending.pop(id, None)
        if entry is not None and entry[1] is not None and entry[1].active():
            entry[1].cancel()

    def _time_out(self, id: str, timeout: float) -> None:
        entry = self._pending.pop(id, None)
        if entry is not None:
            entry[0].errback(CallTimeout(f"no response within {timeout} s"))

    def _refused(self, reason: str) -> None:
        """Report the (first) reason this connection refuses its peer to ``on_refused``."""
        if self.refusal is not None:
            return
        self.refusal = reason
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                log.failure("counting a refused EPS peer failed")

    def _hello_timed_out(self) -> None:
        self._timer = None
        if self.state == _CLOSED:
            return
        self._refused("hello_timeout")
        if self.state == _HANDSHAKE:
            log.warn("no TLS handshake from an EPS peer within {timeout} s",
                     timeout=self.hello_timeout)
            self._abort(wire.ERR_TIMEOUT, "no TLS handshake")
            return
        log.warn("no hello from EPS peer {peer} within {timeout} s",
                 peer=self._peer_name(), timeout=self.hello_timeout)
        self._abort(wire.ERR_TIMEOUT, "no hello received")

    def _schedule_heartbeat(self) -> None:
        now = self.clock.seconds()
        due = min(self._last_sent + self.ping_interval, self._last_received + self.dead_after)
        self._timer = self.clock.callLater(max(0.0, due - now), self._heartbeat)

    def _heartbeat(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        if now - self._last_received >= self.dead_after:
            log.warn("EPS peer {peer} silent for {seconds:.0f} s, closing",
                     peer=self._peer_name(), seconds=now - self._last_received)
            self._abort(wire.ERR_TIMEOUT, "peer silent for too long")
            return
        if now - self._last_sent >= self.ping_interval:
            self._send(wire.Ping(str(next(self._nonces))))
        self._schedule_heartbeat()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _peer_name(self) -> str:
        if self.peer is not None:
            return self.peer.name
        return ",".join(i.name for i in self.identities) or "(unidentified)"


class _EPSFactory(Factory):
    """Builds :class:`EPSConnection` protocols sharing one configuration."""

    protocol = EPSConnection
    noisy = False  # links log their own coming and going (epsproxy.eps.peering)

    def __init__(
        self,
        directory: Any,
        own_name: str,
        handler: Handler,
        clock: IReactorTime,
        **options: Any,
    ) -> None:
        self.directory = directory
        self.own_name = own_name
        self.handler = handler
        self.clock = clock
        self.options = options

    def buildProtocol(self, addr: Any) -> Optional[EPSConnection]:
        connection = self.protocol(
            self.directory, self.own_name, self.handler, self.clock, **self.options
        )
        connection.factory = self
        return connection


class EPSServerFactory(_EPSFactory):
    """Factory for accepted EPS connections (behind a mutual TLS listener)."""


class EPSClientFactory(_EPSFactory):
    """Factory for outgoing EPS connections (through a mutual TLS client endpoint)."""
