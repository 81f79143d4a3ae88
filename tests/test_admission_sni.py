"""
The public proxy's TLS listener at its connection cap, over real sockets: connections
that have not sent a ClientHello within ``hello_timeout_at_cap`` make room for the ones
waiting in the backlog; below the cap they keep the whole ``hello_timeout``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
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


class OnFull(unittest.SynchronousTestCase):
    def test_on_full_is_called_each_time_the_listener_stops(self):
        calls = []
        a = Admission("l", 1, 5, budget=ProcessBudget(cap=10), on_full=lambda: calls.append(1))

        class Addr:
            host = "10.0.0.1"

        a.admit(Addr())
        a.release(Addr())
        a.admit(Addr())
        self.assertEqual(len(calls), 2)

    def test_a_failing_relief_does_not_break_the_count(self):
        def broken() -> None:
            raise RuntimeError("boom")

        a = Admission("l", 1, 5, budget=ProcessBudget(cap=10), on_full=broken)

        class Addr:
            host = "10.0.0.1"

        self.assertTrue(a.admit(Addr()))
        self.assertTrue(a.paused)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


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
        self.assertGreaterEqual(front.evicted, 1)
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
        self.assertEqual((proxy.front.evicted, proxy.front.timeouts), (0, 1))
