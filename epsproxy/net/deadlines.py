"""
Many deadlines of one length on one timer.

A proxy gives every new connection at its internal endpoint a few seconds to present its
token, and every token a few seconds to be paired: thousands a second, nearly all met.
A reactor timer each (``callLater``, then ``cancel``) costs a push and a removal in the
reactor's heap, compared in Python, per connection.  :class:`Deadlines` keeps the keys in
the order of their deadlines instead (one length for all: the order they were added in,
a key added again moving to the end) and sets one timer, for the first: adding and
discarding are a dict insertion and removal, and the timer is set again only when it
fires (or stopped when the last key is discarded).

Changing :attr:`Deadlines.timeout` applies to keys added from then on; until the keys of
the old length are gone, one with a longer deadline ahead of it may expire late by the
difference (a reload, not the normal case).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """
    Keys that expire ``timeout`` seconds after they were last :meth:`add`-ed: then
    ``expire(key)`` is called (the key is forgotten first).  One reactor timer, running
    only while a key is held.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expire: Callable[[K], None]) -> None:
        self.clock = clock
        self.timeout = timeout
        self._expire = expire
        self._due: dict[K, float] = {}  # in the order of the deadlines
        self._call: IDelayedCall | None = None
        self._firing = False  # expiring keys: the timer is set once they are done

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def keys(self) -> list[K]:
        """The keys held, the first to expire first."""
        return list(self._due)

    def add(self, key: K) -> None:
        """``key`` expires ``timeout`` seconds from now (from now again, if held)."""
        due = self._due
        due.pop(key, None)
        now = self.clock.seconds()
        due[key] = now + self.timeout
        if self._call is None and not self._firing:
            self._call = self.clock.callLater(self.timeout, self._fire)

    def discard(self, key: K) -> None:
        """Forget ``key`` (its deadline was met); the timer stops with the last key."""
        due = self._due
        if due.pop(key, None) is not None and not due and self._call is not None:
            self._call.cancel()
            self._call = None

    def clear(self) -> None:
        """Forget every key, expiring none; the timer stops."""
        self._due.clear()
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        due = self._due
        now = self.clock.seconds()
        self._firing = True
        try:
            while due:
                key = next(iter(due))
                if due[key] > now:
                    break
                del due[key]
                self._expire(key)
        finally:
            self._firing = False
        if due and self._call is None:
            self._call = self.clock.callLater(max(due[next(iter(due))] - now, 0.0),
                                              self._fire)
