"""
What the network's certificates contain, in one place: the extensions of a TLS leaf and of
a signing leaf, the keys, the ``certificates`` record that pins them, and certificate
signing requests (CSRs) that ask a real CA for exactly that (``eps csr``).

The dev PKI (``epsproxy/dev/pki.py``, ``eps certs``) issues its leaves with these same
extensions, and the checks of :mod:`epsproxy.rules.credentials` and of signed records
(:mod:`epsproxy.rules.records.trust`) are what they must satisfy:

- every key is ECDSA P-256 (a signing key must be ECDSA; TLS keys are too, for cheap
  handshakes);
- a **TLS** leaf (mutual TLS between endpoint servers, to the SD, the gateway, the
  proxies) names the operator as a DNS subjectAltName (peers match it against the
  directory; the subject CN alone is not enough for the web-PKI verifier), has
  basicConstraints CA:FALSE (critical), keyUsage digitalSignature (critical) and
  extendedKeyUsage serverAuth + clientAuth (one certificate serves both sides);
- a **signing** leaf (signs change records) carries ``iris-name://<name>``, one
  ``iris-group://<group>`` per group (``sd-admin`` may write to the directory) and the
  name as a DNS subjectAltName (``eps sign`` checks the chain for that name), keyUsage
  digitalSignature, and no extendedKeyUsage (the records verifier accepts only none or
  codeSigning).

Pure: no reactor, no sockets. :func:`write_request` writes files, nothing else does.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epsproxy.rules.certificates import fingerprint

__all__ = [
    "KINDS",
    "SIGNING_KIND",
    "TLS_KIND",
    "Extension",
    "ProfileError",
    "Request",
    "certificate_kind",
    "certificates_record",
    "check_name",
    "pins_of",
    "key_pem",
    "key_usage",
    "make_request",
    "new_key",
    "signing_extensions",
    "tls_extensions",
    "write_request",
]

Kind = Literal["tls", "signing"]
TLS_KIND: Kind = "tls"
SIGNING_KIND: Kind = "signing"
KINDS: tuple[Kind, ...] = (TLS_KIND, SIGNING_KIND)

#: An extension and whether it is critical.
Extension = tuple[x509.ExtensionType, bool]

# An operator name, a group or an extra DNS name: DNS-like labels (letters, digits, '-',
# '_'), dot-separated; '*.' may start an extra DNS name. Nothing that would change the
# meaning of an iris-name:// URI (no '/', '@', ':', '?', '#', spaces).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
MAX_NAME_LENGTH = 253


class ProfileError(ValueError):
    """A name, group or file cannot be used for a request; the text says which and why."""


def check_name(value: str, what: str = "name", wildcard: bool = False) -> str:
    """``value`` if it can name an operator, a group or (``wildcard``) a DNS name."""
    text = value[2:] if wildcard and value.startswith("*.") else value
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LENGTH or \
            not _NAME.fullmatch(text):
        raise ProfileError(
            f"{what} {value!r} is not usable: letters, digits, '-' and '_' in dot-separated "
            f"labels, at most {MAX_NAME_LENGTH} characters"
        )
    return value


def key_usage(*, digital_signature: bool = False, ca: bool = False) -> x509.KeyUsage:
    """keyUsage with only the bits a leaf (digitalSignature) or a CA (certificate and CRL signing) needs."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def tls_extensions(name: str, extra_dns: Iterable[str] = ()) -> list[Extension]:
    """The extensions of a TLS leaf for operator ``name`` (extra DNS names after it)."""
    names = [x509.DNSName(name)] + [x509.DNSName(d) for d in extra_dns if d != name]
    return [
        (x509.SubjectAlternativeName(names), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage(digital_signature=True), True),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        ),
    ]


def signing_extensions(name: str, groups: Iterable[str] = ()) -> list[Extension]:
    """The extensions of a signing leaf for operator ``name`` in ``groups``."""
    # No EKU: the records verifier (SPEC §5.3) needs "absent or codeSigning".
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"iris-name://{name}")]
        + [x509.UniformResourceIdentifier(f"iris-group://{g}") for g in groups]
        + [x509.DNSName(name)]
    )
    return [(san, False), (key_usage(digital_signature=True), False)]


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new key of the kind every certificate of the network holds (ECDSA P-256)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey, kind: Kind = TLS_KIND) -> bytes:
    """
    Unencrypted PEM of ``key``: PKCS#8 for TLS keys, SEC 1 ``EC PRIVATE KEY`` for signing
    keys (the reference's form, SPEC §5.1).
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL
        if kind == SIGNING_KIND
        else serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_kind(certificate: x509.Certificate) -> Literal["signing", "encryption"]:
    """
    How a ``certificates`` record names a certificate's use: ``signing`` when it carries
    an ``iris-name://`` URI, else ``encryption`` (a TLS certificate).
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return "encryption"
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return "signing" if any(u.lower().startswith("iris-name:") for u in uris) else "encryption"


