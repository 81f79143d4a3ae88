"""
The endpoint server's status page (``/`` of its metrics listener, see
:mod:`epsproxy.net.pages`): who this node is (operator, groups, certificates), each peer
and its link (up since, direction, direct or through which proxy, calls in and out, the
last failed call), the directory (age, size, checkpoint), refused calls by reason,
asynchronous calls pending, and sparklines of the last hour.

Everything comes from the running :class:`~epsproxy.eps.service.EndpointServerService`
and its registry, read at render time: the page never calls anyone.
"""

from __future__ import annotations

import base64
from typing import Any, Mapping, Sequence

from prometheus_client import CollectorRegistry
from twisted.web.template import Tag, tags

from epsproxy.directory import entries as _entries
from epsproxy.eps.links.registry import INCOMING, OUTGOING
from epsproxy.eps.settings import eps_file_sets
from epsproxy.net.pages import (
    CertificateShelf,
    IntParameter,
    Sampler,
    Series,
    counter_by,
    counter_total,
    format_age,
    format_time,
    key_values,
    section,
    table,
)
from epsproxy.net.reactor import IReactor

__all__ = ["EndpointServerPage", "describe_checkpoint", "route_of"]

#: ``eps_requests_total`` outcomes that are a refusal (the broker said no).
REFUSED_OUTCOMES = ("denied", "invalid")


