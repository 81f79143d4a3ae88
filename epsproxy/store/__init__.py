"""
Append-only stores of data entries, shared by the SD and the proxies (SPEC §8.5).

A *data entry* is ``(type, id, data)``: the SD keeps one signed change record per entry,
the proxies keep their announcements.  Every store only appends and reads incrementally:
``read_new()`` returns what was appended since this ``Store`` object last read — by this
process or by any other one sharing the same file or Redis key — in append order.

Two back-ends sit behind the one small :class:`Store` interface:

- ``embedded`` (:mod:`epsproxy.store.embedded`): one SQLite file.  It replaces the
  reference's hand-made chunked ``file`` format, whose bounds checks and partial-write
  handling were wrong (SPEC §23.3 #31).
- ``redis`` (:mod:`epsproxy.store.redis`): one Redis list, as in the reference, but with
  bounded commands and a read index that notices a trimmed or recreated list (§23.3 #32).
  Either one server (``addresses``: the first is used) or Redis Sentinel (``sentinels`` +
  ``master_name``, :mod:`epsproxy.store.redis_sentinel`), which follows a failover.

This module holds what both share: the entry type and its byte layout (the reference's
``ToBytes``), the settings schema and :func:`open_store`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from twisted.internet.defer import Deferred

from epsproxy.net.reactor import IReactor
from epsproxy.rules import forms

__all__ = [
    "StoreError",
    "MalformedEntry",
    "StoreUnavailable",
    "AppendConflict",
    "StoredEntry",
    "Store",
    "serialise",
    "parse",
    "parse_address",
    "DATASTORE_SETTINGS",
    "EMBEDDED_SETTINGS",
    "REDIS_SETTINGS",
    "open_store",
]

#: First byte of a serialised entry.
ENTRY_VERSION = 1
#: version, type, id length (u16 little-endian)
_HEADER = struct.Struct("<BBH")
MAX_ID_LENGTH = 0xFFFF


class StoreError(Exception):
    """Base of every store failure; ``str()`` is one line fit for a log or an operator."""


class MalformedEntry(StoreError):
    """Bytes or values that are not a valid data entry."""


class StoreUnavailable(StoreError):
    """The back-end cannot be reached, timed out, refused a command or is closed."""


class AppendConflict(StoreError):
    """
    A compare-and-append (``append_if_unchanged``, shared stores only) found entries this
    reader has not read yet: nothing was written; read them and decide again.
    """


@dataclass(frozen=True)
class StoredEntry:
    """One data entry: ``type`` is a byte (0-255), ``id`` at most 65535 bytes."""

    type: int
    id: bytes
    data: bytes

    def __post_init__(self) -> None:
        if isinstance(self.type, bool) or not isinstance(self.type, int):
            raise MalformedEntry(f"entry type must be an integer, got {type(self.type).__name__}")
        if not 0 <= self.type <= 0xFF:
            raise MalformedEntry(f"entry type {self.type} does not fit in a byte")
        if not isinstance(self.id, bytes) or not isinstance(self.data, bytes):
            raise MalformedEntry("entry id and data must be bytes")
        if len(self.id) > MAX_ID_LENGTH:
            raise MalformedEntry(
                f"entry id of {len(self.id)} bytes is longer than {MAX_ID_LENGTH}"
            )


class Store(Protocol):
    """What the SD and the proxies need from a datastore."""

    #: Times ``read_new`` found the data replaced behind its back (a Redis list trimmed
    #: or replaced, a failover to a replica that had not seen every append) and read it
    #: again from the start: what that read returned is everything, not just what is new.
    resets: int

    def append(self, entry: StoredEntry) -> Deferred[None]:
        """Append one entry; fires once the back-end has acknowledged it (committed)."""

    def read_new(self) -> Deferred[list[StoredEntry]]:
        """Entries appended since this object's last read (by any process), in order."""

    def close(self) -> Deferred[None]:
        """Release connections and threads; later calls fail with StoreUnavailable."""


def serialise(entry: StoredEntry) -> bytes:
    """
    The reference's ``ToBytes`` layout: ``[0x01, type, len(id) u16 LE, id, data]``.
    """
    return _HEADER.pack(ENTRY_VERSION, entry.type, len(entry.id)) + entry.id + entry.data


def parse(data: bytes) -> StoredEntry:
    """
    Decode :func:`serialise` output; anything else raises :class:`MalformedEntry`.

    Every length is checked against the bytes actually present (the reference's file
    store got this wrong, SPEC §23.3 #31).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedEntry(f"entry must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise MalformedEntry(f"entry of {len(data)} bytes is shorter than its header")
    version, type_, id_length = _HEADER.unpack_from(data)
    if version != ENTRY_VERSION:
        raise MalformedEntry(f"unknown entry version {version}")
    end = _HEADER.size + id_length
    if end > len(data):
        raise MalformedEntry(
            f"entry id length {id_length} exceeds the {len(data) - _HEADER.size} bytes left"
        )
    return StoredEntry(type_, data[_HEADER.size : end], data[end:])


# -- settings ---------------------------------------------------------------------------

_ADDRESS = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>[0-9]{1,5})")


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``; ValueError otherwise."""
    match = _ADDRESS.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return match["v6"] or match["host"], port


