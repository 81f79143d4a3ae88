"""
Signed checkpoints of the record chain: the directory's state as a whole, signed.

A checkpoint says "the chain named ``origin`` had ``size`` records, and its chain head was
``head``, at ``time``".  The text format is modelled on C2SP's signed-note and
tlog-checkpoint (docs/checkpoints.md has the full description)::

    sd-1                                              origin (the directory's name)
    42                                                size (decimal, no leading zeros)
    3q2+7w...=                                        head (base64 of 32 bytes)
    2026-12-03T04:20:00Z                              time (UTC, seconds)
                                                      (blank line)
    \u2014 sd-1 AAECAzBFAiEA...                            signature lines

The ``head`` is the chain hash: ``h0`` is 32 zero bytes and ``h_i = SHA-256(h_{i-1} ||
hash_i)`` over the records' hashes in chain order, so it commits to the whole history, not
only to the last record (:func:`chain_head`).  A signature line is an em dash, a space,
the signer's name, a space and base64 of the key id (the first 4 bytes of the SHA-256
fingerprint of the signer's certificate) followed by an ECDSA P-256 signature (DER) over
SHA-256 of the body (the four lines, each with its newline).  Witnesses add their own
signature lines the same way.

Everything here is pure: parse, serialise, sign and verify, with bounded input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from epsproxy.rules.records import InvalidRecord, Signer, TrustStore, load_signer

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "ZERO_HEAD",
    "Checkpoint",
    "CheckpointError",
    "NoteSignature",
    "SignedCheckpoint",
    "chain_head",
    "chain_heads",
    "parse",
    "sign",
    "cosign",
    "verify",
    "RESET_KEY",
    "reset_change",
    "reset_root",
    "replaced_by",
]

#: Largest note accepted (bytes of UTF-8).
MAX_NOTE_BYTES = 16 * 1024
#: Most signature lines accepted on one note (the SD's own and witnesses').
MAX_SIGNATURES = 32
#: Largest origin (characters).
MAX_ORIGIN = 253
#: The head of an empty chain.
ZERO_HEAD = bytes(32)

_DASH = "\u2014"
_ORIGIN = re.compile(r"[\x21-\x7e]{1,253}")
_SIZE = re.compile(r"0|[1-9][0-9]{0,17}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_NAME = re.compile(r"[\x21-\x2a\x2c-\x7e]{1,253}")  # printable, no space, no '+'
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_HASH_HEX = re.compile(r"[a-f0-9]{64}")
_ALGORITHM = ec.ECDSA(hashes.SHA256())


class CheckpointError(ValueError):
    """A checkpoint note is malformed, or does not verify (the message says why)."""


def chain_head(previous: bytes, record_hash: str) -> bytes:
    """The chain head after a record with hash ``record_hash`` (64 hex) follows ``previous``."""
    if not _HASH_HEX.fullmatch(record_hash):
        raise CheckpointError("a record hash must be 64 lowercase hex digits")
    return hashlib.sha256(previous + bytes.fromhex(record_hash)).digest()


def chain_heads(record_hashes: Iterable[str], start: bytes = ZERO_HEAD) -> list[bytes]:
    """The chain head after each of ``record_hashes`` in turn, from ``start``."""
    heads = []
    head = start
    for record_hash in record_hashes:
        head = chain_head(head, record_hash)
        heads.append(head)
    return heads


def _time_text(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint states (the note's body)."""

    origin: str
    size: int
    head: bytes
    time: int

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not _ORIGIN.fullmatch(self.origin):
            raise CheckpointError("origin must be 1-253 printable ASCII characters, no spaces")
        if not isinstance(self.size, int) or not 0 <= self.size < 10**18:
            raise CheckpointError("size must be a whole number from 0")
        if not isinstance(self.head, bytes) or len(self.head) != 32:
            raise CheckpointError("head must be 32 bytes")
        if not isinstance(self.time, int) or not 0 <= self.time < 253402300800:
            raise CheckpointError("time must be whole seconds between 1970 and 9999")

    def body(self) -> str:
        """The signed text: origin, size, head and time lines, each ending in a newline."""
        head = base64.b64encode(self.head).decode("ascii")
        return f"{self.origin}\n{self.size}\n{head}\n{_time_text(self.time)}\n"

    def same_state(self, other: "Checkpoint") -> bool:
        """Whether both state the same chain (time aside)."""
        return (self.origin, self.size, self.head) == (other.origin, other.size, other.head)


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the signer's name, the key id and the DER signature."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        blob = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{_DASH} {self.name} {blob}\n"


@dataclass(frozen=True)
class SignedCheckpoint:
    """A parsed note: the checkpoint and its signature lines, and the note's text."""

    checkpoint: Checkpoint
    signatures: tuple[NoteSignature, ...]

    @property
    def text(self) -> str:
        """The note: body, blank line, signature lines."""
        return self.checkpoint.body() + "\n" + "".join(s.line() for s in self.signatures)


