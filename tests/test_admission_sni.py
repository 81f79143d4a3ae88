"""
Eviction at the cap: the counter with a clock, then the public proxy's listeners over
real sockets: connections that have not sent a ClientHello within
``hello_timeout_at_cap`` (or a live token within ``read_timeout_at_cap``) make room for
the ones waiting in the backlog; below the cap they keep their whole deadline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from epsproxy.net.admission import Admission, ProcessBudget
from epsproxy.proxy.tap import Options, makeService
from tests.support.clienthello import openssl_hello
from tests.support.proxies import FakeEPS, public_section, write_settings


class Sender(Protocol):
    """Sends ``data`` once connected; ``lost`` fires when the server closes."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


def connect(source: str, port: int, protocol: Sender) -> Deferred[Sender]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return connectProtocol(endpoint, protocol)


class Peer:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


class Eviction(unittest.SynchronousTestCase):
    """Evicting connections that proved nothing, with a clock and no sockets."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.closed: list[int] = []
        self.a = Admission("l", 3, 10, budget=ProcessBudget(cap=100), evict_after=1.0,
                           clock=self.clock)

    def open(self, port: int) -> Peer:
        peer = Peer("10.0.0.1", port)
        self.assertTrue(self.a.admit(peer))
        self.a.opened(peer, lambda: self.closed.append(port))
        return peer

    def test_at_the_cap_old_unproved_connections_are_closed(self):
        first = self.open(1)
        self.clock.advance(0.5)
        second = self.open(2)
        self.a.forgive(second)  # proved: never evicted
        self.clock.advance(0.6)
        self.open(3)  # full: 1 is 1.1 s old, 3 is new
        self.assertEqual(self.closed, [1])
        self.a.release(first)  # the close completes: room again
        self.assertFalse(self.a.paused)
        self.clock.advance(0.5)
        self.open(4)  # full again: 3 and 4 are young; looked at again when 3 is 1 s old
        self.assertEqual(self.closed, [1])
        self.clock.advance(0.5)
        self.assertEqual(self.closed, [1, 3])
        self.assertEqual(self.a.evicted, 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # for 4, still full

    def test_below_the_cap_nothing_is_evicted(self):
        self.open(1)
        self.clock.advance(100)
        self.open(2)
        self.assertEqual(self.closed, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_timer_goes_when_the_listener_stops(self):
        self.open(1)
        self.open(2)
        self.open(3)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.a.detach()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AtTheCap(unittest.TestCase):
    timeout = 30

    @inlineCallbacks
    def start_proxy(self, **changes: Any) -> Any:
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(folder, eps_port, **changes)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        top.startService()
        self.addCleanup(top.stopService)
        proxy = top.services[0]
        ports = yield proxy.when_ready()
        return proxy, ports.tls.getHost().port

    @inlineCallbacks
    def test_silent_connections_make_room_for_a_client_with_a_hello(self):
        proxy, port = yield self.start_proxy(
            tls_max_connections=3, hello_timeout=60, hello_timeout_at_cap=0.2)
        silent = [Sender() for _ in range(3)]
        for index, protocol in enumerate(silent):
            yield connect(f"127.0.1.{index + 1}", port, protocol)
        client = Sender(openssl_hello(b"nobody.example"))
        yield connect("127.0.1.9", port, client)
        # Served (no announcement for the name: closed) well before hello_timeout.
        yield client.lost
        front = proxy.front
        self.assertEqual(front.no_route, 1)
        self.assertGreaterEqual(proxy.tls_admission.evicted, 1)
        self.assertGreaterEqual(proxy.tls_admission.reached, 1)
        for protocol in silent:
            if not protocol.lost.called:
                protocol.transport.abortConnection()
            yield protocol.lost

    @inlineCallbacks
    def test_below_the_cap_nobody_is_evicted(self):
        proxy, port = yield self.start_proxy(
            tls_max_connections=10, hello_timeout=0.5, hello_timeout_at_cap=0.01)
        silent = Sender()
        yield connect("127.0.1.1", port, silent)
        client = Sender(openssl_hello(b"nobody.example"))
        yield connect("127.0.1.2", port, client)
        yield client.lost
        yield silent.lost  # by hello_timeout, not evicted
        self.assertEqual((proxy.tls_admission.evicted, proxy.front.timeouts), (0, 1))

    @inlineCallbacks
    def test_the_internal_endpoint_evicts_connections_without_a_token(self):
        import os

        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(write_settings(
            folder, {"public": public_section(
                folder, eps_port, internal_max_connections=2, read_timeout=60,
                read_timeout_at_cap=0.2)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        top.startService()
        self.addCleanup(top.stopService)
        proxy = top.services[0]
        port = (yield proxy.when_ready()).internal.getHost().port
        silent = [Sender(), Sender()]
        for index, protocol in enumerate(silent):
            yield connect(f"127.0.2.{index + 1}", port, protocol)
        late = Sender(os.urandom(32))  # an unknown token: refused once it is read
        yield connect("127.0.2.9", port, late)
        yield late.lost
        self.assertGreaterEqual(proxy.internal_admission.evicted, 1)
        self.assertEqual(proxy.rendezvous.refused, 1)
        for protocol in silent:
            if not protocol.lost.called:
                protocol.transport.abortConnection()
            yield protocol.lost
