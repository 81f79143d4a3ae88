"""
Announcements: which operator receives the TLS connections for which domain (SPEC §14.4,
§14.5; issue 5).

Two tables, each persisted in its proxy's datastore (SPEC §8.5) and rebuilt from it on
start:

- :class:`PublicAnnouncements` (public proxy, entry type 1): ``domain -> operator``,
  filled by ``announceConnections``; the SNI front asks :meth:`operator_for`.
- :class:`PrivateAnnouncements` (private proxy, entry type 2): ``(domain, proxy)``,
  filled by ``announceConnection`` and re-sent to the public proxies.

Rules shared by both (the reference's, with the fixes of SPEC §23.1 #7):

- the caller's directory entry decides what it may announce: its ``settings`` item for
  service ``proxy`` as used by the proxy's operator (:func:`allowed_domains`), which must
  be ``{"allowed_domains": [".suffix", ...]}``;
- ``expires_at`` is RFC 3339 and at most 7 days ahead (:func:`parse_expires_at`);
  past times are accepted (they withdraw an announcement);
- expired announcements are ignored by lookups, listings and re-announcements, and no
  longer block another operator (the reference answered 409 forever);
- domains are compared lower-case (DNS names are case-insensitive; the reference matched
  case-sensitively);
- a store entry is written only when something changed (values compared, not pointers);
- the public table answers per item and only fails the whole call for invalid params or
  a store failure; an operator holds at most ``max_per_operator`` live announcements.

The store is append-only, so a table is rebuilt by replaying its entries: the latest
entry for a domain (public) or a (domain, proxy) pair (private) wins.  On the public side
a domain changes hands only when the previous holder's announcement has expired, so the
latest entry per domain is exactly the state the calls left behind.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Iterable

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epsproxy.rules import forms
from ..directory.entries import settings_for
from epsproxy.rules.records import canonical_time, timestamp_ns
from ..store import AppendConflict, Store, StoredEntry, StoreError

__all__ = [
    "PUBLIC_ENTRY_TYPE",
    "PRIVATE_ENTRY_TYPE",
    "MAX_AHEAD_SECONDS",
    "DEFAULT_MAX_PER_OPERATOR",
    "AnnouncementError",
    "NotAuthorized",
    "InvalidDirectorySettings",
    "InvalidExpiry",
    "PersistFailed",
    "NOT_AUTHORIZED",
    "CLIENT_INFO",
    "DOMAIN",
    "OPERATOR",
    "ANNOUNCE_CONNECTIONS_PARAMS",
    "GET_ANNOUNCEMENTS_PARAMS",
    "allowed_domains",
    "domain_allowed",
    "parse_expires_at",
    "PublicAnnouncement",
    "PublicAnnouncements",
    "PrivateAnnouncement",
    "PrivateAnnouncements",
]

log = Logger()

#: Store entry type of a public proxy's announcement (SPEC §8.5).
PUBLIC_ENTRY_TYPE = 1
#: Store entry type of a private proxy's announcement.
PRIVATE_ENTRY_TYPE = 2
#: ``expires_at`` may be at most this far in the future.
MAX_AHEAD_SECONDS = 7 * 86400
#: Live announcements one operator may hold at a public proxy.
DEFAULT_MAX_PER_OPERATOR = 1000
#: Times an announcement is decided again when another instance wrote to the store first.
MAX_CONFLICT_RETRIES = 5
#: Error code of a call that does not come from the own endpoint server (either proxy).
NOT_AUTHORIZED = 403

_EXPIRY_TEXT = "timed announcements need to expire in 7 days or less"

# A DNS host name: dot-separated labels of letters, digits, '-' and '_' (no trailing dot).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
DOMAIN = forms.String(pattern=rf"(?:{_LABEL}\.)*{_LABEL}", min_length=1, max_length=253)
"""An announced domain: a host name (compared lower-case)."""

# Dot-separated parts without white space or parentheses (SPEC §9.2).
_OPERATOR_NAME = r"[^\s().]+(?:\.[^\s().]+)*"
OPERATOR = forms.String(pattern=_OPERATOR_NAME, max_length=253)
"""An operator name that makes a valid ``"<operator>.<method>"`` JSON-RPC method."""

CLIENT_INFO = forms.Map(
    {
        "name": forms.Required(forms.String(min_length=1, max_length=253)),
        "entry": forms.Required(forms.AnyMap()),
    }
)
"""``_client`` as the own endpoint server injects it (SPEC §9.3): ``{name, entry}``."""

_EXPIRES_AT = forms.String(max_length=64)

ANNOUNCE_CONNECTIONS_PARAMS = forms.Map(
    {
        "connections": forms.Required(
            forms.List(
                forms.Map({"domain": forms.Required(DOMAIN),
                           "expires_at": forms.Optional(_EXPIRES_AT)}),
                max_length=DEFAULT_MAX_PER_OPERATOR,
            )
        ),
        "_client": forms.Optional(CLIENT_INFO),
    }
)
"""Params of the public proxy's ``announceConnections`` (SPEC §14.4)."""

