"""
The change-record schemas (SPEC §3.2) and the hashes of a record (SPEC §4.4): what a
record, a signed record and signed data look like, their normalised form, the ``hash``
field and the digest that is signed.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Sequence

from epsproxy.rules import forms
from epsproxy.rules.records.canonical import canonical_time, encode, utf8
from epsproxy.rules.records.errors import InvalidRecord

__all__ = [
    "CERTIFICATES_DATA",
    "CHANGE_RECORD",
    "MAX_CERTIFICATE_PEM",
    "SECTIONS",
    "SIGNATURE",
    "SIGNED_DATA",
    "SIGNED_RECORD",
    "digest_from_stream",
    "normalise_record",
    "normalise_signed_record",
    "record_hash",
    "record_stream",
    "signature_digest",
]

SECTIONS: tuple[str, ...] = (
    "channels",
    "certificates",
    "services",
    "preferences",
    "settings",
    "groups",
)

#: Longest accepted ``signature.c`` text; a real signing certificate is about 1 KiB.
MAX_CERTIFICATE_PEM = 64 * 1024


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


CERTIFICATES_DATA = forms.List(_Map({"fingerprint": _R(_Text()), "key_usage": _R(_Text())}))
_SECTION_DATA: dict[str, forms.Schema] = {
    "channels": forms.List(_Map({"type": _R(_Text()), "settings": _O(forms.AnyMap())})),
    "groups": forms.StringList(lenient=True),
    "settings": forms.List(_scoped("settings")),
    # Quirk kept for hash compatibility: the inner key is "settings" here too (SPEC §3.2).
    "preferences": forms.List(_scoped("settings")),
    "services": forms.List(_SERVICE),
    "certificates": CERTIFICATES_DATA,
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


def normalise_record(record: object) -> dict:
    """The validated change record (SPEC §3.2) with ``created_at`` canonicalised."""
    return CHANGE_RECORD.validate(record)


def normalise_signed_record(signed: dict) -> dict:
    """The validated signed change record; unknown keys are dropped, defaults inserted."""
    return SIGNED_RECORD.validate(signed)


def record_stream(normalised: dict) -> bytes:
    try:
        data = encode(normalised)
    except ValueError as e:  # free-form objects may hold NaN or absurd nesting
        raise InvalidRecord(f"record cannot be hashed: {e}") from None
    assert data is not None  # a record always has a section
    return data


def digest_from_stream(record_stream: bytes, record_hash_hex: str, parent_hash: str) -> bytes:
    # SH({"hash", "parent_hash", "record"}) with keys in byte order, reusing ENC(record).
    parts = [b"stringmap"]
    if record_hash_hex:
        parts += [b"string" + utf8(record_hash_hex), b"stringhash"]
    if parent_hash:
        parts += [b"string" + utf8(parent_hash), b"stringparent_hash"]
    parts += [record_stream, b"stringrecord"]
    return hashlib.sha256(b"".join(parts)).digest()


def record_hash(record: dict) -> str:
    """
    Lowercase hex of SH(normalised record): the ``hash`` field (SPEC §4.4).  Raises
    ``forms.FormError`` for a malformed record, :class:`InvalidRecord` for an unhashable one.
    """
    return hashlib.sha256(record_stream(normalise_record(record))).hexdigest()


def signature_digest(signed: dict) -> bytes:
    """SH({parent_hash, hash, record}) of a signed record: the 32 bytes that are signed."""
    if not isinstance(signed, dict):
        raise forms.FormError("expected a mapping")
    stream = record_stream(normalise_record(signed.get("record")))
    parent = signed.get("parent_hash") or ""
    hash_hex = signed.get("hash") or ""
    if not isinstance(parent, str) or not isinstance(hash_hex, str):
        raise forms.FormError("hash and parent_hash must be strings")
    return digest_from_stream(stream, hash_hex, parent)
