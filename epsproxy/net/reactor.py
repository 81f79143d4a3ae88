"""
The reactor as our code uses it, named for the type checker.

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

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
)

__all__ = ["IReactor", "installed_reactor"]


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
