"""
The canonical encoding of JSON values and its hash, the structured hash SH (SPEC §4), and
the canonical form of time stamps (SPEC §4.3).

The encoding must match the Go nodes' byte for byte: a record's hash and its signature
are computed over it.  :func:`loads` reads JSON for hashing (``-0`` kept, ``NaN``
refused); :func:`encode` is ENC, :func:`structured_hash` is SH.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "canonical_time",
    "encode",
    "loads",
    "structured_hash",
    "timestamp_ns",
    "utf8",
]

#: Nesting deeper than this is refused by :func:`encode` (hostile input, not real data).
MAX_DEPTH = 200


# ------------------------------------------------------------ structured hash (§4)

_NULL_FLOAT = b"\x00" * 8
_TRUE = b"stringbool\x02" + b"\x00" * 9
_pack_double = struct.Struct("<d").pack
_SURROGATES = re.compile("[\ud800-\udfff]")


def utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        # Lone surrogates (JSON "\ud800") become U+FFFD, as Go's JSON decoder does.
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")


def _parse_int(text: str) -> int | float:
    return -0.0 if text == "-0" else int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str | bytes) -> Any:
    """
    ``json.loads`` for hashed data: JSON ``-0`` stays ``-0.0`` (it hashes differently from
    ``0``), ``NaN``/``Infinity`` are refused, and hostile nesting raises ``ValueError``.
    """
    try:
        return json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


_INDEX = tuple(b"string%d" % i for i in range(256))


def _slow_keys(mapping: dict) -> list[tuple[bytes, str]]:
    try:
        return sorted((utf8(k), k) for k in mapping)
    except AttributeError:
        raise ValueError("object keys must be strings") from None


def _encode_into(value: Any, out: list[bytes], depth: int) -> None:
    """Append ENC(value) to ``out``; appends nothing when ENC(value) is NULL."""
    kind = type(value)
    if kind is str:
        if value:
            out.append(b"string" + utf8(value))
    elif kind is dict or isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise ValueError(f"value is nested deeper than {MAX_DEPTH} levels")
        append = out.append
        append(b"stringmap")
        try:
            # For valid text, code point order is UTF-8 byte order, and str sorting is fast.
            pairs = [(k.encode("utf-8"), k) for k in sorted(value)]
        except UnicodeEncodeError:
            pairs = _slow_keys(value)
        except (TypeError, AttributeError):
            raise ValueError("object keys must be strings") from None
        for raw_key, key in pairs:
            item = value[key]
            if type(item) is str:  # the common case, inlined for speed
                if not item:
                    continue
                append(b"string" + utf8(item))
            else:
                mark = len(out)
                _encode_into(item, out, depth + 1)
                if len(out) == mark:
                    continue
            if raw_key:
                append(b"string" + raw_key)
    elif kind is list or kind is tuple or isinstance(value, (list, tuple)):
        if not value:
            return
        if depth >= MAX_DEPTH:
            raise ValueError(f"value is nested deeper than {MAX_DEPTH} levels")
        append = out.append
        append(b"stringlist")
        for i, item in enumerate(value):
            append(_INDEX[i] if i < 256 else b"string%d" % i)
            if type(item) is str:
                if item:
                    append(b"string" + utf8(item))
            else:
                _encode_into(item, out, depth + 1)
    elif value is None or value is False:
        return
    elif value is True:
        out.append(_TRUE)
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError("number is too large for a double") from None
        if not math.isfinite(number):
            raise ValueError("number is not finite")
        packed = _pack_double(number)
        if packed != _NULL_FLOAT:
            out.append(b"stringfloat" + packed + b"\x00\x00")
    elif isinstance(value, (bytes, bytearray)):
        if value:
            out.append(b"stringbytes" + bytes(value))
    else:
        raise ValueError(f"cannot hash a value of type {type(value).__name__}")


def encode(value: Any) -> bytes | None:
    """
    ENC of SPEC §4.2: the canonical byte stream of a JSON-like value, or ``None`` for NULL.

    Raises ``ValueError`` for values that have no encoding (non-finite numbers, non-string
    keys, unknown types, nesting deeper than :data:`MAX_DEPTH`).
    """
    out: list[bytes] = []
    _encode_into(value, out, 0)
    return b"".join(out) if out else None


def structured_hash(value: Any) -> bytes:
    """SH(value) = SHA-256(ENC(value)), 32 bytes; ``ValueError`` if ENC(value) is NULL."""
    data = encode(value)
    if data is None:
        raise ValueError("an empty value has no structured hash")
    return hashlib.sha256(data).digest()


# --------------------------------------------------------------- time stamps (§4.3)

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})"
)
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _parse_time(text: str) -> tuple[tuple[int, ...], int, int]:
    """((year, month, day, hour, minute, second), nanoseconds, offset minutes)."""
    if not isinstance(text, str):
        raise ValueError("time stamp must be a string")
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError("not an RFC 3339 time stamp")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= month <= 12:
        raise ValueError("month out of range")
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS[month - 1] + (1 if month == 2 and leap else 0):
        raise ValueError("day out of range")
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("time of day out of range")
    nanos = int((m.group(7) or "0")[:9].ljust(9, "0"))
    zone = m.group(8)
    offset = 0
    if zone != "Z":
        zone_hours, zone_minutes = int(zone[1:3]), int(zone[4:6])
        if zone_hours > 23 or zone_minutes > 59:
            raise ValueError("time zone offset out of range")
        offset = (zone_hours * 60 + zone_minutes) * (-1 if zone[0] == "-" else 1)
    return (year, month, day, hour, minute, second), nanos, offset


def canonical_time(text: str) -> str:
    """
    Go's RFC3339Nano rendering of an RFC 3339 time stamp (SPEC §4.3): nanoseconds kept,
    trailing zeros dropped, ``Z`` for a zero offset.  Raises ``ValueError``.
    """
    fields, nanos, offset = _parse_time(text)
    result = "%04d-%02d-%02dT%02d:%02d:%02d" % fields
    if nanos:
        result += "." + ("%09d" % nanos).rstrip("0")
    if offset == 0:
        return result + "Z"
    sign = "-" if offset < 0 else "+"
    return result + "%s%02d:%02d" % (sign, abs(offset) // 60, abs(offset) % 60)


def timestamp_ns(text: str) -> int:
    """Nanoseconds since the Unix epoch of an RFC 3339 time stamp (for ordering records)."""
    (year, month, day, hour, minute, second), nanos, offset = _parse_time(text)
    # Year 0 is valid RFC 3339 but not a Python date: count days by hand.
    days = _days_from_civil(year, month, day)
    seconds = ((days * 24 + hour) * 60 + minute - offset) * 60 + second
    return seconds * 1_000_000_000 + nanos


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (any year >= 0)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