GET_ANNOUNCEMENTS_PARAMS = forms.Map({})
"""Params of ``getAnnouncements`` (none; ``_client`` and the rest are dropped)."""

_ALLOWED = forms.Map(
    {"allowed_domains": forms.Required(
        forms.List(forms.String(pattern=r"\..+", max_length=253)))}
)


class AnnouncementError(Exception):
    """A refused call; ``code``/``message``/``data`` become the JSON-RPC error."""

    code = -32603

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class NotAuthorized(AnnouncementError):
    """The caller has no ``proxy`` settings for this proxy's operator."""

    code = NOT_AUTHORIZED


class InvalidDirectorySettings(AnnouncementError):
    """The caller's ``proxy`` settings are not ``{"allowed_domains": [".x", ...]}``."""

    code = 500


class InvalidExpiry(AnnouncementError):
    """``expires_at`` is not RFC 3339 or lies more than 7 days ahead."""

    code = -32602


class PersistFailed(AnnouncementError):
    """The datastore did not take an announcement."""

    code = -32603


def allowed_domains(client: dict[str, Any], operator: str) -> list[str]:
    """
    The domain suffixes ``client`` (``{name, entry}``) may announce through ``operator``'s
    proxy, lower-cased.  Raises :class:`NotAuthorized` or
    :class:`InvalidDirectorySettings`.
    """
    entry = client.get("entry")
    item = settings_for(entry, "proxy", operator) if isinstance(entry, dict) else None
    if item is None:
        raise NotAuthorized("not authorized")
    try:
        checked = _ALLOWED.validate(item.get("settings"))
    except forms.FormError:
        raise InvalidDirectorySettings("invalid directory settings") from None
    return [suffix.lower() for suffix in checked["allowed_domains"]]


def domain_allowed(domain: str, allowed: Iterable[str]) -> bool:
    """Whether ``domain`` ends with one of the ``allowed`` suffixes (lower-case)."""
    domain = domain.lower()
    return any(domain.endswith(suffix) for suffix in allowed)


def parse_expires_at(text: str | None, now: float) -> tuple[str | None, int | None]:
    """
    ``(canonical RFC3339Nano text, nanoseconds since the epoch)`` of an ``expires_at``
    (both None when absent).  Raises :class:`InvalidExpiry` when it is not RFC 3339 or
    more than 7 days after ``now`` (seconds since the epoch).
    """
    if text is None:
        return None, None
    try:
        canonical = canonical_time(text)
        nanos = timestamp_ns(text)
    except ValueError:
        raise InvalidExpiry(f"expires_at is not an RFC 3339 time: {text[:64]!r}") from None
    if nanos - MAX_AHEAD_SECONDS * 1_000_000_000 > int(now * 1_000_000_000):
        raise InvalidExpiry(_EXPIRY_TEXT)
    return canonical, nanos


def _live(expires_ns: int | None, now: float) -> bool:
    return expires_ns is None or expires_ns > int(now * 1_000_000_000)


