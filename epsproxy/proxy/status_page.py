"""
The proxies' status pages (``/`` of the metrics listener, see :mod:`epsproxy.net.pages`).

- :class:`PublicProxyPage`: the announcements (domain, operator, expiry), the connection
  pool of each operator, splices and bytes relayed, pairings and TLS connections per
  second, refusals by reason, and the last server names refused for want of an
  announcement.
- :class:`PrivateProxyPage`: its announcements and when they were last re-announced,
  forwarded and failed connections, its connection pool at each public proxy.

Both read the running service at render time (in memory only: never a call out).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.web.template import Tag, tags

from epsproxy.net.pages import (
    CertificateShelf,
    IntParameter,
    Sampler,
    Series,
    format_age,
    format_time,
    key_values,
    section,
    table,
)
from epsproxy.net.reactor import IReactor
from epsproxy.proxy.settings import proxy_file_sets

__all__ = ["PRIVATE_COUNTERS", "PublicProxyPage", "PrivateProxyPage", "SNI_REFUSALS",
           "pool_rows"]

#: The TLS listener's counters that are refusals, with what each means.
SNI_REFUSALS = {
    "no_sni": "ClientHello without a server name",
    "malformed": "not a TLS ClientHello",
    "timeouts": "no ClientHello in time",
    "no_route": "no announcement for the name",
    "full": "too many tokens pending",
    "abandoned": "closed before its ClientHello",
    "bad_proxy_header": "bad PROXY protocol header",
    "rate_limited": "over the connection rate limit",
    "notify_failed": "the operator could not be told",
}

#: What the private proxy counts, with what each means.
PRIVATE_COUNTERS = {
    "forwarded": "incoming connections forwarded",
    "failed": "incoming connections that could not be served",
}


def pool_rows(pools: Any) -> list[tuple[Any, ...]] | None:
    """
    The rows of the pool table from a service's ``pool_state()`` (``{operator: {"idle":
    n, "busy": n, ...}}``), or None when the service keeps no connection pool.
    """
    if pools is None:
        return None
    rows = []
    for operator, state in sorted(dict(pools).items()):
        state = state if isinstance(state, Mapping) else {"state": state}
        rows.append((operator, ", ".join(f"{k}: {v}" for k, v in sorted(state.items()))))
    return rows


def _announcement_rows(announcements: Sequence[Mapping[str, Any]], who: str) -> list[Any]:
    return [(a.get("domain"), a.get(who), a.get("expires_at") or "never")
            for a in sorted(announcements, key=lambda a: str(a.get("domain")))]


class PublicProxyPage:
    """The :class:`~epsproxy.net.pages.StatusPage` of a public proxy."""

    parameters: Sequence[IntParameter] = ()

    def __init__(self, service: Any, reactor: IReactor) -> None:
        self.service = service
        self.reactor = reactor
        self.title = f"Public proxy {service.settings['name']}"
        self.certificates = CertificateShelf(reactor)
        rendezvous = service.rendezvous
        self.sampler: Sampler | None = Sampler(reactor, [
            Series("pairings/s", lambda: rendezvous.pairings, counter=True),
            Series("TLS connections/s", self._accepted, counter=True),
            Series("active splices", lambda: rendezvous.active_splices),
            Series("refusals/s", self._refusals, counter=True),
        ])

    def _accepted(self) -> float:
        return float(getattr(self.service.front, "accepted", 0))

    def _refusals(self) -> float:
        front = self.service.front
        total = sum(getattr(front, name, 0) for name in SNI_REFUSALS) if front else 0
        return float(total + self.service.rendezvous.refused)

    def sections(self, parameters: Mapping[str, int]) -> list[Tag]:
        service = self.service
        announcements = service.announcements
        now = self.reactor.seconds()
        rendezvous = service.rendezvous
        front = service.front
        # A hook for the connection pool (none exists yet): ``pool_state()`` on the service.
        pool_state = getattr(service, "pool_state", None)
        pools = pool_rows(pool_state() if callable(pool_state) else None)
        refusals = [(name, why, getattr(front, name, 0)) for name, why in SNI_REFUSALS.items()
                    if front is not None]
        refusals += [("token_refused", "unknown, used or expired token", rendezvous.refused),
                     ("token_timeouts", "no partner or token in time", rendezvous.timeouts)]
        refused_names = [(f"{format_time(e.at)} ({format_age(now - e.at)} ago)", e.what,
                          e.detail or "-") for e in service.refused_names.newest_first()]
        return [
            section("Announcements", table(
                ("domain", "operator", "expires"),
                _announcement_rows(announcements.announcements() if announcements else [],
                                   "operator"),
                empty="no live announcement")),
            section("Connection pools", table(("operator", "state"), pools) if pools is not None
                    else tags.p("no connection pool", class_="empty")),
            section("Splices", key_values([
                ("active splices", rendezvous.active_splices),
                ("bytes relayed since start", rendezvous.bytes_spliced),
                ("pairings since start", rendezvous.pairings),
                ("tokens waiting", rendezvous.pending),
                ("TLS connections since start", getattr(front, "accepted", 0)),
                ("TLS connections reading their ClientHello", getattr(front, "reading", 0)),
            ])),
            section("Refusals since start", table(
                ("reason", "meaning", "count"), [r for r in refusals if r[2]],
                empty="nothing refused")),
            section("Last refused server names", table(
                ("when", "server name", "client (blurred)"), refused_names,
                empty="no server name refused")),
            section("Last hour", self.sampler.sparklines()) if self.sampler else tags.p(),
            self.certificates.section(proxy_file_sets({"public": service.settings}, "public")),
        ]


class PrivateProxyPage:
    """The :class:`~epsproxy.net.pages.StatusPage` of a private proxy."""

    parameters: Sequence[IntParameter] = ()

    def __init__(self, service: Any, reactor: IReactor) -> None:
        self.service = service
        self.reactor = reactor
        self.title = f"Private proxy {service.settings['name']}"
        self.certificates = CertificateShelf(reactor)
        self.sampler: Sampler | None = Sampler(reactor, [
            Series("forwarded/s", lambda: self._count("forwarded"), counter=True),
            Series("failures/s", lambda: self._count("failed"), counter=True),
            Series("active connections", lambda: len(getattr(service.forwarder, "active", ()))),
        ])

    def _count(self, name: str) -> float:
        return float(getattr(self.service.forwarder, name, 0))

    def sections(self, parameters: Mapping[str, int]) -> list[Tag]:
        service = self.service
        proxy = service.proxy
        now = self.reactor.seconds()
        at = getattr(service, "reannounced_at", None)
        announcements = proxy.announcements.announcements() if proxy is not None else []
        pool_state = getattr(service, "pool_state", None)
        pools = pool_rows(pool_state() if callable(pool_state) else None)
        return [
            section("Announcements", table(
                ("domain", "public proxy", "expires"),
                _announcement_rows(announcements, "proxy"), empty="no live announcement"),
                key_values([
                    ("last re-announced", "not yet" if at is None else
                     f"{format_time(at)} ({format_age(now - at)} ago)"),
                    ("re-announcement calls", getattr(proxy, "reannounced", 0)),
                    ("failed re-announcement calls", getattr(proxy, "reannounce_failures", 0)),
                ])),
            section("Connections", key_values([
                *((why, int(self._count(name))) for name, why in PRIVATE_COUNTERS.items()),
                ("being forwarded now", len(getattr(service.forwarder, "active", ()))),
                ("incomingConnection calls (brokered)", getattr(proxy, "incoming_calls", 0)),
                ("served from the pool", getattr(getattr(service, "pool", None), "served", 0)),
            ])),
            section("Connection pool", table(("public proxy", "state"), pools,
                                              empty="no live announcement to pool for")
                    if pools is not None else tags.p("no connection pool", class_="empty")),
            section("Last hour", self.sampler.sparklines()) if self.sampler else tags.p(),
            self.certificates.section(proxy_file_sets({"private": service.settings}, "private")),
        ]
