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
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory

from epsproxy.net.reactor import IReactor

__all__ = ["connect_protocol", "tcp_endpoint"]

_P = TypeVar("_P", bound=IProtocol)


def tcp_endpoint(reactor: IReactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    The endpoint that connects to ``host`` (an IP address, bracketed or not for IPv6, or
    a name) and ``port`` within ``timeout`` seconds; see the module docstring.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


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
