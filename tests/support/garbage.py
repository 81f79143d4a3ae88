"""What a test leaves for Python's garbage collector (objects in reference cycles)."""

from __future__ import annotations

import gc
from typing import Any, Callable


def watch_new_garbage(test: Any) -> None:
    """
    From now until ``test`` ends, keep what the collector finds (``gc.DEBUG_SAVEALL``)
    and hold every object that exists now, so that what turns up as garbage (other
    tests' connections released meanwhile cannot) is what ``test`` itself made.
    """
    gc.collect()
    existing = gc.get_objects()
    test.addCleanup(existing.clear)
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    test.addCleanup(gc.set_debug, flags)
    test.addCleanup(gc.garbage.clear)


def garbage_names(counts: Callable[[Any], bool]) -> list[str]:
    """Collect now; the type names of the garbage objects ``counts`` selects."""
    gc.collect()
    return [type(o).__name__ for o in gc.garbage if counts(o)]
