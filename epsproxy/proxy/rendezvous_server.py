"""
The public proxy's internal endpoint, the server side of the rendezvous: pair two
connections by token and splice them (SPEC §14.3, §15 steps 6 and 9; issue 4).

A party connects, writes 32 raw token bytes, and then speaks to whoever presents the
same token (end-to-end TLS, which the proxy never looks into).  :class:`Rendezvous` holds
the tokens handed out and the parties waiting, and splices each pair with
:func:`epsproxy.proxy.splice.splice`.  What a token is (size, text form, log tag, and the
client side that dials with one) is :mod:`epsproxy.net.token`.

Differences from the reference, on purpose (SPEC §23.1 #2, #3, #5, #6):

- the token is read however it is fragmented, within ``read_timeout``; bytes that
  follow it in the same read belong to the stream and are relayed;
- the read deadline ends with the token: a spliced pair only has an idle timeout;
- the table is bounded (``max_pending``, :class:`RendezvousFull`) and every entry expires
  (``accept_timeout`` from the token's creation, and again from the first party's
  arrival, so the second party always gets the full ``accept_timeout``);
- a token pairs once; if its first party goes away the token is forgotten.

The two deadlines (a token's pairing, a new connection's token) and the spliced pairs'
idle timeout each run on one timer for all (:class:`epsproxy.net.deadlines.Deadlines`,
:class:`epsproxy.proxy.splice.IdleSweep`), not on a reactor timer per connection.

Tokens are secrets: logs carry only :func:`~epsproxy.net.token.token_tag` and
peer addresses truncated by :func:`epsproxy.net.hostport.truncate_ip`.
"""

from __future__ import annotations

from typing import Any, Callable, cast
from typing import Protocol as Protocol_

from twisted.internet import defer
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.deadlines import Deadlines
from epsproxy.net.hostport import truncate_ip
from epsproxy.net.logs import debug_enabled
from epsproxy.net.token import TOKEN_BYTES, new_token, token_tag

from .splice_engine import SpliceEngine
from .splice import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_READ_BYTES,
    IdleSweep,
    Splice,
    abort,
    retarget,
    splice,
)

__all__ = ["PoolIntake", "Rendezvous", "RendezvousFull"]

log = Logger()

#: Default bound on the bytes one direction of a pair holds in user space.
DEFAULT_BUFFER_BYTES = 256 * 1024


class PoolIntake(Protocol_):
    """What the rendezvous needs of a connection pool (:mod:`epsproxy.proxy.pool`)."""

    def adopt(self, connection: IProtocol, token: bytes, rest: bytes) -> bool:
        """
        Whether ``token`` is a live pool token; if so the pool has taken ``connection``
        over (it closes it itself if ``rest``, bytes after the token, is not empty).
        """


class RendezvousFull(Exception):
    """The pending-token table is at its cap (or closed); no new token is handed out."""


class _peer:
    """A connection's peer for a log line, truncated only if the line is written."""

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def __format__(self, spec: str) -> str:
        try:
            return truncate_ip(str(self.transport.getPeer().host))
        except Exception:
            return "unknown"

    __str__ = __repr__ = lambda self: self.__format__("")  # noqa: E731



class _Entry:
    """A token handed out and not yet paired: maybe with its first party waiting."""

    __slots__ = ("token", "first", "timer")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.first: _Party | None = None


