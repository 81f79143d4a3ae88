"""
What a settings reload (SIGHUP) changes, and refusing one that changes a setting only a
restart can apply.

Settings are compared as a flat map of key paths (``jsonrpc_server.tls.key_file``,
``channels[gateway].settings.bind_address``: a list of mappings that all have a ``name``
is indexed by name, any other list of mappings by position; lists of plain values are
compared whole).  A service lists the paths that need a restart as patterns, where
``*`` stands for one key or index and a trailing ``?`` means "present or absent" (a
block that may change inside, but not appear or disappear).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from epsproxy.net.lifecycle import ReloadError

__all__ = ["flatten", "changed_keys", "restart_keys", "refuse_restart_changes"]

_PRESENT = object()


def _index(items: list[Any]) -> list[tuple[str, Any]] | None:
    """``[name]``/``[i]`` indexes of a list of mappings; None for a list of values."""
    if not items or not all(isinstance(item, Mapping) for item in items):
        return None
    names = [item.get("name") for item in items]
    if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
        return [(f"[{n}]", item) for n, item in zip(names, items)]
    return [(f"[{i}]", item) for i, item in enumerate(items)]


def flatten(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of ``value`` by its key path, and every mapping's path (present)."""
    flat: dict[str, Any] = {}
    if isinstance(value, Mapping):
        if path:
            flat[path] = _PRESENT
        for key, item in value.items():
            flat.update(flatten(item, f"{path}.{key}" if path else str(key)))
        return flat
    if isinstance(value, list):
        indexed = _index(value)
        if indexed is not None:
            flat[path] = _PRESENT
            for index, item in indexed:
                flat.update(flatten(item, path + index))
            return flat
    flat[path] = value
    return flat


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The key paths whose value differs, or that exist on one side only (sorted)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, None) != b.get(k, None)
                  or (k in a) != (k in b))


def _pattern(text: str) -> tuple[re.Pattern[str], bool]:
    presence = text.endswith("?")
    body = re.escape(text.rstrip("?")).replace(r"\*", r"[^.\[\]]+")
    return re.compile(body if presence else body + r"(?:[.\[].*)?"), presence


def restart_keys(
    old: Mapping[str, Any], new: Mapping[str, Any], restart: Iterable[str]
) -> list[str]:
    """The changed key paths that match one of the ``restart`` patterns."""
    a, b = flatten(old), flatten(new)
    patterns = [_pattern(p) for p in restart]
    found = []
    for key in changed_keys(old, new):
        for regex, presence in patterns:
            if not regex.fullmatch(key):
                continue
            if presence and (key in a) == (key in b):
                continue
            found.append(key)
            break
    return found


def refuse_restart_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], restart: Iterable[str]
) -> None:
    """
    Raise :class:`~epsproxy.net.lifecycle.ReloadError` naming every changed key path that
    needs a restart (``"jsonrpc_server.bind_address: changing it needs a restart"``).
    """
    keys = restart_keys(old, new, restart)
    if keys:
        # A whole block that appeared or disappeared lists its leaves too: name the block.
        shown = [k for k in keys if not any(k.startswith(o + ".") or k.startswith(o + "[")
                                            for o in keys if o != k)]
        raise ReloadError("; ".join(f"{k}: changing it needs a restart" for k in shown))
