"""
An endpoint server's memory of the directory's signed checkpoints (issue 15 items 2-4):
the last checkpoint it verified, the rules a new view of the directory must meet to
replace it (it never goes back), and the comparison with a checkpoint a peer gossips.

Pure rules over plain values (no reactor): :class:`CheckpointGuard` is used by
:class:`~epsproxy.directory.api.APIDirectory`; docs/checkpoints.md explains the rules.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from twisted.logger import Logger

from epsproxy.rules import checkpoint as cp
from epsproxy.rules.records import TrustStore

__all__ = ["CheckpointGuard", "View", "Verified", "ViewRefused", "MODES", "short"]

log = Logger()

#: ``required``: every view must carry a valid checkpoint.  ``optional``: unsigned
#: views are accepted until the first checkpoint verified; from then on as required.
MODES = ("required", "optional")


class ViewRefused(Exception):
    """A view of the directory was refused; ``kind`` is the metric label, str() why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def short(checkpoint: cp.Checkpoint) -> str:
    """``origin/size/head`` with the head's first 12 base64 characters, for messages."""
    head = base64.b64encode(checkpoint.head).decode("ascii")[:12]
    return f"{checkpoint.origin}/{checkpoint.size}/{head}"


@dataclass(frozen=True)
class Verified:
    """A checkpoint that verified, and the certificates it was verified with."""

    signed: cp.SignedCheckpoint
    certificates: tuple[str, ...]

    @property
    def checkpoint(self) -> cp.Checkpoint:
        return self.signed.checkpoint

    def as_json(self) -> dict[str, Any]:
        """The form the SD serves and the cache file and gossip carry."""
        return {"checkpoint": self.signed.text, "certificates": list(self.certificates)}


@dataclass(frozen=True)
class View:
    """
    A view of the directory about to be accepted: ``size`` records whose chain heads
    ``head_at(n)`` gives (None beyond the view), the signing-key pins after them, and,
    for a view that starts a new chain (a reset), its root record.
    """

    size: int
    head_at: Callable[[int], bytes | None]
    pinned: Callable[[str], str | None]
    root: dict | None = None


def _served(served: Any) -> tuple[str, tuple[str, ...]] | None:
    if not isinstance(served, dict) or served.get("checkpoint") is None:
        return None
    note, certificates = served.get("checkpoint"), served.get("certificates", [])
    if not isinstance(note, str) or not isinstance(certificates, list) or not all(
        isinstance(c, str) for c in certificates
    ):
        raise ViewRefused("bad_checkpoint", "the checkpoint is not a note with a list of "
                                            "certificates")
    return note, tuple(certificates[: cp.MAX_SIGNATURES])


