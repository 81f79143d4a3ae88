"""
Evidence of a split view: two checkpoints signed by the same directory that cannot both
be true, saved in a file that anyone can check offline (``eps sd verify-evidence FILE``).

The file is JSON::

    {"format": "epsproxy-checkpoint-evidence/1",
     "reason": "...", "observer": "hd-1", "peer": "hd-2", "observed_at": "...Z",
     "checkpoints": [{"checkpoint": note, "certificates": [PEM, ...]}, {...}],
     "records": [signed record, ...]}

``records`` is the chain (from its root) of the larger checkpoint, needed only when the
two sizes differ: recomputing its chain heads shows that the larger checkpoint states
that chain and that the smaller one is not a prefix of it.  Two checkpoints of the same
size with different heads need nothing else.  :func:`verify_evidence` checks all this
with the certificates in the file (it names their fingerprints, to compare with the pins
of the directory); it needs no network and no configured roots.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from epsproxy.rules import checkpoint as cp
from epsproxy.rules import forms, records
from epsproxy.rules.records import InvalidRecord, load_signer

__all__ = ["FORMAT", "MAX_EVIDENCE_BYTES", "EvidenceError", "evidence", "write_evidence",
           "verify_evidence", "check_evidence"]

FORMAT = "epsproxy-checkpoint-evidence/1"
#: Largest evidence file read (bytes).
MAX_EVIDENCE_BYTES = 64 * 1024 * 1024


class EvidenceError(ValueError):
    """An evidence file is malformed or proves nothing (the message says why)."""


def evidence(reason: str, observer: str, peer: str, observed_at: float,
             checkpoints: Sequence[dict[str, Any]], chain: Sequence[dict] = ()) -> dict[str, Any]:
    """The evidence document (``checkpoints``: two ``{"checkpoint", "certificates"}``)."""
    return {
        "format": FORMAT,
        "reason": reason,
        "observer": observer,
        "peer": peer,
        "observed_at": datetime.fromtimestamp(observed_at, timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "checkpoints": [dict(c) for c in checkpoints],
        "records": list(chain),
    }


def write_evidence(folder: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` atomically into a new file (mode 0600) in ``folder``; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = document["observed_at"].replace(":", "")
    fd, tmp = tempfile.mkstemp(prefix=f"evidence-{stamp}-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        final = Path(tmp[: -len(".tmp")])
        os.replace(tmp, final)
        return final
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _checkpoint(value: Any, which: str) -> tuple[cp.SignedCheckpoint, list[str], dict[str, str]]:
    if not isinstance(value, dict) or not isinstance(value.get("checkpoint"), str):
        raise EvidenceError(f"{which}: expected {{\"checkpoint\": note, \"certificates\": [...]}}")
    certificates = value.get("certificates")
    if not isinstance(certificates, list) or not all(isinstance(c, str) for c in certificates):
        raise EvidenceError(f"{which}: certificates must be a list of PEM texts")
    try:
        signed = cp.parse(value["checkpoint"])
        names = cp.verify(signed, certificates, None, None)
    except cp.CheckpointError as e:
        raise EvidenceError(f"{which}: {e}") from None
    fingerprints: dict[str, str] = {}
    for pem in certificates[: cp.MAX_SIGNATURES]:
        try:
            signer = load_signer(pem)
        except InvalidRecord:
            continue
        fingerprints.setdefault(signer.name, signer.fingerprint)
    return signed, names, fingerprints


def _chain_heads(chain: Any) -> list[bytes]:
    """The chain heads of ``chain`` (signed records from the root), checking hashes and links."""
    if not isinstance(chain, list):
        raise EvidenceError("records must be a list")
    hashes = []
    previous = ""
    for index, raw in enumerate(chain):
        try:
            signed = records.normalise_signed_record(raw) if isinstance(raw, dict) else None
        except forms.FormError as e:
            raise EvidenceError(f"record {index}: malformed ({e})") from None
        if signed is None:
            raise EvidenceError(f"record {index}: not a signed record")
        try:
            computed = records.record_hash(signed["record"])
        except (ValueError, records.RecordError) as e:
            raise EvidenceError(f"record {index}: cannot be hashed ({e})") from None
        if computed != signed["hash"]:
            raise EvidenceError(f"record {index}: its hash does not match its content")
        if signed["parent_hash"] != previous:
            raise EvidenceError(f"record {index}: does not link to the record before it")
        previous = signed["hash"]
        hashes.append(previous)
    return cp.chain_heads(hashes)


def check_evidence(document: Any) -> str:
    """What ``document`` proves (a sentence); raises :class:`EvidenceError` if nothing."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise EvidenceError(f"not an evidence document (format {FORMAT!r} expected)")
    pair = document.get("checkpoints")
    if not isinstance(pair, list) or len(pair) != 2:
        raise EvidenceError("checkpoints must hold exactly two signed checkpoints")
    (a, a_names, a_keys), (b, b_names, b_keys) = (
        _checkpoint(pair[0], "checkpoint 1"), _checkpoint(pair[1], "checkpoint 2"))
    common = [n for n in a_names if n in b_names and a_keys.get(n) == b_keys.get(n)]
    if not common:
        raise EvidenceError("the two checkpoints have no valid signature by the same key")
    x, y = a.checkpoint, b.checkpoint
    if x.origin != y.origin:
        raise EvidenceError(f"the checkpoints are of different directories ({x.origin!r}, "
                            f"{y.origin!r})")
    signer = f"{common[0]} (signing certificate SHA-256 {a_keys[common[0]]})"
    if x.size == y.size:
        if x.head == y.head:
            raise EvidenceError("the checkpoints state the same chain: no conflict")
        return (f"{signer} signed two different chains of {x.size} records for "
                f"{x.origin!r}: a split view")
    small, large = (x, y) if x.size < y.size else (y, x)
    heads = _chain_heads(document.get("records", []))
    if len(heads) < large.size or heads[large.size - 1] != large.head:
        raise EvidenceError(f"the records do not make the chain of the checkpoint of "
                            f"{large.size} records")
    small_head = heads[small.size - 1] if small.size else cp.ZERO_HEAD
    if small_head == small.head:
        raise EvidenceError(f"the checkpoint of {small.size} records is a prefix of the one "
                            f"of {large.size}: no conflict")
    return (f"{signer} signed a chain of {small.size} records for {x.origin!r} that is not "
            f"a prefix of the chain of {large.size} records it also signed: a split view")


def verify_evidence(path: str | Path) -> tuple[bool, str]:
    """
    Check the evidence file at ``path`` offline: (True, what it proves) or (False, why
    it proves nothing).  The logic of ``eps sd verify-evidence FILE``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVIDENCE_BYTES + 1)
    except OSError as e:
        return False, f"{path}: {e.strerror or e}"
    if len(data) > MAX_EVIDENCE_BYTES:
        return False, f"{path}: larger than {MAX_EVIDENCE_BYTES} bytes"
    try:
        document = records.loads(data)
    except ValueError as e:
        return False, f"{path}: not JSON ({e})"
    try:
        return True, check_evidence(document)
    except EvidenceError as e:
        return False, f"{path}: {e}"
