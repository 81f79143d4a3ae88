"""
The reactor as our code uses it: the one the programs run on, and its type for the checker.

**The programs' reactor.**  :class:`EPollReactor` is Twisted's epoll reactor with a leaner
dispatch: each ready descriptor goes straight to Twisted's own ``_doReadOrWrite`` (the
read, write and hang-up handling, its errors logged and the descriptor closed, as in
Twisted), where Twisted's wraps every event in ``log.callWithLogger``, which asks the
descriptor for its log prefix and pushes and pops a legacy log context, some ten Python
calls per event.  Only legacy ``twisted.python.log`` messages read that context (their
``system``); the programs log with ``twisted.logger``.  A proxy handles about nine events
per relayed connection, so this is a tenth of its Python calls per connection (issue 14).
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
    """Twisted's epoll reactor without a legacy log context per event (module docstring)."""

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
                handle(selectable, fd, event)
            except Exception:
                # _doReadOrWrite catches what doRead/doWrite raise; this is what closing
                # the descriptor raised.  Logged, and the loop goes on, as in Twisted.
                log.failure("handling an event of {selectable!r}", selectable=selectable)

    doIteration = doPoll


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

