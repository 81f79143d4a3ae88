"""
Connection caps for listeners, a process-wide cap, and the descriptor headroom they keep.

A listener that accepts whatever arrives runs out of file descriptors under a flood of
slow connections from many addresses, and then ``accept()`` fails with ``EMFILE`` for
everyone: the node's operators and peers too.  As HAProxy does (``maxconn`` per frontend
and global, the kernel backlog as the queue beyond it), a listener here *stops accepting*
at its cap and resumes once a connection below it closes; the connections beyond wait in
the backlog (or time out there) and cost the process nothing.

- :class:`ProcessBudget` is the process-wide cap: the soft ``RLIMIT_NOFILE`` minus
  :func:`reserved_for` descriptors, kept for what must work while public listeners are
  full (established peer links, the node's own outgoing dials, its store, the metrics
  listener, log files).  Those are never counted, so they always find descriptors.
  :data:`PROCESS` is the process's budget (a process has one descriptor table).
- :class:`Admission` is one listener's cap, sans-IO: connections in, ``accept`` or
  ``refuse`` and pause/resume out (through the :class:`Gate` it is attached to).  It
  also caps concurrent connections per client address (an IPv6 client per /64, as the
  rate limits count them), so that one address cannot hold the whole cap; a connection
  over it is closed at once.
- :class:`AdmissionEndpoint` is the thin part: a TCP listener whose port asks the
  admission before each ``accept()`` and stops reading its socket at the cap.
- :func:`raise_descriptor_limit` lifts the soft ``RLIMIT_NOFILE`` towards the hard one at
  start (twistd does it through :mod:`epsproxy.net.program`), logging before and after.
- :class:`AdmissionCollector` exports the figures (current, cap, times the cap was
  reached, per-address refusals, accept errors such as ``EMFILE``).

Settings: :data:`LISTENER_LIMIT_FIELDS` (``max_connections``,
``max_connections_per_address``) go into each listener's settings; when left out they
are derived from the descriptor limit (:func:`default_listener_cap`,
:func:`default_per_address_cap`).
"""

from __future__ import annotations

import errno
import ipaddress
import resource
import socket
from time import monotonic
from typing import Any, Callable, Iterable, Iterator, Protocol as TypingProtocol, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet import tcp
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorFDSet,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, Logger, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.hostport import host_key, peer_key
from epsproxy.net.ratelimit import RateLimitedFactory
from epsproxy.rules import forms

__all__ = [
    "LISTENER_LIMIT_FIELDS",
    "PROCESS",
    "PROCESS_MAX_CONNECTIONS_SETTING",
    "address_in",
    "Admission",
    "AdmissionCollector",
    "AdmissionEndpoint",
    "Gate",
    "ProcessBudget",
    "default_listener_cap",
    "default_per_address_cap",
    "descriptor_limit",
    "listener_admission",
    "parse_networks",
    "raise_descriptor_limit",
    "reconfigure_from",
    "reserved_for",
]

log = Logger()

#: Fewest descriptors kept out of the process-wide cap, whatever the limit.
MIN_RESERVED = 64
#: Seconds between two log lines of one kind about one listener.
LOG_INTERVAL = 60.0
#: Highest soft limit :func:`raise_descriptor_limit` asks for when the hard one is
#: unlimited (select/poll costs and kernel memory grow with it).
MAX_RAISED_LIMIT = 1 << 20

LISTENER_LIMIT_FIELDS: dict[str, forms.Field] = {
    "max_connections": forms.Optional(
        forms.Integer(min=1),
        doc="most connections open at once on this listener; at the cap it stops "
            "accepting (new ones wait in the backlog). Default: a quarter of the "
            "process-wide cap (the descriptor limit less the reserved headroom)",
    ),
    "max_connections_per_address": forms.Optional(
        forms.Integer(min=1),
        doc="most connections open at once from one client address (IPv6: per /64); "
            "more are closed at once. Default: a quarter of max_connections (at least 8)",
    ),
}
"""The per-listener connection caps, for a listener's settings schema."""

PROCESS_MAX_CONNECTIONS_SETTING = forms.Optional(
    forms.Integer(min=1),
    doc="most connections the capped listeners of this process hold together (never "
        "more than the descriptor limit less the reserved headroom); reloaded on SIGHUP. "
        "Default: the descriptor limit less the reserve",
)
"""The top-level ``max_connections`` key every program's settings have."""