def _decode(entry: StoredEntry, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """A stored announcement's JSON, or None (logged) if it is unusable."""
    try:
        value = json.loads(entry.data)
        if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in keys):
            raise ValueError("missing fields")
        expires = value.get("expires_at")
        if expires is not None:
            timestamp_ns(expires)
        return value
    except (ValueError, TypeError) as e:
        log.warn("skipping an unreadable announcement in the store: {error}", error=str(e))
        return None


async def _persist(
    store: Store, type_: int, value: dict[str, Any], *, if_unchanged: bool = False
) -> None:
    """
    Append ``value`` as an entry of ``type_``.  With ``if_unchanged`` and a store that can
    compare-and-append (Redis), only if nobody appended since this process last read it:
    :class:`AppendConflict` then means nothing was written.
    """
    data = json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
    entry = StoredEntry(type_, secrets.token_bytes(16), data)
    append_if_unchanged = getattr(store, "append_if_unchanged", None) if if_unchanged else None
    try:
        if append_if_unchanged is not None:
            await append_if_unchanged([entry])
        else:
            await store.append(entry)
    except AppendConflict:
        raise
    except StoreError as e:
        log.error("cannot persist an announcement: {error}", error=str(e))
        raise PersistFailed("cannot persist the announcement") from None


# -------------------------------------------------------------------- public side


@dataclass(frozen=True)
class PublicAnnouncement:
    """``operator`` receives the connections for ``domain`` (until ``expires_at``)."""

    domain: str
    operator: str
    expires_at: str | None
    expires_ns: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"expires_at": self.expires_at, "operator": self.operator, "domain": self.domain}


