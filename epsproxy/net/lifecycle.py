"""
Services whose start-up is asynchronous (open a store, fetch the directory, listen).

:class:`AsyncStartService` is the life cycle the SD, the endpoint server and both proxy
modes share: ``startService`` runs the subclass's ``_start()`` coroutine, a failure goes
to ``_start_failed`` (which logs, cleans up and may stop the reactor), and any number of
callers wait for the outcome with :meth:`~AsyncStartService.when_ready`.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.python.failure import Failure

__all__ = ["AsyncStartService", "stop_reactor_soon"]

T = TypeVar("T")


def stop_reactor_soon(reactor: Any) -> None:
    """
    Stop ``reactor`` once it runs.  Start-up can fail before twistd runs the reactor (a
    port in use fails at once, inside ``startService``), so stopping it right away would
    do nothing and leave the process idling.
    """
    reactor.callWhenRunning(reactor.callLater, 0, reactor.stop)


class AsyncStartService(Service, Generic[T]):
    """
    Subclasses implement ``async _start() -> T`` and ``_start_failed(failure)`` (which
    returns the failure, or a Deferred firing with it, after cleaning up).
    """

    _outcome: T | Failure | None = None
    _waiters: list[Deferred[T]]

    async def _start(self) -> T:
        raise NotImplementedError

    def _start_failed(self, failure: Failure) -> Any:
        return failure

    def startService(self) -> None:
        super().startService()
        d = ensureDeferred(self._start())
        d.addErrback(self._start_failed)
        d.addBoth(self._settle)

    def when_ready(self) -> Deferred[T]:
        """A new Deferred for the outcome of start-up (any number of callers may wait)."""
        if self._outcome is None:
            waiter: Deferred[T] = Deferred()
            self.__dict__.setdefault("_waiters", []).append(waiter)
            return waiter
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        return succeed(self._outcome)

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        waiters, self._waiters = self.__dict__.get("_waiters", []), []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
