"""
Signed change records: the structured hash, record schemas, ECDSA signatures, signing
certificates, chain validation and the rule of who may write into the directory.

Everything here is pure (no network, no reactor) and written to be fast, because the
service directory verifies every record of a chain: a signer is loaded once per
certificate text, a certificate chain is validated once per (certificate, DNS name), the
structured encoding of a record is computed once and reused for its hash and its
signature digest, and signing-key pins are kept incrementally (:class:`Pins`).

The wire formats follow SPEC §2.2–§5 exactly (they must, to interoperate with Go nodes);
where the reference crashes or is lax (SPEC §23 #35: malformed PEM) this module refuses
with :class:`InvalidRecord` and a clear reason instead.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import ExtendedKeyUsageOID

from epsproxy.rules import forms
from epsproxy.rules.certificates import (
    CertificateError,
    fingerprint,
    load_certificates,
    load_certificates_file,
    to_pem,
)

__all__ = [
    "RecordError",
    "InvalidRecord",
    "NotAllowed",
    "SigningError",
    "SECTIONS",
    "ADMIN_GROUP",
    "loads",
    "encode",
    "structured_hash",
    "canonical_time",
    "timestamp_ns",
    "CHANGE_RECORD",
    "SIGNED_RECORD",
    "SIGNED_DATA",
    "normalise_record",
    "normalise_signed_record",
    "record_hash",
    "signature_digest",
    "Signer",
    "load_signer",
    "TrustStore",
    "sign_record",
    "sign_data",
    "verify_data",
    "Pins",
    "verify_record",
]

SECTIONS: tuple[str, ...] = (
    "channels",
    "certificates",
    "services",
    "preferences",
    "settings",
    "groups",
)

#: Only signers in this group may write change records (SPEC §5.4).
ADMIN_GROUP = "sd-admin"

#: Nesting deeper than this is refused by :func:`encode` (hostile input, not real data).
MAX_DEPTH = 200

#: Longest accepted ``signature.c`` text; a real signing certificate is about 1 KiB.
MAX_CERTIFICATE_PEM = 64 * 1024


# --------------------------------------------------------------------------- errors


class RecordError(Exception):
    """A record, signature or certificate was refused; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class InvalidRecord(RecordError):
    """Malformed record, hash mismatch, unusable certificate or a bad signature."""


class NotAllowed(RecordError):
    """Well-formed, but the signer may not write it (group, pinned key, untrusted chain)."""


class SigningError(RecordError):
    """Our own key or certificate cannot produce a valid signature."""


# ------------------------------------------------------------ structured hash (§4)

_NULL_FLOAT = b"\x00" * 8
_TRUE = b"stringbool\x02" + b"\x00" * 9
_pack_double = struct.Struct("<d").pack
_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
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
        return sorted((_utf8(k), k) for k in mapping)
    except AttributeError:
        raise ValueError("object keys must be strings") from None


def _encode_into(value: Any, out: list[bytes], depth: int) -> None:
    """Append ENC(value) to ``out``; appends nothing when ENC(value) is NULL."""
    kind = type(value)
    if kind is str:
        if value:
            out.append(b"string" + _utf8(value))
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
                append(b"string" + _utf8(item))
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
                    append(b"string" + _utf8(item))
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


# ------------------------------------------------------------ record schemas (§3.2)


def _only_call(rights: list[str]) -> list[str]:
    for right in rights:
        if right != "call":
            raise ValueError(f"unknown right {right!r} (only 'call' is valid)")
    if len(set(rights)) != len(rights):
        raise ValueError("rights must not repeat")
    return rights


