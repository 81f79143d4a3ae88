"""
Dialling a ``host``/``port``: the one place that picks the client endpoint.

An IP address gets a plain TCP endpoint: it connects at once, and reports a refused
connection at once.  Twisted's ``HostnameEndpoint`` would first resolve even an IP
address through the reactor's resolver, which runs ``getaddrinfo`` in a thread pool: a
round trip through a thread for every connection (measured on the private proxy's
per-client dials, issue 14), and a refused connection waits out the whole timeout.  A
name gets ``HostnameEndpoint`` (resolution, then happy eyeballs over its addresses).
"""

from __future__ import annotations

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from epsproxy.net.reactor import IReactor

__all__ = ["tcp_endpoint"]


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
