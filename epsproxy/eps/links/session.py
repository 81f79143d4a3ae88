"""
One EPS-to-EPS link as a sans-IO state machine (docs/protocol.md): bytes, the peer's
certificate and the time go in; lines to send and events come out.

:class:`Session` is the same machine for the accepting and the connecting EPS: after the
TLS handshake it identifies the peer from its certificate (SPEC §12.5,
:mod:`epsproxy.eps.links.peers`), exchanges ``hello`` frames, then carries calls in both
directions (matched by id) and keeps the link alive with heartbeats.  It never touches a
socket, a reactor or a Deferred: the time comes in as ``now`` (seconds), the lines to
send are taken with :meth:`Session.data_to_send`, the next moment the owner must call
:meth:`Session.timer_due` is :meth:`Session.next_deadline`, and what happens is reported
to a :class:`SessionEvents` given at construction.  :mod:`epsproxy.eps.links.protocol`
is the thin Twisted protocol that feeds it.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.eps.links import wire
from epsproxy.eps.links.peers import Directory, PeerIdentity, PeerRefused, identify_peer

__all__ = [
    "LinkError",
    "PeerGone",
    "CallTimeout",
    "HANDLER_ERROR",
    "PEER_REFUSAL_REASONS",
    "SessionEvents",
    "Session",
]

log = Logger()

#: Error code of a response whose handler raised (the reference's reverse-stream code).
HANDLER_ERROR = -100

#: Why a link refused its peer, as reported by :meth:`SessionEvents.link_refused` (and
#: counted as ``eps_peer_refusals_total{reason}``): the TLS handshake failed (another
#: CA, no client certificate, not TLS at all, or the peer left during it); the
#: certificate is not one the directory pins for the peer, or the hello names another
#: operator; no hello (handshake included) within ``hello_timeout`` of connecting; a
#: line over ``max_line``; a frame that is not valid or breaks the protocol.
#: ``rate_limited`` is the listener's (:mod:`epsproxy.net.ratelimit`), before any link.
PEER_REFUSAL_REASONS = (
    "handshake_failed", "identity", "hello_timeout", "line_too_long", "malformed",
    "rate_limited",
)


class LinkError(Exception):
    """Base of the errors a call over a link fails with."""


class PeerGone(LinkError):
    """The link closed (or never opened) while a call waited for its answer."""


class CallTimeout(LinkError):
    """A call got no response within its timeout; a late response is dropped."""


class SessionEvents(Protocol):
    """What a :class:`Session` reports to its owner (the protocol, or a test's recorder)."""

    def link_ready(self, peer: PeerIdentity) -> None:
        """The hellos are done: ``peer`` is who the link is with."""

    def link_not_ready(self, error: Exception) -> None:
        """The link will never be ready (:class:`PeerRefused` or :class:`PeerGone`)."""

    def link_refused(self, reason: str) -> None:
        """The link refuses its peer, for one of :data:`PEER_REFUSAL_REASONS` (once)."""

    def serve(self, request: wire.Request) -> None:
        """The peer calls us: answer with :meth:`Session.answer` (now or later)."""

    def answered(self, handle: Any, response: wire.Response) -> None:
        """The peer answered the call made with ``handle``."""

    def call_failed(self, handle: Any, error: LinkError) -> None:
        """The call made with ``handle`` gets no answer (timeout, or the link is gone)."""

    def disconnect(self, abort: bool) -> None:
        """Send what :meth:`Session.data_to_send` holds, then close (``abort``: cut)."""


# The states, private: owners ask the predicates (is_open, ...).
_HANDSHAKE, _HELLO, _OPEN, _CLOSED = range(4)


class Session:
    """
    The EPS line protocol of one link, without I/O.

    Inputs: :meth:`connection_made`, :meth:`handshake_done`, :meth:`receive`,
    :meth:`call`, :meth:`answer`, :meth:`timer_due`, :meth:`close`,
    :meth:`connection_lost`; each takes ``now`` where time matters.  ``hello_timeout``
    runs from :meth:`connection_made` (before the TLS handshake) to the peer's hello.
    """

    def __init__(
        self,
        directory: Directory,
        own_name: str,
        events: SessionEvents,
        *,
        hello_timeout: float = 10,
        ping_interval: float = 30,
        dead_after: float = 90,
        max_line: int = wire.DEFAULT_MAX_LINE,
    ) -> None:
        self.directory = directory
        self.own_name = own_name
        self.events = events
        self.hello_timeout = hello_timeout
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.max_line = max_line
        #: The first reason this link refused its peer, if it did.
        self.refusal: str | None = None
        #: The identities the peer's certificate proves (after the handshake).
        self.identities: list[PeerIdentity] = []
        #: The identity the peer said hello as (once open).
        self.peer: PeerIdentity | None = None
        #: The protocol version agreed in the hellos.
        self.version: int | None = None
        self._state = _HANDSHAKE
        self._settled = False
        self._decoder = wire.LineDecoder(max_line)
        self._out: list[bytes] = []
        # id -> (handle, sequence number of its deadline entry, timeout)
        self._pending: dict[str, tuple[Any, int, float | None]] = {}
        # (deadline, sequence, id) of calls with a timeout; answered calls leave stale
        # entries, dropped when they come up (cheaper than a timer per call).
        self._deadlines: list[tuple[float, int, str]] = []
        self._sequence = count(1)
        self._queued: list[tuple[str, bytes]] = []
        self._serving: set[str] = set()
        self._ids = count(1)
        self._nonces = count(1)
        self._hello_deadline: float | None = None
        self._last_sent = self._last_received = 0.0

    # -- predicates ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """The hellos are done and the link carries calls."""
        return self._state == _OPEN

    @property
    def is_closed(self) -> bool:
        """The link closed, or is closing: nothing more is read or sent."""
        return self._state == _CLOSED

    @property
    def is_handshaking(self) -> bool:
        """The TLS handshake has not completed yet."""
        return self._state == _HANDSHAKE

    @property
    def last_received(self) -> float:
        """When the peer last sent a whole frame (the connection's start before that)."""
        return self._last_received

    # -- inputs -------------------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The TCP connection is up (the TLS handshake starts): the hello deadline runs."""
        self._last_sent = self._last_received = now
        self._hello_deadline = now + self.hello_timeout

    def handshake_done(self, certificate: Any, now: float) -> None:
        """TLS is up with the peer's verified leaf ``certificate``: identify, say hello."""
        if self._state != _HANDSHAKE:
            return
        self._state = _HELLO  # frames can be sent now (a refusal's error frame)
        try:
            self.identities = identify_peer(certificate, self.directory)
        except PeerRefused as e:
            log.warn("refused EPS peer: {reason}", reason=e.reason)
            self._refused("identity")
            self._settle_failed(e)
            self._abort(wire.ERR_IDENTITY, "peer certificate not accepted", now)
            return
        self._send(wire.Hello(wire.PROTOCOL_VERSION, self.own_name), now)
        if self._hello_deadline is None:  # connection_made was skipped
            self._hello_deadline = now + self.hello_timeout

    def receive(self, data: bytes, now: float) -> None:
        """Bytes from the peer (any split)."""
        state = self._state
        if state != _OPEN and state != _HELLO:
            return  # before identification, or after closing: read nothing
        try:
            frames = self._decoder.feed(data)
        except wire.WireError as e:
            for frame in e.frames:
                self._handle(frame, now)
                if self._state == _CLOSED:
                    return
            log.warn("bad frame from EPS peer {peer}: {reason}",
                     peer=self.peer_name(), reason=e.reason)
            self._refused("line_too_long" if isinstance(e, wire.LineTooLong) else "malformed")
            frame = wire.error_frame_for(e)
            self._abort(frame.code, frame.message, now)
            return
        if frames:
            # Whole frames are signs of life; a trickle of bytes is not.
            self._last_received = now
        for frame in frames:
            if self._state == _CLOSED:
                return
            self._handle(frame, now)

    def new_call_id(self) -> str:
        """An id for :meth:`call` that no pending call of ours uses."""
        id = str(next(self._ids))
        while id in self._pending:
            id = str(next(self._ids))
        return id

    def call(
        self,
        id: str,
        method: str,
        params: dict[str, Any],
        handle: Any,
        now: float,
        timeout: float | None = None,
    ) -> None:
        """
        Call ``method`` on the peer; its answer is reported with ``handle``
        (:meth:`SessionEvents.answered` or :meth:`SessionEvents.call_failed`).  Calls
        made before the hellos are sent once they are done.

        :raises ValueError: ``id`` is already in flight on this link.
        :raises PeerGone: the link is closed.
        :raises wire.WireError: the request cannot be sent (too long, not JSON); the link
            is unaffected.
        """
        if id in self._pending:
            raise ValueError(f"request id {id!r} is already in flight")
        if self._state == _CLOSED:
            raise PeerGone("connection closed")
        line = wire.encode(wire.Request(id, method, params), self.max_line)
        sequence = 0
        if timeout is not None:
            sequence = next(self._sequence)
            deadlines = self._deadlines
            if len(deadlines) > 64 + 2 * len(self._pending):
                self._compact_deadlines()
            heapq.heappush(deadlines, (now + timeout, sequence, id))
        self._pending[id] = (handle, sequence, timeout)
        if self._state == _OPEN:
            self._out.append(line)
            self._last_sent = now
        else:
            self._queued.append((id, line))

    def forget(self, id: str) -> None:
        """Stop waiting for the answer to call ``id`` (it was cancelled)."""
        self._pending.pop(id, None)

    def answer(self, request: wire.Request, result: Any, now: float) -> None:
        """
        Answer the peer's ``request`` with what its handler gave: a
        :class:`wire.Response`, a result object, None (an empty result) or a
        :class:`Failure` (an error response with :data:`HANDLER_ERROR`).
        """
        self._serving.discard(request.id)
        if type(result) is wire.Response and result.id == request.id:
            response = result  # validated when it was built: the fast path
        elif isinstance(result, Failure):
            response = self._handler_failed(result, request)
        else:
            try:
                response = _response(result, request)
            except BaseException:
                # A result that is not a valid response object is a handler failure.
                response = self._handler_failed(Failure(), request)
        if self._state != _OPEN:
            return
        try:
            line = wire.encode(response, self.max_line)
        except wire.WireError as e:
            log.warn("response to {method} not sent: {reason}",
                     method=request.method, reason=e.reason)
            error = {"code": HANDLER_ERROR, "message": f"response not sendable: {e.reason}"}
            line = wire.encode(wire.Response(request.id, error=error), self.max_line)
        self._out.append(line)
        self._last_sent = now

    def timer_due(self, now: float) -> None:
        """The time is ``now``, at or after :meth:`next_deadline`: act on what is due."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, sequence, id = heapq.heappop(deadlines)
            entry = self._pending.get(id)
            if entry is not None and entry[1] == sequence:
                del self._pending[id]
                self.events.call_failed(entry[0], CallTimeout(f"no response within {entry[2]} s"))
        state = self._state
        if state == _OPEN:
            if now - self._last_received >= self.dead_after:
                log.warn("EPS peer {peer} silent for {seconds:.0f} s, closing",
                         peer=self.peer_name(), seconds=now - self._last_received)
                self._abort(wire.ERR_TIMEOUT, "peer silent for too long", now)
            elif now - self._last_sent >= self.ping_interval:
                self._send(wire.Ping(str(next(self._nonces))), now)
        elif state != _CLOSED and self._hello_deadline is not None and (
            now >= self._hello_deadline
        ):
            self._hello_deadline = None
            self._refused("hello_timeout")
            if state == _HANDSHAKE:
                log.warn("no TLS handshake from an EPS peer within {timeout} s",
                         timeout=self.hello_timeout)
                self._abort(wire.ERR_TIMEOUT, "no TLS handshake", now)
            else:
                log.warn("no hello from EPS peer {peer} within {timeout} s",
                         peer=self.peer_name(), timeout=self.hello_timeout)
                self._abort(wire.ERR_TIMEOUT, "no hello received", now)

    def close(self, code: int, message: str, now: float) -> None:
        """Send an error frame (best effort) and close the link."""
        self._abort(code, message, now)

    def connection_lost(self, reason: str = "closed") -> None:
        """The connection is gone: pending calls fail, the link is closed for good."""
        if self._state == _HANDSHAKE:
            # Closed before the handshake completed, and not by our deadline: TLS
            # refused the peer (another CA, no certificate, not TLS) or it went away.
            log.info("EPS connection closed during the TLS handshake: {reason}",
                     reason=reason)
            self._refused("handshake_failed")
        self._state = _CLOSED
        self._out = []
        pending, self._pending, self._queued = self._pending, {}, []
        self._deadlines = []
        if pending:
            gone = f"connection to {self.peer_name()} lost"
            for handle, _, _ in pending.values():
                self.events.call_failed(handle, PeerGone(gone))
        self._settle_failed(PeerGone("connection closed before the hello exchange"))

    # -- outputs ------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The lines to send since the last time, in one piece (b"" when none)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def next_deadline(self) -> float | None:
        """
        When :meth:`timer_due` must be called at the latest (None: no need).  Calling it
        earlier is harmless: nothing that is not due happens.
        """
        state = self._state
        if state == _OPEN:
            due = min(self._last_sent + self.ping_interval,
                      self._last_received + self.dead_after)
        elif state == _CLOSED:
            return None
        else:
            if self._hello_deadline is None:
                return self._deadlines[0][0] if self._deadlines else None
            due = self._hello_deadline
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] < due:
            return deadlines[0][0]
        return due

    def peer_name(self) -> str:
        """The peer's name for logs (its certificate's names before the hello)."""
        if self.peer is not None:
            return self.peer.name
        return ",".join(i.name for i in self.identities) or "(unidentified)"

    # -- frames -------------------------------------------------------------------------

    def _handle(self, frame: wire.Frame, now: float) -> None:
        if isinstance(frame, wire.ErrorFrame):
            log.info("EPS peer {peer} closed with error {code}: {message}",
                     peer=self.peer_name(), code=frame.code, message=frame.message)
            self._state = _CLOSED
            self.events.disconnect(False)
        elif self._state == _HELLO:
            if isinstance(frame, wire.Hello):
                self._hello(frame, now)
            else:
                self._refused("malformed")
                self._abort(wire.ERR_PROTOCOL, "expected hello first", now)
        elif isinstance(frame, wire.Request):
            self._serve(frame, now)
        elif isinstance(frame, wire.Response):
            self._answered(frame)
        elif isinstance(frame, wire.Ping):
            self._send(wire.Pong(frame.nonce), now)
        elif isinstance(frame, wire.Hello):
            self._refused("malformed")
            self._abort(wire.ERR_PROTOCOL, "second hello", now)
        # Pong: the sign of life was already counted.

    def _hello(self, hello: wire.Hello, now: float) -> None:
        self._hello_deadline = None
        if hello.version < 1:
            self._refused("malformed")
            self._abort(wire.ERR_VERSION, f"unsupported protocol version {hello.version}",
                        now)
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
                self._abort(wire.ERR_IDENTITY, "hello name is not a name of the certificate",
                            now)
                return
            peer = matching[0]
        self.peer = peer
        self.version = min(wire.PROTOCOL_VERSION, hello.version)
        self._state = _OPEN
        queued, self._queued = self._queued, []
        for id, line in queued:
            if id in self._pending:
                self._out.append(line)
                self._last_sent = now
        if not self._settled:
            self._settled = True
            self.events.link_ready(peer)

    def _answered(self, response: wire.Response) -> None:
        entry = self._pending.pop(response.id, None)
        if entry is None:
            log.info("dropped response with unknown id from EPS peer {peer}",
                     peer=self.peer_name())
            return
        self.events.answered(entry[0], response)

    def _serve(self, request: wire.Request, now: float) -> None:
        if request.id in self._serving:
            self._refused("malformed")
            self._abort(wire.ERR_PROTOCOL, "duplicate request id in flight", now)
            return
        self._serving.add(request.id)
        self.events.serve(request)

    def _handler_failed(self, failure: Failure, request: wire.Request) -> wire.Response:
        log.failure("handler of {method} failed", failure, method=request.method)
        message = str(failure.value)[: wire.MAX_MESSAGE]
        return wire.Response(request.id, error={"code": HANDLER_ERROR, "message": message})

    # -- sending and closing ------------------------------------------------------------

    def _send(self, frame: wire.Frame, now: float) -> None:
        self._out.append(wire.encode(frame, self.max_line))
        self._last_sent = now

    def _abort(self, code: int, message: str, now: float) -> None:
        state = self._state
        if state == _CLOSED:
            return
        self._state = _CLOSED
        self._hello_deadline = None
        if state == _HANDSHAKE:
            # No frame can go out before the handshake, and a graceful TLS close would
            # wait for it: cut the connection.
            self.events.disconnect(True)
            return
        self._send(wire.ErrorFrame(code, message), now)
        self.events.disconnect(False)

    def _refused(self, reason: str) -> None:
        if self.refusal is None:
            self.refusal = reason
            self.events.link_refused(reason)

    def _settle_failed(self, error: Exception) -> None:
        if not self._settled:
            self._settled = True
            self.events.link_not_ready(error)

    def _compact_deadlines(self) -> None:
        pending = self._pending
        live = [entry for entry in self._deadlines
                if (p := pending.get(entry[2])) is not None and p[1] == entry[1]]
        heapq.heapify(live)
        self._deadlines = live


def _response(result: Any, request: wire.Request) -> wire.Response:
    """A handler's result as the response to ``request``."""
    if result is None:
        return wire.Response(request.id, {})
    if isinstance(result, wire.Response):
        return wire.Response(request.id, result.result, result.error)
    return wire.Response(request.id, result)