class _Map(forms.Map):
    """
    A lenient :class:`forms.Map` with the same semantics and a tighter loop: record
    normalisation is on the service directory's hot path (every record it loads).
    """

    def __init__(self, fields: dict[str, forms.Field]) -> None:
        super().__init__(fields, strict=False)
        self._plan = tuple(
            (key, f.schema.validate, f.required, f.default) for key, f in self.fields.items()
        )

    def validate(self, value: Any, path: Sequence[forms.PathItem] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            return super().validate(value, path)  # raises the usual error
        result = {}
        get = value.get
        for key, check, required, default in self._plan:
            item = get(key)
            if item is None or (item == "" and not required):
                if required:
                    raise forms.FormError("is required", (*path, key))
                if default is not forms.MISSING:
                    result[key] = default if type(default) is str else copy.deepcopy(default)
                continue
            result[key] = check(item, (*path, key))
        return result


class _Text(forms.String):
    """An unconstrained string, checked with one type test (the usual case in records)."""

    def validate(self, value: Any, path: Sequence[forms.PathItem] = ()) -> str:
        return value if type(value) is str else super().validate(value, path)


_R = forms.Required
_O = forms.Optional
_PERMISSION = _Map(
    {"group": _R(_Text()), "rights": _R(forms.Check(forms.StringList(lenient=True), _only_call))}
)
_VALIDATOR = _Map({"type": _R(_Text()), "parameters": _O(forms.AnyMap())})
_PARAMETER = _Map({"name": _R(_Text()), "validators": _O(forms.List(_VALIDATOR))})
_METHOD = _Map(
    {
        "name": _R(_Text()),
        "permissions": _O(forms.List(_PERMISSION), default=[]),
        "parameters": _O(forms.List(_PARAMETER)),
    }
)
_SERVICE = _Map(
    {
        "name": _R(_Text()),
        "permissions": _O(forms.List(_PERMISSION), default=[]),
        "methods": _O(forms.List(_METHOD), default=[]),
    }
)


def _scoped(inner_key: str) -> forms.Map:
    return _Map(
        {
            "operator": _O(_Text(), default=""),
            "service": _O(_Text(), default=""),
            "environment": _O(_Text(), default=""),
            inner_key: _R(forms.AnyMap()),
        }
    )


_CERTIFICATES = forms.List(_Map({"fingerprint": _R(_Text()), "key_usage": _R(_Text())}))
_SECTION_DATA: dict[str, forms.Schema] = {
    "channels": forms.List(_Map({"type": _R(_Text()), "settings": _O(forms.AnyMap())})),
    "groups": forms.StringList(lenient=True),
    "settings": forms.List(_scoped("settings")),
    # Quirk kept for hash compatibility: the inner key is "settings" here too (SPEC §3.2).
    "preferences": forms.List(_scoped("settings")),
    "services": forms.List(_SERVICE),
    "certificates": _CERTIFICATES,
}
assert set(_SECTION_DATA) == set(SECTIONS)


class _ChangeRecordSchema(forms.Schema):
    """The change-record schema: ``data`` is validated according to ``section``."""

    _head = _Map(
        {
            "name": _R(_Text()),
            "section": _R(forms.String(choices=SECTIONS)),
            "created_at": _R(forms.Check(forms.String(max_length=100), canonical_time)),
        }
    )

    def validate(self, value: Any, path: Sequence[forms.PathItem] = ()) -> dict[str, Any]:
        head = self._head.validate(value, path)
        data = value.get("data")
        if data is None:
            raise forms.FormError("is required", (*path, "data"))
        return {
            "name": head["name"],
            "section": head["section"],
            "data": _SECTION_DATA[head["section"]].validate(data, (*path, "data")),
            "created_at": head["created_at"],
        }


_DECIMAL = r"[0-9]{10,100}"  # not \d: Python's \d also matches non-ASCII digits
CHANGE_RECORD: forms.Schema = _ChangeRecordSchema()
SIGNATURE: forms.Schema = _Map(
    {
        "r": _R(forms.String(pattern=_DECIMAL)),
        "s": _R(forms.String(pattern=_DECIMAL)),
        "c": _R(forms.String(max_length=MAX_CERTIFICATE_PEM)),
    }
)
SIGNED_RECORD: forms.Schema = _Map(
    {
        "parent_hash": _O(forms.String(pattern=r"[a-f0-9]{64}"), default=""),
        # Any-case hex is well-formed (as in Go); only lowercase matches the computed hash.
        "hash": _R(forms.String(pattern=r"[0-9a-fA-F]{64}")),
        "signature": _R(SIGNATURE),
        "record": _R(CHANGE_RECORD),
    }
)
SIGNED_DATA: forms.Schema = _Map({"signature": _R(SIGNATURE), "data": _R(forms.AnyValue())})


def normalise_record(record: dict) -> dict:
    """The validated change record (SPEC §3.2) with ``created_at`` canonicalised."""
    return CHANGE_RECORD.validate(record)


def normalise_signed_record(signed: dict) -> dict:
    """The validated signed change record; unknown keys are dropped, defaults inserted."""
    return SIGNED_RECORD.validate(signed)


def _record_stream(normalised: dict) -> bytes:
    try:
        data = encode(normalised)
    except ValueError as e:  # free-form objects may hold NaN or absurd nesting
        raise InvalidRecord(f"record cannot be hashed: {e}") from None
    assert data is not None  # a record always has a section
    return data


def _digest_from_stream(record_stream: bytes, record_hash_hex: str, parent_hash: str) -> bytes:
    # SH({"hash", "parent_hash", "record"}) with keys in byte order, reusing ENC(record).
    parts = [b"stringmap"]
    if record_hash_hex:
        parts += [b"string" + _utf8(record_hash_hex), b"stringhash"]
    if parent_hash:
        parts += [b"string" + _utf8(parent_hash), b"stringparent_hash"]
    parts += [record_stream, b"stringrecord"]
    return hashlib.sha256(b"".join(parts)).digest()


def record_hash(record: dict) -> str:
    """
    Lowercase hex of SH(normalised record): the ``hash`` field (SPEC §4.4).  Raises
    ``forms.FormError`` for a malformed record, :class:`InvalidRecord` for an unhashable one.
    """
    return hashlib.sha256(_record_stream(normalise_record(record))).hexdigest()


def signature_digest(signed: dict) -> bytes:
    """SH({parent_hash, hash, record}) of a signed record: the 32 bytes that are signed."""
    if not isinstance(signed, dict):
        raise forms.FormError("expected a mapping")
    stream = _record_stream(normalise_record(signed.get("record")))
    parent = signed.get("parent_hash") or ""
    hash_hex = signed.get("hash") or ""
    if not isinstance(parent, str) or not isinstance(hash_hex, str):
        raise forms.FormError("hash and parent_hash must be strings")
    return _digest_from_stream(stream, hash_hex, parent)


# ------------------------------------------------------- signing certificates (§5.2)


@dataclass(frozen=True)
class Signer:
    """Who signed: the ``iris-name`` and ``iris-group`` identities of a signing certificate."""

    name: str
    groups: tuple[str, ...]
    certificate: x509.Certificate
    fingerprint: str
    public_key: ec.EllipticCurvePublicKey | None = field(default=None, compare=False, repr=False)


def _first_pem_block(pem: str) -> str:
    # Plain finds, not a regex: stays linear on hostile input.
    start = pem.find("-----BEGIN ")
    label_end = pem.find("-----", start + 11) if start >= 0 else -1
    label = pem[start + 11 : label_end]
    if label_end < 0 or not label or "\n" in label:
        raise InvalidRecord("signing certificate is not PEM (no PEM block found)")
    if label != "CERTIFICATE":
        raise InvalidRecord(f"signing certificate: first PEM block is {label!r}, not CERTIFICATE")
    end_marker = "-----END CERTIFICATE-----"
    end = pem.find(end_marker, label_end)
    if end < 0:
        raise InvalidRecord("signing certificate is not PEM (no END line)")
    return pem[start : end + len(end_marker)] + "\n"


@functools.lru_cache(maxsize=1024)
def _load_signer_cached(pem: str) -> Signer:
    block = _first_pem_block(pem)
    try:
        certificate = x509.load_pem_x509_certificate(block.encode("ascii"))
        # cryptography parses names lazily: a malformed one must fail here, not with a
        # TypeError deep inside chain building (found by fuzzing, fuzz/ records).
        certificate.subject
        certificate.issuer
    except (ValueError, TypeError, UnicodeEncodeError, x509.InvalidVersion) as e:
        raise InvalidRecord(f"signing certificate cannot be parsed ({e})") from None
    try:
        extensions = certificate.extensions
        key_usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidRecord("signing certificate has no keyUsage extension") from None
    except ValueError as e:
        raise InvalidRecord(f"signing certificate has malformed extensions ({e})") from None
    if not key_usage.digital_signature:
        raise InvalidRecord("signing certificate lacks keyUsage digitalSignature")
    try:
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidRecord("signing certificate has an unreadable public key") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidRecord("signing certificate does not hold an ECDSA key")
    name = ""
    groups: list[str] = []
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        scheme, _, rest = uri.partition(":")
        scheme = scheme.lower()
        if scheme not in ("iris-name", "iris-group"):
            continue
        # Go's URL.Host: the authority without userinfo, case kept.
        authority = rest[2:] if rest.startswith("//") else ""
        authority = re.split(r"[/?#]", authority, maxsplit=1)[0].rpartition("@")[2]
        if scheme == "iris-name":
            name = authority
        elif authority:
            groups.append(authority)
    return Signer(name, tuple(groups), certificate, fingerprint(certificate), public_key)


def load_signer(pem: str) -> Signer:
    """
    The signer described by the first PEM certificate of ``pem`` (SPEC §5.2), cached by
    the PEM text.  Raises :class:`InvalidRecord` naming what is wrong.
    """
    if not isinstance(pem, str):
        raise InvalidRecord("signing certificate must be a PEM string")
    if len(pem) > MAX_CERTIFICATE_PEM:
        raise InvalidRecord("signing certificate is too long")
    return _load_signer_cached(pem)


# ------------------------------------------------------------ chain validation (§5.3)

_CODE_SIGNING_EKUS = frozenset(
    {ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)
MAX_CHAIN_DEPTH = 8
MAX_ISSUER_CANDIDATES = 16
_MAX_SIGNATURE_CHECKS = 64


def _usable_in_chain(cert: x509.Certificate) -> bool:
    """EKU permits code signing; no critical extension we cannot honour."""
    try:
        extensions = cert.extensions
    except ValueError:
        return False
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.ExtendedKeyUsage):
            if not _CODE_SIGNING_EKUS.intersection(value):
                return False
        elif extension.critical and isinstance(
            value, (x509.UnrecognizedExtension, x509.NameConstraints)
        ):
            # Name constraints are not evaluated here, so fail closed.
            return False
    return True


def _can_issue(cert: x509.Certificate, intermediates_below: int) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    if not constraints.ca:
        return False
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        return False
    return _usable_in_chain(cert)


def _dns_matches(cert: x509.Certificate, host: str) -> bool:
    """Go ``VerifyHostname`` for DNS names: SAN only, case-insensitive, ``*.`` wildcard."""
    host = host.lower().rstrip(".")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    for pattern in san.get_values_for_type(x509.DNSName):
        pattern = pattern.lower().rstrip(".")
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host:
            label, _, rest = host.partition(".")
            if label and rest == pattern[2:]:
                return True
    return False


def _window(chain: Sequence[x509.Certificate]) -> tuple[float, float]:
    return (
        max(c.not_valid_before_utc.timestamp() for c in chain),
        min(c.not_valid_after_utc.timestamp() for c in chain),
    )


class TrustStore:
    """
    Roots and intermediates for signing-certificate chains (SPEC §5.3).

    The time-independent part of a verification (path building, CA flags, path lengths,
    EKU, DNS name) is cached per (fingerprint, DNS name) as the time windows in which
    each found path is valid, so a cached answer still honours certificate expiry.
    ``clock`` returns POSIX seconds (pass ``reactor.seconds``; tests pass a ``Clock``).

    Go ``x509.Verify`` semantics, slightly stricter: a configured root must itself be a CA
    (basicConstraints) unless it is the signing certificate, and certificates with
    critical name constraints or unknown critical extensions are refused (fail closed).
    Path building is bounded (depth, candidates per step, signature checks).
    """

    def __init__(
        self,
        roots: Iterable[x509.Certificate],
        intermediates: Iterable[x509.Certificate] = (),
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
    ) -> None:
        self.roots = list(roots)
        self.intermediates = list(intermediates)
        self._root_fingerprints = {fingerprint(c) for c in self.roots}
        self._by_subject: dict[x509.Name, list[tuple[x509.Certificate, str]]] = {}
        seen: set[str] = set()
        for cert in [*self.roots, *self.intermediates]:
            fp = fingerprint(cert)
            if fp not in seen:
                seen.add(fp)
                self._by_subject.setdefault(cert.subject, []).append((cert, fp))
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[tuple[float, float], ...]] = (
            OrderedDict()
        )
        self._cache_size = cache_size

    @classmethod
    def from_files(
        cls,
        root_files: Iterable[str | Path],
        intermediate_files: Iterable[str | Path] = (),
        **kwargs: Any,
    ) -> "TrustStore":
        """Load every certificate of the given PEM files; raises ``CertificateError``."""
        roots = [c for path in root_files for c in load_certificates_file(path)]
        intermediates = [c for path in intermediate_files for c in load_certificates_file(path)]
        return cls(roots, intermediates, **kwargs)

    def verify_chain(
        self,
        certificate: x509.Certificate,
        dns_name: str = "",
        *,
        certificate_fingerprint: str | None = None,
    ) -> bool:
        """
        True if ``certificate`` chains to one of the roots now (and matches ``dns_name``).
        A caller that already has the certificate's :func:`fingerprint` (a
        :class:`Signer` does) passes it as ``certificate_fingerprint`` to save hashing it
        again: it is the cache key.
        """
        if not self.roots:
            return False
        fp = certificate_fingerprint or fingerprint(certificate)
        key = (fp, dns_name.lower())
        windows = self._cache.get(key)
        if windows is None:
            windows = self._windows(certificate, fp, dns_name)
            self._cache[key] = windows
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        now = self._clock()
        return any(start <= now <= end for start, end in windows)

    def _windows(
        self, leaf: x509.Certificate, leaf_fp: str, dns_name: str
    ) -> tuple[tuple[float, float], ...]:
        if dns_name and not _dns_matches(leaf, dns_name):
            return ()
        if not _usable_in_chain(leaf):
            return ()
        found: list[tuple[float, float]] = []
        budget = [_MAX_SIGNATURE_CHECKS]

        def extend(chain: list[x509.Certificate], fps: set[str], last_fp: str) -> None:
            if last_fp in self._root_fingerprints:
                found.append(_window(chain))
                return
            if len(chain) > MAX_CHAIN_DEPTH:
                return
            last = chain[-1]
            for candidate, fp in self._by_subject.get(last.issuer, ())[:MAX_ISSUER_CANDIDATES]:
                if fp in fps or budget[0] <= 0:
                    continue
                if not _can_issue(candidate, len(chain) - 1):
                    continue
                budget[0] -= 1
                try:
                    last.verify_directly_issued_by(candidate)
                except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                    continue
                extend([*chain, candidate], fps | {fp}, fp)

        extend([leaf], {leaf_fp}, leaf_fp)
        return tuple(found)


