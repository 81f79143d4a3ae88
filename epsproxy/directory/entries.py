"""
Directory entries: what the network knows about one operator, and the questions asked
of it (SPEC §2.1, §6).

An entry is a plain dict in the JSON shape the reference serves (so ``getEntries`` can
return it as it is).  Entries are built by replaying change records with
:func:`integrate`; the rest of this module answers lookups on them: which channel to
use, which settings apply, whether one operator may call a method of another
(:func:`can_call`, asked by the broker on every request, so it copies nothing), and who
its peers are.

Differences from the reference, on purpose:

- ``preferences`` records keep their content: each entry item carries it under the key
  ``preferences`` (the reference loses it, SPEC §3.2 quirk, §23.3 #29).
- Channel types have aliases (:data:`CHANNEL_ALIASES`): our own channels are called
  ``eps_server``/``eps_client`` while Go nodes publish ``grpc_server``/``grpc_client``;
  lookups and queries treat both spellings as the same channel.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Mapping

from epsproxy.rules import records

__all__ = [
    "CHANNEL_ALIASES",
    "ENTRY_SECTIONS",
    "EntryError",
    "canonical_channel_type",
    "new_entry",
    "section_value",
    "integrate",
    "channel",
    "settings_for",
    "service_for",
    "query",
    "can_call",
    "peer_groups",
    "peers",
]

Entry = dict[str, Any]
Entries = Mapping[str, Entry] | Iterable[Entry]

#: Alias -> canonical channel type.  The canonical spelling is the one Go nodes publish
#: in the directory, so entries we write stay readable by the reference.
CHANNEL_ALIASES: dict[str, str] = {
    "eps_server": "grpc_server",
    "eps_client": "grpc_client",
}

#: The record sections that change an entry (SPEC §2.2); each replaces the entry key of
#: the same name.
ENTRY_SECTIONS: tuple[str, ...] = records.SECTIONS


class EntryError(ValueError):
    """A change record cannot be integrated (unknown section, data of the wrong shape)."""


def canonical_channel_type(channel_type: str) -> str:
    """The canonical spelling of a channel type (``eps_server`` -> ``grpc_server``)."""
    return CHANNEL_ALIASES.get(channel_type, channel_type)


def new_entry(name: str) -> Entry:
    """A fresh, empty entry for operator ``name`` (SPEC §2.1)."""
    return {
        "name": name,
        "groups": [],
        "channels": [],
        "services": [],
        "certificates": [],
        "settings": [],
        "preferences": None,
        "records": [],
        "properties": {"displayName": ""},
    }


# -- converting normalised record data into the entry shape -------------------------------


def _permissions(items: list[dict] | None) -> list[dict]:
    result = []
    for p in items or ():
        rights = p.get("rights") or []
        if not isinstance(p["group"], str) or not isinstance(rights, list):
            raise TypeError("a permission needs a group and a list of rights")
        result.append({"group": p["group"], "rights": list(rights)})
    return result


def _validators(items: list[dict] | None) -> list[dict] | None:
    if items is None:
        return None
    return [{"type": v["type"], "parameters": v.get("parameters")} for v in items]


def _parameters(items: list[dict] | None) -> list[dict] | None:
    if items is None:
        return None
    return [{"name": p["name"], "validators": _validators(p.get("validators"))} for p in items]


def _methods(items: list[dict] | None) -> list[dict]:
    return [
        {
            "name": m["name"],
            "permissions": _permissions(m.get("permissions")),
            "parameters": _parameters(m.get("parameters")),
        }
        for m in items or ()
    ]


def _convert_channels(data: list) -> list:
    return [{"type": c["type"], "settings": c.get("settings")} for c in data]


def _convert_groups(data: list) -> list:
    if not all(isinstance(g, str) for g in data):
        raise TypeError("groups must be strings")
    return list(data)


def _convert_services(data: list) -> list:
    return [
        {
            "name": s["name"],
            "permissions": _permissions(s.get("permissions")),
            "methods": _methods(s.get("methods")),
        }
        for s in data
    ]


def _convert_certificates(data: list) -> list:
    return [{"fingerprint": c["fingerprint"], "key_usage": c["key_usage"]} for c in data]


def _scope(item: dict) -> dict:
    return {
        "operator": item.get("operator") or "",
        "service": item.get("service") or "",
        "environment": item.get("environment") or "",
    }


def _convert_settings(data: list) -> list:
    return [{**_scope(item), "settings": item["settings"]} for item in data]


def _convert_preferences(data: list) -> list:
    # The record schema calls the content "settings"; the entry calls it "preferences".
    # Keep it (the reference drops it, SPEC §3.2).
    return [
        {**_scope(item), "preferences": item.get("settings", item.get("preferences"))}
        for item in data
    ]


_CONVERTERS = {
    "channels": _convert_channels,
    "groups": _convert_groups,
    "services": _convert_services,
    "certificates": _convert_certificates,
    "settings": _convert_settings,
    "preferences": _convert_preferences,
}


def section_value(section: object, data: Any) -> list:
    """
    The entry value for a record's ``section``/``data`` (normalised record data, SPEC
    §3.2), in the shape of SPEC §2.1.  Raises :class:`EntryError` if it does not fit.
    """
    converter = _CONVERTERS.get(section) if isinstance(section, str) else None
    if converter is None:
        raise EntryError(f"unknown section {section!r}")
    if data is None:
        return []
    if not isinstance(data, list):
        raise EntryError(f"section {section!r}: data must be a list")
    try:
        return converter(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise EntryError(f"section {section!r}: malformed data ({e!r})") from None


def integrate(entries: dict[str, Entry], signed_or_record: dict) -> None:
    """
    Apply one change record to ``entries`` (name -> entry), SPEC §6.1.

    ``signed_or_record`` is a signed record (has ``record``) or, for the json directory
    back-end, a bare change record, which the entry's ``records`` list then holds with
    empty hash, parent hash and signature.  The record's section replaces the whole
    entry section.  The record must be normalised (``records.normalise_record``).
    Raises :class:`EntryError` and leaves ``entries`` unchanged if it does not fit.
    """
    if "record" in signed_or_record:
        signed = signed_or_record
        record = signed["record"]
    else:
        record = signed_or_record
        signed = {"parent_hash": "", "hash": "", "signature": None, "record": record}
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise EntryError("a change record needs a name")
    value = section_value(record.get("section"), record.get("data"))
    name = record["name"]
    entry = entries.get(name)
    if entry is None:
        entry = entries[name] = new_entry(name)
    entry[record["section"]] = value
    entry["records"].append(signed)


# -- lookups (SPEC §6.2) ------------------------------------------------------------------


def channel(entry: Entry, channel_type: str) -> dict | None:
    """The first channel of ``entry`` of type ``channel_type`` (aliases count), or None."""
    wanted = canonical_channel_type(channel_type)
    for item in entry.get("channels") or ():
        if canonical_channel_type(item.get("type", "")) == wanted:
            return item
    return None


def settings_for(entry: Entry, service: str, operator: str) -> dict | None:
    """
    The first settings item that applies to ``service`` as used by ``operator`` (an
    empty ``service``/``operator`` in the item is a wildcard), or None.  Order matters.
    """
    for item in entry.get("settings") or ():
        if item.get("service", "") in (service, "") and item.get("operator", "") in (
            operator,
            "",
        ):
            return item
    return None


def service_for(entry: Entry, method: str) -> dict | None:
    """The first service of ``entry`` that has a method named ``method``, or None."""
    for service in entry.get("services") or ():
        for m in service.get("methods") or ():
            if m.get("name") == method:
                return service
    return None


# -- query (SPEC §6.3) --------------------------------------------------------------------


def _values(entries: Entries) -> Iterable[Entry]:
    if isinstance(entries, Mapping):
        return entries.values()
    return entries


def query(
    entries: Entries,
    group: str | None = None,
    operator: str | None = None,
    channels: list[str] | None = None,
) -> list[Entry]:
    """
    The entries that match a directory query (SPEC §6.3): ``operator`` and ``group``
    match when empty/None or equal; ``channels`` None matches every entry, otherwise the
    entry needs a channel of one of those types (aliases count).  Quirk kept for
    compatibility: an explicitly empty ``channels`` list matches nothing.
    """
    wanted = None if channels is None else {canonical_channel_type(c) for c in channels}
    result = []
    for entry in _values(entries):
        if operator and entry.get("name") != operator:
            continue
        if group and group not in (entry.get("groups") or ()):
            continue
        if wanted is not None and not any(
            canonical_channel_type(c.get("type", "")) in wanted
            for c in entry.get("channels") or ()
        ):
            continue
        result.append(entry)
    return result


# -- permissions and peers (SPEC §6.4, §6.5) ----------------------------------------------


def _grants_call(permissions: Iterable[dict] | None, groups: Collection[str]) -> bool:
    for p in permissions or ():
        group = p.get("group")
        if (group == "*" or group in groups) and "call" in (p.get("rights") or ()):
            return True
    return False


def can_call(caller: Entry, callee: Entry, method: str) -> bool:
    """
    Whether ``caller`` may call ``method`` of ``callee`` (SPEC §6.4): the first service
    of the callee with that method decides; its service-level permissions and the
    method's own permissions both grant (there is no deny); group ``*`` is anyone.
    """
    groups = caller.get("groups") or ()
    for service in callee.get("services") or ():
        for m in service.get("methods") or ():
            if m.get("name") == method:
                return _grants_call(service.get("permissions"), groups) or _grants_call(
                    m.get("permissions"), groups
                )
    return False


def peer_groups(entry: Entry) -> set[str]:
    """
    Every group named in the entry's service- and method-level permissions: the groups
    that may call this operator (``*`` included literally).
    """
    result: set[str] = set()
    for service in entry.get("services") or ():
        result.update(p.get("group") for p in service.get("permissions") or ())
        for m in service.get("methods") or ():
            result.update(p.get("group") for p in m.get("permissions") or ())
    result.discard(None)
    return result


def peers(base: Entry, entries: Entries, incoming_only: bool = False) -> list[Entry]:
    """
    The operators ``base`` talks to (SPEC §6.5): those it may call (unless
    ``incoming_only``) and those that may call it.  Plain set intersection of groups:
    ``*`` has no special meaning here (reference quirk), so a service open to everyone
    makes nobody a peer.
    """
    base_groups = set(base.get("groups") or ())
    base_peer_groups = peer_groups(base)
    result = []
    for entry in _values(entries):
        if entry.get("name") == base.get("name"):
            continue
        if not incoming_only and base_groups & peer_groups(entry):
            result.append(entry)
        elif set(entry.get("groups") or ()) & base_peer_groups:
            result.append(entry)
    return result
