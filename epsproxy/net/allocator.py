"""
The C allocator's thresholds for a process that moves data in large pieces (issue 14).

glibc's ``malloc`` serves a block over its *mmap threshold* with fresh pages from the
system and returns them when the block is freed, and gives the top of its heap back once
more than its *trim threshold* is free there.  It starts at 128 KiB for both and raises
them as large blocks come and go, so where a process ends up depends on its history.
Our proxies move a download in blocks of 64-256 KiB: Twisted reads 256 KiB at a time
from an internal server (``BULK_READ_BYTES``) and joins a write's 64 KiB TLS pieces
before sending them.  When those blocks came from fresh pages, every byte cost two page
faults (549 per MB counted in a terminating private proxy) and the proxy's CPU per GB
doubled: in 12 paired downloads of 500 MB, 5 through one private proxy process ran at
half the speed of the rest, and a process stayed in that state or out of it for
minutes.  With the thresholds fixed (:func:`keep_large_buffers_on_the_heap`: blocks up
to :data:`MMAP_THRESHOLD` from the heap, at most :data:`TRIM_THRESHOLD` of free heap
kept) no round did, and the faults were gone.  glibc's own adjustment may go as far as
32 MiB and 64 MiB.

Where an operator has set the allocator through the environment (``GLIBC_TUNABLES``
naming ``glibc.malloc``, or the ``MALLOC_*_`` variables), their settings stand.  Where
the C library is not glibc (no ``mallopt``, or one that refuses), nothing changes.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Mapping

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_large_buffers_on_the_heap"]

MMAP_THRESHOLD = 1024 * 1024
"""Blocks up to this size come from the heap (glibc's ``M_MMAP_THRESHOLD``)."""

TRIM_THRESHOLD = 4 * 1024 * 1024
"""The most free memory kept at the top of the heap (glibc's ``M_TRIM_THRESHOLD``)."""

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3

_OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_large_buffers_on_the_heap(
    environ: Mapping[str, str] = os.environ, libc: Any = None
) -> str:
    """
    Fix the allocator's thresholds (see the module docstring); returns what was done,
    for the program's log.  ``libc``: the C library (the process's own by default).
    """
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", "") or any(
            name in environ for name in _OPERATOR_VARIABLES):
        return "left as the environment sets it"
    try:
        library = ctypes.CDLL(None) if libc is None else libc
        mallopt = library.mallopt
    except (AttributeError, OSError):
        return "left as it is (no mallopt: not glibc)"
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(
            _M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "left as it is (mallopt refused the thresholds)"
    return (f"blocks up to {MMAP_THRESHOLD // 1024 // 1024} MiB from the heap, at most "
            f"{TRIM_THRESHOLD // 1024 // 1024} MiB of it kept free")
