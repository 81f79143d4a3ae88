"""
Dialling a ``host``/``port``: the one place that picks the client endpoint.

An IP address gets a plain TCP endpoint: it connects at once, and reports a refused
connection at once.  Twisted's ``HostnameEndpoint`` would first resolve even an IP
address through the reactor's resolver, which runs ``getaddrinfo`` in a thread pool: a
round trip through a thread for every connection (measured on the private proxy's
per-client dials, issue 14), and a refused connection waits out the whole timeout.  A
name gets ``HostnameEndpoint`` (resolution, then happy eyeballs over its addresses).

:func:`connect_protocol` is Twisted's ``connectProtocol`` without its two log lines
("Starting factory", "Stopping factory") per connection: a proxy dials per client.

:func:`dial` is for the dials a proxy makes per client (the private proxy's connection to
its internal server, its pooled connections): a :class:`Dialled` protocol is connected
by Twisted's TCP client with a connector of our own (:class:`_Dial`: Twisted's connector
and client factory take some twenty Python calls more per dial), the connect call made
at once rather than a reactor turn later (a turn on the path of every client, and a
timer each), and tells of its own connection, so no endpoint, no wrapping factory or
protocol and no chain of Deferreds is built per connection, and nothing of the dial
holds the protocol once it is connected (the connection's connector lives as long as
the connection: through an endpoint it kept the protocol, its header reader and its
buffers alive until the end).  A name still goes through ``HostnameEndpoint``.  The
connect itself takes fewer steps than Twisted's client: it waits for writability only
(Twisted registers the socket for reading and writing, then unregisters both and
registers it again for reading once connected), and reads the outcome from
``SO_ERROR`` once (Twisted asks ``SO_ERROR`` and calls ``connect`` again both before and
after): three system calls and some fifteen Python calls less per dial.  A connect that
is under way is asked once more at once: over loopback the kernel has completed the
handshake within the first call, and the connection is made there and then, with no
poll for writability (two poller changes, a reactor turn and a wake-up less on the way
of each client of a private proxy; measured with ``strace -c``, issue 14).
"""

from __future__ import annotations

import errno
import os
import socket
from functools import lru_cache
from weakref import WeakKeyDictionary
from typing import Any, Callable, TypeVar

from twisted.internet import error, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from epsproxy.net.deadlines import Deadlines
from epsproxy.net.reactor import IReactor

__all__ = ["Dialled", "connect_protocol", "dial", "tcp_endpoint", "write_at_once"]

_P = TypeVar("_P", bound=IProtocol)
_D = TypeVar("_D", bound="Dialled")


def tcp_endpoint(reactor: IReactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    The endpoint that connects to ``host`` (an IP address, bracketed or not for IPv6, or
    a name) and ``port`` within ``timeout`` seconds; see the module docstring.
    """
    host = _unbracketed(host)
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def _unbracketed(host: str) -> str:
    """``host`` without the brackets of an IPv6 address (``[::1]`` -> ``::1``)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@lru_cache(maxsize=256)
def _is_ip(host: str) -> bool:
    """Whether ``host`` (no brackets) is an IP address; cached (asked for every dial)."""
    return bool(isIPAddress(host) or isIPv6Address(host))


class _Once(Factory):
    """Builds the one protocol it was given; quiet (no start/stop lines per connection)."""

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Any:  # the protocol given, whatever its type
        return self.protocol_instance


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: _P) -> "Deferred[_P]":
    """Connect ``protocol`` through ``endpoint``; fires with it once connected."""
    d: Deferred[Any] = endpoint.connect(_Once(protocol))
    return d


def write_at_once(transport: Any, data: bytes) -> None:
    """
    Write ``data`` on ``transport`` now.  A reactor TCP transport with nothing queued
    sends it in this call (what the socket does not take is queued as ``write`` queues
    it); ``write`` itself always queues and sends on the next write event: for the first
    bytes of a just-connected socket (a token) that is a reactor turn, two changes to the
    poller and a write event per connection.  Any other transport: ``write``.
    """
    if (isinstance(transport, tcp.Connection) and transport.connected
            and not transport.disconnecting and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)):
        sent = transport.writeSomeData(data)
        if sent.__class__ is int:
            if sent == len(data):
                return
            data = data[sent:]
        # An error: write() queues it, and the write event finds the error and closes.
    transport.write(data)


class Dialled(Protocol):
    """
    A protocol :func:`dial` connects: its ``connectionMade`` (a subclass calls it, after
    its own work) fires the Deferred :func:`dial` returned.
    """

    when_connected: Deferred[Any] | None = None

    def connectionMade(self) -> None:
        d, self.when_connected = self.when_connected, None
        if d is not None and not d.called:
            d.callback(self)


