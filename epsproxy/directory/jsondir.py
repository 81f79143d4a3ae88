"""
The ``json`` directory back-end of an EPS (SPEC §7.1): directory entries built from
unsigned change records kept in local files, for development and tests.

``path`` is one file, or a folder whose files ending in ``.json`` are read in name
order.  Each file is ``{"records": [<change record>, ...]}``; the records are
normalised (SPEC §3.2) and integrated in order (SPEC §6.1).  No signatures are checked.

Better than the reference (SPEC §23.3 #30): files are re-read only when the set of
(name, mtime, size, inode) of the files changed, not on every query; the name filter is
an anchored suffix (``x.json.bak`` is ignored); a broken file names itself and the
record at fault; and once a load has succeeded, a broken edit keeps the last good data
in service (with a warning) instead of failing every lookup.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from epsproxy.rules import forms, records
from epsproxy.directory import entries as _entries

__all__ = ["DirectoryError", "JSONDirectory", "MAX_FILE_SIZE"]

log = Logger()

#: Largest directory file read (bytes); a bigger one is an error, not a memory hog.
MAX_FILE_SIZE = 16 * 1024 * 1024

_Stamp = tuple[tuple[str, int, int, int], ...]


class DirectoryError(Exception):
    """The directory cannot answer: no such entry, or its files cannot be loaded."""


def answer_query(
    entries: dict[str, dict[str, Any]],
    query: dict[str, Any] | None,
    error: type[DirectoryError] = DirectoryError,
) -> list[dict[str, Any]]:
    """
    Copies of the entries matching a directory query object (keys ``group``, ``operator``,
    ``channels``; SPEC §6.3); a malformed query raises ``error``.  Shared by the back-ends.
    """
    query = query or {}
    if not isinstance(query, dict):
        raise error("a directory query must be an object")
    channels = query.get("channels")
    if channels is not None and not (
        isinstance(channels, list) and all(isinstance(c, str) for c in channels)
    ):
        raise error("query channels must be a list of strings")
    found = _entries.query(
        entries,
        group=query.get("group") or None,
        operator=query.get("operator") or None,
        channels=channels,
    )
    return copy.deepcopy(found)


class JSONDirectory:
    """
    Directory entries read from JSON files of unsigned change records (SPEC §7.1).

    ``name`` is our own operator name.  The first load happens in the constructor and
    raises :class:`DirectoryError` if it fails; later reloads that fail are logged and
    the last good entries keep being served.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        own_name: str,
        max_file_size: int = MAX_FILE_SIZE,
        reload_interval: float = 0.0,
    ) -> None:
        self.path = Path(path)
        self.name = own_name
        self._max_file_size = max_file_size
        self.reload_interval = reload_interval
        self._checked_at = float("-inf")
        self._entries: dict[str, dict[str, Any]] = {}
        self._stamp: _Stamp | None = None
        self._failed_stamp: _Stamp | None = None
        self._last_error: str | None = None
        self._refresh(first=True)

    # -- public interface (SPEC §7) ---------------------------------------------------

    def entries(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """
        The entries matching ``query`` (keys ``group``, ``operator``, ``channels``; SPEC
        §6.3), or all entries.  The dicts returned are copies.
        """
        self._refresh()
        return answer_query(self._entries, query)

    def entry_for(self, name: str) -> dict[str, Any]:
        """
        The entry of operator ``name``; :class:`DirectoryError` if none.  The dict is the
        directory's own (no copy: this is on every call's path) and must not be changed.
        """
        self._refresh()
        entry = self._entries.get(name)
        if entry is None:
            raise DirectoryError(f"no directory entry found for {name}")
        return entry

    def own_entry(self) -> dict[str, Any]:
        """Our own entry (``entry_for(self.name)``)."""
        return self.entry_for(self.name)

    # -- loading ----------------------------------------------------------------------

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            try:
                with os.scandir(self.path) as it:
                    names = sorted(e.name for e in it if e.name.endswith(".json") and e.is_file())
            except OSError as e:
                raise DirectoryError(f"{self.path}: cannot list folder: {e.strerror}") from None
            return [self.path / n for n in names]
        return [self.path]

    def _snapshot(self) -> _Stamp:
        stamp = []
        for file in self._files():
            try:
                st = file.stat()
            except OSError as e:
                raise DirectoryError(f"{file}: cannot read: {e.strerror}") from None
            stamp.append((str(file), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamp)

    def _read(self, file: Path) -> bytes:
        """The bytes of one directory file (a seam for tests)."""
        with file.open("rb") as f:
            data = f.read(self._max_file_size + 1)
        if len(data) > self._max_file_size:
            raise DirectoryError(f"{file}: larger than {self._max_file_size} bytes")
        return data

    def _load_file(self, file: Path, into: dict[str, dict[str, Any]]) -> None:
        try:
            data = records.loads(self._read(file))
        except OSError as e:
            raise DirectoryError(f"{file}: cannot read: {e.strerror}") from None
        except ValueError as e:  # includes UnicodeDecodeError and JSONDecodeError
            raise DirectoryError(f"{file}: invalid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise DirectoryError(f'{file}: expected an object {{"records": [...]}}')
        for index, record in enumerate(data["records"]):
            if not isinstance(record, dict):
                raise DirectoryError(f"{file}: record {index}: must be an object")
            try:
                _entries.integrate(into, records.normalise_record(record))
            except (forms.FormError, _entries.EntryError) as e:
                raise DirectoryError(f"{file}: record {index}: {e}") from None

    def _refresh(self, first: bool = False) -> None:
        """Reload if the files changed, looking at most every ``reload_interval`` s."""
        now = time.monotonic()
        if not first and now - self._checked_at < self.reload_interval:
            return
        self._checked_at = now
        stamp: _Stamp | None = None
        try:
            # The stamp is taken before reading: a change during the read shows up as a
            # different stamp next time and is read then.
            stamp = self._snapshot()
            if stamp == self._stamp or stamp == self._failed_stamp:
                return
            loaded: dict[str, dict[str, Any]] = {}
            for name, *_ in stamp:
                self._load_file(Path(name), loaded)
        except DirectoryError as e:
            if first:
                raise
            # A broken set of files is not read again until it changes; a missing
            # folder is retried (a stat per query) but warned about once.
            self._failed_stamp = stamp
            if str(e) != self._last_error:
                log.warn("json directory reload failed, keeping last good data: {error}",
                         error=str(e))
            self._last_error = str(e)
            return
        self._entries = loaded
        self._stamp = stamp
        self._failed_stamp = None
        self._last_error = None
        log.info("json directory loaded {count} entries from {files} files",
                 count=len(loaded), files=len(stamp))
