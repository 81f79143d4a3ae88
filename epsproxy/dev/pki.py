"""
The development certificate authority behind ``eps certs`` (SPEC §21.1).

:func:`create_pki` makes, with ``cryptography`` alone (no ``openssl`` subprocess), what the
reference's ``make certs`` makes: a root CA, an intermediate CA and, for every dev name, a
TLS identity, a signing identity and an ``-alt`` twin of each (a second key the directory
does not pin, for pinning tests), plus the directory file ``002_certificates.json`` that
pins the SHA-256 fingerprints of the non-alt leaves.

Deliberate differences from the reference:

* every key is ECDSA P-256, also the CA and TLS keys the reference makes RSA 2048: TLS
  handshakes are much cheaper, which keeps the test suite and the demo fast;
* leaves carry the extensions of the production profile
  (:mod:`epsproxy.rules.certificate_profile`, what ``eps csr`` asks a real CA for): TLS
  leaves keyUsage digitalSignature (critical), EKU serverAuth + clientAuth,
  basicConstraints CA:FALSE, plus key identifiers, so strict TLS stacks accept them;
* a signing certificate for a name without groups carries no ``iris-group://`` URI at all
  (the reference writes one with an empty authority, which means the same);
* key files are created mode 0600 from the start, and nothing is overwritten unless asked.

``root.crt`` is written last: the Makefile uses it as the "this PKI exists" marker, so an
interrupted run is redone rather than mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from epsproxy.rules.certificate_profile import (
    SIGNING_KIND,
    TLS_KIND,
    certificates_record,
    key_pem,
    key_usage,
    signing_extensions,
    tls_extensions,
)
from epsproxy.rules.certificates import CertificateError, fingerprint, load_certificate_file

__all__ = [
    "DEV_NAMES",
    "DEV_GROUPS",
    "PKIError",
    "DevPKI",
    "create_pki",
    "open_pki",
]

log = Logger()

DEV_NAMES: tuple[str, ...] = (
    "op-1",
    "op-2",
    "hd-1",
    "hd-2",
    "ls-1",
    "internal-server",
    "public-proxy-1.ga",
    "private-proxy-1.ga",
    "sd-1",
    "demo-app",
)
DEV_GROUPS: dict[str, tuple[str, ...]] = {"hd-1": ("sd-admin",)}

DIRECTORY_FILE = "002_certificates.json"
ROOT_DAYS = 1024
INTERMEDIATE_DAYS = 300
LEAF_DAYS = 500
# Certificates start an hour in the past so that small clock differences between the
# machine that made them and the one checking them do not matter.
BACKDATE = timedelta(hours=1)


class PKIError(Exception):
    """The dev PKI cannot be created or opened (existing files, unknown name, I/O error)."""


@dataclass
class DevPKI:
    """Paths of a dev PKI on disk, and the facts the directory needs about it."""

    cert_dir: Path
    root: Path
    intermediate: Path
    directory_file: Path | None
    names: tuple[str, ...] = field(default=DEV_NAMES)

    def _existing(self, filename: str) -> Path:
        path = self.cert_dir / filename
        if not path.is_file():
            raise PKIError(f"{path}: no such certificate file in the dev PKI")
        return path

    def tls(self, name: str, alt: bool = False) -> tuple[Path, Path]:
        """(certificate, key) of a TLS identity; the certificate file is leaf + intermediate."""
        stem = f"{name}-alt" if alt else name
        return self._existing(f"{stem}.crt"), self._existing(f"{stem}.key")

    def signing(self, name: str, alt: bool = False) -> tuple[Path, Path]:
        """(certificate, key) of a signing identity; the certificate file is leaf + intermediate."""
        stem = f"{name}-sign-alt" if alt else f"{name}-sign"
        return self._existing(f"{stem}.crt"), self._existing(f"{stem}.key")

    def fingerprints(self, name: str) -> dict[str, str]:
        """SHA-256 fingerprints of the non-alt leaves: ``{"signing": …, "encryption": …}``."""
        try:
            signing = load_certificate_file(self.signing(name)[0])
            encryption = load_certificate_file(self.tls(name)[0])
        except CertificateError as e:
            raise PKIError(str(e)) from None
        return {"signing": fingerprint(signing), "encryption": fingerprint(encryption)}

    def certificates_records(self) -> list[dict]:
        """
        The unsigned ``certificates`` change records of ``002_certificates.json``.

        Read from the directory file when there is one; otherwise made from the
        certificates on disk, stamped with the current local time.
        """
        if self.directory_file is not None and self.directory_file.is_file():
            try:
                document = json.loads(self.directory_file.read_text("utf-8"))
                records = document["records"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise PKIError(f"{self.directory_file}: not a certificates file ({e})") from None
            if not isinstance(records, list):
                raise PKIError(f"{self.directory_file}: 'records' is not a list")
            return records
        created_at = _local_time(datetime.now(timezone.utc))
        return [_certificates_record(n, self.fingerprints(n), created_at) for n in self.names]


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Berlin"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Berlin"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IRIS"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "IT"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class _Identity:
    """A key and the certificate for it, as made in memory before anything is written."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _issue(
    common_name: str,
    issuer: _Identity | None,
    days: int,
    now: datetime,
    extensions: Iterable[tuple[x509.ExtensionType, bool]],
) -> _Identity:
    """A new P-256 key and its certificate, signed by ``issuer`` (``None``: self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _subject(common_name)
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.certificate.subject if issuer else subject
    issuer_public = signer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), False
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return _Identity(key, builder.sign(signer_key, hashes.SHA256()))


def _root(now: datetime) -> _Identity:
    return _issue(
        "Testing-Development",
        None,
        ROOT_DAYS,
        now,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (key_usage(ca=True), True),
        ],
    )


def _intermediate(root: _Identity, now: datetime) -> _Identity:
    return _issue(
        "intermediate",
        root,
        INTERMEDIATE_DAYS,
        now,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (key_usage(digital_signature=True, ca=True), True),
        ],
    )


def _tls_leaf(name: str, issuer: _Identity, now: datetime) -> _Identity:
    # The production profile, plus *.<name>.local for the SNI passthrough demo.
    return _issue(name, issuer, LEAF_DAYS, now, tls_extensions(name, [f"*.{name}.local"]))


def _signing_leaf(
    name: str, groups: Iterable[str], issuer: _Identity, now: datetime
) -> _Identity:
    return _issue(name, issuer, LEAF_DAYS, now, signing_extensions(name, groups))


def _cert_pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _key_pem(key: ec.EllipticCurvePrivateKey, sec1: bool = False) -> bytes:
    # The reference's signing keys are SEC 1 "EC PRIVATE KEY" blocks (SPEC §5.1).
    return key_pem(key, SIGNING_KIND if sec1 else TLS_KIND)


def _local_time(now: datetime) -> str:
    """RFC 3339 local time with offset, seconds precision (e.g. 2021-05-17T12:00:00+02:00)."""
    return now.astimezone().replace(microsecond=0).isoformat()


def _certificates_record(name: str, fingerprints: Mapping[str, str], created_at: str) -> dict:
    return certificates_record(name, fingerprints, created_at)


@dataclass(frozen=True)
class _File:
    path: Path
    content: bytes
    secret: bool = False


def _write_atomically(target: _File) -> None:
    """Write via a temporary name in the same folder and rename over the target."""
    temporary = target.path.with_name(f".{target.path.name}.{secrets.token_hex(6)}.tmp")
    mode = 0o600 if target.secret else 0o644
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(target.content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target.path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def create_pki(
    cert_dir: str | Path,
    *,
    directory_dir: str | Path | None = None,
    names: Iterable[str] = DEV_NAMES,
    groups: Mapping[str, Iterable[str]] = DEV_GROUPS,
    force: bool = False,
    now: datetime | None = None,
) -> DevPKI:
    """
    Create a complete dev PKI in ``cert_dir`` (and ``002_certificates.json`` in
    ``directory_dir`` when given).

    Raises :class:`PKIError` naming the first existing file, with nothing written, unless
    ``force`` is set, in which case everything is regenerated. ``now`` (timezone-aware;
    naive values are taken as UTC) fixes the validity period and ``created_at`` for tests.
    """
    cert_dir = Path(cert_dir)
    directory_path = Path(directory_dir) if directory_dir is not None else None
    names = tuple(names)
    if not names or len(set(names)) != len(names):
        raise PKIError("names must be a non-empty list without duplicates")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise PKIError(f"{name!r} cannot be used as a certificate file name")
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)

    root = _root(now)
    intermediate = _intermediate(root, now)
    intermediate_pem = _cert_pem(intermediate.certificate)
    files: list[_File] = [
        _File(cert_dir / "root.key", _key_pem(root.key), secret=True),
        _File(cert_dir / "intermediate.key", _key_pem(intermediate.key), secret=True),
        _File(cert_dir / "intermediate.crt", intermediate_pem),
    ]
    created_at = _local_time(now)
    records = []
    for name in names:
        name_groups = tuple(groups.get(name, ()))
        tls = _tls_leaf(name, intermediate, now)
        signing = _signing_leaf(name, name_groups, intermediate, now)
        made = [
            (name, tls, False),
            (f"{name}-alt", _tls_leaf(name, intermediate, now), False),
            (f"{name}-sign", signing, True),
            (f"{name}-sign-alt", _signing_leaf(name, name_groups, intermediate, now), True),
        ]
        for stem, identity, sec1 in made:
            chain = _cert_pem(identity.certificate) + intermediate_pem
            files.append(_File(cert_dir / f"{stem}.crt", chain))
            files.append(_File(cert_dir / f"{stem}.key", _key_pem(identity.key, sec1), True))
        pins = {
            "signing": fingerprint(signing.certificate),
            "encryption": fingerprint(tls.certificate),
        }
        records.append(_certificates_record(name, pins, created_at))
    directory_file = None
    if directory_path is not None:
        directory_file = directory_path / DIRECTORY_FILE
        document = json.dumps({"records": records}, indent=2) + "\n"
        files.append(_File(directory_file, document.encode("utf-8")))
    files.append(_File(cert_dir / "root.crt", _cert_pem(root.certificate)))

    if not force:
        for target in files:
            if os.path.lexists(target.path):
                raise PKIError(f"{target.path} already exists (use --force to regenerate)")
    try:
        cert_dir.mkdir(parents=True, exist_ok=True)
        if directory_path is not None:
            directory_path.mkdir(parents=True, exist_ok=True)
        if force:
            # Remove the marker first so an interrupted regeneration is not taken as complete.
            (cert_dir / "root.crt").unlink(missing_ok=True)
        for target in files:
            _write_atomically(target)
    except OSError as e:
        raise PKIError(f"{e.filename or cert_dir}: cannot write the dev PKI ({e.strerror})") from None

    log.info(
        "created dev PKI in {cert_dir} for {count} names",
        cert_dir=str(cert_dir),
        count=len(names),
    )
    return DevPKI(
        cert_dir=cert_dir,
        root=cert_dir / "root.crt",
        intermediate=cert_dir / "intermediate.crt",
        directory_file=directory_file,
        names=names,
    )


def open_pki(cert_dir: str | Path, directory_dir: str | Path | None = None) -> DevPKI:
    """
    An existing dev PKI. Its names are those with a signing certificate on disk, the dev
    names first in their usual order, then any others sorted.
    """
    cert_dir = Path(cert_dir)
    root = cert_dir / "root.crt"
    if not root.is_file():
        raise PKIError(f"{root}: no dev PKI here (run `eps certs {cert_dir}`)")
    found = {
        p.name[: -len("-sign.crt")]
        for p in cert_dir.glob("*-sign.crt")
        if not p.name.endswith("-sign-alt.crt")
    }
    names = tuple(n for n in DEV_NAMES if n in found) + tuple(sorted(found - set(DEV_NAMES)))
    directory_file = None
    if directory_dir is not None:
        directory_file = Path(directory_dir) / DIRECTORY_FILE
    return DevPKI(
        cert_dir=cert_dir,
        root=root,
        intermediate=cert_dir / "intermediate.crt",
        directory_file=directory_file,
        names=names,
    )