_UNDER_WAY = frozenset((errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY))


class _Client(tcp.Client):
    """
    Twisted's TCP client to an IP address, made by :func:`dial` with a :class:`_Dial` as
    its connector: it starts connecting in the same call rather than a reactor turn later
    (Twisted's ``callLater(0)``), with no Deferred for an address that needs no resolving,
    and takes fewer steps to connect (:meth:`doConnect`).
    """

    _in_progress = False  # the connect call was made and is under way
    _read = True  # read once connected (False: the protocol takes the connection over)
    logstr = "dial,client"  # legacy log context (Twisted computes one per connection)

    def __init__(self, host: str, port: int, connector: _Dial, reactor: Any) -> None:
        # Twisted's steps for an IP address (tcp._BaseTCPClient and BaseClient).
        self.connector = connector
        if ":" in host:
            self.addr = tcp._resolveIPv6(host, port)
            self.addressFamily = socket.AF_INET6
            self._addressType = IPv6Address  # type: ignore[assignment]  # Twisted's own step
        else:
            self.addr = (host, port)
        self._requiresResolution = False
        # Non-blocking from here: Twisted's Connection.__init__ sets it (one ioctl, not two).
        skt = socket.socket(self.addressFamily, socket.SOCK_STREAM)
        common: Any = self._commonConnection
        common.__init__(self, skt, None, reactor)

    def start(self) -> None:
        """Make the connect call (Twisted's ``_setRealAddress``)."""
        self.realAddress = self.addr
        self.doConnect()

    def doConnect(self) -> None:
        """
        Twisted's ``doConnect``, in fewer steps: the first call makes the connect call
        (asked twice when under way: see the module docstring) and, if it is still under
        way, waits for writability only; the second reads the outcome from ``SO_ERROR``.
        """
        if not hasattr(self, "connector"):
            return  # failed before it started (as in Twisted)
        skt = self.socket
        if self._in_progress:
            err = skt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            try:
                err = skt.connect_ex(self.realAddress)
            except OSError as e:
                err = e.args[0]
            if err in _UNDER_WAY:
                # Over loopback (a private proxy and its internal server, a pool's
                # dials to a public proxy on the same host) the handshake is done
                # within the connect call: asking again says so (EISCONN), and the
                # connection is made now rather than after a poll for writability
                # (two poller changes and a reactor turn per dial, on the way of
                # every client).  Anywhere else this is one system call more per dial.
                try:
                    err = skt.connect_ex(self.realAddress)
                except OSError as e:
                    err = e.args[0]
            if err in _UNDER_WAY:
                self._in_progress = True
                self.connector.start_timer()
                # As Twisted does: both events mean the connect's outcome.
                self.doWrite = self.doRead = self.doConnect  # type: ignore[method-assign]  # ditto
                self.startWriting()
                return
            if err == errno.EISCONN:
                err = 0
        if err:
            self.failIfNotConnected(error.getConnectError((err, os.strerror(err))))
            return
        if self._in_progress:
            del self.doWrite, self.doRead
            self.stopWriting()
        self._connectDone()

    def _connectDone(self) -> None:
        # Twisted's, without an address object and a log prefix built per connection
        # (the connector gives its one protocol whatever the address).
        protocol = self.connector.buildProtocol(None)
        self.connected = 1
        if protocol is None:  # as Twisted: something to hear the close, then close
            self.protocol = Protocol()
            self.loseConnection()
            return
        self.protocol = protocol
        if self._read:
            self.startReading()
        protocol.makeConnection(self)

    def connectionLost(self, reason: Failure) -> None:
        if not self.connected and self._in_progress and hasattr(self, "connector"):
            # A connect that failed is reported by epoll as a hang-up (not as writable):
            # the error is the socket's, as Twisted reads it when told it is writable.
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.failIfNotConnected(error.getConnectError((err, os.strerror(err))))
                return
        super().connectionLost(reason)


_DEADLINES: WeakKeyDictionary[Any, dict[float, Deadlines[_Dial]]] = WeakKeyDictionary()


def _deadlines(reactor: Any, timeout: float) -> Deadlines[_Dial]:
    """
    The connect deadlines of ``reactor``'s dials of ``timeout`` seconds: one timer for
    all of them, where a timer each is a push into the reactor's heap and a cancel per
    dial (two dials per client in the private proxy).
    """
    by_timeout = _DEADLINES.get(reactor)
    if by_timeout is None:
        by_timeout = _DEADLINES[reactor] = {}
    deadlines = by_timeout.get(timeout)
    if deadlines is None:
        deadlines = by_timeout[timeout] = Deadlines(reactor, timeout, _Dial._timed_out)
    return deadlines


