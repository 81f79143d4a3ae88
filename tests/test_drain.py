"""
Graceful shutdown of the public proxy (issue 6, "SIGTERM drains"): it stops accepting,
lets spliced connections finish for up to ``shutdown_grace`` seconds, then cuts the rest.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from epsproxy.proxy.tap import Options, makeService
from tests.support.proxies import private_section, public_section, write_settings


class Party(Protocol):
    """A token party that records what it receives and when it is closed."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.token)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self.waiting = getattr(self, "waiting", None), None
        if waiting is not None:
            waiting.callback(data)

    def next_data(self) -> defer.Deferred[bytes]:
        self.waiting = defer.Deferred()
        return self.waiting

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


class Drain(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def start(self, grace: float):
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(folder, 1, shutdown_grace=grace)}))])
        self.top = makeService(options, reactor, exit_on_failure=False)
        self.top.startService()
        self.addCleanup(lambda: self.top.running and self.top.stopService())
        self.service = self.top.services[0]
        ports = yield self.service.when_ready()
        self.internal = ports.internal.getHost().port

    @defer.inlineCallbacks
    def pair(self):
        token = self.service.rendezvous.new_token()
        parties = []
        for _ in range(2):
            party = Party(token)
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.internal), party)
            parties.append(party)
        # Prove the splice is up: bytes go across.
        arrived = parties[1].next_data()
        parties[0].transport.write(b"hello")
        yield arrived
        return parties

    @defer.inlineCallbacks
    def test_spliced_pair_finishes_within_the_grace_period(self):
        yield self.start(grace=20)
        a, b = yield self.pair()
        stopped = self.top.stopService()
        # Not accepting any more, but the pair still relays.
        arrived = a.next_data()
        b.transport.write(b"still here")
        data = yield arrived
        self.assertEqual(data, b"still here")
        self.assertFalse(stopped.called)
        # The pair ends by itself: shutdown completes at once.
        a.transport.loseConnection()
        yield stopped
        yield b.closed
        self.assertEqual(self.service.rendezvous.active_splices, 0)

    @defer.inlineCallbacks
    def test_pair_still_open_after_the_grace_period_is_cut(self):
        yield self.start(grace=0.2)
        a, b = yield self.pair()
        yield self.top.stopService()
        yield a.closed
        yield b.closed
        self.assertEqual(self.service.rendezvous.active_splices, 0)


class PrivateDrain(TestCase):
    """The private proxy: forwards in progress get ``shutdown_grace`` to end by themselves."""

    timeout = 30

    @defer.inlineCallbacks
    def start(self, grace: float):
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "private", "--settings", str(write_settings(
            folder, {"private": private_section(folder, 1, shutdown_grace=grace)}))])
        self.top = makeService(options, reactor, exit_on_failure=False)
        self.top.startService()
        self.addCleanup(lambda: self.top.running and self.top.stopService())
        self.service = self.top.services[0]
        yield self.service.when_ready()
        return self.service.forwarder

    @defer.inlineCallbacks
    def test_stop_waits_for_forwards_in_progress(self):
        forwarder = yield self.start(grace=20)
        forward = object()  # stands for a splice or a terminated connection in progress
        forwarder.active.add(forward)
        draining: defer.Deferred[float] = defer.Deferred()
        drain = forwarder.drain

        def noting(grace: float) -> defer.Deferred[None]:
            d = drain(grace)
            draining.callback(grace)
            return d

        forwarder.drain = noting
        stopped = self.top.stopService()
        grace = yield draining
        self.assertEqual(grace, 20)
        self.assertTrue(forwarder.busy)  # no new forwards while draining
        self.assertFalse(stopped.called)
        forwarder._forget(forward)  # it ended by itself
        yield stopped

    @defer.inlineCallbacks
    def test_grace_period_ends_the_wait(self):
        forwarder = yield self.start(grace=0.2)
        forwarder.active.add(object())
        yield self.top.stopService()
