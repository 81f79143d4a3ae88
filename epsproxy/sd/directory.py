"""
The service directory's state: the record store and the verified chain built from it.

Writes are serialised by one lock.  A batch of submitted records is checked as a whole
before anything is written (the reference writes record by record and can leave half a
batch behind), then each record is appended to the store and read back into the
:class:`~epsproxy.directory.chain.RecordLog`, so what the API serves is always what the
store holds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Generator, Sequence

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.logger import Logger

from epsproxy.rules import records as records_mod
from ..directory.chain import RecordLog, StaleAppend
from ..store import AppendConflict, Store, StoredEntry
from .checkpoints import CheckpointSigner

__all__ = ["RECORD_ENTRY_TYPE", "ServiceDirectory", "SubmitError"]

RECORD_ENTRY_TYPE = 1
"""Store entry type of a signed change record (SPEC §8.5)."""


class SubmitError(Exception):
    """A submitted batch was refused; ``code`` is the JSON-RPC error code to report."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


#: Compare-and-append attempts of one submit before giving up (scale-out, issue 6).
MAX_CONFLICT_RETRIES = 5

STALE = 409
NOT_ALLOWED = 403
INVALID = 400


class ServiceDirectory:
    """The records an SD serves, kept in step with its store."""

    log = Logger()

    def __init__(self, store: Store, trust: records_mod.TrustStore,
                 checkpoints: CheckpointSigner | None = None) -> None:
        self.store = store
        self.trust = trust
        #: Signs checkpoints of the selected chain (None: this SD signs none).
        self.checkpoints = checkpoints
        self.record_log = RecordLog(trust)
        self._lock = DeferredLock()

    # -- reading ------------------------------------------------------------------

    @inlineCallbacks
    def refresh(self) -> Generator[Deferred[Any], Any, int]:
        """Read entries appended to the store since the last read; returns their number."""
        resets = self.store.resets
        entries: list[StoredEntry] = yield self.store.read_new()
        if self.store.resets != resets:
            # The store was read again from its start (a Redis list replaced behind our
            # back, e.g. by a failover to a replica that had not seen every append):
            # what it returned is the whole log, so the record log starts over with it.
            self.log.warn("store was read again from its start; rebuilding the record log")
            self.record_log = RecordLog(self.trust)
        decoded = []
        for entry in entries:
            if entry.type != RECORD_ENTRY_TYPE:
                continue
            try:
                decoded.append(json.loads(entry.data))
            except ValueError:
                self.log.warn(
                    "skipping store entry {entry_id} that is not JSON", entry_id=entry.id.hex()
                )
        if decoded:
            self.record_log.add(decoded)
        return len(decoded)

    def tip(self) -> dict | None:
        """The last record of the selected chain."""
        return self.record_log.selected.tip

    def records_after(self, after: str) -> list[dict]:
        """Records after the one with hash ``after``; all if ``after`` is empty or unknown."""
        return self.record_log.selected.records_after(after)

    def checkpoint(self) -> dict[str, Any] | None:
        """
        The signed checkpoint of the selected chain as served (``{"checkpoint": note,
        "certificates": [PEM, ...]}``), None if this SD signs no checkpoints.
        """
        if self.checkpoints is None:
            return None
        return self.checkpoints.served(self.record_log.selected)

    def records_with_checkpoint(self, after: str) -> dict[str, Any]:
        """
        ``{"records": ..., "checkpoint": ..., "certificates": ...}``: the records after
        ``after`` and the checkpoint of the chain they end, taken from the same chain
        object so that the two always agree.
        """
        chain = self.record_log.selected
        reply: dict[str, Any] = {"records": chain.records_after(after)}
        if self.checkpoints is not None:
            reply.update(self.checkpoints.served(chain))
        return reply

    def entries(self) -> list[dict]:
        """All directory entries, ordered by name."""
        entries = self.record_log.selected.entries
        return [entries[name] for name in sorted(entries)]

    def entry(self, name: str) -> dict | None:
        return self.record_log.selected.entries.get(name)

    # -- writing ------------------------------------------------------------------

    def submit(self, signed_records: Sequence[dict]) -> Deferred[None]:
        """Append a batch of (normalised) signed records, all or nothing as far as checks go."""
        return self._lock.run(self._submit, list(signed_records))

    def catch_up(self) -> Deferred[int]:
        """
        :meth:`refresh` under the write lock: what the SD service runs when the store
        says another SD appended (and periodically).  Never between a submit's check and
        its append, which would let the submit write against a tip it did not check.
        """
        return self._lock.run(self.refresh)

    @inlineCallbacks
    def _submit(self, signed_records: list[dict]) -> Generator[Deferred[Any], Any, None]:
        yield self.refresh()
        self._check_batch(signed_records)
        append_if_unchanged = getattr(self.store, "append_if_unchanged", None)
        if append_if_unchanged is not None:
            yield self._append_against_tip(append_if_unchanged, signed_records)
            return
        for signed in signed_records:
            entry = StoredEntry(
                RECORD_ENTRY_TYPE,
                os.urandom(16),
                json.dumps(signed, separators=(",", ":")).encode("utf-8"),
            )
            yield self.store.append(entry)
            yield self.refresh()
            if not self.record_log.is_selected(signed["hash"]):
                raise SubmitError(
                    -32603, "new record not found in the selected chain after writing it"
                )
        self.log.info(
            "appended {count} record(s); tip {tip}",
            count=len(signed_records),
            tip=signed_records[-1]["hash"][:16],
        )

    @inlineCallbacks
    def _append_against_tip(
        self,
        append_if_unchanged: Callable[[Sequence[StoredEntry]], Deferred[None]],
        signed_records: list[dict],
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Scale-out (issue 6): several SD instances share one store.  The checked batch is
        written all at once and only if nobody appended since this SD last read the store
        (the store's compare-and-append), so two SDs can never both extend the same tip.
        On a conflict the new records are read and the batch checked again: it is stale
        (409) if another SD moved the tip, and retried if the new entries left it alone.
        """
        entries = [
            StoredEntry(
                RECORD_ENTRY_TYPE,
                os.urandom(16),
                json.dumps(signed, separators=(",", ":")).encode("utf-8"),
            )
            for signed in signed_records
        ]
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                yield append_if_unchanged(entries)
                break
            except AppendConflict:
                yield self.refresh()
                self._check_batch(signed_records)
        else:
            raise SubmitError(-32603, "the store kept changing during the append; try again")
        yield self.refresh()
        for signed in signed_records:
            if not self.record_log.is_selected(signed["hash"]):
                raise SubmitError(
                    -32603, "new record not found in the selected chain after writing it"
                )
        self.log.info(
            "appended {count} record(s); tip {tip}",
            count=len(signed_records),
            tip=signed_records[-1]["hash"][:16],
        )

    def _check_batch(self, signed_records: list[dict]) -> None:
        """Refuse the batch before writing if any record would be refused (SPEC §8.3)."""
        pins = self.record_log.selected.pins.copy()
        previous = ""
        for index, signed in enumerate(signed_records):
            try:
                if index == 0:
                    self.record_log.check_append(signed)
                else:
                    if signed.get("parent_hash", "") != previous:
                        raise SubmitError(
                            INVALID,
                            f"record {index} does not chain onto record {index - 1} of the batch",
                        )
                    records_mod.verify_record(signed, pins, self.trust)
            except StaleAppend as e:
                tip = self.record_log.selected.tip_hash
                raise SubmitError(STALE, str(e.reason if hasattr(e, "reason") else e), {"tip": tip})
            except records_mod.NotAllowed as e:
                raise SubmitError(NOT_ALLOWED, f"you cannot append record {index}: {e.reason}")
            except records_mod.RecordError as e:
                raise SubmitError(INVALID, f"invalid record {index}: {e.reason}")
            pins.observe(signed)
            previous = signed["hash"]