# ----------------------------------------------------------------- ECDSA (§5.1)

_ALGORITHM = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


def _sign(digest: bytes, key: Any) -> tuple[str, str]:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningError("the signing key is not an ECDSA private key")
    r, s = utils.decode_dss_signature(key.sign(digest, _ALGORITHM))
    return str(r), str(s)


def _signature_ok(signer: Signer, digest: bytes, r: str, s: str) -> bool:
    public_key = signer.public_key or signer.certificate.public_key()
    try:
        signature = utils.encode_dss_signature(int(r), int(s))
        public_key.verify(signature, digest, _ALGORITHM)
    except (InvalidSignature, ValueError):
        return False
    return True


def _signing_certificate(key: Any, certificate_pem: str) -> str:
    """The PEM of the leaf of ``certificate_pem``, checked against §5.2 and ``key``."""
    try:
        leaf = load_certificates(certificate_pem, "signing certificate")[0]
    except CertificateError as e:
        raise SigningError(str(e)) from None
    pem = to_pem(leaf)
    try:
        signer = load_signer(pem)
    except InvalidRecord as e:
        raise SigningError(e.reason) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningError("the signing key is not an ECDSA private key")
    if key.public_key().public_numbers() != signer.certificate.public_key().public_numbers():
        raise SigningError("the signing key does not belong to the signing certificate")
    return pem


