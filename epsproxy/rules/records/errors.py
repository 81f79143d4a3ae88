"""
The errors of signed change records: one base class, :class:`RecordError`, whose
``reason`` is a one-line explanation safe to return to a peer.
"""

from __future__ import annotations

__all__ = ["RecordError", "InvalidRecord", "NotAllowed", "SigningError"]


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
