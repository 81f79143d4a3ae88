"""
Signed change records: the structured hash, record schemas, ECDSA signatures, signing
certificates, chain validation and the rule of who may write into the directory.

This package's name is the public API; each concept lives in one module of it:

- :mod:`.errors`: :class:`RecordError` and its kinds;
- :mod:`.canonical`: the canonical encoding and structured hash (SPEC §4), time stamps;
- :mod:`.schema`: the record schemas (SPEC §3.2), a record's hash and signed digest;
- :mod:`.trust`: signing certificates (SPEC §5.2) and chain validation (SPEC §5.3);
- :mod:`.signing`: ECDSA signing and the verification of records and data (SPEC §5.1, §5.4).

Everything here is pure (no network, no reactor) and written to be fast, because the
service directory verifies every record of a chain: a signer is loaded once per
certificate text, a certificate chain is validated once per (certificate, DNS name), the
structured encoding of a record is computed once and reused for its hash and its
signature digest, and signing-key pins are kept incrementally (:class:`Pins`).

The wire formats follow SPEC §2.2–§5 exactly (they must, to interoperate with Go nodes);
where the reference crashes or is lax (SPEC §23 #35: malformed PEM) this package refuses
with :class:`InvalidRecord` and a clear reason instead.
"""

from __future__ import annotations

from epsproxy.rules.records.canonical import (
    MAX_DEPTH,
    canonical_time,
    encode,
    loads,
    structured_hash,
    timestamp_ns,
)
from epsproxy.rules.records.errors import InvalidRecord, NotAllowed, RecordError, SigningError
from epsproxy.rules.records.schema import (
    CHANGE_RECORD,
    MAX_CERTIFICATE_PEM,
    SECTIONS,
    SIGNED_DATA,
    SIGNED_RECORD,
    normalise_record,
    normalise_signed_record,
    record_hash,
    signature_digest,
)
from epsproxy.rules.records.signing import (
    ADMIN_GROUP,
    Pins,
    sign_data,
    sign_record,
    verify_data,
    verify_record,
)
from epsproxy.rules.records.trust import Signer, TrustStore, load_signer

__all__ = [
    "RecordError",
    "InvalidRecord",
    "NotAllowed",
    "SigningError",
    "SECTIONS",
    "ADMIN_GROUP",
    "MAX_DEPTH",
    "MAX_CERTIFICATE_PEM",
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
