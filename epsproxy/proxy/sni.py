"""
The public proxy's TLS listener: SNI passthrough (SPEC §14.2; issue 5).

A client's TLS connection is never terminated here.  :class:`SNIFront` reads its
ClientHello with :class:`epsproxy.proxy.clienthello.ClientHelloReader`, asks ``lookup``
which operator announced the SNI host name, parks the (paused) connection in the
:class:`epsproxy.proxy.rendezvous_server.Rendezvous` under a fresh token, and tells the
operator through ``notify`` (the lead wires ``"<operator>.incomingConnection"`` there).
When the operator's private proxy presents the token at the internal endpoint it first
receives the ClientHello bytes, then the two connections are spliced.

With a connection ``pool`` (issue 14, :mod:`epsproxy.proxy.pool`) the front first takes
an idle pooled connection of that operator: it writes the header of
:func:`epsproxy.proxy.pooling.pool_header` (the client's address, the server name) and
the ClientHello to it and splices the two at once, with no token and no ``notify``.  Only when the operator has no
idle connection does the brokered path above run (a fallback).  ``lookup`` only names an
operator with a live announcement of the name, so a pooled connection never carries a
name its operator does not hold.

Differences from the reference (SPEC §23.1 #1, #3, #5), on purpose:

- The ClientHello is read however it arrives (TCP reads, TLS records) within
  ``max_hello_bytes`` and ``hello_timeout`` — a deadline for the whole hello, counted
  from accept, so a client sending a byte now and then is closed at the deadline.
- The deadline ends when the route is made: a parked connection then lives by the
  rendezvous' ``accept_timeout``, a spliced one as long as its ends keep it (plus the
  splice idle timeout).
- The pending table is the rendezvous' bounded one (full: the client is closed).
- Every outcome is counted (attributes of :class:`SNIFront`); nothing raises out of the
  protocol.  Logs carry the host name (not secret; at most 253 characters by the
  parser), token tags (:func:`token_tag`) and client addresses only truncated.

PROXY protocol (v1 and v2, as sent by HAProxy's ``send-proxy``/``send-proxy-v2`` and
cloud load balancers): with ``proxy_protocol=True`` every connection must begin with a
PROXY header, read by :class:`epsproxy.net.proxy_protocol.ProxyHeaderReader` inside the same deadline; the source
address it carries is the client address for logs and for ``rate_limiter``.  This is
done here rather than with Twisted's ``haproxy:`` endpoint
(:func:`twisted.protocols.haproxy.proxyEndpoint`) because that wrapper closes a header
that arrives in pieces of fewer than 8/16 bytes, has no deadline of its own, builds the
inner protocol (and so would run a rate limiter) with the load balancer's address, and
puts a wrapper transport under the splice, which then loses its fast path.
Only the sources in ``proxy_trusted`` (the load balancers' addresses or networks,
parsed once with :mod:`ipaddress`) may send a header: a connection from anywhere else
is closed at accept (``proxy_untrusted="refuse"``, the default) or read as a plain
client with its own address (``"data"``), and counted (``untrusted_proxy_source``), so
whoever reaches the port directly cannot claim another client's address.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Any, Callable, Iterable, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net.admission import address_in
from epsproxy.net.deadlines import Deadlines
from epsproxy.net.hostport import format_host_port, truncate_ip
from epsproxy.net.logs import debug_enabled
from epsproxy.net.proxy_protocol import (
    MAX_PROXY_HEADER,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
)
from epsproxy.net.ratelimit import RateLimiter
from epsproxy.net.token import encode_token, token_tag

from .clienthello import DEFAULT_MAX_BYTES, ClientHello, ClientHelloError, ClientHelloReader
from .pool import ConnectionPool, PooledConnection
from .pooling import pool_header
from .rendezvous_server import Rendezvous, RendezvousFull

__all__ = [
    "DEFAULT_HELLO_TIMEOUT",
    "MAX_PROXY_HEADER",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "SNIFront",
]

log = Logger()

#: Default seconds from accept for the whole ClientHello (and PROXY header).
DEFAULT_HELLO_TIMEOUT = 5.0


def _endpoints(client: "_Client") -> tuple[Any, Any]:
    """
    The client's address as this proxy knows it (after a trusted PROXY header, the one
    it names) and, without a PROXY header, the address it connected to (else None);
    (None, None) for a client that is not an IP address.
    """
    address = client.address
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None, None
    transport = client.transport
    if transport is not None and address == transport.getPeer():  # no PROXY header
        local = transport.getHost()
        if isinstance(local, type(address)):
            return address, local
    return address, None


def _addresses(client: "_Client") -> dict[str, str]:
    """
    ``client_address`` (and, without a PROXY header, ``server_address``) for
    ``incomingConnection`` (:func:`_endpoints` as texts), so the private proxy's PROXY
    v2 header to the internal server carries the real client instead of LOCAL.
    """
    address, local = _endpoints(client)
    found = {}
    if address is not None:
        found["client_address"] = format_host_port(address.host, address.port)
    if local is not None:
        found["server_address"] = format_host_port(local.host, local.port)
    return found


def _describe(address: Any) -> str:
    return truncate_ip(str(getattr(address, "host", "")))


class _Client(Protocol):
    """One accepted client connection until it is parked (or closed)."""

    def __init__(self, front: SNIFront, address: IAddress | None) -> None:
        self.front = front
        self.address = address  # the client's, from the PROXY header when there is one
        self.header: ProxyHeaderReader | None = (
            ProxyHeaderReader() if front.expects_header(address) else None)
        self.reader = ClientHelloReader(front.max_hello_bytes)
        self.state = "reading"  # -> "routing" -> "parked", or "closed"
        self.lost: defer.Deferred[None] | None = None

    def connectionMade(self) -> None:
        self.front._accepted(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state != "reading":
            return  # closing: whatever still arrives is dropped
        if self.header is not None:
            try:
                header = self.header.feed(data)
            except ProxyHeaderError as e:
                self.front._refuse(self, "bad_proxy_header", str(e))
                return
            if header is None:
                return
            self.header = None
            if header.source is not None:
                self.address = header.source
            if not self.front._admit(self):
                return
            data = header.rest
            if not data:
                return
        try:
            hello = self.reader.feed(data)
        except ClientHelloError as e:
            self.front._refuse(self, "malformed", str(e))
            return
        if hello is not None:
            self.front._route(self, hello)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.front._lost(self)


class _FrontFactory(Factory):
    """Builds a :class:`_Client` per connection; none while the front is closing."""

    noisy = False  # one "Starting factory" line per listener is enough

    def __init__(self, front: SNIFront) -> None:
        self.front = front

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.front._closing:
            return None
        return _Client(self.front, addr)


class SNIFront:
    """
    The protocol logic of the public TLS listener (see the module docstring).

    ``lookup(host_name) -> operator | None`` names the operator whose live announcement
    covers the (normalised, lower-case) host name.  ``notify(operator, params)`` tells
    it, with ``params = {"domain", "token" (standard base64), "endpoint",
    "client_address", "server_address"}`` (the addresses ``ip:port``, the server's only
    without a PROXY header), and returns
    a Deferred (or a value); a failure cancels the token, which closes the client.
    ``on_routed(peer)`` (optional) is told the TCP peer of each connection routed (the
    listener's per-address cap forgives it); ``on_no_route(name, peer)`` (optional) of
    each server name nobody announced, with the client's blurred address.
    ``pool`` (optional) serves clients from the operator's idle pooled connections.
    ``rate_limiter`` (optional) is asked about
    each client's address — after the PROXY header when ``proxy_protocol`` is on;
    without it, wrapping :meth:`factory` with
    :func:`epsproxy.net.ratelimit.rate_limited` does the same.

    Counters since start: ``accepted``, ``no_sni``, ``malformed``, ``timeouts``,
    ``no_route``, ``full`` (rendezvous table full), ``abandoned`` (client left before
    its hello was complete), ``bad_proxy_header``, ``untrusted_proxy_source`` (with
    ``proxy_protocol``: connections from a source not in ``proxy_trusted``, refused or
    read without a header as ``proxy_untrusted`` says), ``rate_limited``, ``routed``
    (parked and notify sent), ``notified`` (notify succeeded), ``notify_failed``,
    ``pooled`` (spliced with a pooled connection), ``pool_fallbacks`` (brokered because
    the operator had no idle pooled connection); gauge :attr:`reading` (connections
    still reading their hello).
    """

    def __init__(
        self,
        clock: IReactorTime,
        rendezvous: Rendezvous,
        lookup: Callable[[str], str | None],
        notify: Callable[[str, dict[str, str]], Any],
        *,
        max_hello_bytes: int = DEFAULT_MAX_BYTES,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        internal_endpoint: str,
        proxy_protocol: bool = False,
        proxy_trusted: Iterable[IPv4Network | IPv6Network] | None = None,
        proxy_untrusted: str = "refuse",
        rate_limiter: RateLimiter | None = None,
        on_routed: Callable[[IAddress], None] | None = None,
        on_no_route: Callable[[str, str], None] | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        ClientHelloReader(max_hello_bytes)  # validates the cap
        self.clock = clock
        self.rendezvous = rendezvous
        self.lookup = lookup
        self.notify = notify
        self.max_hello_bytes = max_hello_bytes
        self.internal_endpoint = internal_endpoint
        self.proxy_protocol = proxy_protocol
        self.proxy_trusted = None if proxy_trusted is None else tuple(proxy_trusted)
        self.proxy_untrusted = proxy_untrusted
        self.rate_limiter = rate_limiter
        self.on_routed = on_routed
        self.on_no_route = on_no_route
        self.pool = pool
        # The clients still reading their hello, on one timer for all of them.
        self._reading: Deadlines[_Client] = Deadlines(clock, hello_timeout, self._timed_out)
        self._closing = False
        self._factory = _FrontFactory(self)
        self.accepted = 0
        self.no_sni = 0
        self.malformed = 0
        self.timeouts = 0
        self.no_route = 0
        self.full = 0
        self.abandoned = 0
        self.bad_proxy_header = 0
        self.untrusted_proxy_source = 0
        self.rate_limited = 0
        self.routed = 0
        self.notified = 0
        self.notify_failed = 0
        self.pooled = 0
        self.pool_fallbacks = 0

    @property
    def hello_timeout(self) -> float:
        """Seconds a client has for its whole hello (a new value: for later clients)."""
        return self._reading.timeout

    @hello_timeout.setter
    def hello_timeout(self, seconds: float) -> None:
        self._reading.timeout = seconds

    @property
    def reading(self) -> int:
        """Connections accepted whose ClientHello is not complete yet."""
        return len(self._reading)

    def factory(self) -> IProtocolFactory:
        """The protocol factory of the TLS listener (a plain TCP endpoint)."""
        return self._factory

    def close_all(self) -> defer.Deferred[None]:
        """
        Shutdown: accept nothing more and close the connections still reading their
        hello (parked and spliced ones belong to the rendezvous: close it too).
        """
        self._closing = True
        waits: list[defer.Deferred[None]] = []
        for client in self._reading.keys():
            client.lost = defer.Deferred()
            waits.append(client.lost)
            self._close(client, abort=True)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- internals

    def expects_header(self, address: IAddress | None) -> bool:
        """
        Whether a connection from ``address`` must begin with a PROXY header: with
        ``proxy_protocol`` on, one from a trusted source (``proxy_trusted``) must; from
        any other, ``proxy_untrusted`` says: ``"refuse"`` (closed at accept) or
        ``"data"`` (no header read: its first bytes are the ClientHello).  With
        ``proxy_trusted`` None every source is trusted: the service always passes the
        configured list (``public.proxy_protocol_trusted``, loopback by default).
        """
        if not self.proxy_protocol:
            return False
        return self.proxy_trusted is None or address_in(address, self.proxy_trusted)

    def _accepted(self, client: _Client) -> None:
        self.accepted += 1
        if self.proxy_protocol and client.header is None:
            self.untrusted_proxy_source += 1
            if self.proxy_untrusted == "refuse":
                log.debug("closing {peer}: not a trusted PROXY protocol source",
                         peer=_describe(client.address))
                client.state = "closed"
                cast(ITCPTransport, client.transport).abortConnection()
                return
        self._reading.add(client)
        if client.header is None:
            self._admit(client)

    def _admit(self, client: _Client) -> bool:
        if self.rate_limiter is None or self.rate_limiter.allow(client.address):
            return True
        self.rate_limited += 1
        self._close(client, abort=True)
        return False

    def _stop_reading(self, client: _Client) -> None:
        self._reading.discard(client)

    def _close(self, client: _Client, abort: bool = False) -> None:
        self._stop_reading(client)
        client.state = "closed"
        transport = cast(ITCPTransport, client.transport)
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def _timed_out(self, client: _Client) -> None:
        if client.state != "reading":
            return
        self.timeouts += 1
        log.debug("no ClientHello from {peer} within {timeout}s, closing",
                  peer=_describe(client.address), timeout=self.hello_timeout)
        self._close(client, abort=True)

    def _refuse(self, client: _Client, counter: str, why: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        log.debug("closing {peer}: {why}", peer=_describe(client.address), why=why)
        self._close(client)

    def _lost(self, client: _Client) -> None:
        if client.state == "reading":
            self.abandoned += 1
        self._stop_reading(client)
        client.state = "closed"
        if client.lost is not None:
            d, client.lost = client.lost, None
            d.callback(None)

    def _route(self, client: _Client, hello: ClientHello) -> None:
        self._stop_reading(client)
        client.state = "routing"
        name = hello.server_name
        if name is None:
            self._refuse(client, "no_sni", "ClientHello without a server name")
            return
        try:
            operator = self.lookup(name)
        except Exception:
            log.failure("announcement lookup for {name} failed", name=name)
            operator = None
        if operator is None:
            self.no_route += 1
            peer = _describe(client.address)
            log.info("no announcement for {name} (client {peer}), closing", name=name, peer=peer)
            if self.on_no_route is not None:
                self.on_no_route(name, peer)  # the name as sent, the client blurred
            self._close(client)
            return
        if self.pool is not None:
            pooled = self.pool.take(operator)
            if pooled is not None:
                self._serve_pooled(client, hello, name, operator, pooled)
                return
            self.pool_fallbacks += 1
        try:
            token = self.rendezvous.new_token()
        except RendezvousFull as e:
            self.full += 1
            log.warn("cannot route {name} for {peer}: {why}", name=name,
                     peer=_describe(client.address), why=str(e))
            self._close(client)
            return
        tag = token_tag(token)
        cast(IPushProducer, client.transport).pauseProducing()
        try:
            self.rendezvous.park(token, client, hello.raw)
        except Exception:
            log.failure("cannot park the connection for {name} (token {tag})", name=name, tag=tag)
            self.rendezvous.cancel(token)
            self._close(client, abort=True)
            return
        client.state = "parked"
        self.routed += 1
        if self.on_routed is not None:
            # A routed client proved itself (the connection's own peer, not a PROXY
            # header's): never evicted at the cap, no longer counted against its address.
            self.on_routed(cast(ITCPTransport, client.transport).getPeer())
        log.info("{name} from {peer}: asking {operator} to collect it (token {tag})",
                 name=name, peer=_describe(client.address), operator=operator, tag=tag)
        params = {
            "domain": name,
            "token": encode_token(token),
            "endpoint": self.internal_endpoint,
            **_addresses(client),
        }
        d = defer.maybeDeferred(self.notify, operator, params)
        d.addCallbacks(self._notified, self._notify_failed,
                       errbackArgs=(token, name, operator))

    def _serve_pooled(self, client: _Client, hello: ClientHello, name: str, operator: str,
                      pooled: PooledConnection) -> None:
        """Splice ``client`` with an idle pooled connection of ``operator`` (issue 14)."""
        assert self.pool is not None
        pool = self.pool
        try:
            header = pool_header(name, *_endpoints(client))
            s = self.rendezvous.splice_pair(client, pooled, to_right=header + hello.raw,
                                            tag=f"pool:{operator}")
        except Exception as e:
            if isinstance(e, RendezvousFull):  # closing
                self.full += 1
                log.warn("cannot serve {name} from the pool: {why}", name=name, why=str(e))
            else:
                log.failure("cannot serve {name} from the pool of {operator}", name=name,
                            operator=operator)
            pool.release(pooled)
            if pooled.transport is not None:
                pooled.transport.loseConnection()
            self._close(client, abort=True)
            return
        client.state = "pooled"
        self.pooled += 1
        s.done.addBoth(lambda _: pool.release(pooled))
        if self.on_routed is not None:
            transport: Any = client.transport  # a TCP transport (typing.cast is a call)
            self.on_routed(transport.getPeer())
        if debug_enabled():
            log.debug("{name} from {peer}: served by a pooled connection of {operator}",
                      name=name, peer=_describe(client.address), operator=operator)

    def _notified(self, _: Any) -> None:
        self.notified += 1

    def _notify_failed(self, failure: Failure, token: bytes, name: str, operator: str) -> None:
        self.notify_failed += 1
        log.info("{operator} did not take the connection for {name} (token {tag}): {why}",
                 operator=operator, name=name, tag=token_tag(token),
                 why=failure.getErrorMessage()[:300])
        self.rendezvous.cancel(token)
