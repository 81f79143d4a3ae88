"""
Identify the EPS at the other end of a mutual TLS connection (SPEC §12.5).

The peer's leaf certificate names candidates (CN, then DNS SANs); a name counts only if
its directory entry pins the SHA-256 fingerprint of that very leaf with
``key_usage: "encryption"``.  Identity therefore comes from the certificate and the
directory, never from anything the peer sends later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from epsproxy.rules.certificates import certificate_names, fingerprint
from epsproxy.directory.jsondir import DirectoryError

__all__ = ["Directory", "PeerRefused", "PeerIdentity", "identify_peer"]


class PeerRefused(Exception):
    """The peer cannot be identified; ``reason`` says why (no key material in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PeerIdentity:
    """One name the peer's certificate proves, with its directory entry (ClientInfo)."""

    name: str
    entry: dict[str, Any]


class Directory(Protocol):
    """What identifying a peer needs of the directory."""

    def entry_for(self, name: str) -> dict[str, Any]: ...


def _pins(entry: dict[str, Any], leaf_fingerprint: str) -> bool:
    for pinned in entry.get("certificates") or ():
        if (
            isinstance(pinned, dict)
            and pinned.get("key_usage") == "encryption"
            and pinned.get("fingerprint") == leaf_fingerprint
        ):
            return True
    return False


def identify_peer(
    certificate: x509.Certificate | None, directory: Directory
) -> list[PeerIdentity]:
    """
    The identities proven by the peer's leaf ``certificate``, in certificate-name order
    (duplicates kept, as in SPEC §12.5).

    A name without a directory entry is skipped (``entry_for`` raising
    :class:`DirectoryError`); wildcard names never match.

    :raises PeerRefused: no certificate, or no name of it is pinned in the directory.
    """
    if certificate is None:
        raise PeerRefused("certificate missing")
    names = certificate_names(certificate)
    leaf = fingerprint(certificate)
    found: list[PeerIdentity] = []
    for name in names:
        if "*" in name:
            continue
        try:
            entry = directory.entry_for(name)
        except DirectoryError:
            continue
        if _pins(entry, leaf):
            found.append(PeerIdentity(name, entry))
    if not found:
        raise PeerRefused(
            "no name of the certificate is pinned in the directory"
            f" (names: {', '.join(names) or 'none'})"
        )
    return found