class CheckpointGuard:
    """
    The last verified checkpoint and the rules to replace it.

    ``signers`` are the names whose signature makes a checkpoint the SD's;
    ``witnesses``/``required_witnesses``: that many of these names must have cosigned.
    """

    def __init__(self, mode: str, signers: Sequence[str], trust: TrustStore,
                 witnesses: Sequence[str] = (), required_witnesses: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"checkpoints must be one of {', '.join(MODES)}")
        self.mode = mode
        self.signers = tuple(signers)
        self.trust = trust
        self.witnesses = tuple(witnesses)
        self.required_witnesses = required_witnesses
        self.verified: Verified | None = None

    def verify_note(self, served: Any, pinned: Callable[[str], str | None]
                    ) -> Verified | None:
        """A served ``{"checkpoint", "certificates"}`` verified (None: none served)."""
        found = _served(served)
        if found is None:
            return None
        note, certificates = found
        try:
            signed = cp.parse(note)
            names = cp.verify(signed, certificates, self.trust, pinned,
                              (*self.signers, *self.witnesses))
        except cp.CheckpointError as e:
            raise ViewRefused("bad_checkpoint", f"the checkpoint does not verify: {e}") from None
        if not any(name in self.signers for name in names):
            raise ViewRefused("bad_checkpoint", "the checkpoint is not signed by "
                              + " or ".join(self.signers or ("any configured signer",)))
        cosigned = [n for n in names if n in self.witnesses and n not in self.signers]
        if len(cosigned) < self.required_witnesses:
            raise ViewRefused(
                "witnesses",
                f"the checkpoint has {len(cosigned)} of the {self.required_witnesses} "
                f"witness cosignatures required ({', '.join(self.witnesses)})")
        return Verified(signed, certificates)

    def check(self, view: View, served: Any) -> Verified | None:
        """
        Whether ``view`` may replace what was verified so far: the checkpoint served
        with it verifies and states exactly this view, and the view extends the last
        verified checkpoint (or is a reset whose root record names it).  Returns the new
        checkpoint (None: an unsigned view, accepted in ``optional`` mode before any
        checkpoint was verified); raises :class:`ViewRefused`.
        """
        verified = self.verify_note(served, view.pinned)
        old = self.verified
        if verified is None:
            if self.mode == "required" or old is not None:
                raise ViewRefused("unsigned", "the SD served no checkpoint with the records")
            return None
        new = verified.checkpoint
        if new.size != view.size or view.head_at(new.size) != new.head:
            raise ViewRefused("mismatch", f"the checkpoint {short(new)} does not state the "
                              f"{view.size} records served")
        if old is None:
            return verified
        before = old.checkpoint
        if new.origin != before.origin:
            raise ViewRefused("origin", f"the checkpoint is of {new.origin!r}, not of "
                              f"{before.origin!r}")
        if new.size >= before.size and view.head_at(before.size) == before.head:
            return verified
        if view.root is not None and self._names(view.root, before):
            log.info("accepted a reset signed by an sd-admin replacing checkpoint {old}",
                     old=short(before))
            return verified
        if view.root is not None:
            raise ViewRefused("reset", f"a new chain that does not name the checkpoint "
                              f"{short(before)} it replaces (an unsigned reset)")
        kind = "rollback" if new.size < before.size else "fork"
        raise ViewRefused(kind, f"the view {short(new)} does not extend the verified "
                          f"checkpoint {short(before)}")

    @staticmethod
    def _names(root: dict, before: cp.Checkpoint) -> bool:
        named = cp.replaced_by(root.get("record"))
        if named is None:
            return False
        origin, size, head = named
        if origin != before.origin:
            return False
        # A reset naming a later checkpoint than ours replaces ours too (we had not
        # caught up); one naming the same size must name the same head.
        return size > before.size or (size == before.size and head == before.head)

    def accept(self, verified: Verified | None) -> None:
        """Remember ``verified`` (from :meth:`check`) as the last verified checkpoint."""
        if verified is not None:
            self.verified = verified

    def conflict(self, other: Any, heads: Callable[[int], bytes | None],
                 pinned: Callable[[str], str | None], reset_at: float | None = None,
                 ) -> tuple[Verified, str] | None:
        """
        Compare a checkpoint a peer gossiped (``{"checkpoint", "certificates"}``) with
        the local chain: returns (its verified form, why both cannot be true) or None when
        they agree as far as the local chain can tell.  ``reset_at`` is the time of the
        reset our chain starts with, if it starts with one: a checkpoint signed before it
        is of the chain that reset replaced (a peer that has not seen the reset yet), not
        a split view.  Raises :class:`ViewRefused` for a checkpoint that does not verify
        (not evidence of anything).
        """
        theirs = self.verify_note(other, pinned)
        ours = self.verified
        if theirs is None or ours is None:
            return None
        a, b = ours.checkpoint, theirs.checkpoint
        if a.origin != b.origin:
            return None
        if reset_at is not None and b.time < reset_at:
            return None
        if a.size == b.size and a.head != b.head:
            return theirs, f"same size {a.size}, different heads ({short(a)} vs {short(b)})"
        if b.size <= a.size and heads(b.size) != b.head:
            return theirs, (f"{short(b)} is not a prefix of the local chain {short(a)}")
        return None


def signers_for(settings: dict[str, Any], hosts: Iterable[str]) -> list[str]:
    """The checkpoint signers of API directory settings (default: the SD's names)."""
    names = list(settings.get("checkpoint_signers") or [])
    return names or list(settings.get("server_names") or []) or [h for h in hosts if h]
