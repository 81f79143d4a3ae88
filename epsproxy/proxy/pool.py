"""
The public proxy's pool of pre-dialled connections, per operator (issue 14; what both
proxies agree on is :mod:`epsproxy.proxy.pooling`).

:class:`ConnectionPool` hands out pool tokens to an operator that holds live
announcements (:meth:`~ConnectionPool.issue`, served as ``requestPoolTokens``), takes
over the connections that present them at the internal endpoint
(:meth:`~ConnectionPool.adopt`, offered by :class:`~epsproxy.proxy.rendezvous_server.
Rendezvous` for every token that is not one of its pairings), keeps them idle, and gives
one to the SNI front for a new client of that operator (:meth:`~ConnectionPool.take`).

The rules that keep it safe:

- a token is single-use and expires ``token_lifetime`` seconds after it was issued;
  an unknown, used or expired token is not the pool's (the rendezvous refuses it);
- idle connections of one operator never exceed ``max_per_operator`` (a connection
  presenting a token over it is closed, ``over_cap``; 0: no pool, nothing is issued), so
  the pool cannot be used to exhaust the proxy's file descriptors, and its unexpired
  tokens never exceed :func:`~epsproxy.proxy.pooling.token_cap` of it (tokens hold no
  descriptor; more of them make a private proxy's calls rarer);
- an idle connection must stay silent: bytes after its token, or any byte while idle,
  close it (``bytes_while_idle``);
- the sweep (every ``sweep_interval`` seconds, :meth:`~ConnectionPool.start`) closes the
  idle connections of an operator that holds no live announcement any more
  (``announcement_expired``), those idle for longer than ``idle_timeout`` (``idle_timeout``;
  the private proxy replaces them) and forgets expired tokens.

Everything is driven by the clock passed in and by the thin protocol
:class:`PooledConnection`; nothing here opens a socket.  Tokens are secrets: logs carry
only :func:`~epsproxy.net.token.token_tag`.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net.logs import debug_enabled
from epsproxy.net.token import new_token, new_tokens, token_tag

from .pooling import DEFAULT_POOL_CAP, keep_alive, token_cap
from .splice import abort, retarget

__all__ = [
    "CLOSE_REASONS",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_PER_OPERATOR",
    "ConnectionPool",
    "PooledConnection",
]

log = Logger()

#: Default cap of idle connections per operator (and of unexpired tokens: token_cap of it).
DEFAULT_MAX_PER_OPERATOR = DEFAULT_POOL_CAP
#: Default seconds an idle pooled connection is kept before it is closed.
DEFAULT_IDLE_TIMEOUT = 300.0

#: Why the pool closes (or loses) an idle connection: the labels of its counter.
CLOSE_REASONS = ("bytes_while_idle", "announcement_expired", "idle_timeout", "over_cap",
                 "lost", "shutdown")



class PooledConnection(Protocol):
    """
    An idle pooled connection: any byte or its loss is reported to the pool.  Not
    half-closeable: an end-of-stream while idle is the connection's loss.
    """

    def __init__(self, pool: ConnectionPool, operator: str, since: float) -> None:
        self.pool = pool
        self.operator = operator
        self.since = since
        self.state = "idle"  # -> "in_use" (taken) or "closed"
        self.lost: defer.Deferred[None] | None = None  # made by close_all

    def dataReceived(self, data: bytes) -> None:
        self.pool._bytes_while_idle(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.pool._lost(self)


class _Operator:
    """One operator's part of the pool."""

    __slots__ = ("idle", "in_use", "tokens")

    def __init__(self) -> None:
        self.idle: dict[PooledConnection, None] = {}  # oldest first
        self.in_use: set[PooledConnection] = set()
        self.tokens: dict[bytes, float] = {}  # token -> expiry

    def empty(self) -> bool:
        return not (self.idle or self.in_use or self.tokens)


