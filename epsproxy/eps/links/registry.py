"""
The open EPS links of one node (SPEC §12.4-§12.7), whichever side opened them: accepted
by the ``eps_server`` listener, handed to us after a proxy rendezvous, dialled for a
call, or kept open so that a peer can reach us over a link we opened.  Because a link
carries calls in both directions, every link serves both ways; the channels only decide
*which* links they may use.

:class:`LinkRegistry` builds the factories of those links (each registers the links it
builds) and keeps a small :class:`LinkRecord` per link: direction, kept or not, last
use.  Requests arriving on a link go to the ``serve`` callable given at construction;
what serves them (the broker) is not known here.

:meth:`LinkRegistry.collector` is the per-peer view for Prometheus:
``eps_peer_link_up{peer, direction}`` and ``eps_peer_last_seen_seconds{peer}``.  Peers
become label values only once a link to them completed its hellos, that is once their
certificate matched a pin of the directory: never a name a stranger chose.  Peers whose
links are all closed are remembered (for their last-seen time) up to
:data:`MAX_REMEMBERED_PEERS`, the least recently seen forgotten first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.eps.links import wire
from epsproxy.eps.links.peers import Directory, PeerIdentity
from epsproxy.eps.links.protocol import (
    EPSClientFactory,
    EPSConnection,
    EPSServerFactory,
    Handler,
)

__all__ = [
    "INCOMING",
    "OUTGOING",
    "MAX_REMEMBERED_PEERS",
    "LinkRecord",
    "LinkRegistry",
    "PeerActivity",
    "PeerLinkCollector",
    "link_options",
]

log = Logger()

#: Direction of a link we accepted (or were handed after a rendezvous as TLS server).
INCOMING = "incoming"
#: Direction of a link we dialled.
OUTGOING = "outgoing"

#: Peers without an open link whose last-seen time is kept (and reported); peers with
#: an open link are always reported (they are in the directory, which bounds them).
MAX_REMEMBERED_PEERS = 1000


def link_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The :class:`EPSConnection` options of a channel's validated link settings."""
    return {
        "max_line": settings["max_line_bytes"],
        "hello_timeout": settings["hello_timeout"],
        "ping_interval": settings["ping_interval"],
        "dead_after": settings["dead_after"],
    }


@dataclass(eq=False)
class LinkRecord:
    """What the node knows about one of its links besides the link itself."""

    link: EPSConnection
    direction: str
    kept: bool
    last_used: float
    #: When its hellos completed (None until then).
    up_since: float | None = None


@dataclass
class PeerActivity:
    """Calls over the links to one identified peer since start, and the last failure."""

    calls_in: int = 0
    calls_out: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


