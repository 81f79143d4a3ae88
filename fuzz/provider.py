"""
Turn fuzz input bytes into typed values.

Under atheris the targets use its ``FuzzedDataProvider`` (fast, C++); without atheris
(``make test`` on a machine without it) :class:`FallbackProvider` offers the same methods
so the targets still run.  The two read bytes differently: an input does not decode to
the same values under both, which does not matter for the properties checked.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

__all__ = ["FallbackProvider", "provider"]

try:  # pragma: no cover - depends on the environment
    from atheris import FuzzedDataProvider as _Atheris
except ImportError:  # pragma: no cover
    _Atheris = None


class FallbackProvider:
    """A pure-Python subset of atheris' ``FuzzedDataProvider`` (front-to-back reads)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    def remaining_bytes(self) -> int:
        return len(self._data) - self._pos

    def ConsumeBytes(self, count: int) -> bytes:
        count = max(0, count)
        chunk = self._data[self._pos:self._pos + count]
        self._pos += len(chunk)
        return chunk

    def ConsumeIntInRange(self, low: int, high: int) -> int:
        if high <= low:
            return low
        span = high - low
        size = (span.bit_length() + 7) // 8
        raw = self.ConsumeBytes(size)
        return low + int.from_bytes(raw, "big") % (span + 1) if raw else low

    def ConsumeBool(self) -> bool:
        return bool(self.ConsumeIntInRange(0, 1))

    def ConsumeRegularFloat(self) -> float:
        raw = self.ConsumeBytes(8).ljust(8, b"\x00")
        value = struct.unpack("<d", raw)[0]
        return value if value == value and abs(value) != float("inf") else 0.0

    def ConsumeUnicodeNoSurrogates(self, count: int) -> str:
        raw = self.ConsumeBytes(max(0, count))
        if not raw:
            return ""
        kind, rest = raw[0], raw[1:]
        if kind & 1:
            return rest.decode("latin-1")
        return rest.decode("utf-8", "replace")

    def ConsumeUnicode(self, count: int) -> str:
        return self.ConsumeUnicodeNoSurrogates(count)

    def PickValueInList(self, values: Sequence[Any]) -> Any:
        return values[self.ConsumeIntInRange(0, len(values) - 1)]


def provider(data: bytes) -> Any:
    """A data provider over ``data``: atheris' when available, else :class:`FallbackProvider`."""
    if _Atheris is not None:
        return _Atheris(data)
    return FallbackProvider(data)