def certificates_record(
    name: str, fingerprints: Mapping[str, str], created_at: str | None = None
) -> dict:
    """
    The unsigned ``certificates`` change record pinning ``fingerprints`` (``{"signing":
    …, "encryption": …}``, either may be absent) for operator ``name``.
    """
    record: dict = {"section": "certificates"}
    if created_at is not None:
        record["created_at"] = created_at
    record["name"] = name
    record["data"] = [
        {"fingerprint": fingerprints[usage], "key_usage": usage}
        for usage in ("signing", "encryption")
        if usage in fingerprints
    ]
    return record


@dataclass(frozen=True)
class Request:
    """A new key and the CSR for it."""

    kind: Kind
    key: ec.EllipticCurvePrivateKey
    csr: x509.CertificateSigningRequest

    def key_pem(self) -> bytes:
        return key_pem(self.key, self.kind)

    def csr_pem(self) -> bytes:
        return self.csr.public_bytes(serialization.Encoding.PEM)


def make_request(
    name: str,
    kind: Kind,
    groups: Sequence[str] = (),
    extra_dns: Sequence[str] = (),
    organization: str | None = None,
) -> Request:
    """
    A new P-256 key and a CSR (subject CN=``name``, optionally O=``organization``) asking
    for exactly the extensions of a ``kind`` leaf. ``groups`` only for signing, extra
    DNS names only for TLS.
    """
    check_name(name)
    if kind not in KINDS:
        raise ProfileError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    for group in groups:
        check_name(group, "group")
    for dns in extra_dns:
        check_name(dns, "DNS name", wildcard=True)
    if groups and kind != SIGNING_KIND:
        raise ProfileError("groups belong in a signing certificate (--kind signing)")
    if extra_dns and kind != TLS_KIND:
        raise ProfileError("extra DNS names belong in a TLS certificate (--kind tls)")
    if len(set(groups)) != len(groups):
        raise ProfileError("a group is named twice")
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    extensions = (
        tls_extensions(name, extra_dns) if kind == TLS_KIND else signing_extensions(name, groups)
    )
    key = new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return Request(kind, key, builder.sign(key, hashes.SHA256()))


def _write(path: Path, content: bytes, mode: int, force: bool) -> None:
    """Write via a temporary name in the same folder (created ``mode``), then rename."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        if force:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if path exists, even if made meanwhile
            temporary.unlink()
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_request(
    request: Request, out_dir: str | Path, stem: str | None = None, force: bool = False
) -> tuple[Path, Path]:
    """
    Write ``<stem>.key`` (mode 0600) and ``<stem>.csr`` into ``out_dir`` (made if
    missing); ``stem`` defaults to the kind (``tls``, ``signing``), the file names the
    example settings expect. Existing files are kept (:class:`ProfileError`) unless
    ``force``. Returns (key path, CSR path).
    """
    stem = stem or request.kind
    if "/" in stem or stem.startswith(".") or not stem:
        raise ProfileError(f"{stem!r} cannot be used as a file name")
    folder = Path(out_dir)
    key_path, csr_path = folder / f"{stem}.key", folder / f"{stem}.csr"
    if not force:
        for path in (key_path, csr_path):
            if os.path.lexists(path):
                raise ProfileError(f"{path} already exists (use --force to replace it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write(key_path, request.key_pem(), 0o600, force)
        _write(csr_path, request.csr_pem(), 0o644, force)
    except FileExistsError as e:
        raise ProfileError(f"{e.filename or folder} already exists") from None
    except OSError as e:
        raise ProfileError(f"{e.filename or folder}: cannot write ({e.strerror})") from None
    return key_path, csr_path


def pins_of(certificates: Iterable[x509.Certificate]) -> list[dict[str, str]]:
    """
    The ``data`` items of a ``certificates`` record pinning the given leaves, each by its
    kind (signing ones first; several of a kind, e.g. old and new during a rotation, are
    fine; the same certificate twice is not).
    """
    items: list[dict[str, str]] = []
    for certificate in certificates:
        pin = {"fingerprint": fingerprint(certificate), "key_usage": certificate_kind(certificate)}
        if pin in items:
            raise ProfileError(f"certificate {pin['fingerprint']} is given twice")
        items.append(pin)
    return sorted(items, key=lambda pin: pin["key_usage"] != "signing")