# ------------------------------------------------------------------ descriptor limits


LIMIT_CHECK_SECONDS = 1.0
"""How often, at most, a new connection has the descriptor limit read again (a system
call and some Python: every accept would pay it)."""


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` (descriptors this process may hold)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_RAISED_LIMIT if soft == resource.RLIM_INFINITY else int(soft)


def raise_descriptor_limit(ceiling: int = MAX_RAISED_LIMIT) -> tuple[int, int]:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``ceiling``); log the
    limit before and after.  Returns ``(before, after)``; never lowers it, and a refusal
    by the system is logged and leaves the limit as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(int(hard), ceiling)
    before = int(soft) if soft != resource.RLIM_INFINITY else ceiling
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the descriptor limit from {before} to {target}: {why}",
                     before=before, target=target, why=str(e))
            return before, before
    after = descriptor_limit()
    log.info("descriptor limit (RLIMIT_NOFILE): {before} before, {after} after "
             "(hard limit {hard})", before=before, after=after,
             hard="unlimited" if hard == resource.RLIM_INFINITY else hard)
    return before, after


def reserved_for(limit: int) -> int:
    """Descriptors kept out of the process-wide cap: a tenth, at least :data:`MIN_RESERVED`."""
    return max(MIN_RESERVED, limit // 10)


def default_listener_cap(process_cap: int) -> int:
    """
    A listener's default cap: a quarter of the process-wide one.  A program has at most
    three listeners that accept from outside, so floods on all of them together stay
    under the process cap and never stop the others.
    """
    return max(1, process_cap // 4)


def default_per_address_cap(listener_cap: int) -> int:
    """
    Default concurrent connections per address: a quarter of the listener's cap, at
    least 8 (many legitimate clients can share an address: a NAT, the local applications
    of a gateway), so that at least four addresses are needed to fill a listener.
    """
    return max(8, listener_cap // 4)


def parse_networks(items: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """
    Addresses and networks (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"``) parsed once;
    raises ``ValueError`` naming the first bad one.
    """
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item[:60]!r} is not an IP address or network") from None
    return tuple(networks)


def address_in(address: Any, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether ``address`` (an ``IAddress`` or host text) lies in one of ``networks``."""
    host = getattr(address, "host", address)
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


# ------------------------------------------------------------------ sans-IO caps


class Gate(TypingProtocol):
    """What an :class:`Admission` pauses and resumes: a listening port's reading."""

    def stopReading(self) -> None: ...

    def startReading(self) -> None: ...


class ProcessBudget:
    """
    The process-wide cap on connections accepted by capped listeners: ``cap`` when
    given, else the soft descriptor limit less :func:`reserved_for` it (read again at a
    new connection, at most every :data:`LIMIT_CHECK_SECONDS` of ``clock``, so a raised
    limit counts).  ``reached`` counts the times it filled up; ``accept_errors`` counts
    ``accept()`` failures by errno name (``EMFILE``...).
    """

    def __init__(self, cap: int | None = None, reserved: int | None = None,
                 clock: Callable[[], float] = monotonic) -> None:
        self._clock = clock
        self.configured_cap = cap
        self.configured_reserved = reserved
        self.setting_cap: int | None = None
        self._cap = self._compute_cap()
        self._next_check = 0.0  # when take() reads the descriptor limit again
        self.current = 0
        self.reached = 0
        self.accept_errors: dict[str, int] = {}
        self.listeners: list[Admission] = []

    @property
    def limit(self) -> int:
        """The soft descriptor limit."""
        return descriptor_limit()

    @property
    def reserved(self) -> int:
        """Descriptors left out of the cap for links, dials, the store and metrics."""
        if self.configured_reserved is not None:
            return self.configured_reserved
        return reserved_for(self.limit)

    @property
    def cap(self) -> int:
        """
        Connections the capped listeners may hold together (the limit is read again at a
        new connection, at most once every :data:`LIMIT_CHECK_SECONDS`, so a lowered or
        raised limit is followed live).
        """
        return self._cap

    def _compute_cap(self) -> int:
        if self.configured_cap is not None:
            return self.configured_cap
        limit = descriptor_limit()  # one system call
        reserved = (self.configured_reserved if self.configured_reserved is not None
                    else reserved_for(limit))
        derived = max(1, limit - reserved)
        # The settings' max_connections may lower the derived cap, never eat into the
        # reserve.
        return derived if self.setting_cap is None else min(self.setting_cap, derived)

    def configure(self, cap: int | None = None, reserved: int | None = None) -> None:
        """Set (or, with None, derive again) the cap and the reserve; listeners re-check."""
        self.configured_cap = cap
        self.configured_reserved = reserved
        self._cap = self._compute_cap()
        self._changed()

    def apply_setting(self, cap: int | None) -> None:
        """The top-level ``max_connections`` setting (None: derived from the limit alone)."""
        self.setting_cap = cap
        self._cap = self._compute_cap()
        self._changed()

    def room(self) -> int:
        return self.cap - self.current

    def take(self) -> None:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + LIMIT_CHECK_SECONDS
            self._cap = self._compute_cap()
        self.current += 1
        if self.current == self._cap:
            self.reached += 1
            log.warn("process-wide connection cap reached ({cap}): listeners stop "
                     "accepting until connections close", cap=self.cap)
            self._changed()

    def give(self) -> None:
        self.current -= 1
        for listener in self.listeners:
            if listener.paused:
                self._changed()
                return

    def accept_failed(self, name: str) -> None:
        self.accept_errors[name] = self.accept_errors.get(name, 0) + 1

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener.update()


PROCESS = ProcessBudget()
"""This process's budget (one descriptor table per process)."""


class Admission:
    """
    One listener's caps (sans-IO): at most ``max_connections`` open at once (None: the
    default from the process budget's cap), at most ``per_address`` from one client
    address (None: derived from the cap).  Addresses in ``exempt`` (networks) have no
    per-address cap (a trusted load balancer carries many clients).

    :meth:`admit` is asked before a connection is served: False means close it (over the
    per-address cap); True counts it until :meth:`release`.  When no room is left (this
    cap or the process-wide one) the attached :class:`Gate` is stopped, and started
    again when a connection closes.

    A connection that proves legitimate (a live token, a routed ClientHello: the
    protocol calls :meth:`forgive`) stops counting against its address.  With
    ``evict_after`` (seconds), a listener at its cap also closes the connections that
    have not proved themselves that long after accept (:meth:`opened` registers how to
    close one), oldest first, so that the connections waiting in the backlog get their
    slots: slow and silent clients cannot hold a full listener for the whole deadline
    of their protocol.

    Counters: ``current``, ``admitted``, ``reached`` (times the listener stopped
    accepting), ``refused_per_address``, ``evicted``.  ``clock`` (the reactor) times
    evictions and the log lines (at most one a minute per listener and kind).
    """

    def __init__(
        self,
        name: str,
        max_connections: int | None = None,
        per_address: int | None = None,
        *,
        budget: ProcessBudget = PROCESS,
        exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        evict_after: float | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as default_reactor

            clock = cast(IReactorTime, default_reactor)
        self.name = name
        self.clock = clock
        self.budget = budget
        self.configured_cap = max_connections
        self.configured_per_address = per_address
        self.exempt = tuple(exempt)
        self.evict_after = evict_after
        self.current = 0
        self.admitted = 0
        self.reached = 0
        self.refused_per_address = 0
        self.evicted = 0
        self.by_address: dict[str, int] = {}
        self._forgiven: set[tuple[Any, Any]] = set()
        self._keys: dict[tuple[Any, Any], str | None] = {}  # of the open connections
        # Connections not proved yet, oldest first: identity -> (accepted at, close).
        self._unproven: dict[tuple[Any, Any], tuple[float, Callable[[], None]]] = {}
        self._eviction: IDelayedCall | None = None
        self._logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self.gate: Gate | None = None
        self.paused = False

    @property
    def cap(self) -> int:
        """The listener's cap in force."""
        if self.configured_cap is not None:
            return self.configured_cap
        return default_listener_cap(self.budget.cap)

    @property
    def per_address(self) -> int:
        """The per-address cap in force."""
        if self.configured_per_address is not None:
            return self.configured_per_address
        return default_per_address_cap(self.cap)

    def room(self) -> int:
        """Connections that may still be accepted now (asked twice per connection: the
        cap and the budget's are read in place rather than through their properties)."""
        budget = self.budget
        cap = self.configured_cap
        if cap is None:
            cap = default_listener_cap(budget._cap)
        room = cap - self.current
        total = budget._cap - budget.current
        if total < room:
            room = total
        return room if room > 0 else 0

    def reconfigure(
        self, max_connections: int | None, per_address: int | None,
        exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
        evict_after: float | None = None,
    ) -> None:
        """New caps for the next connections (open ones are kept, even over a lower cap)."""
        self.configured_cap = max_connections
        self.configured_per_address = per_address
        if exempt is not None:
            self.exempt = tuple(exempt)
        if evict_after is not None:
            self.evict_after = evict_after
        self.update()

    def attach(self, gate: Gate) -> None:
        """Pause and resume ``gate`` from now on (and count in the process budget's list)."""
        self.gate = gate
        if self not in self.budget.listeners:
            self.budget.listeners.append(self)
        self.update()

    def detach(self) -> None:
        """The listener stopped: nothing to pause or evict any more."""
        self.gate = None
        self._cancel_eviction()
        if self in self.budget.listeners:
            self.budget.listeners.remove(self)

    def key(self, address: IAddress | Any) -> str | None:
        """The per-address key of ``address``, or None when it is exempt."""
        if self.exempt and address_in(address, self.exempt):
            return None
        host = getattr(address, "host", None)
        return host_key(host) if host.__class__ is str else peer_key(address)

    def admit(self, address: IAddress | Any) -> bool:
        """Count a new connection from ``address``; False if it must be closed."""
        key = self.key(address)
        ident = _identity(address)
        if key is not None:
            count = self.by_address.get(key, 0)
            per_address = self.configured_per_address
            if per_address is None:
                per_address = self.per_address
            if count >= per_address:
                self.refused_per_address += 1
                self._log("per_address", "listener {name}: closed {count} connection(s) over "
                          "the per-address cap ({cap})", cap=self.per_address)
                return False
            self.by_address[key] = count + 1
        self._keys[ident] = key
        self.current += 1
        self.admitted += 1
        self.budget.take()
        self.update()
        return True

    def opened(self, address: IAddress | Any, close: Callable[[], None]) -> None:
        """The admitted connection from ``address`` is open; ``close()`` evicts it."""
        if self.evict_after is not None:
            self._unproven[_identity(address)] = (self.clock.seconds(), close)

    def forgive(self, address: IAddress | Any) -> None:
        """
        The open connection from ``address`` (host and port) proved legitimate (a live
        token, a routed ClientHello): it is never evicted, and no longer counts against
        its address's cap (it keeps its slot under the listener's).  A private proxy
        relaying many clients from one address is then limited only by the listener's cap.
        """
        ident = _identity(address)
        self._unproven.pop(ident, None)
        key = self._keys.get(ident)
        if key is None or ident in self._forgiven or not self.by_address.get(key):
            return
        self._forgiven.add(ident)
        self._decrement(key)

    def _decrement(self, key: str) -> None:
        count = self.by_address.get(key, 0) - 1
        if count > 0:
            self.by_address[key] = count
        else:
            self.by_address.pop(key, None)

    def release(self, address: IAddress | Any) -> None:
        """A connection counted by :meth:`admit` closed."""
        ident = _identity(address)
        self._unproven.pop(ident, None)
        key = self._keys.pop(ident, None) if ident in self._keys else self.key(address)
        if ident in self._forgiven:
            self._forgiven.discard(ident)
        elif key is not None:
            self._decrement(key)
        self.current -= 1
        self.budget.give()
        self.update()

    def update(self) -> None:
        """Stop or start the gate as the room left says; at the cap, evict."""
        full = self.room() <= 0
        if full and not self.paused:
            self.paused = True
            self.reached += 1
            self._log("full", "listener {name} at its cap {count} time(s) ({current} open, "
                      "cap {cap}, process {total} of {total_cap}): waiting in the backlog",
                      current=self.current, cap=self.cap, total=self.budget.current,
                      total_cap=self.budget.cap)
            if self.gate is not None:
                self.gate.stopReading()
            self._evict()
        elif not full and self.paused:
            self.paused = False
            if self.gate is not None:
                self.gate.startReading()

    def _evict(self) -> None:
        self._cancel_eviction()
        if self.evict_after is None or not self._unproven:
            return
        now = self.clock.seconds()
        limit = now - self.evict_after
        victims = []
        for ident, (since, close) in self._unproven.items():
            if since > limit:
                # The oldest left: look again when it is old enough, if still full.
                self._eviction = self.clock.callLater(since - limit, self._evict_if_full)
                break
            victims.append((ident, close))
        for ident, close in victims:
            del self._unproven[ident]
            self.evicted += 1
            close()  # released when the close completes
        if victims:
            self._log("evicted", "listener {name} at its cap: closed {count} connection(s) "
                      "that proved nothing within {seconds:g}s", seconds=self.evict_after)

    def _evict_if_full(self) -> None:
        self._eviction = None
        if self.paused:
            self._evict()

    def _cancel_eviction(self) -> None:
        if self._eviction is not None and self._eviction.active():
            self._eviction.cancel()
        self._eviction = None

    def _log(self, kind: str, text: str, **fields: Any) -> None:
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = self.clock.seconds()
        last = self._logged.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self._logged[kind] = now
        count, self._unlogged[kind] = self._unlogged[kind], 0
        log.info(text, name=self.name, count=count, **fields)


def _identity(address: IAddress | Any) -> tuple[Any, Any]:
    try:  # an IPv4Address or IPv6Address (asked several times per connection)
        return (address.host, address.port)  # type: ignore[union-attr]  # or the fallback
    except AttributeError:
        return (getattr(address, "host", None), getattr(address, "port", None))


def listener_admission(
    name: str,
    settings: dict[str, Any],
    *,
    budget: ProcessBudget = PROCESS,
    prefix: str = "",
    exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    evict_after: float | None = None,
    clock: IReactorTime | None = None,
) -> Admission:
    """An :class:`Admission` for a listener from its settings' ``<prefix>max_connections*`` keys."""
    return Admission(
        name, settings.get(f"{prefix}max_connections"),
        settings.get(f"{prefix}max_connections_per_address"), budget=budget, exempt=exempt,
        evict_after=evict_after, clock=clock,
    )


def reconfigure_from(admission: Admission, settings: dict[str, Any], prefix: str = "") -> None:
    """Apply a reloaded listener's ``<prefix>max_connections*`` settings to ``admission``."""
    admission.reconfigure(settings.get(f"{prefix}max_connections"),
                          settings.get(f"{prefix}max_connections_per_address"))


# ------------------------------------------------------------------ the thin part


class _AdmittedServer(tcp.Server):
    """
    A connection of an :class:`_AdmittedPort`: tells the admission how to close it (for
    evictions) and gives its slot back when it closes.
    """

    _peer: Any = None

    def __init__(self, sock: socket.socket, protocol: IProtocol, client: tuple[object, ...],
                 server: tcp.Port, sessionno: int, reactor: IReactorFDSet,
                 peer: IAddress | None = None) -> None:
        # ``peer``: the address object the port already built for the factory (one
        # per connection, not two).
        self._peer = peer
        # tcp.Server's steps, without the log prefix and the repr text it formats for
        # every connection (made when asked: logPrefix, repr).
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1
        port: Any = server
        port.admission.opened(self.getPeer(), self.abortConnection)

    @property
    def logstr(self) -> str:  # type: ignore[override]  # tcp.Server's attribute, made when asked
        return f"{self._getLogPrefix(self.protocol)},{self.sessionno},{self.hostname}"

    @property
    def repstr(self) -> str:  # type: ignore[override]  # tcp.Server's attribute, made when asked
        port: Any = self.server
        return (f"<{self.protocol.__class__.__name__} #{self.sessionno} on "
                f"{port._realPortNumber}>")

    def getPeer(self) -> Any:
        # One address object per connection (Twisted builds one per call, validators
        # and all; the admission, the limits and the proxy each ask for it).
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def connectionLost(self, reason: Failure) -> None:
        # The slot is free before the protocol hears of the close (nothing is accepted
        # before the reactor's next turn anyway).
        port: Any = self.server
        port.admission.release(self.getPeer())
        super().connectionLost(reason)


@implementer(IProtocolFactory, ILoggingContext)
class _AdmittedFactory:
    """Asks the admission before the wrapped factory builds a protocol (None: closed)."""

    def __init__(self, wrapped: IProtocolFactory, admission: Admission) -> None:
        self.wrappedFactory = wrapped
        self.admission = admission

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if not self.admission.admit(addr):
            return None
        try:
            protocol = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            self.admission.release(addr)
            raise
        if protocol is None:
            self.admission.release(addr)
        return protocol

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        if ILoggingContext.providedBy(self.wrappedFactory):
            return str(self.wrappedFactory.logPrefix())
        return self.wrappedFactory.__class__.__name__


_ACCEPT_ERROR_FORMATS = ("EMFILE encountered", "Could not accept new connection")
_ACCEPT_ERRORS = frozenset(getattr(tcp, "_ACCEPT_ERRORS", (
    errno.EMFILE, errno.ENOBUFS, errno.ENFILE, errno.ENOMEM, errno.ECONNABORTED)))
"""accept() errors Twisted logs and moves on from (its list where it has one)."""


@implementer(ILogObserver)
class _AcceptErrors:
    """Counts accept() failures a port logs (then passes the event on)."""

    def __init__(self, budget: ProcessBudget) -> None:
        self.budget = budget

    def __call__(self, event: LogEvent) -> None:
        text = str(event.get("log_format") or "")
        if text.startswith(_ACCEPT_ERROR_FORMATS[0]):
            self.budget.accept_failed("EMFILE")
        elif text.startswith(_ACCEPT_ERROR_FORMATS[1]):
            self.budget.accept_failed(str(event.get("acceptError", "other")))
        globalLogPublisher(event)


class _AdmittedPort(tcp.Port):
    """
    A TCP port that accepts only while its admission has room: ``doRead`` accepts at
    most that many, and the admission stops and starts its reading (the rest wait in
    the kernel backlog).  ``factory`` asks the admission first (an ``_AdmittedFactory``,
    possibly behind a rate limiter).
    """

    transport = _AdmittedServer

    def __init__(self, port: int, factory: IProtocolFactory, backlog: int, interface: str,
                 reactor: Any, admission: Admission) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self.admission = admission
        self._logger = Logger(namespace=self._logger.namespace,
                              observer=_AcceptErrors(admission.budget))

    def startListening(self) -> None:
        super().startListening()
        self.admission.attach(self)

    def startReading(self) -> None:
        # The admission resumes only a port that still listens.
        if self.connected and not self.disconnecting:
            super().startReading()

    def doRead(self) -> None:
        """
        Accept at most as many connections as the admission has room for, as Twisted's
        ``Port.doRead`` does, in fewer steps per connection: the listening socket's own
        ``_accept`` (Python's ``socket.accept`` asks the family and type of the listener
        through enum conversions each time), no buffering logger and generator per
        event, and the address built once.  Any ``accept()`` error other than "no more"
        is left to Twisted's ``doRead`` (its ``EMFILE`` recovery, its logged refusals).
        """
        room = self.admission.room()
        if room <= 0:
            self.admission.update()
            self.stopReading()
            return
        accepts = max(1, min(self.numberAccepts, room))
        listener: Any = self.socket
        accept = listener._accept  # the C method under Python's socket.accept
        family = self.addressFamily
        factory: Any = self.factory
        accepted = 0
        try:
            for _ in range(accepts):  # at most that many tries, refusals included
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EPERM:
                        continue  # netfilter refused it; accept the next (as Twisted)
                    if e.errno == errno.EMFILE:
                        # Out of descriptors: Twisted's recovery (its reserved one).
                        self.numberAccepts = accepts - accepted
                        super().doRead()
                        return
                    if e.errno in _ACCEPT_ERRORS:
                        # Logged as Twisted logs it (and so counted by _AcceptErrors).
                        self._logger.info("Could not accept new connection ({acceptError})",
                                          acceptError=errno.errorcode.get(e.errno or 0, "?"))
                        break
                    raise
                accepted += 1
                skt = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                if len(addr) == 4:
                    # IPv6: the scope id in the host, as Twisted does.
                    host = socket.getnameinfo(
                        addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                peer = self._buildAddr(addr)
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    skt.close()
                    continue
                sessionno = self.sessionno
                self.sessionno = sessionno + 1
                transport = self.transport(
                    skt, protocol, addr, self, sessionno, self.reactor, peer)
                protocol.makeConnection(transport)
        except BaseException:
            log.failure("accepting on {port}", port=self.port)
        # Twisted's scaling of the accepts per event.
        self.numberAccepts = self.numberAccepts + 20 if accepted == accepts else max(1, accepted)

    def connectionLost(self, reason: Failure) -> None:
        self.admission.detach()
        super().connectionLost(reason)


@implementer(IStreamServerEndpoint)
class AdmissionEndpoint:
    """
    A TCP server endpoint (IPv4 or IPv6 by ``interface``) whose listener is capped by
    ``admission``; with a reactor that is not a real one (tests' memory reactors) it
    listens plainly.
    """

    def __init__(self, reactor: IReactorTCP, port: int, admission: Admission, *,
                 backlog: int = 50, interface: str = "") -> None:
        self.reactor = reactor
        self.port = port
        self.admission = admission
        self.backlog = backlog
        self.interface = interface

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        from twisted.internet.posixbase import PosixReactorBase

        if not isinstance(self.reactor, PosixReactorBase):
            try:
                plain: Any = protocolFactory  # any factory will do; typed narrowly
                return succeed(self.reactor.listenTCP(
                    self.port, plain, self.backlog, self.interface))
            except Exception:
                return fail()
        # Rate limits first: an attempt over them costs no slot (and is counted there).
        factory: IProtocolFactory
        if isinstance(protocolFactory, RateLimitedFactory):
            factory = protocolFactory.rewrap(
                _AdmittedFactory(protocolFactory.wrappedFactory, self.admission))
        else:
            factory = _AdmittedFactory(protocolFactory, self.admission)
        try:
            port = _AdmittedPort(self.port, factory, self.backlog, self.interface,
                                 self.reactor, self.admission)
            port.startListening()
        except Exception:
            return fail()
        return succeed(port)


# ------------------------------------------------------------------ metrics


class AdmissionCollector(Collector):
    """
    ``<prefix>_listener_connections{listener}``, ``..._max_connections{listener}``,
    ``..._cap_reached_total{listener}``, ``..._per_address_refused_total{listener}``,
    ``..._evicted_total{listener}``;
    ``<prefix>_connections`` / ``_max_connections`` / ``_cap_reached_total`` for the
    process, ``<prefix>_descriptor_limit``, ``<prefix>_reserved_descriptors`` and
    ``<prefix>_accept_errors_total{error}`` (``EMFILE`` among them, at 0 from the start).
    """

    def __init__(self, prefix: str, budget: ProcessBudget = PROCESS) -> None:
        self.prefix = prefix
        self.budget = budget

    def collect(self) -> Iterator[Any]:
        p, b = self.prefix, self.budget
        current = GaugeMetricFamily(f"{p}_listener_connections",
                                    "connections open on a capped listener", labels=["listener"])
        cap = GaugeMetricFamily(f"{p}_listener_max_connections",
                                "a listener's connection cap", labels=["listener"])
        reached = CounterMetricFamily(f"{p}_listener_cap_reached",
                                      "times a listener stopped accepting at its cap",
                                      labels=["listener"])
        per_address = CounterMetricFamily(
            f"{p}_listener_per_address_refused",
            "connections closed over the per-address concurrency cap", labels=["listener"])
        evicted = CounterMetricFamily(
            f"{p}_listener_evicted",
            "connections closed at the cap for proving nothing in time", labels=["listener"])
        for a in b.listeners:
            current.add_metric([a.name], a.current)
            cap.add_metric([a.name], a.cap)
            reached.add_metric([a.name], a.reached)
            per_address.add_metric([a.name], a.refused_per_address)
            evicted.add_metric([a.name], a.evicted)
        yield from (current, cap, reached, per_address, evicted)
        yield GaugeMetricFamily(f"{p}_connections", "connections open on capped listeners",
                                value=b.current)
        yield GaugeMetricFamily(f"{p}_max_connections", "the process-wide connection cap",
                                value=b.cap)
        yield CounterMetricFamily(f"{p}_cap_reached", "times the process-wide cap was reached",
                                  value=b.reached)
        yield GaugeMetricFamily(f"{p}_descriptor_limit", "soft RLIMIT_NOFILE", value=b.limit)
        yield GaugeMetricFamily(f"{p}_reserved_descriptors",
                                "descriptors kept out of the process-wide cap", value=b.reserved)
        errors = CounterMetricFamily(f"{p}_accept_errors", "accept() failures by errno",
                                     labels=["error"])
        counts = {"EMFILE": 0, **b.accept_errors}
        for name, count in sorted(counts.items()):
            errors.add_metric([name], count)
        yield errors