def _b64(text: str, what: str) -> bytes:
    if not _BASE64.fullmatch(text) or len(text) % 4:
        raise CheckpointError(f"{what} is not base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{what} is not base64") from None


def _parse_time(text: str) -> int:
    if not _TIME.fullmatch(text):
        raise CheckpointError("time line must be YYYY-MM-DDTHH:MM:SSZ")
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise CheckpointError("time line is not a valid date and time") from None
    return int(moment.timestamp())


def parse(note: str | bytes) -> SignedCheckpoint:
    """
    Read a checkpoint note.  Raises :class:`CheckpointError` for anything but exactly
    four body lines, a blank line and 1 to :data:`MAX_SIGNATURES` signature lines, each
    ending in a newline, in at most :data:`MAX_NOTE_BYTES` bytes.
    """
    if isinstance(note, bytes):
        if len(note) > MAX_NOTE_BYTES:
            raise CheckpointError(f"note is larger than {MAX_NOTE_BYTES} bytes")
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError("note is not UTF-8") from None
    if not isinstance(note, str):
        raise CheckpointError("note must be text")
    if len(note) > MAX_NOTE_BYTES or len(note.encode("utf-8", "replace")) > MAX_NOTE_BYTES:
        raise CheckpointError(f"note is larger than {MAX_NOTE_BYTES} bytes")
    if "\r" in note or "\x00" in note:
        raise CheckpointError("note contains a carriage return or NUL")
    if not note.endswith("\n"):
        raise CheckpointError("note is truncated (it must end with a newline)")
    body, sep, signature_text = note.partition("\n\n")
    if not sep:
        raise CheckpointError("note has no blank line before its signatures")
    lines = body.split("\n")
    if len(lines) != 4:
        raise CheckpointError(f"note body must have 4 lines (origin, size, head, time), "
                              f"not {len(lines)}")
    origin, size_text, head_text, time_text = lines
    if not _ORIGIN.fullmatch(origin):
        raise CheckpointError("origin line must be 1-253 printable ASCII characters")
    if not _SIZE.fullmatch(size_text):
        raise CheckpointError("size line must be a decimal number without leading zeros")
    head = _b64(head_text, "head line")
    if len(head) != 32:
        raise CheckpointError("head line must hold 32 bytes")
    checkpoint = Checkpoint(origin, int(size_text), head, _parse_time(time_text))
    signature_lines = signature_text[:-1].split("\n")
    if signature_lines == [""]:
        raise CheckpointError("note has no signature")
    if len(signature_lines) > MAX_SIGNATURES:
        raise CheckpointError(f"note has more than {MAX_SIGNATURES} signatures")
    signatures = []
    for number, line in enumerate(signature_lines, 1):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _DASH:
            raise CheckpointError(f"signature line {number} is not '{_DASH} name signature'")
        name, blob_text = parts[1], parts[2]
        if not _NAME.fullmatch(name):
            raise CheckpointError(f"signature line {number} has an invalid signer name")
        blob = _b64(blob_text, f"signature line {number}")
        if not 8 < len(blob) <= 4 + 80:
            raise CheckpointError(f"signature line {number} has a signature of a wrong size")
        signatures.append(NoteSignature(name, blob[:4], blob[4:]))
    return SignedCheckpoint(checkpoint, tuple(signatures))


def _key_id(signer: Signer) -> bytes:
    return bytes.fromhex(signer.fingerprint[:8])