@implementer(IHalfCloseableProtocol)
class _Party(Protocol):
    """
    A connection at the internal endpoint until it is spliced: reads the token, then
    waits (buffering at most ``buffer_bytes`` of early stream bytes) for its partner.
    """

    state = "token"  # "token" -> "waiting" -> "spliced"; or "closed", or "pooled" (issue 14)

    def __init__(self, rendezvous: Rendezvous) -> None:
        self._rv = rendezvous
        self._buffer = b""
        self.entry: _Entry | None = None
        self.rest = b""  # stream bytes read after the token, for the partner
        self.replay = b""  # bytes read by someone else before park(), for the partner
        self.eof = False
        self.lost: defer.Deferred[None] | None = None  # made by close_all

    def connectionMade(self) -> None:
        self._rv._accepted(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "token":
            self._buffer += data
            if len(self._buffer) >= TOKEN_BYTES:
                buffered, self._buffer = self._buffer, b""
                self._rv._presented(self, buffered[:TOKEN_BYTES], buffered[TOKEN_BYTES:])
        elif self.state == "waiting":
            self.rest += data
            if len(self.rest) >= self._rv.buffer_bytes:
                cast(IPushProducer, self.transport).pauseProducing()

    def readConnectionLost(self) -> None:
        if self.state == "token":
            self._rv._refuse(self, "end of stream inside the token")
        elif self.state == "waiting":
            self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._rv._party_lost(self)


class _InternalFactory(Factory):
    """Builds :class:`_Party` protocols; none while the rendezvous is closing."""

    noisy = False  # one "Starting factory" line per listener is enough

    def __init__(self, rendezvous: Rendezvous) -> None:
        self.rendezvous = rendezvous

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.rendezvous._closing:
            return None
        return _Party(self.rendezvous)


class Rendezvous:
    """
    Tokens waiting at a public proxy's internal endpoint, and the pairs spliced by them.

    Memory per direction is bounded: a waiting party's early bytes up to
    ``buffer_bytes`` (then it is paused), a spliced direction at most one read of
    ``read_bytes`` (its source is paused at any backlog; see
    :mod:`epsproxy.proxy.splice`) — within ``buffer_bytes`` plus one read.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        accept_timeout: float = 10.0,
        read_timeout: float = 5.0,
        max_pending: int = 10_000,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        read_bytes: int = DEFAULT_READ_BYTES,
        on_valid_token: Callable[[Any], None] | None = None,
        pool: PoolIntake | None = None,
        engine: SpliceEngine | None = None,
    ) -> None:
        if max_pending < 1 or buffer_bytes < 1 or read_bytes < 1:
            raise ValueError("max_pending, buffer_bytes and read_bytes must be positive")
        self._clock = clock
        # The two deadlines of the internal endpoint, each on one timer: a token's
        # pairing, and a new connection's token.
        self._tokens: Deadlines[_Entry] = Deadlines(clock, accept_timeout, self._expire)
        self._reading: Deadlines[_Party] = Deadlines(clock, read_timeout, self._read_timed_out)
        self.max_pending = max_pending
        self.buffer_bytes = buffer_bytes
        self.idle_timeout = idle_timeout
        self.read_bytes = read_bytes
        self._sweep = IdleSweep(clock)  # the idle timeouts of all its splices
        #: Relays pairs of TCP connections in C when given (else the Python splice).
        self.engine = engine
        self._table: dict[bytes, _Entry] = {}
        self._splices: set[Splice] = set()
        self._closing = False
        self._factory = _InternalFactory(self)
        #: Called with a party's peer address when it presents a live token (e.g. a rate
        #: limiter's ``forgive``: a brokered connection is not a flood).
        self.on_valid_token = on_valid_token
        #: (issue 14) Offered each connection whose token is not in the table: a live pool
        #: token makes it an idle pooled connection (see :mod:`epsproxy.proxy.pool`).
        self.pool = pool
        # counters since start (metrics)
        self.pairings = 0
        self.timeouts = 0
        self.refused = 0
        self._bytes_closed = 0

    # -- gauges

    @property
    def pending(self) -> int:
        """Tokens handed out (or parked) and not yet paired."""
        return len(self._table)

    @property
    def active_splices(self) -> int:
        """Pairs currently spliced."""
        return len(self._splices)

    @property
    def engine_splices(self) -> int:
        """Pairs of :attr:`active_splices` that the splice engine relays now."""
        return sum(1 for s in self._splices if s.engine_handle is not None)

    @property
    def bytes_spliced(self) -> int:
        """Bytes relayed by all splices since start, both directions."""
        return self._bytes_closed + sum(s.bytes_relayed for s in self._splices)

    @property
    def splices(self) -> frozenset[Splice]:
        """The active splices (for inspection and tests)."""
        return frozenset(self._splices)

    # -- tokens

    def new_token(self) -> bytes:
        """
        A fresh random 32-byte token for a peer-to-peer pairing (two parties will present
        it); forgotten after accept_timeout if the pair is not complete by then (a first
        party waiting alone is closed).  Raises RendezvousFull over max_pending.
        """
        self._check_room()
        token = new_token()
        while token in self._table:  # pragma: no cover - 2**-256
            token = new_token()
        entry = self._table[token] = _Entry(token)
        self._arm(entry)
        return token

    def park(self, token: bytes, waiting: IProtocol, first_bytes: bytes) -> None:
        """
        (issue 5, SNI path) An already-connected client connection (paused by the
        caller) waits for the party that presents ``token``; that party first receives
        ``first_bytes`` (the ClientHello that was read), then the two are spliced.  Same
        expiry rules.  ``token`` may come from :meth:`new_token` or be new (then it
        counts against ``max_pending``).  From now on the rendezvous owns the
        connection: ``waiting`` gets no further events.
        """
        if len(token) != TOKEN_BYTES:
            raise ValueError(f"token must be {TOKEN_BYTES} bytes")
        entry = self._table.get(token)
        if entry is None:
            self._check_room()
            entry = self._table[token] = _Entry(token)
        elif entry.first is not None:
            raise ValueError("a connection is already waiting for this token")
        transport = waiting.transport  # type: ignore[attr-defined]  # not in IProtocol
        party = _Party(self)
        retarget(transport, waiting, party)
        party.state = "waiting"
        party.entry = entry
        party.replay = bytes(first_bytes)
        entry.first = party
        self._arm(entry)
        if debug_enabled():
            log.debug("parked {peer} for token {tag}", peer=_peer(transport),
                      tag=token_tag(token))

    def cancel(self, token: bytes) -> None:
        """Forget a token (closing a party waiting for it)."""
        entry = self._table.pop(token, None)
        if entry is None:
            return
        self._disarm(entry)
        if entry.first is not None:
            first, entry.first = entry.first, None
            first.state = "closed"
            first.entry = None
            abort(first.transport)

    def splice_pair(
        self, left: IProtocol, right: IProtocol, *, to_right: bytes = b"", tag: str = ""
    ) -> Splice:
        """
        (issue 14) Splice two connections that did not pair here (a client and a pooled
        connection), with this rendezvous' read size and idle timeout, ``to_right`` sent
        to ``right`` first; tracked like a pair (drain, close_all, bytes_spliced,
        active_splices) but not counted as a pairing.  Raises RendezvousFull once closing.
        """
        if self._closing:
            raise RendezvousFull("the rendezvous is closed")
        s = splice(self._clock, left, right, to_right=to_right, read_bytes=self.read_bytes,
                   idle_timeout=self.idle_timeout, tag=tag, sweep=self._sweep,
                   engine=self.engine)
        self._splices.add(s)
        s.done.addCallback(self._splice_done, s)
        return s

    def factory(self) -> IProtocolFactory:
        """
        The protocol factory of the internal listener (reads exactly 32 token bytes,
        however fragmented, within read_timeout; unknown/expired/used token -> close).
        """
        return self._factory

    def drain(self, grace: float) -> defer.Deferred[None]:
        """
        Fires once every splice active now has ended by itself, or after ``grace``
        seconds, whichever comes first (graceful shutdown: call it after the listeners
        stopped, then :meth:`close_all`).
        """
        splices = list(self._splices)
        if not splices or grace <= 0:
            return defer.succeed(None)
        drained: defer.Deferred[None] = defer.Deferred()
        remaining = [len(splices)]

        def one_ended(result: Any) -> Any:
            remaining[0] -= 1
            if remaining[0] == 0 and not drained.called:
                drained.callback(None)
            return result

        for s in splices:
            s.done.addBoth(one_ended)

        def grace_over() -> None:
            if not drained.called:
                drained.callback(None)

        timer = self._clock.callLater(grace, grace_over)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(stop_timer)

    def close_all(self) -> defer.Deferred[None]:
        """Shutdown: stop accepting, close waiting parties and spliced pairs."""
        self._closing = True
        waits: list[defer.Deferred[Any]] = []
        parties = self._reading.keys()
        self._reading.clear()
        for entry in list(self._table.values()):
            if entry.first is not None:
                parties.append(entry.first)
        self._tokens.clear()
        self._table.clear()
        for party in parties:
            party.lost = defer.Deferred()
            waits.append(party.lost)
            party.state = "closed"
            abort(party.transport)
        for s in list(self._splices):
            waits.append(s.done)
            s.abort()
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- internals

    def _check_room(self) -> None:
        if self._closing:
            raise RendezvousFull("the rendezvous is closed")
        if len(self._table) >= self.max_pending:
            raise RendezvousFull(
                f"too many pending connection requests ({self.max_pending}); try again later"
            )

    @property
    def accept_timeout(self) -> float:
        """Seconds a token waits for its pair (from its creation, and again from the
        first party's arrival); a new value applies to the deadlines set from then on."""
        return self._tokens.timeout

    @accept_timeout.setter
    def accept_timeout(self, seconds: float) -> None:
        self._tokens.timeout = seconds

    @property
    def read_timeout(self) -> float:
        """Seconds a new connection has to present its token."""
        return self._reading.timeout

    @read_timeout.setter
    def read_timeout(self, seconds: float) -> None:
        self._reading.timeout = seconds

    def _arm(self, entry: _Entry) -> None:
        self._tokens.add(entry)  # (again, when the first party arrived: moved)

    def _disarm(self, entry: _Entry) -> None:
        self._tokens.discard(entry)

    def _expire(self, entry: _Entry) -> None:
        if self._table.get(entry.token) is not entry:
            return
        del self._table[entry.token]
        self.timeouts += 1
        first, entry.first = entry.first, None
        if first is None:
            log.debug("token {tag} expired unused", tag=token_tag(entry.token))
            return
        log.info("no partner for {peer} within {timeout}s (token {tag}), closing",
                 peer=_peer(first.transport), timeout=self.accept_timeout,
                 tag=token_tag(entry.token))
        first.state = "closed"
        first.entry = None
        abort(first.transport)

    def _accepted(self, party: _Party) -> None:
        self._reading.add(party)

    def _read_timed_out(self, party: _Party) -> None:
        if party.state != "token":
            return
        self.timeouts += 1
        party.state = "closed"
        log.info("no token from {peer} within {timeout}s, closing",
                 peer=_peer(party.transport), timeout=self.read_timeout)
        abort(party.transport)

    def _stop_reading_token(self, party: _Party) -> None:
        self._reading.discard(party)

    def _refuse(self, party: _Party, why: str, token: bytes | None = None) -> None:
        self._stop_reading_token(party)
        self.refused += 1
        party.state = "closed"
        log.info("refused {peer}: {why}{tag}", peer=_peer(party.transport), why=why,
                 tag=f" (token {token_tag(token)})" if token is not None else "")
        transport = party.transport
        assert transport is not None
        transport.loseConnection()

    def _presented(self, party: _Party, token: bytes, rest: bytes) -> None:
        self._stop_reading_token(party)
        entry = self._table.get(token)
        if entry is None:
            if self.pool is not None and self.pool.adopt(party, token, rest):
                party.state = "pooled"  # the pool owns the connection from now on
                if self.on_valid_token is not None:
                    self.on_valid_token(cast(Any, party.transport).getPeer())
                return
            self._refuse(party, "unknown, expired or used token", token)
            return
        if self.on_valid_token is not None:
            transport = party.transport
            assert transport is not None
            self.on_valid_token(transport.getPeer())
        if entry.first is None:
            party.state = "waiting"
            party.entry = entry
            party.rest = rest
            entry.first = party
            self._arm(entry)  # the partner gets the whole accept_timeout
            if len(rest) >= self.buffer_bytes:
                cast(IPushProducer, party.transport).pauseProducing()
            return
        del self._table[entry.token]
        self._disarm(entry)
        first, entry.first = entry.first, None
        first.entry = None
        first.state = party.state = "spliced"
        self.pairings += 1
        tag = token_tag(token)
        # Pairing is the normal case: counted in metrics, not logged (a log event costs
        # even at debug, and this is the hot path).
        s = splice(
            self._clock, first, party,
            to_left=rest, to_right=first.replay + first.rest, left_eof=first.eof,
            read_bytes=self.read_bytes, idle_timeout=self.idle_timeout, tag=tag,
            sweep=self._sweep, engine=self.engine,
        )
        first.rest = first.replay = b""
        self._splices.add(s)
        s.done.addCallback(self._splice_done, s)

    def _splice_done(self, _: None, s: Splice) -> None:
        self._splices.discard(s)
        self._bytes_closed += s.bytes_relayed

    def _party_lost(self, party: _Party) -> None:
        self._stop_reading_token(party)
        entry = party.entry
        if entry is not None and entry.first is party:
            # The first party left: the token is spent, nobody may take its place.
            entry.first = None
            party.entry = None
            if self._table.get(entry.token) is entry:
                del self._table[entry.token]
            self._disarm(entry)
            log.info("{peer} left while waiting (token {tag})", peer=_peer(party.transport),
                     tag=token_tag(entry.token))
        party.state = "closed"
        if party.lost is not None:
            d, party.lost = party.lost, None
            d.callback(None)
