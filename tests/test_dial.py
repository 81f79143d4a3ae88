"""
epsproxy.net.dial over real loopback sockets: :func:`dial` connects a :class:`Dialled`
protocol with the reactor's TCP connector (IP addresses; the connect call made by dial()
itself) or ``HostnameEndpoint`` (names), fires once the protocol's ``connectionMade``
ran, reports refusals and timeouts, can be cancelled, and keeps no reference to the
protocol once it is connected (the connector lives as long as the connection).
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from epsproxy.net.dial import Dialled, dial, write_at_once


class Greeter(Dialled):
    """Writes ``hello`` on connect; records what its own connectionMade saw."""

    def __init__(self) -> None:
        self.made_before_fired = False
        self.received = b""
        self.echoed: defer.Deferred[None] = defer.Deferred()  # b"hello" came back
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made_before_fired = self.when_connected is not None
        self.transport.write(b"hello")  # type: ignore[union-attr]
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"hello" and not self.echoed.called:
            self.echoed.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DialTests(TestCase):
    timeout = 30

    def raw_listener(self, backlog: int) -> socket.socket:
        """A plain listening socket on loopback that nothing accepts from."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(backlog)
        return listener

    def stalled_listener(self) -> tuple[socket.socket, int]:
        """
        A listening socket whose accept queue is full, and its port: the kernel drops
        new SYNs, so a connect to it stays under way.
        """
        listener = self.raw_listener(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        return listener, port

    def listen(self, interface: str = "127.0.0.1") -> int:
        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface=interface)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @defer.inlineCallbacks
    def test_an_ip_address_connects_and_fires_after_connection_made(self):
        port = self.listen()
        greeter = Greeter()
        connected = yield dial(reactor, "127.0.0.1", port, 5, greeter)
        self.assertIs(connected, greeter)
        self.assertTrue(greeter.made_before_fired)  # its own work ran first
        self.assertIsNone(greeter.when_connected)
        # the connector (alive with the connection) no longer holds the protocol
        transport: Any = greeter.transport
        connector = transport.connector
        self.assertIsNone(connector._protocol)
        self.assertNotIn(greeter, gc.get_referents(connector, vars(connector)))
        transport.loseConnection()
        yield greeter.lost

    @defer.inlineCallbacks
    def test_a_closed_connection_is_freed_without_the_garbage_collector(self):
        # The client and its connector refer to each other until the connection is lost;
        # then the connector lets go, and no cycle is left for the collector.
        gc.disable()
        self.addCleanup(gc.enable)
        port = self.listen()
        greeter = yield dial(reactor, "127.0.0.1", port, 5, Greeter())
        transport: Any = greeter.transport
        refs = [weakref.ref(transport), weakref.ref(transport.connector), weakref.ref(greeter)]
        lost = greeter.lost
        transport.loseConnection()
        del transport, greeter
        yield lost
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0, d.callback, None)  # the closing turn has ended
        yield d
        self.assertEqual([ref() for ref in refs], [None] * len(refs))

    @defer.inlineCallbacks
    def test_bytes_flow(self):
        port = self.listen()
        greeter = yield dial(reactor, "127.0.0.1", port, 5, Greeter())
        yield greeter.echoed  # the echo comes back
        greeter.transport.loseConnection()
        yield greeter.lost

    @defer.inlineCallbacks
    def test_a_connection_not_read_is_read_only_once_resumed(self):
        # read=False: not registered with the reactor (its taker reads it), so the echo
        # of its first bytes waits in the socket until it is resumed.
        port = self.listen()
        greeter = yield dial(reactor, "127.0.0.1", port, 5, Greeter(), read=False)
        transport: Any = greeter.transport
        self.assertNotIn(transport, reactor.getReaders())
        transport.resumeProducing()
        self.assertIn(transport, reactor.getReaders())
        yield greeter.echoed
        transport.loseConnection()
        yield greeter.lost

    @defer.inlineCallbacks
    def test_a_refused_connection_fails_at_once(self):
        yield self.assertFailure(dial(reactor, "127.0.0.1", free_port(), 5, Greeter()),
                                 ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_the_connect_call_is_made_by_dial_itself(self):
        # Not a reactor turn later: on loopback the kernel has completed the handshake
        # (the connection waits in the listener's accept queue) when dial() returns.
        listener = self.raw_listener(8)
        listener.setblocking(False)
        greeter = Greeter()
        d = dial(reactor, "127.0.0.1", listener.getsockname()[1], 5, greeter)
        accepted, _ = listener.accept()  # BlockingIOError if no connect call was made
        self.addCleanup(accepted.close)
        self.assertIs((yield d), greeter)
        greeter.transport.loseConnection()
        yield greeter.lost

    @defer.inlineCallbacks
    def test_cancel_stops_the_attempt(self):
        _, port = self.stalled_listener()  # the connect stays under way
        greeter = Greeter()
        d = dial(reactor, "127.0.0.1", port, 5, greeter)
        self.assertFalse(d.called)
        d.cancel()  # while connecting (the connect call is made, not yet completed)
        yield self.assertFailure(d, defer.CancelledError)
        self.assertFalse(greeter.connected)
        self.assertFalse([w for w in reactor.getWriters()
                          if getattr(w, "realAddress", None) == ("127.0.0.1", port)])

    @defer.inlineCallbacks
    def test_a_loopback_connect_completes_within_dial(self):
        # The kernel completes a loopback handshake inside the connect call: dial() asks
        # again at once and makes the connection then, never registering the socket
        # for writability (no reactor turn on the way of the dialler's client).
        from epsproxy.net.deadlines import Deadlines

        port = self.listen()
        greeter = Greeter()
        timers = len(reactor.getDelayedCalls())
        d = dial(reactor, "127.0.0.1", port, 5, greeter)
        self.assertTrue(d.called)
        self.assertTrue(greeter.connected)
        # No connect deadline is left running for it.
        self.assertEqual(len(reactor.getDelayedCalls()), timers)
        self.assertFalse([c for c in reactor.getDelayedCalls()
                          if isinstance(getattr(c.func, "__self__", None), Deadlines)])
        transport: Any = greeter.transport
        self.assertFalse(transport._in_progress)
        self.assertIn(transport, reactor.getReaders())
        self.assertIs((yield d), greeter)
        self.assertEqual(transport.getPeer().port, port)
        transport.loseConnection()
        yield greeter.lost

    @defer.inlineCallbacks
    def test_a_connection_that_never_completes_times_out(self):
        _, port = self.stalled_listener()
        greeter = Greeter()
        d = dial(reactor, "127.0.0.1", port, 0.3, greeter)
        self.assertFalse(d.called)
        yield self.assertFailure(d, TimeoutError)
        self.assertFalse(greeter.connected)

    @defer.inlineCallbacks
    def test_a_connect_refused_while_under_way_fails_with_the_sockets_error(self):
        # The SYN is dropped by a full accept queue; the listener then closes, and the
        # kernel's retried SYN (about a second later) is refused.  epoll reports that as
        # a hang-up, not as writability: the failure is still the socket's own error.
        listener, port = self.stalled_listener()
        greeter = Greeter()
        d = dial(reactor, "127.0.0.1", port, 20, greeter)
        self.assertFalse(d.called)
        listener.close()
        yield self.assertFailure(d, ConnectionRefusedError)
        self.assertFalse(greeter.connected)

    def test_connecting_waits_for_writability_only(self):
        # Registered for writing (the connect's completion), not for reading as well.
        _, port = self.stalled_listener()
        greeter = Greeter()
        d = dial(reactor, "127.0.0.1", port, 5, greeter)
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        self.addCleanup(d.cancel)
        connecting = [w for w in reactor.getWriters() if getattr(w, "connector", None) is not None
                      and w.realAddress == ("127.0.0.1", port)]
        self.assertEqual(len(connecting), 1)
        self.assertNotIn(connecting[0], reactor.getReaders())

    @defer.inlineCallbacks
    def test_no_descriptor_left_fails_the_dial(self):
        from twisted.internet.error import ConnectBindError

        from tests.support.admission import lower_descriptor_limit

        port = self.listen()
        lower_descriptor_limit(self, 0)  # socket() fails with EMFILE
        greeter = Greeter()
        failure = yield self.assertFailure(dial(reactor, "127.0.0.1", port, 5, greeter),
                                           ConnectBindError)
        self.assertIn("Too many open files", str(failure))
        self.assertIsNone(greeter.when_connected)

    @defer.inlineCallbacks
    def test_dials_in_progress_share_one_timer(self):
        from epsproxy.net.deadlines import Deadlines

        def deadline_timers() -> list[Any]:
            return [c for c in reactor.getDelayedCalls()
                    if isinstance(getattr(c.func, "__self__", None), Deadlines)]

        _, port = self.stalled_listener()  # the dials stay connecting
        before = len(deadline_timers())
        greeters = [Greeter() for _ in range(5)]
        dials = [dial(reactor, "127.0.0.1", port, 7.5, g) for g in greeters]
        for d in dials:
            d.addErrback(lambda f: f.trap(defer.CancelledError, TimeoutError))
        self.assertEqual(len(deadline_timers()), before + 1)  # one, not five
        self.assertFalse(any(g.connected for g in greeters))
        for d in dials:
            d.cancel()
        yield defer.DeferredList(dials)
        self.assertEqual(len(deadline_timers()), before)  # stopped with the last dial

    @defer.inlineCallbacks
    def test_a_name_goes_through_resolution(self):
        port = self.listen()
        greeter = Greeter()
        connected = yield dial(reactor, "localhost", port, 5, greeter)
        self.assertIs(connected, greeter)
        greeter.transport.loseConnection()
        yield greeter.lost

    @defer.inlineCallbacks
    def test_a_bracketed_ipv6_address(self):
        try:
            port = self.listen("::1")
        except Exception as e:  # pragma: no cover - a machine without IPv6 loopback
            self.skipTest(f"no IPv6 loopback: {e}")
        greeter = yield dial(reactor, "[::1]", port, 5, Greeter())
        self.assertEqual(greeter.transport.getPeer().host, "::1")
        greeter.transport.loseConnection()
        yield greeter.lost


class WriteAtOnce(TestCase):
    """write_at_once(): a just-connected socket's first bytes go out in the call."""

    timeout = 30

    @defer.inlineCallbacks
    def connected_pair(self) -> Any:
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        protocol = yield dial(reactor, "127.0.0.1", listener.getsockname()[1], 5, Dialled())
        self.addCleanup(lambda: protocol.transport.abortConnection())
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        accepted.setblocking(False)
        return protocol.transport, accepted

    @defer.inlineCallbacks
    def test_the_bytes_are_sent_in_the_call(self):
        transport, peer = yield self.connected_pair()
        write_at_once(transport, b"token")
        # No reactor turn in between: the peer can read them already.
        self.assertEqual(peer.recv(100), b"token")
        self.assertNotIn(transport, reactor.getWriters())

    @defer.inlineCallbacks
    def test_bytes_queued_before_keep_their_order(self):
        collected: defer.Deferred[bytes] = defer.Deferred()

        class Collect(Protocol):
            data = b""

            def dataReceived(self, data: bytes) -> None:
                self.data += data
                if len(self.data) >= 12:
                    collected.callback(self.data)

        port = reactor.listenTCP(0, Factory.forProtocol(Collect), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        protocol = yield dial(reactor, "127.0.0.1", port.getHost().port, 5, Dialled())
        self.addCleanup(lambda: protocol.transport.abortConnection())
        protocol.transport.write(b"first ")  # queued until the next write event
        write_at_once(protocol.transport, b"second")
        self.assertEqual((yield collected), b"first second")

    def test_a_transport_of_another_kind_is_written_to(self):
        written: list[bytes] = []

        class Recording:
            def write(self, data: bytes) -> None:
                written.append(data)

        write_at_once(Recording(), b"token")
        self.assertEqual(written, [b"token"])