def sign_record(record: dict, parent_hash: str, key: Any, certificate_pem: str) -> dict:
    """
    A signed change record: ``record`` normalised (its ``created_at`` canonicalised, not
    replaced), hashed, linked to ``parent_hash`` and signed with ``key``.  ``c`` is the
    leaf of ``certificate_pem`` only.  Raises :class:`InvalidRecord` / :class:`SigningError`.
    """
    try:
        normalised = normalise_record(record)
    except forms.FormError as e:
        raise InvalidRecord(f"malformed record: {e}") from None
    if not isinstance(parent_hash, str) or not re.fullmatch(r"(?:[a-f0-9]{64})?", parent_hash):
        raise InvalidRecord("parent hash must be empty or 64 lowercase hex digits")
    pem = _signing_certificate(key, certificate_pem)
    stream = _record_stream(normalised)
    hash_hex = hashlib.sha256(stream).hexdigest()
    r, s = _sign(_digest_from_stream(stream, hash_hex, parent_hash), key)
    return {
        "parent_hash": parent_hash,
        "hash": hash_hex,
        "signature": {"r": r, "s": s, "c": pem},
        "record": normalised,
    }


def sign_data(data: Any, key: Any, certificate_pem: str) -> dict:
    """``{"signature": {r, s, c}, "data": data}`` signed over SH(data) (the CLI's ``sd sign``)."""
    try:
        digest = structured_hash(data)
    except ValueError as e:
        raise InvalidRecord(f"data cannot be signed: {e}") from None
    pem = _signing_certificate(key, certificate_pem)
    r, s = _sign(digest, key)
    return {"signature": {"r": r, "s": s, "c": pem}, "data": data}


