"""
The reactor as our code uses it: the one the programs run on, and its type for the checker.

**The programs' reactor.**  :class:`EPollReactor` is Twisted's epoll reactor with a leaner
dispatch: a plain readable or writable descriptor (most events) has its ``doRead`` or
``doWrite`` called in line, its end handled by Twisted's ``_disconnectSelectable`` (errors
logged and the descriptor closed, as in Twisted), and any other event (hang-up, error,
both at once) goes to Twisted's own ``_doReadOrWrite``.  Twisted's wraps every event in
``log.callWithLogger``, which asks the descriptor for its log prefix and pushes and pops a
legacy log context, some ten Python calls per event.  Only legacy ``twisted.python.log``
messages read that context (their ``system``); the programs log with ``twisted.logger``.
A proxy handles about nine events per relayed connection, so this is a tenth of its
Python calls per connection (issue 14).

Its main loop, too, takes fewer steps per turn: Twisted's asks its queue of timed calls,
through two methods and a context manager every turn, whether something is due and how
long it may sleep; :meth:`EPollReactor.mainLoop` runs the timed calls only when one is new,
due or handed over from a thread, and works out the sleep in line: some ten calls less per
turn, and at one client a proxy turns a dozen times per connection.

Every program runs on it when started by twistd without ``--reactor``
(:func:`install_default`, from the programs' shared options); ``twistd --reactor
epsproxy`` names it, and any other ``--reactor`` is respected.

A collaborator that needs one thing of the reactor takes that one interface
(``IReactorTime`` for a clock, ``IReactorTCP`` to connect).  A collaborator that needs
several, such as a service that opens a store (threads, shutdown triggers), listens and
times out, takes :class:`IReactor`.  Twisted types its global reactor the same way (a
make-believe ``_IReactorCommon``), but without the threads, so the programs' entry points
take the global one through :func:`installed_reactor`.

These are for mypy (with mypy-zope): no reactor declares that it provides
:class:`IReactor`, so never test it with ``providedBy``.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any, cast

from twisted.internet import epollreactor
from twisted.internet.error import ReactorAlreadyInstalledError
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger

__all__ = ["EPollReactor", "IReactor", "install", "install_default", "installed_reactor"]

log = Logger()

_READABLE = select.EPOLLIN
_WRITABLE = select.EPOLLOUT

_LONGEST_SLEEP = 2147483.0
"""The longest sleep epoll takes (2**31 milliseconds), as in Twisted's ``timeout()``."""


class IReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorFromThreads):
    """
    What a whole program needs of its reactor: run and stop with shutdown triggers,
    schedule calls, TCP, and results handed back from threads.
    """


def installed_reactor() -> IReactor:
    """The global reactor, installed by twistd or ``task.react`` before this is called."""
    from twisted.internet import reactor

    # Every reactor Twisted installs is a ReactorBase (core, time, threads) and a
    # PosixReactorBase or IOCPReactor (TCP); Twisted's own annotation omits the threads.
    return cast(IReactor, reactor)


