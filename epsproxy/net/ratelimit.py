"""
Connection rate limiting for listeners (SPEC §16).

A :class:`RateLimiter` counts accepted connections per peer in fixed calendar windows
(whole UTC seconds, minutes or hours, from ``clock.seconds()``); a peer over a limit is
closed straight after accept, with nothing read or written.  :func:`rate_limited` wraps a
protocol factory with one.

Differences from the reference, on purpose:

- IPv6 peers are counted per /64 (SPEC §23.1 #11: one host usually owns a whole /64 and
  could rotate through it); IPv4-mapped IPv6 addresses count as their IPv4 address.
- The number of distinct peers counted per window is capped (``max_keys``, 100 000 by
  default) so a flood from many addresses cannot grow memory without bound.  When the
  cap is reached, *new* peers are refused until the window turns; peers already counted
  keep their normal allowance.
- Refusals are counted (:attr:`RateLimiter.refused`, and an ``on_refused`` callback for
  metrics) and logged at most once per ``log_interval`` with the peer address truncated.
- A connection that proves legitimate can be taken back (:meth:`RateLimiter.forgive`), so
  a limit can count only the failing ones (the public proxy's internal endpoint does).
- The limits can be replaced while the listener runs (:meth:`RateLimiter.reconfigure`, on
  a settings reload): the next connection is counted against the new limits, and a window
  whose type is kept keeps its counts.

Put the limiter in front of TLS so refused peers cost no handshake: the endpoints of
:mod:`epsproxy.net.tls` do that by themselves when given a :class:`RateLimitedFactory`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.interfaces import (
    IAddress,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from zope.interface import implementer

from epsproxy.net.hostport import peer_key, truncate_ip
from epsproxy.rules import forms

__all__ = [
    "TCP_RATE_LIMITS",
    "WINDOWS",
    "RateLimiter",
    "RateLimitedFactory",
    "rate_limited",
]

log = Logger()

WINDOWS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600}
"""Window lengths in seconds; the epoch is midnight UTC, so windows are UTC-aligned."""

TCP_RATE_LIMITS = forms.List(
    forms.Map(
        {
            "type": forms.Required(forms.String(choices=WINDOWS)),
            "limit": forms.Required(forms.Integer(min=1)),
        },
        strict=True,
    )
)
"""The ``tcp_rate_limits`` settings value: a list of ``{type, limit}``."""

DEFAULT_MAX_KEYS = 100_000
DEFAULT_LOG_INTERVAL = 60.0


class _Window:
    """The counters of one limit in its current window."""

    __slots__ = ("length", "limit", "type", "window", "counts")

    def __init__(self, type: str, limit: int) -> None:
        self.type = type
        self.length = WINDOWS[type]
        self.limit = limit
        self.window = -1
        self.counts: dict[str, int] = {}


class RateLimiter:
    """
    Counts connections per peer against ``limits`` (validated ``TCP_RATE_LIMITS``), in
    the order given: when a later limit refuses, earlier ones have already counted the
    attempt (SPEC §16).

    ``refused`` is the number of refused connections so far; ``on_refused(reason)`` is
    called for each, with ``reason`` the limit type or ``"peer_cap"``.
    """

    def __init__(
        self,
        limits: Iterable[dict[str, Any]],
        clock: IReactorTime,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        on_refused: Callable[[str], None] | None = None,
        log_interval: float = DEFAULT_LOG_INTERVAL,
    ) -> None:
        self._windows = [_Window(rl["type"], rl["limit"]) for rl in TCP_RATE_LIMITS(list(limits))]
        self._clock = clock
        self.max_keys = max_keys
        self.on_refused = on_refused
        self.refused = 0
        self._log_interval = log_interval
        self._last_log: float | None = None
        self._unlogged = 0

    @property
    def limits(self) -> list[dict[str, Any]]:
        """The limits in force, as ``TCP_RATE_LIMITS`` items."""
        return [{"type": w.type, "limit": w.limit} for w in self._windows]

    def reconfigure(self, limits: Iterable[dict[str, Any]]) -> None:
        """
        Count against ``limits`` (``TCP_RATE_LIMITS`` items, validated here) from the next
        connection on.  A limit whose window type was already limited keeps that window
        and its counts (with the new number), so a reload never hands every peer a fresh
        allowance; windows of types no longer listed are dropped.  Raises
        :class:`epsproxy.rules.forms.FormError` on invalid limits, changing nothing.
        """
        rules = TCP_RATE_LIMITS(list(limits))
        unused = list(self._windows)
        windows: list[_Window] = []
        for rule in rules:
            kept = next((w for w in unused if w.type == rule["type"]), None)
            if kept is None:
                kept = _Window(rule["type"], rule["limit"])
            else:
                unused.remove(kept)
                kept.limit = rule["limit"]
            windows.append(kept)
        self._windows = windows

    def allow(self, address: IAddress | Any) -> bool:
        """Count a connection from ``address``; False if it must be refused."""
        if not self._windows:
            return True
        key = peer_key(address)
        now = self._clock.seconds()
        for w in self._windows:
            window = int(now // w.length)
            if window != w.window:
                w.window = window
                w.counts = {}
            count = w.counts.get(key)
            if count is None:
                if len(w.counts) >= self.max_keys:
                    self._refuse(key, "peer_cap", now)
                    return False
                count = 0
            if count >= w.limit:
                self._refuse(key, w.type, now)
                return False
            w.counts[key] = count + 1
        return True

    def forgive(self, address: IAddress | Any) -> None:
        """
        Take back one connection counted for ``address`` in the current windows: it proved
        to be legitimate (e.g. it presented a token this proxy made), so it should not use
        up its peer's allowance.  A private proxy or an endpoint server then relays any
        number of brokered connections from one address, while a peer that keeps failing
        is still limited.
        """
        if not self._windows:
            return
        key = peer_key(address)
        now = self._clock.seconds()
        for w in self._windows:
            if w.window != int(now // w.length):
                continue  # counted in a window that has passed: nothing left to take back
            count = w.counts.get(key)
            if count is not None and count > 0:
                w.counts[key] = count - 1

    def _refuse(self, key: str, reason: str, now: float) -> None:
        self.refused += 1
        self._unlogged += 1
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                log.failure("rate limit refusal callback failed")
        if self._last_log is None or now - self._last_log >= self._log_interval:
            log.warn(
                "rate limit: refused {count} connection(s); latest from {peer}"
                " (limit per {reason})",
                count=self._unlogged,
                peer=truncate_ip(key),
                reason=reason,
            )
            self._last_log = now
            self._unlogged = 0

    def wrap(self, factory: IProtocolFactory) -> RateLimitedFactory:
        """A factory that consults this limiter before ``factory`` builds a protocol."""
        return RateLimitedFactory(factory, self)


@implementer(IProtocolFactory, ILoggingContext)
class RateLimitedFactory:
    """
    Builds protocols with ``wrappedFactory`` for allowed peers and returns None for
    refused ones, which makes the listening port close the new socket at once.  It adds
    no wrapper around the protocols it lets through.
    """

    def __init__(self, wrappedFactory: IProtocolFactory, limiter: RateLimiter) -> None:
        self.wrappedFactory = wrappedFactory
        self.limiter = limiter

    @property
    def refused(self) -> int:
        """Connections refused so far by the limiter."""
        return self.limiter.refused

    def rewrap(self, factory: IProtocolFactory) -> RateLimitedFactory:
        """The same limiter (shared counters) in front of another factory."""
        return RateLimitedFactory(factory, self.limiter)

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        """The wrapped factory's protocol, or None to close a refused connection."""
        if not self.limiter.allow(addr):
            return None
        return self.wrappedFactory.buildProtocol(addr)

    def doStart(self) -> None:
        """Start the wrapped factory."""
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        """Stop the wrapped factory."""
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        """The wrapped factory's log prefix."""
        if ILoggingContext.providedBy(self.wrappedFactory):
            return self.wrappedFactory.logPrefix()
        return self.wrappedFactory.__class__.__name__


def rate_limited(
    factory: IProtocolFactory,
    limits: list[dict[str, Any]],
    clock: IReactorTime,
    *,
    max_keys: int = DEFAULT_MAX_KEYS,
    on_refused: Callable[[str], None] | None = None,
) -> RateLimitedFactory:
    """
    ``factory`` behind a new :class:`RateLimiter` for ``limits`` (``TCP_RATE_LIMITS``
    items), timed by ``clock`` (the reactor).  Pass the result to a plain TCP endpoint or
    to an endpoint of :func:`epsproxy.net.tls.listen_endpoint`, which keeps it outside TLS.
    """
    return RateLimiter(limits, clock, max_keys=max_keys, on_refused=on_refused).wrap(factory)
