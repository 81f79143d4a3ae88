"""
Waiting for a condition a test cannot be told about by an event (a directory update in
another process, a state reached on a timer): checked every ``step`` seconds, at most
``limit`` seconds, then a clear failure.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, reactor, task


@defer.inlineCallbacks
def until(check: Callable[[], Any], limit: float = 15.0, step: float = 0.1) -> Any:
    """Wait until ``check()`` is true (time is what the test waits for), at most ``limit`` s."""
    waited = 0.0
    while not check():
        if waited > limit:
            raise AssertionError("condition not met in time")
        yield task.deferLater(reactor, step, lambda: None)
        waited += step
