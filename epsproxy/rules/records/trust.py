"""
Who signed, and whether to trust them: signing certificates (SPEC §5.2: the ``iris-name``
and ``iris-group`` identities, :func:`load_signer`) and chain validation against the
configured roots (SPEC §5.3, :class:`TrustStore`).

A signer is loaded once per certificate text, a chain is validated once per
(certificate, DNS name); a cached answer still honours certificate expiry.
"""

from __future__ import annotations

import functools
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from epsproxy.rules.certificates import fingerprint, load_certificates_file
from epsproxy.rules.records.errors import InvalidRecord
from epsproxy.rules.records.schema import MAX_CERTIFICATE_PEM

__all__ = ["MAX_CHAIN_DEPTH", "MAX_ISSUER_CANDIDATES", "Signer", "TrustStore", "load_signer"]


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
