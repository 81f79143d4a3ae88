"""
Helpers for the connection-cap tests: a server factory whose connections a test can
wait for one by one, plain TCP clients bound to a chosen loopback source address, and a
separate process that holds many connections (so its descriptors are not ours).
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.trial import unittest
from zope.interface import implementer


class Held(Protocol):
    """A server-side connection: echoes what it receives."""

    def connectionMade(self) -> None:
        self.factory.built += 1
        self.factory.open.append(self)
        self.factory.accepted.put(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.remove(self)
        self.factory.closed.put(self)


class HeldFactory(Factory):
    """
    Counts the connections it serves; ``accepted.get()`` waits for the next one to be
    served, ``closed.get()`` for the next one to end on the server side.
    """

    protocol = Held
    noisy = False

    def __init__(self) -> None:
        self.built = 0
        self.open: list[Held] = []
        self.accepted: DeferredQueue[Held] = DeferredQueue()
        self.closed: DeferredQueue[Held] = DeferredQueue()

    def abort_all(self) -> None:
        for held in list(self.open):
            held.transport.abortConnection()


class Client(Protocol):
    """A plain TCP client: ``lost`` fires when it is closed; ``echoed`` waits for bytes."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.received = b""
        self._want: tuple[int, Deferred[bytes]] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._want is not None and len(self.received) >= self._want[0]:
            _, d = self._want
            self._want = None
            d.callback(self.received)

    def echo(self, data: bytes) -> Deferred[bytes]:
        """Send ``data`` and wait until as many bytes came back."""
        d: Deferred[bytes] = Deferred()
        self._want = (len(self.received) + len(data), d)
        self.transport.write(data)
        return d

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@implementer(IHandshakeListener)
class IdleTLS(Protocol):
    """A TLS client that completes its handshake and then just stays connected."""

    def __init__(self) -> None:
        self.handshaken: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshaken.callback(None)


def connect_from(source: str, port: int, host: str = "127.0.0.1") -> Deferred[Client]:
    """A :class:`Client` connected to ``host:port`` from loopback address ``source``."""
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=10, bindAddress=(source, 0))
    return connectProtocol(endpoint, Client())


ATTACKER = r"""
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.stdin.readline()
held = []
for i in range(count):
    s = socket.socket()
    s.bind(("127.0.%d.%d" % (1 + i // 250, 1 + i % 250), 0))
    s.connect((host, port))
    held.append(s)
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()
"""


class Attacker(ProcessProtocol):
    """
    A separate process that, on :meth:`go`, opens ``count`` TCP connections to a port
    (each from another loopback address) and holds them until :meth:`stop`.
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready\n" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def go(self) -> None:
        self.transport.write(b"go\n")

    def stop(self) -> Deferred[None]:
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        return self.ended

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode("utf-8", "replace")))
        self.ended.callback(None)


def spawn_attacker(port: int, count: int) -> Attacker:
    """Start an :class:`Attacker` against ``127.0.0.1:port`` (it waits for ``go``)."""
    attacker = Attacker()
    reactor.spawnProcess(attacker, sys.executable,
                         [sys.executable, "-c", ATTACKER, "127.0.0.1", str(port), str(count)],
                         env=None)
    return attacker


def lower_descriptor_limit(test: unittest.TestCase, free: int) -> None:
    """Set the soft RLIMIT_NOFILE so that exactly ``free`` more descriptors can be opened."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    limit = 0
    while limit - sum(1 for fd in used if fd < limit) < free:
        limit += 1
    test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