def _server_channel(entry: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    for channel in (entry or {}).get("channels") or ():
        if isinstance(channel, dict) and _entries.canonical_channel_type(
            str(channel.get("type"))
        ) == "grpc_server":
            settings = channel.get("settings")
            return settings if isinstance(settings, dict) else {}
    return None


def route_of(direction: str, own: Mapping[str, Any] | None,
             peer: Mapping[str, Any] | None) -> str:
    """
    How a link of ``direction`` runs, as the directory says links to that side are made:
    a link we dialled goes through the proxy the peer's server names, one we accepted
    through the proxy our own server names; otherwise "direct".
    """
    server = _server_channel(peer if direction == OUTGOING else own)
    proxy = None if server is None else server.get("proxy")
    return f"through {proxy}" if isinstance(proxy, str) and proxy else "direct"


def describe_checkpoint(checkpoint: Any) -> str:
    """One line for a verified checkpoint (``origin``, ``size``, ``head``, ``time``)."""
    if checkpoint is None:
        return "none"
    inner = getattr(checkpoint, "checkpoint", checkpoint)
    try:
        head = base64.b64encode(inner.head).decode("ascii")[:16]
        return (f"{inner.origin}, {inner.size} records, head {head}..., "
                f"signed {format_time(float(inner.time))}")
    except (AttributeError, TypeError, ValueError):
        return str(checkpoint)[:300]


class EndpointServerPage:
    """The :class:`~epsproxy.net.pages.StatusPage` of one endpoint server."""

    parameters: Sequence[IntParameter] = ()

    def __init__(self, service: Any, reactor: IReactor, registry: CollectorRegistry) -> None:
        self.service = service
        self.reactor = reactor
        self.registry = registry
        self.title = f"Endpoint server {service.name}"
        self.certificates = CertificateShelf(reactor)
        self.sampler: Sampler | None = Sampler(reactor, [
            Series("calls/s", lambda: counter_total(registry, "eps_requests_total"),
                   counter=True),
            Series("refusals/s", self._refusals, counter=True),
            Series("open links", self._open_links),
        ])

    # -- sampled numbers ----------------------------------------------------------------

    def _refusals(self) -> float:
        registry = self.registry
        return (counter_total(registry, "eps_requests_total",
                              lambda labels: labels.get("outcome") in REFUSED_OUTCOMES)
                + counter_total(registry, "eps_peer_refusals_total")
                + counter_total(registry, "eps_http_refusals_total"))

    def _open_links(self) -> float:
        links = self.service.links
        return 0.0 if links is None else float(links.count(INCOMING) + links.count(OUTGOING))

    # -- the sections -------------------------------------------------------------------

    def _own_entry(self) -> Mapping[str, Any] | None:
        try:
            directory = self.service.directory
            return None if directory is None else directory.own_entry()
        except Exception:
            return None

    def _entry(self, name: str) -> Mapping[str, Any] | None:
        try:
            directory = self.service.directory
            return None if directory is None else directory.entry_for(name)
        except Exception:
            return None

    def sections(self, parameters: Mapping[str, int]) -> list[Tag]:
        own = self._own_entry()
        return [
            self._identity(own),
            self._peers(own),
            self._directory(),
            self._refused(),
            self._async(),
            section("Last hour", self.sampler.sparklines()) if self.sampler else tags.p(),
            self.certificates.section(eps_file_sets(self.service.settings)),
        ]

    def _identity(self, own: Mapping[str, Any] | None) -> Tag:
        groups = (own or {}).get("groups") or []
        channels = ", ".join(f"{c.name} ({c.type})" for c in self.service.channels) or "-"
        return section("Identity", key_values([
            ("operator", self.service.name),
            ("groups", ", ".join(str(g) for g in groups) if own else
             "no entry in the directory"),
            ("channels", channels),
        ]))

    def _peers(self, own: Mapping[str, Any] | None) -> Tag:
        links = self.service.links
        if links is None:
            return section("Peers", tags.p("not started", class_="empty"))
        now = self.reactor.seconds()
        opened: dict[str, list[Any]] = {}
        for record in links.records():
            if record.link.is_open and record.link.peer is not None:
                opened.setdefault(record.link.peer.name, []).append(record)
        rows = []
        for name, (directions, seen) in sorted(links.peers().items()):
            records = opened.get(name, [])
            activity = links.activity(name)
            ups = [r.up_since for r in records if r.up_since is not None]
            entry = self._entry(name)
            routes = sorted({f"{r.direction}, {route_of(r.direction, own, entry)}"
                             for r in records})
            error = "-" if activity.last_error is None else (
                f"{activity.last_error} ({format_age(now - (activity.last_error_at or now))}"
                " ago)")
            rows.append((
                name,
                tags.span("up", class_="ok") if directions else tags.span("down", class_="bad"),
                "-" if not ups else f"{format_time(min(ups))} ({format_age(now - min(ups))})",
                "; ".join(routes) or "-",
                activity.calls_in, activity.calls_out,
                "-" if not seen else f"{format_age(now - seen)} ago",
                error,
            ))
        return section("Peers", table(
            ("peer", "link", "up since", "direction, route", "calls in", "calls out",
             "last frame", "last error"), rows, empty="no peer has linked yet"))

    def _directory(self) -> Tag:
        directory = self.service.directory
        if directory is None:
            return section("Directory", tags.p("not loaded", class_="bad"))
        last = getattr(directory, "last_success", None)
        try:
            size: Any = len(directory.entries())
        except Exception as e:
            size = f"unreadable: {e}"
        kind = self.service.settings["directory"]["type"]
        if kind == "api":
            age = ("never updated from the SD" if last is None else
                   f"{format_age(self.reactor.seconds() - last)} (updated {format_time(last)})")
        else:
            age = f"file {self.service.settings['directory']['settings']['path']}"
        return section("Directory", key_values([
            ("source", kind),
            ("age", age),
            ("operators", size),
            ("checkpoint", describe_checkpoint(getattr(directory, "checkpoint", None))),
        ]))

    def _refused(self) -> Tag:
        registry = self.registry
        rows: list[tuple[str, str, int]] = []
        for outcome, count in sorted(counter_by(registry, "eps_requests_total", "outcome").items()):
            if outcome != "ok" and count:
                rows.append(("call", outcome, int(count)))
        for family, what in (("eps_peer_refusals_total", "peer link"),
                             ("eps_http_refusals_total", "HTTP connection")):
            for reason, count in sorted(counter_by(registry, family, "reason").items()):
                if count:
                    rows.append((what, reason, int(count)))
        now = self.reactor.seconds()
        recent = getattr(self.service, "recent_failures", None)
        last = [] if recent is None else [
            (f"{format_time(e.at)} ({format_age(now - e.at)} ago)", e.what, e.detail)
            for e in recent.newest_first()]
        return section("Refused and failed since start", table(
            ("what", "reason", "count"), rows, empty="nothing refused"),
            tags.h3("Last calls not answered ok"),
            table(("when", "outcome", "method"), last, empty="none"))

    def _async(self) -> Tag:
        calls = self.service.async_calls
        return section("Asynchronous calls", key_values([
            ("waiting for a local service's result",
             getattr(calls, "pending_acknowledged", 0)),
            ("waiting for a peer's result", getattr(calls, "pending_expected", 0)),
        ]))