class ConnectionPool:
    """
    Idle pooled connections and pool tokens per operator (see the module docstring).

    ``holds_live(operator)`` says whether the operator holds any live announcement at
    this proxy.  Counters since start: ``issued`` (tokens), ``adopted`` (connections
    that became idle), ``hits`` and ``misses`` (:meth:`take`), ``closed`` (per reason of
    :data:`CLOSE_REASONS`).
    """

    def __init__(
        self,
        clock: IReactorTime,
        holds_live: Callable[[str], bool],
        *,
        token_lifetime: float,
        max_per_operator: int = DEFAULT_MAX_PER_OPERATOR,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        sweep_interval: float = 1.0,
        keep_alive: Callable[[Any], None] | None = keep_alive,
    ) -> None:
        if token_lifetime <= 0 or max_per_operator < 0 or idle_timeout <= 0:
            raise ValueError("token_lifetime and idle_timeout must be positive, "
                             "max_per_operator not negative")
        self.clock = clock
        self.holds_live = holds_live
        self.token_lifetime = token_lifetime
        self.max_per_operator = max_per_operator
        self.idle_timeout = idle_timeout
        self.sweep_interval = sweep_interval
        #: Turns on TCP keepalive on an adopted connection's transport; None when its
        #: listener's sockets have it already (the public proxy's internal listener).
        self._keep_alive = keep_alive
        self._operators: dict[str, _Operator] = {}
        self._tokens: dict[bytes, str] = {}  # token -> operator
        self._waiters: list[tuple[str, int, defer.Deferred[None]]] = []
        self._sweeper: LoopingCall | None = None
        self.issued = 0
        self.adopted = 0
        self.hits = 0
        self.misses = 0
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)

    # -- tokens

    def issue(self, operator: str, count: int) -> list[bytes]:
        """
        Up to ``count`` fresh single-use pool tokens for ``operator``, each expiring
        ``token_lifetime`` seconds from now; fewer (even none) when its unexpired tokens
        reach :func:`~epsproxy.proxy.pooling.token_cap` of ``max_per_operator``, none
        while its idle connections are at ``max_per_operator``.
        """
        op = self._operators.get(operator)
        now = self.clock.seconds()
        if op is not None:
            self._forget_expired(op, now)
            if len(op.idle) >= self.max_per_operator:
                return []
            held = len(op.tokens)
        else:
            held = 0
        room = max(0, min(count, token_cap(self.max_per_operator) - held))
        if room == 0:
            return []
        if op is None:
            op = self._operators[operator] = _Operator()
        tokens = []
        expires = now + self.token_lifetime
        for token in new_tokens(room):
            while token in self._tokens:  # pragma: no cover - 2**-256
                token = new_token()
            self._tokens[token] = operator
            op.tokens[token] = expires
            tokens.append(token)
        self.issued += room
        log.debug("issued {count} pool token(s) to {operator}", count=room, operator=operator)
        return tokens

    def adopt(self, connection: IProtocol, token: bytes, rest: bytes) -> bool:
        """
        Whether ``token`` is a live pool token.  If it is, it is spent and the pool takes
        ``connection`` (a connected protocol) over: idle in its operator's pool, or closed
        at once when ``rest`` (bytes after the token) is not empty, the operator holds
        no live announcement any more, or its idle connections are at
        ``max_per_operator``.  If not, nothing changes.
        """
        operator = self._tokens.pop(token, None)
        if operator is None:
            return False
        op = self._operators[operator]
        expires = op.tokens.pop(token)
        now = self.clock.seconds()
        if expires <= now:
            self._tidy(operator, op)
            return False
        transport = connection.transport  # type: ignore[attr-defined]  # not in IProtocol
        pooled = PooledConnection(self, operator, now)
        retarget(transport, connection, pooled)
        if rest:
            self._close(pooled, "bytes_while_idle")
            self._tidy(operator, op)
            return True
        if not self.holds_live(operator):
            self._close(pooled, "announcement_expired")
            self._tidy(operator, op)
            return True
        if len(op.idle) >= self.max_per_operator:
            self._close(pooled, "over_cap")
            self._tidy(operator, op)
            return True
        if self._keep_alive is not None:
            self._keep_alive(transport)
        op.idle[pooled] = None
        self.adopted += 1
        if debug_enabled():
            log.debug("pooled a connection of {operator} (token {tag}); {idle} idle",
                      operator=operator, tag=token_tag(token), idle=len(op.idle))
        self._wake(operator, len(op.idle))
        return True

    # -- connections

    def take(self, operator: str) -> PooledConnection | None:
        """
        The oldest idle connection of ``operator`` (now in use: call :meth:`release`
        when its splice ends), or None.  Counted as a hit or a miss.
        """
        op = self._operators.get(operator)
        if op is None or not op.idle:
            self.misses += 1
            return None
        connection = next(iter(op.idle))
        del op.idle[connection]
        op.in_use.add(connection)
        connection.state = "in_use"
        self.hits += 1
        return connection

    def release(self, connection: PooledConnection) -> None:
        """A connection given by :meth:`take` is no longer in use (its splice ended)."""
        op = self._operators.get(connection.operator)
        if op is not None:
            op.in_use.discard(connection)
            self._tidy(connection.operator, op)
        connection.state = "closed"

    def when_idle(self, operator: str, count: int) -> defer.Deferred[None]:
        """Fires once ``operator`` has at least ``count`` idle connections."""
        if self.idle(operator) >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((operator, count, d))
        return d

    def idle(self, operator: str) -> int:
        """Idle connections of ``operator``."""
        op = self._operators.get(operator)
        return 0 if op is None else len(op.idle)

    def state(self) -> dict[str, dict[str, int]]:
        """``{operator: {"idle": n, "in_use": n, "tokens": n}}`` (unexpired tokens)."""
        now = self.clock.seconds()
        return {
            operator: {"idle": len(op.idle), "in_use": len(op.in_use),
                       "tokens": sum(1 for e in op.tokens.values() if e > now)}
            for operator, op in sorted(self._operators.items())
        }

    # -- sweep and shutdown

    def start(self) -> None:
        """Sweep every ``sweep_interval`` seconds (until :meth:`stop`)."""
        if self._sweeper is not None:
            return
        self._sweeper = LoopingCall(self._sweep_logged)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.sweep_interval, now=False)

    def stop(self) -> None:
        """Stop sweeping."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.running:
            sweeper.stop()

    def sweep(self) -> None:
        """
        Close the idle connections of operators without a live announcement and those
        idle for ``idle_timeout``; forget expired tokens.
        """
        now = self.clock.seconds()
        for operator, op in list(self._operators.items()):
            self._forget_expired(op, now)
            if (op.idle or op.tokens) and not self.holds_live(operator):
                if op.idle:
                    log.info("closing {count} idle pooled connection(s) of {operator}: it "
                             "holds no live announcement", count=len(op.idle),
                             operator=operator)
                for connection in list(op.idle):
                    self._close(connection, "announcement_expired")
                for token in op.tokens:
                    self._tokens.pop(token, None)
                op.tokens.clear()
            for connection in list(op.idle):
                if now - connection.since < self.idle_timeout:
                    break  # oldest first: the rest are younger
                self._close(connection, "idle_timeout")
            self._tidy(operator, op)

    def close_all(self) -> defer.Deferred[None]:
        """Shutdown: stop sweeping, forget every token, close every idle connection."""
        self.stop()
        waits: list[defer.Deferred[None]] = []
        self._tokens.clear()
        for operator, op in list(self._operators.items()):
            op.tokens.clear()
            for connection in list(op.idle):
                connection.lost = defer.Deferred()
                waits.append(connection.lost)
                self._close(connection, "shutdown")
            self._tidy(operator, op)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- internals

    def _sweep_logged(self) -> None:
        try:
            self.sweep()
        except Exception:
            log.failure("the connection pool's sweep failed")

    def _forget_expired(self, op: _Operator, now: float) -> None:
        expired = [token for token, expires in op.tokens.items() if expires <= now]
        for token in expired:
            del op.tokens[token]
            self._tokens.pop(token, None)

    def _tidy(self, operator: str, op: _Operator) -> None:
        if op.empty() and self._operators.get(operator) is op:
            del self._operators[operator]

    def _close(self, connection: PooledConnection, reason: str) -> None:
        op = self._operators.get(connection.operator)
        if op is not None:
            op.idle.pop(connection, None)
            self._tidy(connection.operator, op)
        connection.state = "closed"
        self.closed[reason] += 1
        if reason == "bytes_while_idle":
            log.info("closed a pooled connection of {operator}: it sent bytes while idle",
                     operator=connection.operator)
        transport = connection.transport
        if transport is not None:
            abort(transport)

    def _bytes_while_idle(self, connection: PooledConnection) -> None:
        if connection.state != "idle":
            return  # closing: whatever still arrives is dropped
        self._close(connection, "bytes_while_idle")

    def _lost(self, connection: PooledConnection) -> None:
        if connection.state == "idle":
            self.closed["lost"] += 1
            op = self._operators.get(connection.operator)
            if op is not None:
                op.idle.pop(connection, None)
                self._tidy(connection.operator, op)
            log.debug("an idle pooled connection of {operator} was lost",
                      operator=connection.operator)
        connection.state = "closed"
        if connection.lost is not None:
            d, connection.lost = connection.lost, None
            d.callback(None)

    def _wake(self, operator: str, idle: int) -> None:
        ready = [w for w in self._waiters if w[0] == operator and w[1] <= idle]
        if not ready:
            return
        self._waiters = [w for w in self._waiters if not (w[0] == operator and w[1] <= idle)]
        for _, _, d in ready:
            d.callback(None)
