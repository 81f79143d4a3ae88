"""
Chains of signed change records, and the service directory's model of its store.

:class:`VerifiedChain` is an ordered list of records that link (each ``parent_hash`` is
the previous ``hash``) and that all verified (SPEC §5.4) with the signing-key pins of the
records before them, together with the directory entries they build.  A directory
client keeps one and extends it with what the SD sends; unlike the reference it checks
the links, so a server cannot drop or reorder records unnoticed (SPEC §23.3 #28).

:class:`RecordLog` is the SD's model (SPEC §8.2, stricter as §23.3 #26/#27 ask): the
store's records form a tree by ``parent_hash``.  Each record is verified once, when its
parent is known, with the pins of its verified ancestors only; a record that fails cuts
off its subtree (no gaps); a record whose parent is not known yet waits and is linked
when the parent arrives.  The selected chain runs from the root with the latest
``created_at`` (that is how a reset wins) to its deepest leaf (the longest chain), ties
going to the chain that was complete first in store order.

Records are verified with :func:`epsproxy.rules.records.verify_record`; the cost of a record is
one ECDSA verification, everything else here is O(1) per record.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.logger import Logger

from epsproxy.rules import checkpoint as _checkpoint, forms, records
from epsproxy.directory import entries as _entries

__all__ = [
    "ChainError",
    "StaleAppend",
    "VerifiedChain",
    "RecordLog",
    "created_at_key",
]

log = Logger()

_EARLIEST = -(2**128)


class ChainError(records.RecordError):
    """
    Record ``index`` of a batch cannot extend a chain (``reason`` says why; ``cause`` is
    the underlying records error, if any).  The chain was left unchanged.
    """

    def __init__(self, index: int, reason: str, cause: Exception | None = None) -> None:
        super().__init__(f"record {index}: {reason}")
        self.index = index
        self.reason = reason
        self.cause = cause

    def __str__(self) -> str:
        return f"record {self.index}: {self.reason}"


class StaleAppend(records.RecordError):
    """An appended record does not follow the current tip (SPEC §8.3 step 2)."""

    def __init__(self, reason: str = "stale append, please try again") -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def created_at_key(text: str) -> int:
    """
    A sort key for an RFC 3339 ``created_at``: nanoseconds since the epoch (so time zones
    and nanoseconds count), used to compare chain roots.  Unreadable times sort earliest.
    """
    try:
        return records.timestamp_ns(text)
    except ValueError:
        return _EARLIEST


def _normalise(signed: Any) -> dict:
    if not isinstance(signed, dict):
        raise forms.FormError("a signed record must be a mapping")
    return records.normalise_signed_record(signed)


def _verify(signed: dict, pins: records.Pins, trust: records.TrustStore) -> records.Signer:
    try:
        return records.verify_record(signed, pins, trust, normalised=True)
    except ValueError as e:
        # Values with no structured hash (NaN, absurd nesting) can come out of JSON.
        raise records.InvalidRecord(f"record cannot be hashed: {e}") from None


def _pins_after(pins: records.Pins, signed: dict) -> records.Pins:
    # Pins are shared between records and never changed in place: only a certificates
    # record can change them, and then it gets its own copy.
    if signed["record"]["section"] != "certificates":
        return pins
    pins = pins.copy()
    pins.observe(signed)
    return pins


class VerifiedChain:
    """
    Linked, verified records in chain order and the entries they build.

    ``records`` (signed records), ``entries`` (name -> entry, SPEC §2.1), ``pins``
    (the signing-key pins after the last record) and ``heads`` (the chain head after
    each record, :func:`epsproxy.rules.checkpoint.chain_head`: what a checkpoint of the
    first ``n`` records states is ``heads[n - 1]``) are read-only for callers; change the
    chain only with :meth:`extend`.
    """

    def __init__(self, trust: records.TrustStore) -> None:
        self.trust = trust
        self.records: list[dict] = []
        self.heads: list[bytes] = []
        self.entries: dict[str, dict] = {}
        self.pins = records.Pins()
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def tip(self) -> dict | None:
        """The last record, or None for an empty chain."""
        return self.records[-1] if self.records else None

    @property
    def tip_hash(self) -> str:
        """The hash of the last record, ``""`` for an empty chain."""
        return self.records[-1]["hash"] if self.records else ""

    @property
    def head(self) -> bytes:
        """The chain head of the whole chain (32 zero bytes for an empty chain)."""
        return self.heads[-1] if self.heads else _checkpoint.ZERO_HEAD

    def head_at(self, size: int) -> bytes | None:
        """The chain head of the first ``size`` records, None beyond the chain."""
        if size == 0:
            return _checkpoint.ZERO_HEAD
        return self.heads[size - 1] if 0 < size <= len(self.heads) else None

    @property
    def root_created_at(self) -> str | None:
        """``created_at`` of the first record (compare with :func:`created_at_key`)."""
        return self.records[0]["record"]["created_at"] if self.records else None

    def index_of(self, hash_: str) -> int | None:
        """The position of the record with this hash, or None."""
        return self._index.get(hash_)

    def records_after(self, hash_: str) -> list[dict]:
        """The records after the one with this hash; all of them if ``""`` or unknown."""
        position = self._index.get(hash_) if hash_ else None
        return self.records[position + 1 :] if position is not None else list(self.records)

    def extend(self, signed_records: Iterable[dict]) -> None:
        """
        Append records, all or nothing.  Each must be well formed, link to the one
        before (the first record of an empty chain is a root: ``parent_hash`` ``""``),
        not repeat a record, and verify (SPEC §5.4) with the pins of the records before
        it.  Raises :class:`ChainError` naming the first bad record.
        """
        staged: list[tuple[dict, records.Pins]] = []
        pins = self.pins
        previous = self.tip_hash
        seen: set[str] = set()
        for i, raw in enumerate(signed_records):
            try:
                signed = _normalise(raw)
            except forms.FormError as e:
                raise ChainError(i, f"malformed record: {e}", e) from None
            hash_ = signed["hash"]
            if signed["parent_hash"] != previous:
                raise ChainError(i, "does not link to the previous record")
            if hash_ in self._index or hash_ in seen:
                raise ChainError(i, "record is already in the chain")
            try:
                _verify(signed, pins, self.trust)
                record = signed["record"]
                _entries.section_value(record["section"], record["data"])
            except records.RecordError as e:
                raise ChainError(i, e.reason, e) from None
            except _entries.EntryError as e:
                raise ChainError(i, str(e), e) from None
            pins = _pins_after(pins, signed)
            staged.append((signed, pins))
            seen.add(hash_)
            previous = hash_
        for signed, pins in staged:
            self._append_verified(signed, pins)

    def _append_verified(self, signed: dict, pins_after: records.Pins) -> None:
        """Append a record that is known to link and verify (used by RecordLog)."""
        _entries.integrate(self.entries, signed)
        self._index[signed["hash"]] = len(self.records)
        self.heads.append(_checkpoint.chain_head(self.head, signed["hash"]))
        self.records.append(signed)
        self.pins = pins_after


class _Node:
    """A verified record in the log's tree."""

    __slots__ = ("signed", "parent", "root", "depth", "pins", "best", "time_key")

    def __init__(self, signed: dict, parent: _Node | None, pins: records.Pins) -> None:
        self.signed = signed
        self.parent = parent
        self.root: _Node = parent.root if parent is not None else self
        self.depth: int = parent.depth + 1 if parent is not None else 0
        self.pins = pins  # the pins after this record, for verifying its children
        # Only used on roots: the deepest leaf below (on ties the one linked first)
        # and the root's time stamp.
        self.best: _Node = self
        self.time_key = 0