class PublicAnnouncements:
    """
    A public proxy's announcements (SPEC §14.4), kept in ``store`` (entry type 1).

    ``name`` is the proxy's operator: callers need ``proxy`` settings for it.  Call
    :meth:`load` once before serving.  Announcing calls are serialised, so two calls never
    both take the same domain; instances sharing a Redis store write with
    compare-and-append, so two instances never do either.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        name: str,
        *,
        max_per_operator: int = DEFAULT_MAX_PER_OPERATOR,
    ) -> None:
        self.clock = clock
        self.store = store
        self.name = name
        self.max_per_operator = max_per_operator
        self._by_domain: dict[str, PublicAnnouncement] = {}
        self._by_operator: dict[str, set[str]] = {}  # operator -> its domains (any expiry)
        self._lock = DeferredLock()
        self.watcher: Any = None

    def load(self) -> Deferred[int]:
        """Read the store (what is new since the last read); fires with the entries read."""
        return ensureDeferred(self._load())

    # -- scale-out (issue 6) ---------------------------------------------------------

    def watch(self, *, interval: float | None = 30.0) -> bool:
        """
        Keep this table in step with other public proxy instances on the same store:
        with a store that can notify (Redis, :meth:`RedisStore.watch`), new entries are
        read soon after any instance appends them (pub/sub), after each resubscription
        and every ``interval`` seconds as a safety net.  Reads are serialised with
        announcing calls, so the table always replays the store in its order.  Returns
        whether the store can notify (an embedded store cannot: nothing is started).
        """
        watch = getattr(self.store, "watch", None)
        if watch is None or self.watcher is not None:
            return self.watcher is not None
        self.watcher = watch(lambda: self._lock.run(self.load), interval=interval)
        return True

    def stop(self) -> Deferred[None]:
        """Stop what :meth:`watch` started (safe to call without it, or twice)."""
        watcher, self.watcher = self.watcher, None
        if watcher is None:
            return succeed(None)
        return watcher.stop()

    async def _load(self) -> int:
        entries = await self.store.read_new()
        for entry in entries:
            if entry.type != PUBLIC_ENTRY_TYPE:
                continue
            value = _decode(entry, ("operator", "domain"))
            if value is None:
                continue
            domain = value["domain"].lower()
            expires = value.get("expires_at")
            self._set(PublicAnnouncement(
                domain, value["operator"], expires,
                None if expires is None else timestamp_ns(expires),
            ))
        return len(entries)

    def _set(self, announcement: PublicAnnouncement) -> None:
        previous = self._by_domain.get(announcement.domain)
        if previous is not None and previous.operator != announcement.operator:
            domains = self._by_operator.get(previous.operator)
            if domains is not None:
                domains.discard(announcement.domain)
                if not domains:
                    del self._by_operator[previous.operator]
        self._by_domain[announcement.domain] = announcement
        self._by_operator.setdefault(announcement.operator, set()).add(announcement.domain)

    def holds_live(self, operator: str) -> bool:
        """Whether ``operator`` holds at least one live announcement here (issue 14: only
        then may it keep pooled connections)."""
        now = self.clock.seconds()
        return any(_live(self._by_domain[domain].expires_ns, now)
                   for domain in self._by_operator.get(operator, ()))

    def operator_for(self, domain: str) -> str | None:
        """The operator with a live announcement of exactly ``domain`` (any case), or None."""
        found = self._by_domain.get(domain.lower())
        if found is None or not _live(found.expires_ns, self.clock.seconds()):
            return None
        return found.operator

    def announcements(self) -> list[dict[str, Any]]:
        """``getAnnouncements``: the live ones as ``{expires_at, operator, domain}``."""
        now = self.clock.seconds()
        return [a.as_dict() for a in self._by_domain.values() if _live(a.expires_ns, now)]

    def _count(self, operator: str, now: float) -> int:
        return sum(
            1 for a in self._by_domain.values()
            if a.operator == operator and _live(a.expires_ns, now)
        )

    def announce(
        self, client: dict[str, Any], connections: list[dict[str, Any]]
    ) -> Deferred[list[dict[str, Any] | None]]:
        """
        ``announceConnections``: one result per connection, ``None`` (accepted),
        ``{"code": 403, "message": "not allowed"}`` or ``{"code": 409, "message":
        "already taken"}``.  Raises (through the Deferred) :class:`NotAuthorized`,
        :class:`InvalidDirectorySettings`, :class:`InvalidExpiry` (the whole call) or
        :class:`PersistFailed`.
        """
        return self._lock.run(lambda: ensureDeferred(self._announce(client, connections)))

    async def _announce(
        self, client: dict[str, Any], connections: list[dict[str, Any]]
    ) -> list[dict[str, Any] | None]:
        operator = client["name"]
        allowed = allowed_domains(client, self.name)
        now = self.clock.seconds()
        parsed = [parse_expires_at(c.get("expires_at"), now) for c in connections]
        results: list[dict[str, Any] | None] = []
        for connection, (expires_at, expires_ns) in zip(connections, parsed):
            domain = connection["domain"].lower()
            results.append(
                await self._announce_one(operator, allowed, domain, expires_at, expires_ns, now)
            )
        return results

    def _decide(
        self, operator: str, allowed: list[str], domain: str,
        expires_at: str | None, expires_ns: int | None, now: float,
    ) -> dict[str, Any] | PublicAnnouncement | None:
        """The refusal or ``None`` (nothing to write) for one item, or what to write."""
        if not domain_allowed(domain, allowed):
            return {"code": 403, "message": "not allowed"}
        held = self._by_domain.get(domain)
        if held is not None and held.operator != operator and _live(held.expires_ns, now):
            return {"code": 409, "message": "already taken"}
        if held is not None and held.operator == operator and held.expires_at == expires_at:
            return None
        mine = held is not None and held.operator == operator and _live(held.expires_ns, now)
        if (not mine and _live(expires_ns, now)
                and self._count(operator, now) >= self.max_per_operator):
            return {"code": 403, "message": "too many announcements"}
        return PublicAnnouncement(domain, operator, expires_at, expires_ns)

    async def _announce_one(
        self, operator: str, allowed: list[str], domain: str,
        expires_at: str | None, expires_ns: int | None, now: float,
    ) -> dict[str, Any] | None:
        """
        Decide one item and write it.  Instances sharing a Redis store decide against the
        same state: the entry is appended only if nobody appended since this table last
        read the store, otherwise the new entries are read and the item decided again.  So
        two instances can never both accept different operators for one free domain.
        """
        for _ in range(MAX_CONFLICT_RETRIES):
            decided = self._decide(operator, allowed, domain, expires_at, expires_ns, now)
            if not isinstance(decided, PublicAnnouncement):
                return decided
            try:
                await _persist(self.store, PUBLIC_ENTRY_TYPE, decided.as_dict(),
                               if_unchanged=True)
            except AppendConflict:
                await self._load()
                continue
            self._set(decided)
            if getattr(self.store, "append_if_unchanged", None) is not None:
                await self._load()  # move past our own entry, so the next append matches
            log.info(
                "{operator} announced {domain} (expires {expires})",
                operator=operator, domain=domain, expires=expires_at or "never",
            )
            return None
        log.error("the store kept changing while {operator} announced {domain}",
                  operator=operator, domain=domain)
        raise PersistFailed("the store kept changing; try again")


# ------------------------------------------------------------------- private side


@dataclass(frozen=True)
class PrivateAnnouncement:
    """``domain`` is announced to the public proxy of operator ``proxy``."""

    domain: str
    proxy: str
    expires_at: str | None
    expires_ns: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"expires_at": self.expires_at, "proxy": self.proxy, "domain": self.domain}

    def connection(self) -> dict[str, Any]:
        """The item of an ``announceConnections`` call for this announcement."""
        item: dict[str, Any] = {"domain": self.domain}
        if self.expires_at is not None:
            item["expires_at"] = self.expires_at
        return item


class PrivateAnnouncements:
    """
    A private proxy's announcements (SPEC §14.5), keyed by ``(domain, proxy)`` and kept in
    ``store`` (entry type 2).  Call :meth:`load` once before serving.
    """

    def __init__(self, clock: IReactorTime, store: Store) -> None:
        self.clock = clock
        self.store = store
        self._table: dict[tuple[str, str], PrivateAnnouncement] = {}
        self._lock = DeferredLock()

    def load(self) -> Deferred[int]:
        """Read the store (what is new since the last read); fires with the entries read."""
        return ensureDeferred(self._load())

    async def _load(self) -> int:
        entries = await self.store.read_new()
        for entry in entries:
            if entry.type != PRIVATE_ENTRY_TYPE:
                continue
            value = _decode(entry, ("proxy", "domain"))
            if value is None:
                continue
            domain = value["domain"].lower()
            expires = value.get("expires_at")
            self._table[(domain, value["proxy"])] = PrivateAnnouncement(
                domain, value["proxy"], expires,
                None if expires is None else timestamp_ns(expires),
            )
        return len(entries)

    def upsert(
        self, domain: str, proxy: str, expires_at: str | None, expires_ns: int | None
    ) -> Deferred[PrivateAnnouncement]:
        """
        Set the announcement of ``domain`` to ``proxy`` (``expires_at`` as returned by
        :func:`parse_expires_at`), persisting it if it changed; fails with
        :class:`PersistFailed`.
        """
        announcement = PrivateAnnouncement(domain.lower(), proxy, expires_at, expires_ns)

        async def run() -> PrivateAnnouncement:
            key = (announcement.domain, proxy)
            if self._table.get(key) != announcement:
                await _persist(self.store, PRIVATE_ENTRY_TYPE, announcement.as_dict())
                self._table[key] = announcement
            return announcement

        return self._lock.run(lambda: ensureDeferred(run()))

    def is_live(self, domain: str, proxy: str) -> bool:
        """Whether ``domain`` is announced, unexpired, to ``proxy``."""
        found = self._table.get((domain.lower(), proxy))
        return found is not None and _live(found.expires_ns, self.clock.seconds())

    def announcements(self) -> list[dict[str, Any]]:
        """``getAnnouncements``: the live ones as ``{expires_at, proxy, domain}``."""
        now = self.clock.seconds()
        return [a.as_dict() for a in self._table.values() if _live(a.expires_ns, now)]

    def by_proxy(self) -> dict[str, list[PrivateAnnouncement]]:
        """The live announcements grouped by public proxy (for re-announcing)."""
        now = self.clock.seconds()
        grouped: dict[str, list[PrivateAnnouncement]] = {}
        for a in self._table.values():
            if _live(a.expires_ns, now):
                grouped.setdefault(a.proxy, []).append(a)
        return grouped
