"""
Checks of the certificate and key files a program's settings name, done before anything
starts (and by ``--check``), so that a wrong file is one line naming its settings key,
not a failed start or a failed handshake hours later.

A settings block that names such files is a :class:`FileSet`: a ``tls`` block (a leaf
used for TLS) or a ``signing`` block (a leaf that signs change records), or only CA
files (a set without ``certificate_file``: the roots that verify others).  For each set
:func:`check_file_sets` checks, in order, stopping at the first error of the set:

1. every file exists and parses (PEM certificates; an unencrypted PEM key);
2. the key belongs to the first certificate of ``certificate_file``;
3. the leaf is within its validity: expired or not yet valid is an error, expiring
   within :data:`EXPIRY_WARNING_DAYS` days a warning;
4. the leaf chains to the CA files: TLS leaves with ``cryptography``'s verifier
   (``cryptography.x509.verification``: the client verifier with the web PKI's rules, the
   extended key usage left free because one block serves both sides of mutual TLS),
   signing leaves with the records' own verifier
   (:class:`epsproxy.rules.records.TrustStore`, the one the SD applies to submitted
   records).  Intermediates come from ``certificate_file`` after the leaf and from the
   set's intermediate files.  The chain is checked at a time inside the leaf's validity,
   so an expired leaf still gets its chain checked;
5. the leaf names the operator the settings say it is, when the set has one
   (``operator``): a TLS leaf by its subject CN or a DNS subjectAltName (what peers
   match, :func:`~epsproxy.rules.certificates.certificate_names`), a signing leaf by its
   ``iris-name://`` URI.

Which sets have an operator is each program's choice (``<program>_file_sets`` in its
``settings.py``): the endpoint server's peer channels (``eps_server``, ``eps_client``)
and signing certificate name its ``name``; the proxies' client to their own endpoint
server names the proxy's ``name``; the SD has no operator name, so only steps 1-4 apply.

Pure: no reactor, no sockets; ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from epsproxy.rules.certificates import (
    CertificateError,
    certificate_names,
    load_certificates,
    load_private_key_file,
    to_pem,
)
from epsproxy.rules.records import TrustStore
from epsproxy.rules.records.errors import InvalidRecord
from epsproxy.rules.records.trust import load_signer

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertificateExpiry",
    "FileSet",
    "Finding",
    "certificate_expiries",
    "check_file_sets",
    "summary",
    "tls_file_set",
]

#: A leaf expiring within this many days is a warning.
EXPIRY_WARNING_DAYS = 30

Kind = Literal["tls", "signing"]
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class FileSet:
    """
    One settings block that names certificate files.  ``where`` is its key path
    (``channels[gateway].settings.tls``); the ``*_key`` fields are the keys the block
    spells its files with, so messages name them as the operator wrote them.
    """

    where: str
    certificate_file: str | None
    key_file: str | None
    ca_files: tuple[str, ...]
    intermediate_files: tuple[str, ...] = ()
    operator: str | None = None
    kind: Kind = "tls"
    ca_key: str = "ca_certificate_files"
    intermediate_key: str = "ca_intermediate_certificate_files"


@dataclass(frozen=True)
class Finding:
    """One problem of a file set; ``str()`` is ``<where>: <message>``."""

    where: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class CertificateExpiry:
    """When the leaf of the file set at ``where`` expires (Unix time of notAfter)."""

    where: str
    not_after: float


class _SetError(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.finding = Finding(where, message)


@dataclass
class _Loaded:
    chain: list[x509.Certificate] = field(default_factory=list)
    roots: list[x509.Certificate] = field(default_factory=list)
    intermediates: list[x509.Certificate] = field(default_factory=list)


def _read_certificates(where: str, path: str) -> list[x509.Certificate]:
    file = Path(path)
    if not file.exists():
        raise _SetError(where, f"no such file {path}")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise _SetError(where, f"cannot read {path} ({e.strerror})") from None
    try:
        return load_certificates(data, path)
    except CertificateError as e:
        raise _SetError(where, str(e)) from None


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(file_set: FileSet) -> _Loaded:
    loaded = _Loaded()
    base = file_set.where
    for index, path in enumerate(file_set.ca_files):
        ca_where = f"{base}.{file_set.ca_key}"
        if file_set.kind == "tls" or len(file_set.ca_files) > 1:
            ca_where += f"[{index}]"
        loaded.roots += _read_certificates(ca_where, path)
    for index, path in enumerate(file_set.intermediate_files):
        where = f"{base}.{file_set.intermediate_key}[{index}]"
        loaded.intermediates += _read_certificates(where, path)
    if file_set.certificate_file is None and file_set.key_file is None:
        return loaded
    if file_set.certificate_file is None or file_set.key_file is None:
        missing = "certificate_file" if file_set.certificate_file is None else "key_file"
        raise _SetError(f"{base}.{missing}", "is required when the other one is given")
    cert_where = f"{base}.certificate_file"
    loaded.chain = _read_certificates(cert_where, file_set.certificate_file)
    key_where = f"{base}.key_file"
    if not Path(file_set.key_file).exists():
        raise _SetError(key_where, f"no such file {file_set.key_file}")
    try:
        key = load_private_key_file(file_set.key_file)
    except CertificateError as e:
        raise _SetError(key_where, str(e)) from None
    if key.public_key() != loaded.chain[0].public_key():
        raise _SetError(
            key_where,
            f"{file_set.key_file} does not belong to the certificate of certificate_file "
            f"{file_set.certificate_file}",
        )
    return loaded


def _validity(file_set: FileSet, leaf: x509.Certificate, now: datetime) -> list[Finding]:
    where = f"{file_set.where}.certificate_file"
    before, after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now > after:
        raise _SetError(where, f"the certificate expired on {_stamp(after)}")
    if now < before:
        raise _SetError(where, f"the certificate is not valid before {_stamp(before)}")
    if after - now < timedelta(days=EXPIRY_WARNING_DAYS):
        days = (after - now).days
        return [Finding(where, f"the certificate expires in {days} day(s), on {_stamp(after)}",
                        "warning")]
    return []


def _chain_time(leaf: x509.Certificate, now: datetime) -> datetime:
    """``now``, moved inside the leaf's validity (the validity is reported on its own)."""
    return min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)


