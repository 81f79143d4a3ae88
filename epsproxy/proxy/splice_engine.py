"""
The splice engine: spliced pairs relayed by C on a thread of its own (issue 14).

A Python splice (:mod:`epsproxy.proxy.splice`) runs Python code for every read and
every event of a pair: the reactor's dispatch, the read, the send, the read sizing.
That is most of what a Python relay costs beyond a C one per byte, and a share of what
a short connection costs.  The engine takes that away: once two connected TCP sockets
are paired, :meth:`SpliceEngine.add` hands their descriptors to the C part
(``epsproxy/proxy/_splice_engine.c``), which relays on its own epoll loop and thread
with the same policy as the Python splice (reads sized to the receiver's room, one
shared read buffer, half-close, errors cut the pair with resets, the idle timeout) and
never runs Python code until the pair has ended.  Then the callback given to
:meth:`~SpliceEngine.add` runs on the reactor's thread, with how the pair ended and the
bytes it relayed; the caller closes both sockets (the engine never closes one).

The C part is built with the package where a C compiler is found (``setup.py``); where
it is not, :func:`available` is False and the proxies splice in Python.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    from epsproxy.proxy import _splice_engine as _c
except ImportError:  # not built (no compiler, not Linux): the Python splice does it all
    _c = None  # type: ignore[assignment]  # a module, or None when not built

__all__ = ["Counts", "Ended", "Outcome", "SpliceEngine", "available", "describe"]

log = Logger()

_callbacks: dict[int, Callable[[Ended], None]] = {}
"""What to call when a pair ends, by handle: one table for the process, as the C
engine is one."""


def available() -> bool:
    """Whether the C part was built (else every splice is relayed in Python)."""
    return _c is not None


def describe(engine: SpliceEngine | None, wanted: bool) -> str:
    """How a program relays spliced pairs, for its start log line."""
    if engine is not None:
        return "on (spliced pairs relayed in C)"
    if not wanted:
        return "off (splice_engine: false; relayed in Python)"
    return "off (not built with the package: no C compiler then; relayed in Python)"


class Outcome(enum.IntEnum):
    """How a pair ended (the C part's codes)."""

    FINISHED = 0
    """Both directions ended with end-of-stream; both sockets' write sides are shut."""
    CUT_LEFT = 1
    """The left socket failed; the right one was set to reset on close."""
    CUT_RIGHT = 2
    """The right socket failed; the left one was set to reset on close."""
    IDLE = 3
    """Nothing relayed for the idle timeout; both set to reset on close."""
    ABORTED = 4
    """:meth:`SpliceEngine.abort` ended it; both set to reset on close."""


@dataclass(frozen=True)
class Ended:
    """What the engine reports of an ended pair."""

    outcome: Outcome
    left_to_right: int
    right_to_left: int
    waits: int
    """Times a direction waited for its receiver's room rather than read little."""
    peak_held: int
    """The most bytes one direction held unsent in user space."""


@dataclass(frozen=True)
class Counts:
    """A live pair's counters."""

    left_to_right: int
    right_to_left: int
    waits: int
    held_for_right: int
    """Bytes read from the left and not yet sent to the right."""
    held_for_left: int
    reads: int
    """Reads that returned bytes, both directions."""
    room_queries: int
    """Times a receiver's room (its send buffer and queue) was asked of the kernel: two
    system calls each, made only when what was known did not promise a whole read."""


@implementer(IReadDescriptor)
class _Notifications:
    """The reactor's view of the engine's notification descriptor."""

    def __init__(self, fd: int, dispatch: Callable[[], None]) -> None:
        self._fd = fd
        self.doRead = dispatch

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "SpliceEngine"

    def connectionLost(self, reason: Failure) -> None:
        pass


class SpliceEngine:
    """
    The process's splice engine, seen from one reactor (there is one C engine per
    process: :meth:`shared` gives the same object for the same reactor).

    Its thread starts with :meth:`start` or the first pair (after a daemon's fork, never
    before).
    """

    _instances: dict[int, SpliceEngine] = {}

    def __init__(self, reactor: IReactorFDSet) -> None:
        if _c is None:
            raise RuntimeError("the splice engine's C part is not built")
        self._reactor = reactor
        self._callbacks = _callbacks
        self._reader: _Notifications | None = None

    @classmethod
    def shared(cls, reactor: Any) -> SpliceEngine | None:
        """The engine for ``reactor``, or None where the C part is not built or the
        reactor cannot watch a descriptor."""
        if _c is None or not IReactorFDSet.providedBy(reactor):
            return None
        engine = cls._instances.get(id(reactor))
        if engine is None:
            engine = cls._instances[id(reactor)] = cls(reactor)
        return engine

    def start(self) -> None:
        """
        Start the engine's thread and make its descriptors (an epoll set and two
        eventfds), if not yet done: a program calls it as it starts serving (after a
        daemon's fork), so that a failure shows then and its descriptor count is settled
        before the first pair; :meth:`add` starts it too.
        """
        assert _c is not None
        if self._reader is None:
            self._reader = _Notifications(_c.notify_fd(), self._dispatch)

    def __len__(self) -> int:
        """Pairs handed over and not yet reported ended."""
        return len(self._callbacks)

    def add(
        self,
        left_fd: int,
        right_fd: int,
        ended: Callable[[Ended], None],
        *,
        to_left: bytes = b"",
        to_right: bytes = b"",
        left_eof: bool = False,
        right_eof: bool = False,
        read_bytes: int,
        idle_timeout: float,
    ) -> int:
        """
        Relay between two connected non-blocking sockets until both directions end
        (``to_left``/``to_right`` first; ``left_eof``/``right_eof``: that side already
        sent end-of-stream).  The caller keeps both descriptors open and reads and
        writes neither until ``ended`` is called (on the reactor's thread).  Returns
        the pair's handle, for :meth:`abort` and :meth:`counts` until then.
        """
        assert _c is not None
        self.start()
        assert self._reader is not None
        handle: int = _c.add(left_fd, right_fd, to_left, to_right, left_eof, right_eof,
                             read_bytes, idle_timeout)
        if not self._callbacks:
            # Watched only while pairs are live, so a reactor with none has nothing of
            # ours left in it (a stopped program, a test's clean reactor).
            self._reactor.addReader(self._reader)
        self._callbacks[handle] = ended
        return handle

    def abort(self, handle: int) -> None:
        """End the pair soon with resets (its ``ended`` runs then), if not ended yet."""
        assert _c is not None
        if handle in self._callbacks:
            _c.abort(handle)

    def counts(self, handle: int) -> Counts:
        """What a pair not yet ended has done so far (zeros once it has ended)."""
        assert _c is not None
        if handle not in self._callbacks:
            return Counts(0, 0, 0, 0, 0, 0, 0)
        return Counts(*_c.counts(handle))

    def _dispatch(self) -> None:
        assert _c is not None
        callbacks = self._callbacks
        for handle, outcome, left_to_right, right_to_left, waits, peak in _c.collect():
            callback = callbacks.pop(handle, None)
            if callback is None:
                continue  # cannot happen: every handle was added here
            try:
                callback(Ended(Outcome(outcome), left_to_right, right_to_left, waits, peak))
            except Exception:
                log.failure("a spliced pair's end failed in its handler")
        if not callbacks and self._reader is not None:
            self._reactor.removeReader(self._reader)
        return None
