"""
Reading certificates and keys from PEM, and the facts about a certificate the network
relies on: its SHA-256 fingerprint (what the directory pins) and its names.

Every loader raises :class:`CertificateError` with a message that names the problem
(and the file, when there is one) instead of crashing on malformed input (SPEC §23 #35).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

__all__ = [
    "CertificateError",
    "fingerprint",
    "load_certificates",
    "load_certificate_file",
    "load_certificates_file",
    "load_private_key_file",
    "certificate_names",
    "to_pem",
]


class CertificateError(ValueError):
    """A certificate or key could not be read or does not have the required form."""


def fingerprint(certificate: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER encoding: the value pinned in the directory."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def to_pem(certificate: x509.Certificate) -> str:
    """PEM text of one certificate (64-character lines, trailing newline)."""
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_certificates(data: bytes | str, source: str = "input") -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in order; at least one must be present."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(f"{source}: no PEM certificate found")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as e:
        raise CertificateError(f"{source}: not a valid PEM certificate ({e})") from None
    if not certificates:
        raise CertificateError(f"{source}: no PEM certificate found")
    for certificate in certificates:
        _check_parts(certificate, source)
    return certificates


def _check_parts(certificate: x509.Certificate, source: str) -> None:
    """
    Parse the parts of ``certificate`` that ``cryptography`` only parses when first
    used, so a malformed one fails here, as a :class:`CertificateError`, and not later
    with a ``TypeError`` from deep inside chain building (found by fuzzing: an issuer
    name with a BIT STRING attribute of the wrong type).
    """
    try:
        certificate.subject
        certificate.issuer
        certificate.extensions
        certificate.public_key()
        certificate.not_valid_before_utc
        certificate.not_valid_after_utc
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"{source}: malformed certificate ({e})") from None


def load_certificates_file(path: str | Path) -> list[x509.Certificate]:
    """All certificates of a PEM file (a leaf followed by its intermediates, or a CA list)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CertificateError(f"{path}: cannot read certificate file ({e.strerror})") from None
    return load_certificates(data, str(path))


def load_certificate_file(path: str | Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return load_certificates_file(path)[0]


def load_private_key_file(path: str | Path) -> PrivateKeyTypes:
    """An unencrypted PEM private key (PKCS#8, SEC 1 ``EC PRIVATE KEY`` or PKCS#1)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CertificateError(f"{path}: cannot read key file ({e.strerror})") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{path}: not a usable PEM private key ({e})") from None


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """
    The names a TLS certificate claims, as SPEC §12.5 lists them: the subject CN first,
    then every DNS subjectAltName, in order (duplicates kept).
    """
    names: list[str] = [
        str(attribute.value)
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    names.extend(san.value.get_values_for_type(x509.DNSName))
    return names


def fingerprints(certificates: Iterable[x509.Certificate]) -> list[str]:
    """Fingerprints of several certificates, in order."""
    return [fingerprint(c) for c in certificates]