# One block serves both sides of mutual TLS, and a server-only or client-only leaf is
# the operator's choice: leave the extended key usage to the TLS stack.
_LEAF_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
)


def _check_tls_chain(file_set: FileSet, loaded: _Loaded, at: datetime) -> None:
    where = f"{file_set.where}.certificate_file"
    leaf, rest = loaded.chain[0], [*loaded.chain[1:], *loaded.intermediates]
    if not loaded.roots:
        raise _SetError(f"{file_set.where}.{file_set.ca_key}", "names no CA certificate")
    verifier = (
        PolicyBuilder()
        .store(Store(loaded.roots))
        .time(at)
        .extension_policies(ee_policy=_LEAF_POLICY, ca_policy=ExtensionPolicy.webpki_defaults_ca())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, rest)
    except VerificationError as e:
        raise _SetError(
            where, f"the certificate does not chain to {file_set.ca_key} ({e})"
        ) from None


def _check_signing_chain(file_set: FileSet, loaded: _Loaded, at: datetime) -> None:
    where = f"{file_set.where}.certificate_file"
    leaf, rest = loaded.chain[0], [*loaded.chain[1:], *loaded.intermediates]
    store = TrustStore(loaded.roots, rest, clock=at.timestamp)
    if not store.verify_chain(leaf):
        raise _SetError(
            where,
            f"the signing certificate does not chain to {file_set.ca_key} (or is not "
            "usable for signing: keyUsage digitalSignature, extendedKeyUsage codeSigning)",
        )


def _check_operator(file_set: FileSet, leaf: x509.Certificate) -> None:
    if file_set.operator is None:
        return
    where = f"{file_set.where}.certificate_file"
    if file_set.kind == "signing":
        try:
            name = load_signer(to_pem(leaf)).name
        except InvalidRecord as e:
            raise _SetError(where, f"not a usable signing certificate ({e})") from None
        if name != file_set.operator:
            shown = f"iris-name://{name}" if name else "no iris-name"
            raise _SetError(
                where,
                f"the signing certificate names {shown}, not the operator "
                f"{file_set.operator}",
            )
        return
    names = certificate_names(leaf)
    if file_set.operator not in names:
        shown = ", ".join(dict.fromkeys(names)) or "nobody"
        raise _SetError(
            where,
            f"the certificate names {shown}, not the operator "
            f"{file_set.operator}",
        )


def _check_one(file_set: FileSet, now: datetime) -> list[Finding]:
    loaded = _load(file_set)
    if not loaded.chain:
        return []
    leaf = loaded.chain[0]
    findings = _validity(file_set, leaf, now)
    at = _chain_time(leaf, now)
    if file_set.kind == "signing":
        _check_signing_chain(file_set, loaded, at)
    else:
        _check_tls_chain(file_set, loaded, at)
    _check_operator(file_set, leaf)
    return findings


def check_file_sets(sets: Iterable[FileSet], now: datetime) -> list[Finding]:
    """Every finding of every set (errors and warnings), in the order of ``sets``."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    findings: list[Finding] = []
    for file_set in sets:
        try:
            findings += _check_one(file_set, now)
        except _SetError as e:
            findings.append(e.finding)
    return findings


def certificate_expiries(sets: Iterable[FileSet]) -> list[CertificateExpiry]:
    """The notAfter of every set's leaf that can be read (others are skipped)."""
    expiries = []
    for file_set in sets:
        if file_set.certificate_file is None:
            continue
        try:
            leaf = _read_certificates(file_set.where, file_set.certificate_file)[0]
        except _SetError:
            continue
        expiries.append(CertificateExpiry(file_set.where, leaf.not_valid_after_utc.timestamp()))
    return expiries


def _count(number: int, what: str) -> str:
    return f"{number} {what} file set{'' if number == 1 else 's'}"


def summary(sets: Iterable[FileSet], findings: Iterable[Finding]) -> str:
    """
    One line about a check: ``settings OK: 3 TLS file sets, 1 signing file set checked;
    1 warning`` (or ``settings NOT OK: ...; 2 errors``).
    """
    sets, findings = list(sets), list(findings)
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    checked = ", ".join([
        _count(sum(1 for s in sets if s.kind == "tls"), "TLS"),
        _count(sum(1 for s in sets if s.kind == "signing"), "signing"),
    ])
    text = f"settings {'OK' if not errors else 'NOT OK'}: {checked} checked"
    extra = []
    if errors:
        extra.append(f"{errors} error{'' if errors == 1 else 's'}")
    if warnings:
        extra.append(f"{warnings} warning{'' if warnings == 1 else 's'}")
    return text + ("; " + ", ".join(extra) if extra else "")


def tls_file_set(where: str, tls: Mapping[str, Any], operator: str | None = None) -> FileSet:
    """The file set of a validated ``tls`` settings block at key path ``where``."""
    return FileSet(
        where=where,
        certificate_file=tls.get("certificate_file"),
        key_file=tls.get("key_file"),
        ca_files=tuple(tls.get("ca_certificate_files", ())),
        operator=operator,
        kind="tls",
    )