def verify_data(signed: dict, trust: TrustStore, dns_name: str) -> Signer:
    """
    Check a signed-data object: the certificate chains to ``trust`` with ``dns_name`` as a
    DNS SAN, and the signature covers SH(data).  Returns the signer or raises RecordError.
    """
    try:
        signed = SIGNED_DATA.validate(signed)
        digest = structured_hash(signed["data"])
    except forms.FormError as e:
        raise InvalidRecord(f"malformed signed data: {e}") from None
    except ValueError as e:
        raise InvalidRecord(f"data cannot be hashed: {e}") from None
    signature = signed["signature"]
    signer = load_signer(signature["c"])
    if not trust.verify_chain(signer.certificate, dns_name,
                              certificate_fingerprint=signer.fingerprint):
        suffix = f" for name {dns_name}" if dns_name else ""
        raise NotAllowed(f"signing certificate does not chain to a trusted root{suffix}")
    if not _signature_ok(signer, digest, signature["r"], signature["s"]):
        raise InvalidRecord("invalid signature")
    return signer


# --------------------------------------------------------- record verification (§5.4)


class Pins:
    """
    The signing-certificate fingerprint pinned for each name by the ``certificates``
    records seen so far: the last ``signing`` item wins.  O(record size) per record.
    """

    def __init__(self) -> None:
        self._pins: dict[str, str] = {}

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "Pins":
        """Pins after observing ``records`` in order."""
        pins = cls()
        for signed in records:
            pins.observe(signed)
        return pins

    def observe(self, signed: dict) -> None:
        """Take note of a record accepted into the chain (any section; others are no-ops)."""
        record = signed.get("record") if isinstance(signed, dict) else None
        if not isinstance(record, dict) or record.get("section") != "certificates":
            return
        name = record.get("name")
        if not isinstance(name, str):
            return
        try:
            items = _CERTIFICATES.validate(record.get("data"))
        except forms.FormError:
            return  # invalid certificate data pins nothing (as the reference)
        for item in reversed(items):
            if item["key_usage"] == "signing":
                self._pins[name] = item["fingerprint"]
                return

    def pinned(self, name: str) -> str | None:
        """The pinned signing fingerprint of ``name``, if any."""
        return self._pins.get(name)

    def copy(self) -> "Pins":
        """An independent copy (to try a record without committing to it)."""
        other = Pins()
        other._pins = dict(self._pins)
        return other