class EPollReactor(epollreactor.EPollReactor):
    """Twisted's epoll reactor without a legacy log context per event, and a leaner main
    loop (module docstring)."""

    def mainLoop(self) -> None:
        """
        Run until stopped, as Twisted's main loop does: each turn, the timed calls that are
        due (and calls handed over from threads, and the shutdown after ``stop``), then a
        poll until the next timed call.  An error escaping a turn is logged and the loop
        goes on.
        """
        while self._started:
            try:
                self._turns()
            except BaseException:  # as Twisted's loop: whatever it was, log it, go on
                log.failure("Unexpected error in main loop")
        log.info("Main loop terminated.")

    def _turns(self) -> None:
        seconds = self.seconds
        poll = self.doPoll
        while self._started:
            # Twisted's runUntilCurrent, only when it has something to do.
            now = seconds()
            pending = self._pendingTimedCalls
            if (self.threadCallQueue or self._newTimedCalls or self._justStopped
                    or (pending and pending[0].time <= now)):
                self.runUntilCurrent()
                now = seconds()
            # Twisted's timeout(): until the next timed call, none if there is none.
            if self._newTimedCalls:
                self._insertNewDelayedCalls()
            pending = self._pendingTimedCalls
            if not self.running:
                poll(0.0)
            elif pending:
                delay = pending[0].time - now
                poll(0.0 if delay <= 0.0 else min(delay, _LONGEST_SLEEP))
            else:
                poll(None)

    def doPoll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: until an event) and handle the events."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # closed by an earlier event of this batch
            try:
                # Plain readable or writable (most events): Twisted's steps for it in
                # line; hang-ups, errors and both at once go through its own handling.
                if event == _READABLE:
                    try:
                        why = selectable.doRead()
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.failure("reading {selectable!r}", selectable=selectable)
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                elif event == _WRITABLE:
                    try:
                        why = selectable.doWrite()
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.failure("writing {selectable!r}", selectable=selectable)
                    if why:
                        self._disconnectSelectable(selectable, why, False)
                else:
                    handle(selectable, fd, event)
            except Exception:
                # What closing the descriptor raised.  Logged, and the loop goes on, as
                # in Twisted.
                log.failure("handling an event of {selectable!r}", selectable=selectable)

    doIteration = doPoll

    # Twisted's addReader/addWriter/removeReader/removeWriter, each in one call (Twisted's
    # go through a shared _add or _remove, and the removals ask the continuous poller
    # first): a proxy makes about eight of these per connection.

    def addReader(self, reader: Any) -> None:
        fd = reader.fileno()
        reads = self._reads
        if fd in reads:
            return
        try:
            if fd in self._writes:
                self._poller.modify(fd, _READABLE | _WRITABLE)
            else:
                self._poller.register(fd, _READABLE)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            self._continuousPolling.addReader(reader)  # a descriptor epoll cannot watch
            return
        reads.add(fd)
        self._selectables[fd] = reader

    def addWriter(self, writer: Any) -> None:
        fd = writer.fileno()
        writes = self._writes
        if fd in writes:
            return
        try:
            if fd in self._reads:
                self._poller.modify(fd, _READABLE | _WRITABLE)
            else:
                self._poller.register(fd, _WRITABLE)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            self._continuousPolling.addWriter(writer)
            return
        writes.add(fd)
        self._selectables[fd] = writer

    def removeReader(self, reader: Any) -> None:
        fd = reader.fileno()
        reads = self._reads
        if fd not in reads:
            if fd == -1 or self._continuousPolling._readers:
                super().removeReader(reader)  # already closed, or continuously polled
            return
        if fd in self._writes:
            self._poller.modify(fd, _WRITABLE)
        else:
            del self._selectables[fd]
            self._poller.unregister(fd)
        reads.remove(fd)

    def removeWriter(self, writer: Any) -> None:
        fd = writer.fileno()
        writes = self._writes
        if fd not in writes:
            if fd == -1 or self._continuousPolling._writers:
                super().removeWriter(writer)
            return
        if fd in self._reads:
            self._poller.modify(fd, _READABLE)
        else:
            del self._selectables[fd]
            self._poller.unregister(fd)
        writes.remove(fd)

    def forget(self, selectable: Any) -> None:
        """
        Stop reading and writing ``selectable`` in one step (Twisted's ``removeReader``
        and ``removeWriter`` each ask and modify the poller): for a descriptor about to
        be closed.
        """
        fd = selectable.fileno()
        reads, writes = self._reads, self._writes
        if fd in reads or fd in writes:
            reads.discard(fd)
            writes.discard(fd)
            del self._selectables[fd]
            self._poller.unregister(fd)


def install() -> None:
    """Install :class:`EPollReactor` as the global reactor (``twistd --reactor epsproxy``)."""
    from twisted.internet.main import installReactor

    installReactor(EPollReactor())


def install_default() -> bool:
    """
    Install :class:`EPollReactor` unless a reactor is installed already (``twistd
    --reactor``, or a test runner's); whether it did.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    try:
        install()
    except ReactorAlreadyInstalledError:
        return False
    return True

