"""The life-cycle helpers of epsproxy.net.lifecycle, driven by a memory reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.net.lifecycle import stop_reactor_soon


class _Reactor(MemoryReactorClock):
    """Runs until stopped, and refuses a second stop, as a real reactor does."""

    def run(self) -> None:
        self.running = self.hasRun = True
        for f, args, kwargs in self.whenRunningHooks:
            f(*args, **kwargs)

    def stop(self) -> Any:
        if self.hasStopped:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        return super().stop()


class StopReactorSoon(SynchronousTestCase):
    def test_waits_for_the_reactor_to_run(self):
        reactor = _Reactor()
        stop_reactor_soon(reactor)
        reactor.advance(0)
        self.assertFalse(reactor.hasStopped)
        reactor.run()
        reactor.advance(0)
        self.assertTrue(reactor.hasStopped)

    def test_several_failures_stop_it_once_without_an_error(self):
        # A failed main service and a failed listener (or a signal) each ask.
        reactor = _Reactor()
        for _ in range(3):
            stop_reactor_soon(reactor)
        reactor.run()
        reactor.advance(0)  # the second and third stop find it stopped: no traceback
        self.assertTrue(reactor.hasStopped)