def verify_record(
    signed: dict,
    preceding: Pins | Sequence[dict],
    trust: TrustStore,
    *,
    normalised: bool = False,
) -> Signer:
    """
    Verify one signed change record against the records before it (SPEC §5.4): hash,
    signer certificate, ``sd-admin`` membership, signing-key pin, chain, signature.

    ``preceding`` is a :class:`Pins` (fast path) or the preceding signed records in chain
    order.  ``normalised=True`` says ``signed`` came from :func:`normalise_signed_record`
    already (chains normalise once and keep the result), which saves a second pass.
    Returns the signer; raises :class:`InvalidRecord` or :class:`NotAllowed`.
    """
    if not normalised:
        try:
            signed = normalise_signed_record(signed)
        except forms.FormError as e:
            raise InvalidRecord(f"malformed record: {e}") from None
    stream = _record_stream(signed["record"])
    if hashlib.sha256(stream).hexdigest() != signed["hash"]:
        raise InvalidRecord("invalid hash value")
    signature = signed["signature"]
    signer = load_signer(signature["c"])
    if ADMIN_GROUP not in signer.groups:
        raise NotAllowed(f"signer {signer.name or '(unnamed)'} is not in group {ADMIN_GROUP}")
    pins = preceding if isinstance(preceding, Pins) else Pins.from_records(preceding)
    pinned = pins.pinned(signer.name)
    if pinned is not None and pinned != signer.fingerprint:
        raise NotAllowed(f"signing certificate of {signer.name} is not the pinned one")
    if not trust.verify_chain(signer.certificate, certificate_fingerprint=signer.fingerprint):
        raise NotAllowed("signing certificate does not chain to a trusted root")
    digest = _digest_from_stream(stream, signed["hash"], signed["parent_hash"])
    if not _signature_ok(signer, digest, signature["r"], signature["s"]):
        raise InvalidRecord("invalid signature")
    return signer
