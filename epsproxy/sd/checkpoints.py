"""
The SD's signed checkpoints (issue 15 item 1): its signing key signs the selected chain's
state (origin, size, chain head, time) in the note format of
:mod:`epsproxy.rules.checkpoint`; witnesses' cosignatures of that state are kept and
added to the note (item 4).

A checkpoint is signed once per chain state (size and head) and reused until the chain
changes, so serving it costs nothing per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger

from epsproxy.rules import checkpoint as cp
from epsproxy.rules import forms
from epsproxy.rules.certificates import load_certificates_file, load_private_key_file, to_pem
from epsproxy.rules.records import TrustStore
from ..directory.chain import VerifiedChain

__all__ = ["CHECKPOINT_SETTINGS", "CheckpointSigner", "CosignatureRefused"]

log = Logger()

CHECKPOINT_SETTINGS = forms.Map(
    {
        "name": forms.Required(
            forms.String(min_length=1, max_length=253),
            doc="the signer's name: the iris-name of the signing certificate, pinned in the "
            "directory by a certificates record",
        ),
        "certificate_file": forms.Required(forms.String(min_length=1)),
        "key_file": forms.Required(forms.String(min_length=1)),
        "origin": forms.Optional(
            forms.String(pattern=r"[\x21-\x7e]{1,253}"),
            doc="the directory's name on its checkpoints (default: name)",
        ),
        "max_cosignatures": forms.Optional(forms.Integer(min=0, max=cp.MAX_SIGNATURES - 1),
                                           default=16, doc="witness cosignatures kept"),
    },
    strict=True,
)


class CosignatureRefused(Exception):
    """A witness's cosignature does not match the current checkpoint or does not verify."""


class CheckpointSigner:
    """
    Signs checkpoints of a chain with the SD's key.  ``clock`` gives POSIX seconds
    (the reactor's ``seconds``).  Build it with :meth:`from_settings`.
    """

    def __init__(self, name: str, origin: str, key: Any, certificate_pem: str,
                 clock: Callable[[], float]) -> None:
        self.name = name
        self.origin = origin
        self._key = key
        self.certificate_pem = certificate_pem
        self._clock = clock
        self._signed: cp.SignedCheckpoint | None = None
        self._cosigners: dict[str, str] = {}  # witness name -> its certificate (PEM)
        self.max_cosignatures = 16
        # Fails now (at start) if the key and certificate do not belong together.
        cp.sign(cp.Checkpoint(origin, 0, cp.ZERO_HEAD, 0), name, key, certificate_pem)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], clock: Callable[[], float]
                      ) -> "CheckpointSigner":
        """From validated ``CHECKPOINT_SETTINGS``; raises ``ValueError`` naming the problem."""
        certificate = load_certificates_file(Path(settings["certificate_file"]))[0]
        key = load_private_key_file(Path(settings["key_file"]))
        try:
            signer = cls(settings["name"], settings.get("origin") or settings["name"], key,
                         to_pem(certificate), clock)
        except cp.CheckpointError as e:
            raise ValueError(f"checkpoint: {e}") from None
        signer.max_cosignatures = settings.get("max_cosignatures", 16)
        return signer

    def current(self, chain: VerifiedChain) -> cp.SignedCheckpoint:
        """The signed checkpoint of ``chain`` as it is now (signed again when it changed)."""
        signed = self._signed
        size, head = len(chain), chain.head
        if signed is None or (signed.checkpoint.size, signed.checkpoint.head) != (size, head):
            checkpoint = cp.Checkpoint(self.origin, size, head, int(self._clock()))
            signed = cp.sign(checkpoint, self.name, self._key, self.certificate_pem)
            self._signed = signed
            self._cosigners = {}
        return signed

    def served(self, chain: VerifiedChain) -> dict[str, Any]:
        """What ``getCheckpoint`` answers: the note and the certificates that verify it."""
        signed = self.current(chain)
        return {
            "checkpoint": signed.text,
            "certificates": [self.certificate_pem, *self._cosigners.values()],
        }

    def add_cosignature(self, chain: VerifiedChain, note: str, certificate_pem: str,
                        trust: TrustStore) -> list[str]:
        """
        Keep a witness's cosignature of the current checkpoint (``note`` is the
        checkpoint with the witness's signature line; ``certificate_pem`` its signing
        certificate, which must be pinned in the chain).  Returns the witnesses kept.
        """
        current = self.current(chain)
        try:
            offered = cp.parse(note)
        except cp.CheckpointError as e:
            raise CosignatureRefused(str(e)) from None
        if offered.checkpoint != current.checkpoint:
            raise CosignatureRefused("the note is not the current checkpoint")
        try:
            names = cp.verify(offered, [certificate_pem], trust, chain.pins.pinned)
        except cp.CheckpointError as e:
            raise CosignatureRefused(str(e)) from None
        names = [n for n in names if n != self.name]
        if not names:
            raise CosignatureRefused("no cosignature verifies with the certificate given")
        witness = names[0]
        if witness not in self._cosigners and len(self._cosigners) >= self.max_cosignatures:
            raise CosignatureRefused("enough cosignatures are kept already")
        line = next(s for s in offered.signatures if s.name == witness)
        kept = tuple(s for s in current.signatures if s.name != witness) + (line,)
        self._signed = cp.SignedCheckpoint(current.checkpoint, kept)
        self._cosigners[witness] = certificate_pem
        log.info("checkpoint {size} cosigned by {witness}", size=current.checkpoint.size,
                 witness=witness)
        return list(self._cosigners)