def _signature(checkpoint: Checkpoint, name: str, key: Any, certificate_pem: str) -> NoteSignature:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CheckpointError("the checkpoint key is not an ECDSA private key")
    if not _NAME.fullmatch(name):
        raise CheckpointError("the signer name must be printable ASCII without spaces or '+'")
    try:
        signer = load_signer(certificate_pem)
    except InvalidRecord as e:
        raise CheckpointError(f"checkpoint certificate: {e.reason}") from None
    if signer.public_key is None or (
        signer.public_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise CheckpointError("the checkpoint key does not belong to its certificate")
    if signer.name != name:
        raise CheckpointError(f"the checkpoint certificate names {signer.name!r}, not {name!r}")
    signature = key.sign(checkpoint.body().encode("utf-8"), _ALGORITHM)
    return NoteSignature(name, _key_id(signer), signature)


def sign(checkpoint: Checkpoint, name: str, key: Any, certificate_pem: str) -> SignedCheckpoint:
    """``checkpoint`` signed by ``name`` (whose certificate must name it: ``iris-name``)."""
    return SignedCheckpoint(checkpoint, (_signature(checkpoint, name, key, certificate_pem),))


def cosign(signed: SignedCheckpoint, name: str, key: Any, certificate_pem: str) -> SignedCheckpoint:
    """``signed`` with a witness's signature line added (or replaced, for the same key)."""
    added = _signature(signed.checkpoint, name, key, certificate_pem)
    kept = tuple(s for s in signed.signatures
                 if (s.name, s.key_id) != (added.name, added.key_id))
    if len(kept) >= MAX_SIGNATURES:
        raise CheckpointError(f"a note holds at most {MAX_SIGNATURES} signatures")
    return SignedCheckpoint(signed.checkpoint, kept + (added,))


def verify(
    signed: SignedCheckpoint,
    certificates: Sequence[str],
    trust: TrustStore | None,
    pinned: Callable[[str], str | None] | None,
    names: Iterable[str] | None = None,
) -> list[str]:
    """
    The names whose signature on ``signed`` verifies, in note order.

    A signature counts when one of ``certificates`` (PEM texts the server sent along) has
    ``iris-name`` equal to the line's name and the line's key id, chains to ``trust``
    (skipped when None: an offline check of evidence), is the signing certificate
    ``pinned(name)`` names in the directory (skipped when None), and its key verifies the
    signature.  ``names``, if given, limits the lines looked at.  Signature lines
    without a matching certificate are ignored, as signed-note verifiers ignore unknown
    keys; bad signatures by a known key raise :class:`CheckpointError`.
    """
    wanted = None if names is None else set(names)
    by_key: dict[tuple[str, bytes], Signer] = {}
    for pem in list(certificates)[:MAX_SIGNATURES]:
        try:
            loaded = load_signer(pem)
        except InvalidRecord:
            continue
        by_key.setdefault((loaded.name, _key_id(loaded)), loaded)
    body = signed.checkpoint.body().encode("utf-8")
    good: list[str] = []
    for line in signed.signatures:
        if wanted is not None and line.name not in wanted:
            continue
        signer = by_key.get((line.name, line.key_id))
        if signer is None:
            continue
        if trust is not None and not trust.verify_chain(
            signer.certificate, certificate_fingerprint=signer.fingerprint
        ):
            raise CheckpointError(f"the certificate of {line.name} does not chain to a "
                                  "trusted root")
        if pinned is not None and pinned(line.name) != signer.fingerprint:
            raise CheckpointError(f"the certificate of {line.name} is not the signing "
                                  "certificate pinned in the directory")
        public_key = signer.public_key
        assert public_key is not None  # load_signer refuses certificates without one
        try:
            public_key.verify(line.signature, body, _ALGORITHM)
        except (InvalidSignature, ValueError):
            raise CheckpointError(f"the signature of {line.name} is not valid") from None
        if line.name not in good:
            good.append(line.name)
    return good


# ------------------------------------------------------------------ resets

#: The key, in a ``settings`` record's item, of the checkpoint a reset replaces.
RESET_KEY = "replaces_checkpoint"


def reset_change(name: str, replaced: Checkpoint, created_at: str) -> dict:
    """
    The change record that starts a reset: a ``settings`` record of ``name`` (the
    sd-admin signing the reset) naming the checkpoint it replaces.  Sign it as the root
    of the new chain (``parent_hash`` ``""``); endpoint servers that verified
    ``replaced`` accept the new chain only because of it.
    """
    return {
        "name": name,
        "section": "settings",
        "data": [{"settings": {RESET_KEY: {
            "origin": replaced.origin,
            "size": replaced.size,
            "head": base64.b64encode(replaced.head).decode("ascii"),
        }}}],
        "created_at": created_at,
    }


def reset_root(served: Any, name: str, created_at: str) -> dict | None:
    """
    The root change record of a reset by ``name``, naming the checkpoint in ``served``
    (an SD's ``getCheckpoint`` answer), or None when there is none to name (an SD that
    signs no checkpoints).  Raises :class:`CheckpointError` for a malformed answer.
    """
    if served is None:
        return None
    if not isinstance(served, dict) or not isinstance(served.get("checkpoint"), str):
        raise CheckpointError("the SD's checkpoint is not a note")
    return reset_change(name, parse(served["checkpoint"]).checkpoint, created_at)


def replaced_by(record: Any) -> tuple[str, int, bytes] | None:
    """(origin, size, head) of the checkpoint a reset's root ``record`` names, if any."""
    if not isinstance(record, dict) or record.get("section") != "settings":
        return None
    data = record.get("data")
    for item in data if isinstance(data, list) else []:
        settings = item.get("settings") if isinstance(item, dict) else None
        named = settings.get(RESET_KEY) if isinstance(settings, dict) else None
        if not isinstance(named, dict):
            continue
        origin, size, head = named.get("origin"), named.get("size"), named.get("head")
        if not (isinstance(origin, str) and isinstance(size, int)
                and not isinstance(size, bool) and isinstance(head, str)):
            continue
        try:
            head_bytes = _b64(head, "head")
        except CheckpointError:
            continue
        if len(head_bytes) == 32:
            return origin, size, head_bytes
    return None
