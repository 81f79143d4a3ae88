"""
The private proxy's pool of pre-dialled connections (issue 14; the protocol is
:mod:`epsproxy.proxy.pooling`).

:class:`PoolKeeper` keeps, for each public proxy this private proxy holds live
announcements at, ``target`` idle connections open at that proxy's internal endpoint:

- it asks for pool tokens through the own endpoint server
  (``"<proxy>.requestPoolTokens" {"count": n}``), one request in flight per proxy, and
  keeps the tokens it does not dial at once as SPARES, usable until
  :data:`SPARE_MARGIN` seconds before the public proxy forgets them (``expires_in``
  after the call: the public proxy made them after it).  A replacement is dialled
  with a spare at once, without a call: a call goes out only when the pool lacks
  connections no spare covers or fewer than half the spares it keeps are left, and
  asks for what it lacks plus spares up to
  :data:`SPARES_PER_CONNECTION` times ``target``, at least :data:`DEFAULT_SPARES`, and
  at least as many as clients took in the last token life, or the most they took in one
  before, halved per :data:`DEMAND_HALF_LIFE` since (a busy pool: so that its calls
  come about twice per token life however many clients it serves)
  (at most :data:`~epsproxy.proxy.pooling.MAX_TOKENS_PER_REQUEST`, and spares plus the
  tokens being dialled within the public proxy's default cap on unused tokens,
  :func:`~epsproxy.proxy.pooling.token_cap`: over it the answer is empty), so one call
  through two endpoint servers serves dozens of replacements instead of one.  Tokens
  that live no longer than :data:`SPARE_MARGIN` are dialled for what the pool lacks,
  never kept, and no spares are asked for then.  Expired spares are
  dropped, not dialled; a closed pool's spares are forgotten with it.  A refusal, no
  answer or a result that is not :data:`~epsproxy.proxy.pooling.POOL_TOKENS_RESULT`
  backs that proxy's calls off (5 s doubling to 60 s; logged when the reason changes,
  not per retry; spares are still dialled meanwhile); a failed dial, or more than a
  pool's worth of connections closed young, backs off its calls and its dials (not
  even a spare is dialled until it ends); an empty answer (the public proxy's cap)
  only delays the next call by 5 s;
- it dials the endpoint for each token, writes the 32 token bytes, turns on TCP
  keepalive and waits, sending nothing, until the public proxy writes a header: a PROXY
  v2 header with the client's addresses and the server name (the authority TLV), read
  with :class:`~epsproxy.net.proxy_protocol.ProxyHeaderReader`.  From the first byte
  the whole header must arrive within ``header_timeout`` seconds.  A header that
  cannot be parsed, names no server, or names one not live-announced to that proxy
  closes that connection only (counted by reason in :attr:`PoolKeeper.closed`);
- a good header hands the connection to the forwarder
  (:meth:`~epsproxy.proxy.private.forwarding.Forwarder.serve_pooled`), served like a
  brokered one, and a replacement is dialled (with a spare, or asked for): at once when
  fewer than :data:`REPLACE_LATER_FROM` others are idle; else, when that client is the
  only one being set up and is not yet (a proxy that terminates TLS: its handshake is
  not done; :attr:`~epsproxy.proxy.private.forwarding.Forwarder.setting_up`), once it
  is; else :data:`REPLACE_DELAY` seconds later (one timer for the replacements of
  several clients).  Either way the dial is not in the way of the client that took
  the connection;
- the target starts at ``pool_size``, grows by one (up to ``pool_max``) for each
  ``incomingConnection`` of that proxy while pooling (:meth:`PoolKeeper.fallback`: the
  public proxy found no idle connection), and shrinks by one after each ``shrink_after``
  seconds without such a fallback: a used connection is then not replaced while the
  pool holds its target or more.  An idle connection is never closed to shrink it: the
  public proxy may be handing that very connection to a client (a soak run found the
  race: a client reset as the private proxy closed its connection); a surplus one waits
  to be used, or for the public proxy's ``pool_idle_timeout``;
- an idle connection that dies is replaced; a proxy whose announcements all expired
  gets its pool closed; :meth:`PoolKeeper.stop` closes everything.

The keeper never writes to a pooled connection after its token, and never reads more
than one header from it: after the header the forwarder owns it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.dial import Dialled, dial, write_at_once
from epsproxy.net.hostport import parse_host_port, truncate_ip
from epsproxy.net.jsonrpc.client import JSONRPCClient
from epsproxy.net.jsonrpc.envelope import INVALID_PARAMS, JSONRPCError, random_id
from epsproxy.net.logs import debug_enabled
from epsproxy.net.proxy_protocol import ProxyHeader, ProxyHeaderError, ProxyHeaderReader
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import decode_token, token_tag
from epsproxy.proxy.announcements import PrivateAnnouncements
from epsproxy.proxy.pooling import (
    DEFAULT_POOL_CAP,
    EARLIER_MAX_TOKENS_PER_REQUEST,
    MAX_POOL_HEADER,
    MAX_TOKENS_PER_REQUEST,
    POOL_TOKENS_RESULT,
    REQUEST_POOL_TOKENS,
    keep_alive,
    token_cap,
)
from epsproxy.proxy.private.forwarding import Forwarder
from epsproxy.rules.text import shorten

__all__ = ["BACKOFF_MAX", "BACKOFF_START", "DEFAULT_SPARES", "DEMAND_HALF_LIFE",
           "HEADER_TIMEOUT", "PoolKeeper", "Dial", "REPLACE_DELAY", "REPLACE_LATER_FROM",
           "SPARES_PER_CONNECTION"]

log = Logger()

#: Seconds to wait after the first failure to get tokens (or an empty answer); doubled
#: per further failure up to :data:`BACKOFF_MAX`.
BACKOFF_START = 5.0
BACKOFF_MAX = 60.0

#: Seconds a pooled connection has, from the first byte of its header, to send all of it.
HEADER_TIMEOUT = 5.0

#: A pooled connection closed by the public proxy within this many seconds of being
#: connected died young: more than a pool's worth of those in a row backs the proxy off
#: (a public proxy that refuses our tokens must not make us dial in a loop).
YOUNG_SECONDS = 2.0

#: Spare tokens kept per connection of the pool's target, and at least
#: :data:`DEFAULT_SPARES` (both within the public proxy's default cap on unused tokens):
#: the more, the rarer the calls through two endpoint servers.
SPARES_PER_CONNECTION = 2

#: The fewest spare tokens a pool keeps, whatever its target: a pool of 4 with 8 spares
#: called ``requestPoolTokens`` once per 4.5 connections of one client, and each call
#: cost its two endpoint servers about 2 ms of CPU; with 96, once per 43, and those
#: calls held up the connections in flight (2.3% of them at 1 client: the p99 latency);
#: with 384, once per ~190, which still held up two connections in a hundred by 1-6 ms:
#: so a busy pool keeps more, as many as clients took in a token's life (issue 14's
#: measurements).  A token costs the public proxy about 140 bytes until it expires.
DEFAULT_SPARES = 384

#: The most times of taken connections a pool remembers (:attr:`_Pool.taken`): no pool
#: keeps more spares than the public proxy's default cap on unused tokens.
TAKEN_KEPT = token_cap(DEFAULT_POOL_CAP)

#: Seconds in which the demand a pool remembers (:meth:`_Pool.demand`) halves.
DEMAND_HALF_LIFE = 60.0

#: How long a cap the public proxy put on our spares (it answered fewer tokens than
#: asked) is kept to before the full number of spares is asked for again.
SPARE_LIMIT_SECONDS = 60.0

#: A spare token is not used in the last this many seconds of its life (the dial and the
#: token must reach the public proxy before it expires there).
SPARE_MARGIN = 1.0

#: Seconds between checks of expired announcements, back-offs and shrinking.
TICK_SECONDS = 1.0

#: Seconds after a pooled connection is taken before it is replaced, while at least
#: :data:`REPLACE_LATER_FROM` others are still idle.  Replacing it at once put the new
#: dial (and, at the public proxy, its accept, token and keepalive) between the header
#: and the internal server's answer of the client that took it.  A small step: with one
#: client at a time, 1.07x, 1.06x and 0.99x the rate and a p99 2-10% lower in three
#: paired runs (issue 14, docs/benchmarks.md).  A few milliseconds cover a TLS handshake
#: on a LAN.  A proxy that terminates TLS does that handshake itself, on its own
#: thread, where the timer often fell: while it sets up one client alone, the
#: replacement waits for that handshake instead (at one client, 1.045x, 1.034x and
#: 1.000x the rate and a p99 6-9% lower in three paired runs; under load, several
#: clients being set up at once, the timer still gathers the replacements).
REPLACE_DELAY = 0.005

#: Fewer idle connections than this left after one is taken: it is replaced at once
#: (under load the pool must not run dry meanwhile: an empty pool means a brokered
#: connection).
REPLACE_LATER_FROM = 2

#: Dials ``address`` (``host:port``) with ``protocol``; fires once connected.
Dial = Callable[[str, Protocol], "Deferred[Any]"]


HELD_BEFORE_SPLICE = 64 * 1024
"""Most bytes a served pooled connection reads after its header before it is spliced
(then it is paused until the splice resumes it)."""


@implementer(IHalfCloseableProtocol)
class _Pooled(Dialled):
    """
    One pooled connection: writes its token, then waits for the header.  Thin: every
    decision is the keeper's.  After the header it remembers what arrives before the
    splice (``received``, at most :data:`HELD_BEFORE_SPLICE` before it pauses; ``eof``)
    for the forwarder; ``gone`` once lost.
    """

    def __init__(self, keeper: PoolKeeper, pool: _Pool, token: bytes) -> None:
        self.keeper = keeper
        self.pool = pool
        self.token = token
        self.tag = token_tag(token)
        self.reader = ProxyHeaderReader(MAX_POOL_HEADER)
        self.header: ProxyHeader | None = None
        self.received: list[bytes] = []
        self.held = 0  # bytes in received
        self.eof = False
        self.gone = False
        self.finished = False  # handed to the forwarder, or closed by the keeper
        self.connected_at = 0.0
        self.deadline: IDelayedCall | None = None
        self.dialling: Deferred[Any] | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport  # a TCP transport: its protocol is taken over later
        # Endpoints put a wrapper between the transport and us; the forwarder needs the
        # transport to talk to us directly, to take the connection over.
        if getattr(transport, "protocol", self) is not self:
            transport.protocol = self
        write_at_once(transport, self.token)
        keep_alive(transport)
        self.dialling = None
        self.keeper._connected(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self.header is not None:
            # Bytes after the header, before the splice (the internal server is being
            # dialled): a TLS client sends nothing more until the server answers, so
            # the connection is not paused for them; past HELD_BEFORE_SPLICE it is.
            self.received.append(data)
            self.held += len(data)
            if self.held > HELD_BEFORE_SPLICE:
                self.transport.pauseProducing()  # type: ignore[union-attr]  # TCP transport
            return
        if self.finished:
            return
        try:
            header = self.reader.feed(data)
        except ProxyHeaderError as e:
            self.keeper._refuse(self, "bad_header", str(e))
            return
        if header is None:
            if self.deadline is None:
                # A header in pieces: no longer idle, and its deadline starts.  (A whole
                # header, the normal case, is served at once: nothing to time, and the
                # replacement is dialled after the client's connection is under way.)
                self.keeper._taken(self)
            return
        self.header = header
        self.keeper._header(self, header)

    def readConnectionLost(self) -> None:
        if self.header is not None:
            self.eof = True
            return
        self.keeper._lost(self)
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.keeper._lost(self)

    def close(self) -> None:
        """Close the connection (or stop dialling it) at once."""
        if self.dialling is not None and not self.dialling.called:
            self.dialling.cancel()
        transport = self.transport
        if transport is not None and not self.gone:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()


class _Pool:
    """The pooled connections at one public proxy, and how they are being topped up."""

    def __init__(self, proxy: str, target: int, now: float) -> None:
        self.proxy = proxy
        self.target = target
        self.idle: set[_Pooled] = set()
        self.connecting: set[_Pooled] = set()
        self.reading: set[_Pooled] = set()  # header under way
        self.requesting: Deferred[Any] | None = None
        #: The most tokens one call to this public proxy asks for (less for an older one).
        self.max_request = MAX_TOKENS_PER_REQUEST
        #: The most spares worth asking for, while the public proxy caps our unused
        #: tokens lower than the spares we would keep (None: no cap seen), and until when.
        self.spare_limit: int | None = None
        self.spare_limit_until = 0.0
        #: Tokens in hand for the next replacements: (token, endpoint, usable until),
        #: the soonest to expire first (so expired ones are dropped from the front).
        self.spare: deque[tuple[bytes, str, float]] = deque()
        #: False while the public proxy's tokens live too short to be kept as spares.
        self.keep_spares = True
        #: How long a token is usable once asked for (``expires_in`` less
        #: :data:`SPARE_MARGIN`, from the last answer; 0 before one).
        self.life = 0.0
        #: When the public proxy took pooled connections for clients (their headers
        #: came), the oldest first, within the last ``life`` seconds: the demand that a
        #: busy pool's spares follow (:meth:`PoolKeeper._fill`).
        self.taken: deque[float] = deque(maxlen=TAKEN_KEPT)
        #: The most connections taken in one token life so far, and when (:meth:`demand`).
        self.peak = 0
        self.peak_at = now
        self.retry_at = 0.0  # no call before this
        self.dial_at = 0.0  # no dial before this (dials at the endpoint failed)
        self.backoff = 0.0
        self.failing: str | None = None  # the reason last logged
        self.changed_at = now  # the last fallback or shrink
        self.young_deaths = 0
        self.closed = False
        #: The top-up after a taken connection, while one is waiting (:data:`REPLACE_DELAY`).
        self.replace_call: IDelayedCall | None = None

    def demand(self, now: float) -> int:
        """
        The clients one token life serves: the connections taken in the last ``life``
        seconds, or the most seen so, halved per :data:`DEMAND_HALF_LIFE` seconds since,
        whichever is more (a pool that served a burst keeps its spares for the next one
        for a while, rather than calling at every half of the floor again).
        """
        taken = self.taken
        while taken and taken[0] <= now - self.life:
            taken.popleft()
        current = len(taken)
        remembered = self.peak * 0.5 ** ((now - self.peak_at) / DEMAND_HALF_LIFE)
        if current >= remembered:
            self.peak, self.peak_at = current, now
            return current
        return int(remembered)

    def members(self) -> list[_Pooled]:
        return [*self.idle, *self.connecting, *self.reading]

    def forget(self, conn: _Pooled) -> str | None:
        """Remove ``conn``; the state it was in, or None if it was not here."""
        for name, group in (("idle", self.idle), ("connecting", self.connecting),
                            ("reading", self.reading)):
            if conn in group:
                group.discard(conn)
                return name
        return None


class PoolKeeper:
    """
    Keeps idle pooled connections at every public proxy of a live announcement (see the
    module docstring).  ``client`` calls the own endpoint server; ``forwarder`` serves a
    pooled connection once its header is read; ``dial`` connects (default: TCP with
    ``connect_timeout``).  ``pool_size`` 0 keeps no pool.  A pool keeps at least
    ``spares`` spare tokens, or :data:`SPARES_PER_CONNECTION` per connection of its target
    if that is more.

    Counters: ``served``, ``replaced`` (idle connections that died and were replaced),
    ``requests``, ``request_failures``, ``bad_results``, ``fallbacks`` and ``closed``
    (connections closed by reason).
    """

    def __init__(
        self,
        reactor: IReactor,
        announcements: PrivateAnnouncements,
        client: JSONRPCClient,
        forwarder: Forwarder,
        *,
        pool_size: int = 4,
        pool_max: int = 64,
        shrink_after: float = 30.0,
        connect_timeout: float = 10.0,
        call_timeout: float | None = None,
        header_timeout: float = HEADER_TIMEOUT,
        tick: float = TICK_SECONDS,
        dial: Dial | None = None,
        spares: int = DEFAULT_SPARES,
    ) -> None:
        self.reactor = reactor
        self.announcements = announcements
        self.client = client
        self.forwarder = forwarder
        self.pool_size = pool_size
        self.pool_max = max(pool_max, pool_size)
        self.shrink_after = shrink_after
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.header_timeout = header_timeout
        self.tick = tick
        self._dial = dial or self._dial_tcp
        self.spares = spares
        self.pools: dict[str, _Pool] = {}
        self.served = 0
        self.replaced = 0
        self.requests = 0
        self.request_failures = 0
        self.bad_results = 0
        self.fallbacks = 0
        self.closed: dict[str, int] = {}
        self._loop: LoopingCall | None = None
        self._stopped = False
        self._waiting: list[tuple[str, int, Deferred[None]]] = []

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """
        Start keeping the pools: checked every ``tick`` seconds and on every event, the
        first time one tick from now (after the re-announcements of a start went out:
        the public proxy hands tokens only to an operator it knows announcements of).
        """
        self._stopped = False
        loop = self._loop = LoopingCall(self.check)
        loop.clock = self.reactor
        loop.start(self.tick, now=False)

    def stop(self) -> Deferred[None]:
        """Close every pool and stop asking for tokens."""
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for proxy in list(self.pools):
            self._close_pool(proxy, "stopped")
        return succeed(None)

    def reconfigure(
        self, *, pool_size: int, pool_max: int, shrink_after: float, connect_timeout: float,
        call_timeout: float | None, client: JSONRPCClient | None = None,
    ) -> None:
        """New settings (a reload): targets are clamped, surplus idle connections closed."""
        self.pool_size = pool_size
        self.pool_max = max(pool_max, pool_size)
        self.shrink_after = shrink_after
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        if client is not None:
            self.client = client
        if pool_size == 0:
            for proxy in list(self.pools):
                self._close_pool(proxy, "disabled")
        for pool in list(self.pools.values()):
            pool.target = max(pool_size, min(pool.target, self.pool_max))
            while len(pool.idle) > pool.target:
                self._close(pool.idle.pop(), "surplus")
        if not self._stopped:
            self.check()

    # -- what the rest of the proxy tells and asks -------------------------------------

    def fallback(self, proxy: str) -> None:
        """
        ``proxy`` brokered a connection (``incomingConnection``): its pool was empty, so
        grow its target by one (up to ``pool_max``).
        """
        pool = self.pools.get(proxy)
        if pool is None or pool.closed:
            return
        self.fallbacks += 1
        pool.changed_at = self.reactor.seconds()
        if pool.target < self.pool_max:
            pool.target += 1
            self._fill(pool)

    def state(self) -> dict[str, dict[str, int]]:
        """``{proxy: {"idle": n, "connecting": n, "target": n}}`` of every pool kept."""
        return {proxy: {"idle": len(pool.idle), "connecting": len(pool.connecting),
                        "target": pool.target}
                for proxy, pool in sorted(self.pools.items())}

    def when_idle(self, proxy: str, count: int) -> Deferred[None]:
        """Fires once ``proxy``'s pool holds exactly ``count`` idle connections."""
        d: Deferred[None] = Deferred()
        self._waiting.append((proxy, count, d))
        self._notify()
        return d

    # -- keeping the pools ------------------------------------------------------------

    def check(self) -> None:
        """
        Open pools for new proxies, close those whose announcements all expired, shrink
        targets idle for ``shrink_after`` seconds, and top every pool up.
        """
        try:
            self._check()
        except Exception:
            log.failure("checking the connection pools failed")

    def _check(self) -> None:
        if self._stopped:
            return
        live = set(self.announcements.by_proxy()) if self.pool_size > 0 else set()
        for proxy in list(self.pools):
            if proxy not in live:
                count = len(self.pools[proxy].idle)
                self._close_pool(proxy, "expired" if self.pool_size > 0 else "disabled")
                log.info("closed the connection pool at {proxy} ({count} idle): no live "
                         "announcement there", proxy=shorten(proxy), count=count)
        now = self.reactor.seconds()
        for proxy in sorted(live):
            pool = self.pools.get(proxy)
            if pool is None:
                pool = self.pools[proxy] = _Pool(proxy, self.pool_size, now)
                log.info("keeping {count} pre-dialled connection(s) at {proxy}",
                         count=self.pool_size, proxy=shorten(proxy))
            if pool.target > self.pool_size and now - pool.changed_at >= self.shrink_after:
                # Not replacing used connections shrinks it (see the module docstring):
                # closing an idle one here races the public proxy handing it out.
                pool.target -= 1
                pool.changed_at = now
            self._fill(pool)
        self._notify()

    def _fill(self, pool: _Pool) -> None:
        """
        Dial what ``pool`` lacks with spare tokens; when it still lacks some, or fewer
        than half the spares it keeps are left, ask for what it lacks plus spares up to
        :data:`SPARES_PER_CONNECTION` times ``target``, ``spares`` or the demand
        (:meth:`_Pool.demand`), whichever is most (within the public proxy's default cap
        on unused tokens,
        :func:`~epsproxy.proxy.pooling.token_cap`), unless a request is out or it backs
        off (failed dials back off the dials too, :meth:`_failed`).  The spares make a
        replacement a dial, not a call through two endpoint servers: one
        ``requestPoolTokens`` serves about half the spares' worth of replacements (it
        asks for at most :data:`~epsproxy.proxy.pooling.MAX_TOKENS_PER_REQUEST`).
        """
        if self._stopped or pool.closed:
            return
        now = self.reactor.seconds()
        if now < pool.dial_at:
            return  # backing off failed dials: no dial, not even with a spare
        spare = pool.spare
        while spare and spare[0][2] <= now:
            spare.popleft()  # expired (this runs per served client: no full scan)
        missing = pool.target - len(pool.idle) - len(pool.connecting)
        while missing > 0 and spare:
            token, endpoint, _ = spare.popleft()  # the soonest to expire first
            self._connect(pool, endpoint, token)
            missing -= 1
        if pool.requesting is not None or now < pool.retry_at:
            return
        # Spares: twice the target, at least ``self.spares``, within the public proxy's
        # default cap on an operator's unused tokens (the tokens of connections still
        # being dialled count there too; a request over it would get no token at all).
        # A busy pool keeps one token life's worth of spares (its demand), so that its
        # calls come about twice per token life however many clients it serves, not once
        # per half the floor of spares.
        spares = (min(max(SPARES_PER_CONNECTION * pool.target, self.spares,
                          pool.demand(now)),
                      max(token_cap(DEFAULT_POOL_CAP) - pool.target, 0))
                  if pool.keep_spares else 0)
        if pool.spare_limit is not None:
            if now < pool.spare_limit_until:
                # The public proxy lets us hold no more (an older version, or a lower
                # pool_max_per_operator there): what it gave is the spares to keep, or
                # every replacement would make a call for the one token it frees.
                spares = min(spares, pool.spare_limit)
            else:
                pool.spare_limit = None  # ask for the full number again, once a while
        if missing <= 0 and 2 * len(pool.spare) >= spares:
            return  # enough in hand: ask again once fewer than half the spares are left
        wanted = max(missing, 0) + spares - len(pool.spare)
        if wanted <= 0:
            return
        count = min(wanted, pool.max_request)
        self.requests += 1
        d = pool.requesting = self.client.call(
            f"{pool.proxy}.{REQUEST_POOL_TOKENS}", {"count": count}, id=random_id(),
            timeout=self.call_timeout,
        )
        d.addBoth(self._got_tokens, pool, count, now)

    def _got_tokens(self, result: Any, pool: _Pool, count: int, asked_at: float) -> None:
        pool.requesting = None
        if isinstance(result, Failure):
            if result.check(defer.CancelledError) or pool.closed:
                return
            error = result.value
            lower = [most for most in EARLIER_MAX_TOKENS_PER_REQUEST if most < count]
            if isinstance(error, JSONRPCError) and error.code == INVALID_PARAMS and lower:
                # A public proxy of an older version (at most 256, or 64, tokens per
                # call): ask it for the next smaller number from now on, at once.
                pool.max_request = lower[0]
                log.info("the public proxy {proxy} refused {count} pool tokens in one call "
                         "(an older version): asking for at most {most} per call",
                         proxy=shorten(pool.proxy), count=count, most=lower[0])
                self._fill(pool)
                return
            self.request_failures += 1
            self._failed(pool, f"requestPoolTokens failed: {result.getErrorMessage()}")
            return
        if pool.closed:
            return
        try:
            value = POOL_TOKENS_RESULT.validate(result)
            tokens = [decode_token(text) for text in value["tokens"]]
            if len(tokens) > count:
                raise ValueError(f"{len(tokens)} tokens for {count} asked")
            host, _ = parse_host_port(value["endpoint"])
            if not host:
                raise ValueError("endpoint has no host")
        except ValueError as e:
            self.bad_results += 1
            self._failed(pool, f"bad requestPoolTokens result: {e}")
            return
        if pool.failing is not None:
            log.info("the connection pool at {proxy} is filled again", proxy=shorten(pool.proxy))
        pool.failing, pool.backoff = None, 0.0
        if len(tokens) < count:
            # At its cap on our unused tokens: keep as spares what we will hold now.
            missing = max(pool.target - len(pool.idle) - len(pool.connecting), 0)
            pool.spare_limit = len(pool.spare) + max(len(tokens) - missing, 0)
            pool.spare_limit_until = self.reactor.seconds() + SPARE_LIMIT_SECONDS
        if not tokens:  # the public proxy is at its cap for us: ask again later
            pool.retry_at = self.reactor.seconds() + BACKOFF_START
            return
        # Fresh tokens are dialled at once for what the pool lacks, however short they
        # live; the rest are spares, used until SPARE_MARGIN before the public proxy
        # forgets them (tokens living no longer than that are not kept, nor asked for).
        # Their life counts from when they were asked for: the public proxy made them
        # after that, and the answer may have taken seconds through two endpoint servers
        # under load (counted from its arrival, spares were dialled after the public
        # proxy had forgotten them: a soak run found a dozen such dials in 10 minutes).
        life = value["expires_in"] - SPARE_MARGIN
        pool.keep_spares = life > 0
        pool.life = max(life, 0.0)
        endpoint, until = value["endpoint"], asked_at + life
        missing = max(pool.target - len(pool.idle) - len(pool.connecting), 0)
        for token in tokens[:missing]:
            self._connect(pool, endpoint, token)
        if pool.spare and pool.spare[-1][2] > until:
            # Shorter-lived than tokens in hand (the public proxy's expiry was lowered):
            # keep the soonest to expire first.
            pool.spare = deque(sorted([*pool.spare, *((t, endpoint, until)
                                                      for t in tokens[missing:])],
                                      key=lambda spare: spare[2]))
        else:
            pool.spare.extend((token, endpoint, until) for token in tokens[missing:])
        self._fill(pool)
        self._notify()

    def _replace(self, pool: _Pool) -> None:
        """
        A pooled connection of ``pool`` was taken: top the pool up at once when fewer
        than :data:`REPLACE_LATER_FROM` idle ones are left, else in
        :data:`REPLACE_DELAY` seconds (one timer per pool: it tops up whatever is missing
        then), off the path of the connection that was just taken.
        """
        if len(pool.idle) < REPLACE_LATER_FROM:
            self._fill(pool)
            return
        call = pool.replace_call
        if call is None or not call.active():
            pool.replace_call = self.reactor.callLater(REPLACE_DELAY, self._replaced, pool)

    def _replaced(self, pool: _Pool) -> None:
        pool.replace_call = None
        self._top_up(pool)

    def _top_up(self, pool: _Pool) -> None:
        """Top ``pool`` up: its replacement timer ran, or a served client is set up
        (:meth:`_header`)."""
        try:
            self._fill(pool)
            self._notify()
        except Exception:
            log.failure("topping up the connection pool at {proxy} failed",
                        proxy=shorten(pool.proxy))

    def _failed(self, pool: _Pool, reason: str, *, dials: bool = False) -> None:
        """
        Back ``pool`` off: its calls, and its dials too when ``dials`` (the public
        proxy's endpoint failed them); log when the reason changes.
        """
        pool.backoff = min(max(BACKOFF_START, pool.backoff * 2), BACKOFF_MAX)
        pool.retry_at = self.reactor.seconds() + pool.backoff
        if dials:
            pool.dial_at = pool.retry_at
        if reason != pool.failing:
            pool.failing = reason
            log.warn("cannot fill the connection pool at {proxy}: {reason} (retrying, "
                     "{backoff:g} s to {most:g} s apart)", proxy=shorten(pool.proxy),
                     reason=shorten(reason, 300), backoff=pool.backoff, most=BACKOFF_MAX)

    def _connect(self, pool: _Pool, endpoint: str, token: bytes) -> None:
        conn = _Pooled(self, pool, token)
        pool.connecting.add(conn)
        d = self._dial(endpoint, conn)
        if not d.called:  # connected at once (loopback): nothing left to cancel
            conn.dialling = d

        def failed(failure: Failure) -> None:
            if pool.forget(conn) is None:
                return  # closed meanwhile
            if failure.check(defer.CancelledError):
                return
            self._count("connect_failed")
            self._failed(pool, f"cannot connect to {endpoint}: {failure.getErrorMessage()}",
                         dials=True)
            self._notify()

        d.addErrback(failed)

    def _dial_tcp(self, address: str, protocol: Dialled) -> Deferred[Any]:
        host, port = parse_host_port(address)
        return dial(self.reactor, host, port, self.connect_timeout, protocol)

    # -- events of pooled connections -------------------------------------------------

    def _connected(self, conn: _Pooled) -> None:
        pool = conn.pool
        if pool.forget(conn) is None or pool.closed or self._stopped:
            conn.close()
            return
        conn.connected_at = self.reactor.seconds()
        pool.idle.add(conn)
        self._notify()

    def _taken(self, conn: _Pooled) -> None:
        """The first byte of a header: no longer idle; a replacement is asked for."""
        pool = conn.pool
        if pool.forget(conn) is None:
            return
        pool.reading.add(conn)
        conn.deadline = self.reactor.callLater(
            self.header_timeout, self._refuse, conn, "header_timeout",
            f"no whole header within {self.header_timeout:g} s")
        self._replace(pool)
        self._notify()

    def _header(self, conn: _Pooled, header: ProxyHeader) -> None:
        pool = conn.pool
        if pool.forget(conn) is None:
            return
        pool.taken.append(self.reactor.seconds())
        if conn.deadline is not None and conn.deadline.active():
            conn.deadline.cancel()
        try:
            domain = header.authority
        except ProxyHeaderError as e:
            self._refuse(conn, "bad_header", str(e))
            return
        if domain is None:
            self._refuse(conn, "bad_header", "the header names no server")
            return
        if not self.announcements.is_live(domain, pool.proxy):
            self._refuse(conn, "not_announced", f"{shorten(domain)} is not announced there")
            return
        if self.forwarder.busy:
            self._refuse(conn, "busy", "max_connections are being forwarded")
            return
        if not self.forwarder.admits(header.source):
            self._refuse(conn, "client_limit",
                         "max_connections_per_client are being forwarded for its client")
            return
        conn.finished = True
        self.served += 1
        pool.young_deaths = 0
        client = getattr(header.source, "host", None)
        if debug_enabled():
            log.debug("serving pooled connection {tag} from {proxy} for {domain}, client "
                      "{client}", tag=conn.tag, proxy=shorten(pool.proxy), domain=domain,
                      client=truncate_ip(client) if client else "unknown")
        set_up = self.forwarder.serve_pooled(conn, header, conn.tag)
        if (set_up.called or self.forwarder.setting_up > 1
                or len(pool.idle) < REPLACE_LATER_FROM):
            self._replace(pool)
        else:
            # The only client being set up (a TLS handshake here, a dial to a distant
            # internal server): its replacement waits until it is, off its path.
            set_up.addBoth(lambda _: self._top_up(pool))
        self._notify()

    def _refuse(self, conn: _Pooled, reason: str, detail: str) -> None:
        """Close one pooled connection for ``reason``; the others go on."""
        if conn.finished:
            return
        log.warn("closed pooled connection {tag} from {proxy}: {detail}", tag=conn.tag,
                 proxy=shorten(conn.pool.proxy), detail=shorten(detail, 200))
        self._close(conn, reason)
        self._fill(conn.pool)
        self._notify()

    def _lost(self, conn: _Pooled) -> None:
        pool = conn.pool
        if conn.deadline is not None and conn.deadline.active():
            conn.deadline.cancel()
        was = pool.forget(conn)
        if was is None or conn.finished:
            return
        conn.finished = True
        if was == "reading":
            self._count("truncated")
        else:
            self._count("died")
            self.replaced += 1
            if self.reactor.seconds() - conn.connected_at < YOUNG_SECONDS:
                pool.young_deaths += 1
                if pool.young_deaths > max(pool.target, 1):
                    pool.young_deaths = 0
                    self._failed(pool, "the public proxy closes pooled connections at once",
                                 dials=True)
        self._fill(pool)
        self._notify()

    def _close(self, conn: _Pooled, reason: str) -> None:
        conn.finished = True
        conn.pool.forget(conn)
        if conn.deadline is not None and conn.deadline.active():
            conn.deadline.cancel()
        self._count(reason)
        conn.close()

    def _close_pool(self, proxy: str, reason: str) -> None:
        pool = self.pools.pop(proxy)
        pool.closed = True
        if pool.replace_call is not None and pool.replace_call.active():
            pool.replace_call.cancel()
        pool.replace_call = None
        pool.spare.clear()
        if pool.requesting is not None:
            pool.requesting.cancel()
        for conn in pool.members():
            self._close(conn, reason)
        self._notify()

    def _count(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1

    def _notify(self) -> None:
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        for proxy, count, d in waiting:
            pool = self.pools.get(proxy)
            if (len(pool.idle) if pool is not None else 0) == count:
                d.callback(None)
            else:
                self._waiting.append((proxy, count, d))
