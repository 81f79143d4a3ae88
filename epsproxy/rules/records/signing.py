"""
Signing and verifying: ECDSA over the structured hash (SPEC §5.1), signed change records
and signed data, and the rule of who may write into the directory (SPEC §5.4: the
``sd-admin`` group, signing-key pins, a trusted chain, a valid signature).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from epsproxy.rules import forms
from epsproxy.rules.certificates import CertificateError, load_certificates, to_pem
from epsproxy.rules.records.canonical import structured_hash
from epsproxy.rules.records.errors import InvalidRecord, NotAllowed, SigningError
from epsproxy.rules.records.schema import (
    CERTIFICATES_DATA,
    SIGNED_DATA,
    digest_from_stream,
    normalise_record,
    normalise_signed_record,
    record_stream,
)
from epsproxy.rules.records.trust import Signer, TrustStore, load_signer

__all__ = ["ADMIN_GROUP", "Pins", "sign_data", "sign_record", "verify_data", "verify_record"]

#: Only signers in this group may write change records (SPEC §5.4).
ADMIN_GROUP = "sd-admin"


# ----------------------------------------------------------------- ECDSA (§5.1)

_ALGORITHM = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


def _sign(digest: bytes, key: Any) -> tuple[str, str]:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningError("the signing key is not an ECDSA private key")
    r, s = utils.decode_dss_signature(key.sign(digest, _ALGORITHM))
    return str(r), str(s)


def _public_key(signer: Signer) -> ec.EllipticCurvePublicKey:
    # load_signer fills public_key; a Signer built by hand may leave it to the certificate.
    public_key = signer.public_key or signer.certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidRecord("signing certificate does not hold an ECDSA key")
    return public_key


def _signature_ok(signer: Signer, digest: bytes, r: str, s: str) -> bool:
    public_key = _public_key(signer)
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
    if key.public_key().public_numbers() != _public_key(signer).public_numbers():
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
    stream = record_stream(normalised)
    hash_hex = hashlib.sha256(stream).hexdigest()
    r, s = _sign(digest_from_stream(stream, hash_hex, parent_hash), key)
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
            items = CERTIFICATES_DATA.validate(record.get("data"))
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
    stream = record_stream(signed["record"])
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
    digest = digest_from_stream(stream, signed["hash"], signed["parent_hash"])
    if not _signature_ok(signer, digest, signature["r"], signature["s"]):
        raise InvalidRecord("invalid signature")
    return signer