class _Dial:
    """
    One :func:`dial` of an IP address: what Twisted's TCP client needs of its connector
    (the protocol, once connected; the failure; the end), and its connect deadline (on
    one timer with the reactor's other dials of that timeout: :func:`_deadlines`).
    Twisted's connector and client factory take some twenty Python calls more per dial:
    a factory started and stopped, an address parsed again, an exception built for the
    timeout, the timer cancelled through two methods.
    """

    def __init__(self, reactor: Any, protocol: Dialled, timeout: float) -> None:
        self.state = "connecting"
        self.transport: _Client | None = None
        self._protocol: Dialled | None = protocol
        self._deadlines = _deadlines(reactor, timeout)

    def start_timer(self) -> None:
        """The connect is under way: its deadline runs from now.  (One that completes
        within the connect call, as over loopback, never sets or stops a timer.)"""
        self._deadlines.add(self)

    def _timed_out(self) -> None:
        if self.transport is not None:
            self.transport.failIfNotConnected(error.TimeoutError())

    def _stop_timer(self) -> None:
        self._deadlines.discard(self)

    def buildProtocol(self, addr: Any) -> Dialled | None:
        self.state = "connected"
        self._stop_timer()
        protocol, self._protocol = self._protocol, None
        return protocol

    def connectionFailed(self, reason: Failure) -> None:
        self._stop_timer()
        self.transport = None
        self.state = "disconnected"
        protocol, self._protocol = self._protocol, None
        d = None if protocol is None else protocol.when_connected
        if d is not None and not d.called:
            protocol.when_connected = None  # type: ignore[union-attr]  # d came from it
            d.errback(reason)

    def connectionLost(self, reason: Failure) -> None:
        # The client keeps its connector; without this the two would be a cycle left to
        # the garbage collector, with everything the connection held.
        self.state = "disconnected"
        self.transport = None

    def stopConnecting(self) -> None:
        if self.state != "connecting" or self.transport is None:
            raise error.NotConnectingError("we're not trying to connect")
        self.state = "disconnected"
        self.transport.failIfNotConnected(error.UserError())


class _DialFactory(ClientFactory):
    """Builds the one protocol of a :func:`dial`, then forgets it; quiet."""

    noisy = False

    def __init__(self, protocol: Dialled) -> None:
        self._protocol: Dialled | None = protocol

    def buildProtocol(self, addr: Any) -> Any:  # the protocol given, whatever its type
        protocol, self._protocol = self._protocol, None
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        protocol, self._protocol = self._protocol, None
        d = None if protocol is None else protocol.when_connected
        if d is not None and not d.called:
            protocol.when_connected = None  # type: ignore[union-attr]  # d came from it
            d.errback(reason)


def dial(reactor: IReactor, host: str, port: int, timeout: float, protocol: _D, *,
         read: bool = True) -> Deferred[_D]:
    """
    Connect ``protocol`` to ``host`` (an IP address, bracketed or not for IPv6, or a name)
    and ``port`` within ``timeout`` seconds; fires with it once its ``connectionMade`` ran,
    fails with Twisted's connect errors.  Cancelling it stops the attempt.

    ``read=False``: the connection to an IP address is not read once connected (the
    protocol hands it to a splice, which reads it itself, or keeps it paused until
    then): no registration with the reactor's poller only to be taken back at once
    (two system calls per dial).  A name's connection is read, as Twisted's are.
    """
    host = _unbracketed(host)
    if not _is_ip(host):
        return connect_protocol(tcp_endpoint(reactor, host, port, timeout), protocol)
    connector: Any = None

    def cancel(_: Deferred[_D]) -> None:
        protocol.when_connected = None  # the Deferred fails with CancelledError itself
        if connector is not None and connector.state == "connecting":
            connector.stopConnecting()

    d: Deferred[_D] = Deferred(cancel)
    protocol.when_connected = d
    if isinstance(reactor, PosixReactorBase):
        # What the reactor's connectTCP does, with a client that connects at once.
        connector = _Dial(reactor, protocol, timeout)
        try:
            client = _Client(host, port, connector, reactor)
        except OSError as e:  # no socket (out of descriptors): as Twisted reports it
            connector.connectionFailed(Failure(error.ConnectBindError(e.errno, e.strerror)))
            return d
        connector.transport = client
        if not read:
            client._read = False
        client.start()
    else:  # a test's memory reactor
        connector = reactor.connectTCP(host, port, _DialFactory(protocol), timeout=timeout)
    return d
