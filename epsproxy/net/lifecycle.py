"""
The life cycle the SD, the endpoint server and both proxy modes share: start-up that is
asynchronous (open a store, fetch the directory, listen), one way to fail it, one way
to stop.

A subclass implements ``async _start() -> T`` (open everything, return what callers
wait for) and ``async _close()`` (release whatever ``_start`` opened so far; it runs
after a failed start as well as at stop, so it copes with a half-started service).  A
service that drains before closing overrides ``async _stop()``.  Everything else is
here: a failed start is logged as one line naming the program (the traceback only at
debug level), the half-started service is closed, and with ``stop_reactor_on_failure``
the reactor is stopped so ``twistd`` exits; any number of callers wait for the outcome
with :meth:`~AsyncStartService.when_ready`.

Two questions an operator asks a running service are answered here too:
:meth:`~AsyncStartService.readiness` (what is not ready yet, by check name) and
:meth:`~AsyncStartService.reload` (apply new, already validated settings, or refuse with
:class:`ReloadError` without changing anything).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net.reactor import IReactor

__all__ = ["AsyncStartService", "ReloadError", "stop_reactor_soon"]

T = TypeVar("T")

log = Logger()


class ReloadError(Exception):
    """
    New settings cannot be applied while running (a listen address changed, a service
    that does not reload); ``str()`` says why, and nothing was changed.
    """


def stop_reactor_soon(reactor: IReactor) -> None:
    """
    Stop ``reactor`` once it runs.  Start-up can fail before twistd runs the reactor (a
    port in use fails at once, inside ``startService``), so stopping it right away would
    do nothing and leave the process idling.
    """
    reactor.callWhenRunning(reactor.callLater, 0, _stop, reactor)


def _stop(reactor: IReactor) -> None:
    # Several failures (the main service and a listener; a signal during the failed
    # start) may each ask; only the first stop counts.
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class AsyncStartService(Service, Generic[T]):
    """
    A service whose start-up is a coroutine.  Subclasses set ``reactor`` and
    ``stop_reactor_on_failure`` in their constructor and implement :meth:`_start`,
    :meth:`_close` and :meth:`_describe`.
    """

    reactor: IReactor
    stop_reactor_on_failure: bool = False
    _outcome: T | Failure | None = None
    _waiters: list[Deferred[T]]

    async def _start(self) -> T:
        raise NotImplementedError

    async def _close(self) -> None:
        """Release what :meth:`_start` opened (also after a failed or partial start)."""

    async def _stop(self) -> None:
        """What :meth:`stopService` does: by default, :meth:`_close`."""
        await self._close()

    def _describe(self) -> str:
        """The program and instance, as log lines name it (``endpoint server hd-1``)."""
        return type(self).__name__

    def describe(self) -> str:
        """The program and instance, as log lines name it (``endpoint server hd-1``)."""
        return self._describe()

    def reload(self, settings: dict[str, Any]) -> None:
        """
        Apply ``settings`` (the same shape the constructor got, already validated by the
        schema and the credential checks) or raise :class:`ReloadError` having changed
        nothing.  By default a service does not reload.
        """
        raise ReloadError(f"{self._describe()} does not reload its settings")

    def readiness(self) -> dict[str, str]:
        """
        What is not ready, as ``{check name: reason}``; empty when ready.  Subclasses add
        their own checks to what this returns.
        """
        if self.__dict__.get("_stopping"):
            return {"stop": "stopping"}
        if self._outcome is None:
            return {"start": "starting"}
        if isinstance(self._outcome, Failure):
            return {"start": self._outcome.getErrorMessage()}
        return {}

    def startService(self) -> None:
        self._stopping = False
        super().startService()
        d = ensureDeferred(self._start())
        d.addErrback(self._start_failed)
        d.addBoth(self._settle)

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        super().stopService()
        return ensureDeferred(self._stop())

    def _start_failed(self, failure: Failure) -> Deferred[Failure]:
        log.error("{what} could not start: {reason}", what=self._describe(),
                  reason=failure.getErrorMessage())
        log.debug("start-up failure: {traceback}", traceback=failure.getTraceback())

        def closed(outcome: Any) -> Failure:
            if isinstance(outcome, Failure):
                log.error("{what}: closing after the failed start failed too: {reason}",
                          what=self._describe(), reason=outcome.getErrorMessage())
            if self.stop_reactor_on_failure:
                stop_reactor_soon(self.reactor)
            return failure

        return ensureDeferred(self._close()).addBoth(closed)

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