class LinkRegistry:
    """
    Open links by peer operator name, and the factories that make them.

    ``serve(request, peer)`` answers the requests peers send over any link (see
    :data:`~epsproxy.eps.links.protocol.Handler`); ``options`` are the default
    :class:`EPSConnection` options (``hello_timeout``, ``ping_interval``,
    ``dead_after``, ``max_line``, ``on_refused``).
    """

    def __init__(
        self,
        clock: IReactorTime,
        directory: Directory,
        own_name: str,
        serve: Handler,
        **options: Any,
    ) -> None:
        self.clock = clock
        self.directory = directory
        self.own_name = own_name
        self.serve = serve
        self.options = options
        self._records: dict[EPSConnection, LinkRecord] = {}
        self._by_peer: dict[str, list[LinkRecord]] = {}
        self._listeners: list[Callable[[str, str, bool], None]] = []
        # peer name -> last frame received on a link to it that is now closed
        self._seen_before: dict[str, float] = {}
        # peer name -> calls and last error (identified peers only: bounded like above)
        self._activity: dict[str, PeerActivity] = {}

    # -- building and tracking links ----------------------------------------------------

    def server_factory(self, **options: Any) -> EPSServerFactory:
        """A factory for links we accept (listener, or rendezvous as TLS server)."""
        return EPSServerFactory(
            self.directory, self.own_name, self._serve, self.clock,
            track=lambda link: self.track(link, INCOMING), **{**self.options, **options},
        )

    def client_factory(self, kept: bool = False, **options: Any) -> EPSClientFactory:
        """A factory for links we dial; ``kept`` marks persistent ones (never idle-closed)."""
        return EPSClientFactory(
            self.directory, self.own_name, self._serve, self.clock,
            track=lambda link: self.track(link, OUTGOING, kept), **{**self.options, **options},
        )

    def track(self, link: EPSConnection, direction: str, kept: bool = False) -> LinkRecord:
        """Keep a record of ``link``; it is found by its peer's name once its hellos are done."""
        record = LinkRecord(link, direction, kept, self.clock.seconds())
        self._records[link] = record
        link.when_ready().addCallbacks(lambda peer: self._register(record, peer), lambda _: None)
        link.when_closed().addCallback(lambda _: self._forget(record))
        return record

    def _register(self, record: LinkRecord, peer: PeerIdentity) -> None:
        if record.link not in self._records:
            return
        record.up_since = self.clock.seconds()
        self._by_peer.setdefault(peer.name, []).append(record)
        log.info("EPS link to {peer} is up ({direction})", peer=peer.name,
                 direction=record.direction)
        self._notify(peer.name, record.direction, True)

    def _forget(self, record: LinkRecord) -> None:
        self._records.pop(record.link, None)
        peer = record.link.peer
        if peer is None:
            return
        records = self._by_peer.get(peer.name, [])
        if record in records:
            records.remove(record)
            if not records:
                del self._by_peer[peer.name]
            self._remember(peer.name, record.link.last_received)
            log.info("EPS link to {peer} is down ({direction})", peer=peer.name,
                     direction=record.direction)
            self._notify(peer.name, record.direction, False)

    def add_listener(self, listener: Callable[[str, str, bool], None]) -> None:
        """Call ``listener(peer_name, direction, up)`` when a link comes up or goes down."""
        self._listeners.append(listener)

    def _notify(self, name: str, direction: str, up: bool) -> None:
        for listener in self._listeners:
            try:
                listener(name, direction, up)
            except Exception:
                log.failure("EPS link listener failed")

    def _remember(self, name: str, seen: float) -> None:
        self._seen_before[name] = max(seen, self._seen_before.get(name, seen))
        excess = len(self._seen_before) - MAX_REMEMBERED_PEERS
        if excess > 0:
            oldest = sorted(self._seen_before, key=self._seen_before.__getitem__)
            for stale in oldest[:excess]:
                del self._seen_before[stale]
                if stale not in self._by_peer:
                    self._activity.pop(stale, None)

    def _serve(self, request: wire.Request, peer: PeerIdentity) -> Any:
        self._activity.setdefault(peer.name, PeerActivity()).calls_in += 1
        return self.serve(request, peer)

    def _failed(self, name: str, failure: Failure) -> Failure:
        activity = self._activity.setdefault(name, PeerActivity())
        activity.last_error = failure.getErrorMessage()[:300]
        activity.last_error_at = self.clock.seconds()
        return failure

    def activity(self, name: str) -> PeerActivity:
        """Calls to and from peer ``name`` since start, and its last failed call."""
        return self._activity.get(name) or PeerActivity()

    # -- lookups ------------------------------------------------------------------------

    def link_to(self, name: str, direction: str | None = None) -> EPSConnection | None:
        """The newest open link to operator ``name`` (of ``direction`` if given), or None."""
        for record in reversed(self._by_peer.get(name, ())):
            if record.link.is_open and (direction is None or record.direction == direction):
                return record.link
        return None

    def record(self, link: EPSConnection) -> LinkRecord | None:
        """The record of ``link`` while it is open."""
        return self._records.get(link)

    def records(self) -> Iterator[LinkRecord]:
        """The records of every identified link."""
        for records in list(self._by_peer.values()):
            yield from list(records)

    def links(self) -> Iterator[EPSConnection]:
        """Every identified link."""
        for record in self.records():
            yield record.link

    def count(self, direction: str) -> int:
        """How many identified links of ``direction`` are open."""
        return sum(1 for record in self.records() if record.direction == direction)

    def peers(self) -> dict[str, tuple[set[str], float]]:
        """
        Every identified peer, with a link now or remembered: ``{name: (directions of
        its open links, Unix time a frame was last received from it)}``.
        """
        peers: dict[str, tuple[set[str], float]] = {
            name: (set(), seen) for name, seen in self._seen_before.items()
        }
        for record in self.records():
            link = record.link
            name = link.peer.name
            directions, seen = peers.get(name, (set(), 0.0))
            if link.is_open:
                directions.add(record.direction)
            peers[name] = (directions, max(seen, link.last_received))
        return peers

    def collector(self) -> PeerLinkCollector:
        """The per-peer metrics of these links, to register in a ``CollectorRegistry``."""
        return PeerLinkCollector(self)

    # -- using links --------------------------------------------------------------------

    def call(
        self,
        link: EPSConnection,
        method: str,
        params: dict[str, Any],
        id: str | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred[wire.Response]:
        """:meth:`EPSConnection.call`, noting the use of the link (idle links are closed)."""
        record = self._records.get(link)
        if record is not None:
            record.last_used = self.clock.seconds()
        d = link.call(method, params, id=id, timeout=timeout)
        if link.peer is not None:
            self._activity.setdefault(link.peer.name, PeerActivity()).calls_out += 1
            d.addErrback(partial(self._failed, link.peer.name))
        return d

    def close_all(self) -> defer.Deferred[None]:
        """Close every link (shutdown); fires when all are closed."""
        closing = []
        for link in list(self._records):
            closing.append(link.when_closed())
            link.close()
        return defer.gatherResults(closing).addCallback(lambda _: None)


class PeerLinkCollector:
    """
    A Prometheus collector reading a :class:`LinkRegistry` at each scrape:
    ``eps_peer_link_up{peer, direction}`` (1 while a link of that direction is open,
    else 0) and ``eps_peer_last_seen_seconds{peer}`` (Unix time of the last frame
    received from the peer).  Register it with ``registry.register(collector)``.
    """

    def __init__(self, links: LinkRegistry) -> None:
        self.links = links

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        up, seen = self._families()
        for name, (directions, last) in sorted(self.links.peers().items()):
            for direction in (INCOMING, OUTGOING):
                up.add_metric([name, direction], 1.0 if direction in directions else 0.0)
            seen.add_metric([name], last)
        return [up, seen]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("eps_peer_link_up", "1 while a link to the peer is open, "
                              "by the side that opened it", labels=["peer", "direction"]),
            GaugeMetricFamily("eps_peer_last_seen_seconds", "Unix time a frame was last "
                              "received from the peer", labels=["peer"]),
        ]