class RecordLog:
    """
    The service directory's model of its append-only store (SPEC §8.2, §8.3).

    Feed it the store's records with :meth:`add` (in store order, as often as new ones
    arrive); read the chosen chain from :attr:`selected`; ask :meth:`check_append`
    before writing a submitted record.  No record is verified twice.
    """

    def __init__(self, trust: records.TrustStore) -> None:
        self.trust = trust
        self._nodes: dict[str, _Node] = {}  # hash -> verified record
        self._pending: dict[str, list[tuple[int, dict]]] = {}  # parent hash -> waiting
        self._seq = 0
        self._best_root: _Node | None = None
        self._tip_node: _Node | None = None
        self._selected = VerifiedChain(trust)
        self._empty_pins = records.Pins()

    @property
    def selected(self) -> VerifiedChain:
        """The selected chain (a new object whenever the selection is rebuilt)."""
        return self._selected

    @property
    def verified_count(self) -> int:
        """How many distinct records verified (in any chain)."""
        return len(self._nodes)

    @property
    def pending_count(self) -> int:
        """How many records wait for a parent that is not (yet) known."""
        return sum(len(waiting) for waiting in self._pending.values())

    def is_selected(self, hash_: str) -> bool:
        """Whether the record with this hash is in the selected chain."""
        return self._selected.index_of(hash_) is not None

    def records_after(self, hash_: str) -> list[dict]:
        """Records of the selected chain after ``hash_``; all if ``""`` or unknown."""
        return self._selected.records_after(hash_)

    def add(self, stored: Iterable[Any]) -> bool:
        """
        Take records read from the store (JSON-decoded, in store order).  Malformed and
        tampered records are skipped with a warning, duplicates ignored.  Returns
        whether the selected chain changed.
        """
        for raw in stored:
            seq = self._seq
            self._seq += 1
            # Only verified records are indexed by hash, so a tampered record that
            # claims another one's hash cannot shadow it.
            if isinstance(raw, dict) and isinstance(raw.get("hash"), str):
                if raw["hash"] in self._nodes:
                    continue  # a duplicate of a verified record
            try:
                signed = _normalise(raw)
            except (ValueError, TypeError) as e:
                log.warn("skipping malformed stored record #{seq}: {reason}",
                         seq=seq, reason=str(e))
                continue
            parent_hash = signed["parent_hash"]
            if parent_hash == "":
                self._link(seq, signed, None)
            elif parent_hash in self._nodes:
                self._link(seq, signed, self._nodes[parent_hash])
            else:
                self._pending.setdefault(parent_hash, []).append((seq, signed))
        return self._reconcile()

    def _link(self, seq: int, signed: dict, parent: _Node | None) -> None:
        work: list[tuple[int, dict, _Node | None]] = [(seq, signed, parent)]
        while work:
            seq, signed, parent = work.pop()
            hash_ = signed["hash"]
            if hash_ in self._nodes:
                continue
            pins = parent.pins if parent is not None else self._empty_pins
            try:
                _verify(signed, pins, self.trust)
            except records.RecordError as e:
                log.warn("stored record {hash} (#{seq}) does not verify: {reason}",
                         hash=hash_[:16], seq=seq, reason=e.reason)
                continue
            node = _Node(signed, parent, _pins_after(pins, signed))
            self._nodes[hash_] = node
            self._place(node)
            waiting = self._pending.pop(hash_, None)
            if waiting:
                work.extend((s, child, node) for s, child in reversed(waiting))

    def _place(self, node: _Node) -> None:
        if node.parent is None:
            node.time_key = created_at_key(node.signed["record"]["created_at"])
            best = self._best_root
            if best is None or node.time_key > best.time_key:
                self._best_root = node
            return
        root = node.root
        leaf = root.best
        # Strictly deeper only: records are linked in the order their chains become
        # complete, so on a tie the chain complete first (in store order) keeps the
        # selection and a competitor that merely catches up never takes over.
        if node.depth > leaf.depth:
            root.best = node

    def _reconcile(self) -> bool:
        target = self._best_root.best if self._best_root is not None else None
        current = self._tip_node
        if target is current:
            return False
        path = []
        node = target
        while node is not None and (current is None or node.depth > current.depth):
            path.append(node)
            node = node.parent
        if node is not current:
            # Not an extension of the selected chain: rebuild from the root.
            while node is not None:
                path.append(node)
                node = node.parent
            self._selected = VerifiedChain(self.trust)
            log.info("selected chain changed: {length} records", length=len(path))
        for node in reversed(path):
            self._selected._append_verified(node.signed, node.pins)
        self._tip_node = target
        return True

    def check_append(self, signed: dict) -> records.Signer:
        """
        Whether ``signed`` may be appended now (SPEC §8.3 steps 2-3): a root (parent
        ``""``, a reset) always links, anything else must follow the selected tip
        (else :class:`StaleAppend`); then it must verify with the selected chain's pins
        (for a reset root too).  Raises records.NotAllowed / InvalidRecord; returns the
        signer.
        """
        try:
            signed = _normalise(signed)
        except forms.FormError as e:
            raise records.InvalidRecord(f"malformed record: {e}") from None
        parent_hash = signed["parent_hash"]
        if parent_hash != "" and parent_hash != self._selected.tip_hash:
            raise StaleAppend()
        if signed["hash"] in self._nodes:
            raise records.InvalidRecord("record is already in the directory")
        return _verify(signed, self._selected.pins, self.trust)