def _address(text: str) -> str:
    parse_address(text)
    return text


EMBEDDED_SETTINGS = forms.Map(
    {"path": forms.Optional(forms.String(), doc="SQLite file; default: the role's own")},
    strict=True,
)

class _RedisMap(forms.Map):
    """REDIS_SETTINGS: the keys, then the rules that tie them together."""

    def validate(self, value: Any, path: Sequence[forms.PathItem] = ()) -> dict[str, Any]:
        result = super().validate(value, path)
        sentinels = "sentinels" in result
        if sentinels and "addresses" in result:
            raise forms.FormError(
                "give either addresses (one Redis server) or sentinels (Redis Sentinel),"
                " not both", (*path, "sentinels"))
        if not sentinels and "addresses" not in result:
            raise forms.FormError("is required (or sentinels and master_name)",
                                  (*path, "addresses"))
        if sentinels and "master_name" not in result:
            raise forms.FormError("is required with sentinels", (*path, "master_name"))
        if not sentinels and "master_name" in result:
            raise forms.FormError("needs sentinels (Redis Sentinel)", (*path, "master_name"))
        return result


REDIS_SETTINGS: forms.Map = _RedisMap(
    {
        "addresses": forms.Optional(
            forms.List(forms.Check(forms.String(), _address), min_length=1),
            doc="host:port list; only the first is used (no cluster support);"
            " give this or sentinels",
        ),
        "sentinels": forms.Optional(
            forms.List(forms.Check(forms.String(), _address), min_length=1),
            doc="host:port of Redis Sentinels, asked in order where master_name is",
        ),
        # An empty master_name counts as absent, so that reference settings with
        # ``master_name: ""`` and plain addresses still load.
        "master_name": forms.Optional(
            forms.String(), doc="the master's name in the sentinels' configuration"
        ),
        "sentinel_password": forms.Optional(
            forms.String(), doc='AUTH password of the sentinels; absent or "" = none'
        ),
        "wait_replicas": forms.Optional(
            forms.Integer(min=0, max=16),
            doc="replicas that must confirm a write (WAIT) before it is acknowledged;"
            " default 1 with sentinels, else 0",
        ),
        "key": forms.Optional(forms.String(), default="entries", doc="Redis list key"),
        "database": forms.Optional(forms.Integer(min=0), default=0),
        "password": forms.Optional(forms.String(), doc='AUTH password; absent or "" = none'),
        "timeout": forms.Optional(
            forms.Float(min=0.001, max=3600), default=1.0, doc="seconds per command"
        ),
    },
    strict=True,
)

_BY_TYPE: dict[str, forms.Map] = {"embedded": EMBEDDED_SETTINGS, "redis": REDIS_SETTINGS}


class _DatastoreMap(forms.Map):
    """A strict map whose ``settings`` are validated by the schema its ``type`` names."""

    def validate(self, value: Any, path: Sequence[forms.PathItem] = ()) -> dict[str, Any]:
        result = super().validate(value, path)
        schema = _BY_TYPE[result["type"]]
        result["settings"] = schema.validate(result["settings"], (*path, "settings"))
        return result


#: ``{type: embedded|redis, settings: {...}}`` (SPEC §8.5; ``embedded`` replaces ``file``).
DATASTORE_SETTINGS: forms.Map = _DatastoreMap(
    {
        "type": forms.Optional(forms.String(choices=_BY_TYPE), default="embedded"),
        "settings": forms.Optional(forms.AnyMap(), default={}),
    },
    strict=True,
)


def open_store(
    reactor: IReactor, settings: dict[str, Any], *, default_path: Path | None = None
) -> Deferred[Store]:
    """
    Open the store that ``settings`` (validated or not) describe.

    ``default_path`` is the SQLite file used when an embedded store names none.  Fails
    with :class:`forms.FormError` for invalid settings and :class:`StoreError` when the
    store cannot be opened.
    """

    async def _open() -> Store:
        checked = DATASTORE_SETTINGS.validate(settings)
        options = checked["settings"]
        if checked["type"] == "redis":
            from epsproxy.store.redis import RedisStore

            return await RedisStore.open(reactor, options)
        from epsproxy.store.embedded import EmbeddedStore

        path = options.get("path") or default_path
        if path is None:
            raise StoreError("the embedded datastore needs settings.path (no default here)")
        return await EmbeddedStore.open(reactor, Path(path))

    return Deferred.fromCoroutine(_open())
