"""
Outbound connections through an HTTP CONNECT proxy, for operators in locked-down networks.

Every outbound connection of an EPS (HTTPS/JSON-RPC to the service directory, the TLS line
protocol to peer servers) can be tunnelled: the proxy is asked ``CONNECT host:port`` and,
once it answers 2xx, the raw connection is handed to the protocol that wanted the target.
TLS is wrapped *around* the tunnel by the callers (:func:`epsproxy.net.tls.client_endpoint`,
:class:`epsproxy.net.jsonrpc.JSONRPCClient`), so TLS stays end-to-end with the target and the
proxy only sees ciphertext.

- :func:`proxy_for` decides which proxy (if any) a target goes through: an explicit
  ``proxy_url`` setting, else ``https_proxy``/``HTTPS_PROXY``, else ``all_proxy``/
  ``ALL_PROXY``; ``no_proxy``/``NO_PROXY`` excludes targets (for an explicit
  ``proxy_url`` too, as curl does).
- :func:`parse_proxy_url` reads ``http://[user:password@]host[:port]``.
- :class:`HTTPConnectEndpoint` is the ``IStreamClientEndpoint`` that builds a tunnel.

Choices worth knowing:

- Only ``http://`` proxies (the CONNECT request itself is plain text; the tunnelled bytes
  are TLS).  A URL without a scheme (``proxy:3128``) is read as ``http://``, like curl.
  Without a port, 80 is used (the ``http`` URL default; curl would use 1080).
- ``HTTP_PROXY`` is ignored on purpose: every connection is tunnelled with CONNECT, which
  is what ``HTTPS_PROXY`` names, and ``HTTP_PROXY`` is attacker-settable in CGI
  environments ("httpoxy").
- Loopback targets are *not* special-cased: write ``NO_PROXY=localhost,127.0.0.1,::1``
  to reach local servers directly.  ``NO_PROXY`` matches host names as written (no DNS
  lookups): an IP or CIDR entry only excludes targets given as addresses.
- Credentials from the URL go into ``Proxy-Authorization: Basic``; they are never logged
  and never part of ``str()``/``repr()`` of a :class:`ProxyAddress` or an error.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, cast
from urllib.parse import unquote, urlsplit

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError, NoProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.hostport import format_host_port, valid_host
from epsproxy.net.reactor import IReactor

__all__ = [
    "ProxyError",
    "ProxyAddress",
    "parse_proxy_url",
    "proxy_for",
    "HTTPConnectEndpoint",
    "MAX_REPLY_BYTES",
    "REPLY_TIMEOUT",
]

log = Logger()

MAX_REPLY_BYTES = 16384
"""The most bytes of status line and headers read from a proxy before giving up."""

REPLY_TIMEOUT = 10.0
"""Seconds a proxy has to answer a CONNECT request (after the TCP connection is made)."""

DEFAULT_PROXY_PORT = 80


class ProxyError(Exception):
    """
    The proxy did not open the tunnel; the message says which proxy, which target and
    why.  ``status`` and ``reason`` are the proxy's reply status when it sent one.
    """

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason


# ------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class ProxyAddress:
    """
    Where a proxy listens, and the credentials to present to it.  ``str()`` gives
    ``host:port`` only, so it can be logged.
    """

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)

    def authorization(self) -> bytes | None:
        """The ``Proxy-Authorization`` header value, or None without credentials."""
        if self.username is None:
            return None
        secret = f"{self.username}:{self.password or ''}".encode("utf-8")
        return b"Basic " + base64.b64encode(secret)




def parse_proxy_url(url: str) -> ProxyAddress:
    """
    ``http://[user[:password]@]host[:port][/]`` (user and password percent-decoded; a URL
    without a scheme is read as http) as a :class:`ProxyAddress`.  Anything else raises
    ValueError saying why; the message never repeats the credentials.
    """
    if not isinstance(url, str):
        raise ValueError(f"proxy URL must be a string, got {type(url).__name__}")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    shown = parts.hostname or "?"  # for messages: never the userinfo
    if parts.scheme.lower() != "http":
        raise ValueError(
            f"proxy URL for {shown}: only http:// proxies are supported, not {parts.scheme}://"
        )
    if not parts.hostname:
        raise ValueError("proxy URL: no host (expected http://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy URL for {shown}: a proxy URL has no path, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"proxy URL for {shown}: the port is not a number in 0-65535") from None
    if port == 0:
        raise ValueError(f"proxy URL for {shown}: port 0 is not a proxy port")
    host = parts.hostname  # lower-cased, brackets removed
    if not valid_host(host):
        raise ValueError(f"proxy URL: {host!r} is not a host name or IP address")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return ProxyAddress(host, port or DEFAULT_PROXY_PORT, username, password)


# --------------------------------------------------------------------------- NO_PROXY


def _normal_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def _no_proxy_entry(entry: str) -> tuple[str, Any, int | None]:
    """
    One ``NO_PROXY`` entry as ``(kind, value, port)``: kind ``"all"``, ``"net"`` (an
    ``ip_network``) or ``"name"`` (a lower-case domain without leading dot).
    """
    port: int | None = None
    text = entry.strip().lower()
    if text == "*":
        return "all", None, None
    if text.startswith("["):
        inner, _, rest = text[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        text = inner
    else:
        try:
            return "net", ipaddress.ip_network(text, strict=False), None
        except ValueError:
            pass
        head, sep, tail = text.rpartition(":")
        if sep and tail.isdigit() and ":" not in head:
            text, port = head, int(tail)
    try:
        return "net", ipaddress.ip_network(text, strict=False), port
    except ValueError:
        pass
    if text.startswith("*."):
        text = text[2:]
    return "name", text.strip(".").rstrip("."), port


def _excluded(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` text ``no_proxy`` says to reach ``host:port`` directly."""
    target = _normal_host(host)
    try:
        address: Any = ipaddress.ip_address(target)
    except ValueError:
        address = None
    for entry in re.split(r"[,\s]+", no_proxy):
        if not entry:
            continue
        kind, value, entry_port = _no_proxy_entry(entry)
        if kind == "all":
            return True
        if entry_port is not None and entry_port != port:
            continue
        if kind == "net":
            if address is not None and address.version == value.version and address in value:
                return True
        elif value and (target == value or target.endswith("." + value)):
            return True
    return False


def _variable(environ: Mapping[str, str], name: str) -> str | None:
    """The lower-case spelling wins over the upper-case one (curl's rule); empty is unset."""
    for key in (name.lower(), name.upper()):
        value = environ.get(key)
        if value and value.strip():
            return value
    return None


def proxy_for(
    host: str,
    port: int,
    proxy_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyAddress | None:
    """
    The proxy to reach ``host:port`` through, or None to connect directly.

    ``proxy_url`` (a setting) wins when given: ``""`` or ``"direct"`` mean no proxy,
    whatever the environment says.  Otherwise ``https_proxy``/``HTTPS_PROXY``, then
    ``all_proxy``/``ALL_PROXY`` from ``environ`` (default ``os.environ``).  Either way
    ``no_proxy``/``NO_PROXY`` (comma or space separated: ``*``, domains with or without
    a leading dot, hosts, IP addresses, CIDR ranges, each with an optional ``:port``)
    names targets that are reached directly.  A malformed proxy URL raises ValueError.
    """
    env = os.environ if environ is None else environ
    if proxy_url is not None:
        if proxy_url.strip().lower() in ("", "direct"):
            return None
        proxy = parse_proxy_url(proxy_url)
    else:
        text = _variable(env, "https_proxy") or _variable(env, "all_proxy")
        if text is None:
            return None
        proxy = parse_proxy_url(text)
    no_proxy = _variable(env, "no_proxy")
    if no_proxy is not None and _excluded(host, port, no_proxy):
        return None
    return proxy


# ----------------------------------------------------------------------- reply parser

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_HEADERS_END = re.compile(rb"\r?\n\r?\n")


class _BadReply(Exception):
    """The proxy's reply cannot be read; the message says how (without the target)."""


class _ReplyParser:
    """
    Reads a proxy's reply to CONNECT from bytes arriving in any pieces: interim 1xx
    replies are skipped, the final status is returned with whatever bytes followed the
    header block (they belong to the tunnel).  At most ``limit`` bytes of replies.
    """

    def __init__(self, limit: int = MAX_REPLY_BYTES) -> None:
        self.limit = limit
        self._buffer = b""
        self._consumed = 0
        self._searched = 0  # where to resume looking for the end of the headers

    def feed(self, data: bytes) -> tuple[int, str, bytes] | None:
        """The final ``(status, reason, rest)`` once complete, else None; raises _BadReply."""
        self._buffer += data
        while True:
            end = _HEADERS_END.search(self._buffer, max(0, self._searched - 3))
            self._searched = len(self._buffer)
            if end is None:
                if self._consumed + len(self._buffer) > self.limit:
                    raise _BadReply(f"reply headers over {self.limit} bytes")
                self._check_status_line()
                return None
            if self._consumed + end.start() > self.limit:
                raise _BadReply(f"reply headers over {self.limit} bytes")
            status, reason = self._status(self._buffer[: end.start()])
            rest = self._buffer[end.end():]
            if 100 <= status < 200:
                self._consumed += end.end()
                self._buffer = rest
                self._searched = 0
                continue
            return status, reason, rest

    def _check_status_line(self) -> None:
        # Fail early on garbage rather than waiting for the cap or the timeout.
        line, newline, _ = self._buffer.partition(b"\n")
        if newline:
            self._status(line)
        elif not b"HTTP/1.".startswith(line[:7]):
            raise _BadReply(f"not an HTTP reply: {_shown(line)}")

    @staticmethod
    def _status(head: bytes) -> tuple[int, str]:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise _BadReply(f"not an HTTP reply: {_shown(line)}")
        return int(match[1]), (match[2] or b"").decode("latin-1").strip()


def _shown(data: bytes) -> str:
    """Hostile bytes, shortened and made printable, for an error message."""
    return repr(data[:60])[1:] + ("..." if len(data) > 60 else "")


# --------------------------------------------------------------------------- endpoint


class _TunnelProtocol(Protocol):
    """
    Asks the proxy for the tunnel and reads its answer; on 2xx the transport is switched
    to the protocol built by the caller's factory (as ``startTLS`` switches a transport
    to its TLS protocol) and the bytes that followed the reply are given to it.
    """

    def __init__(self, request: bytes, endpoint: HTTPConnectEndpoint,
                 factory: IProtocolFactory, result: Deferred[IProtocol]) -> None:
        self._request = request
        self._endpoint = endpoint
        self._factory = factory
        self._result = result
        self._parser = _ReplyParser()
        self._timer: IDelayedCall | None = None
        self._inner: IProtocol | None = None

    def connectionMade(self) -> None:
        self._timer = self._endpoint._reactor.callLater(
            self._endpoint._reply_timeout, self._expired
        )
        transport = self.transport
        assert transport is not None
        transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:  # transports that cannot be switched keep calling us
            self._inner.dataReceived(data)
            return
        if self._result.called:
            return
        try:
            reply = self._parser.feed(data)
        except _BadReply as e:
            self._fail(f"proxy {self._endpoint.proxy} sent a bad reply to CONNECT"
                       f" {self._endpoint.target}: {e}")
            return
        if reply is None:
            return
        status, reason, rest = reply
        if not 200 <= status < 300:
            self._fail(
                f"proxy {self._endpoint.proxy} refused CONNECT to {self._endpoint.target}:"
                f" {status} {reason}".rstrip(),
                status, reason,
            )
            return
        self._switch(rest)

    def _switch(self, rest: bytes) -> None:
        self._stop_timer()
        address = HostnameAddress(self._endpoint._host.encode("ascii"), self._endpoint._port)
        failure: Failure | None
        try:
            inner = self._factory.buildProtocol(address)
        except BaseException:
            failure = Failure()
        else:
            failure = None if inner is not None else Failure(NoProtocol())
        if failure is not None:
            # Fail first: with some transports closing reports the loss straight away.
            self._result.errback(failure)
            cast(ITCPTransport, self.transport).abortConnection()
            return
        log.debug("tunnel to {target} open through proxy {proxy}",
                  target=self._endpoint.target, proxy=str(self._endpoint.proxy))
        assert inner is not None  # failure is None only when buildProtocol made one
        self._inner = inner
        transport: Any = self.transport  # a TCP transport, or the wrapper of one
        if getattr(transport, "protocol", None) is not None:
            transport.protocol = inner
        inner.makeConnection(transport)
        self._result.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._result.called:
            self._result.errback(ProxyError(
                f"proxy {self._endpoint.proxy} closed the connection before answering"
                f" CONNECT to {self._endpoint.target}"
            ))

    def _expired(self) -> None:
        self._timer = None
        self._fail(f"no reply from proxy {self._endpoint.proxy} to CONNECT"
                   f" {self._endpoint.target} within {self._endpoint._reply_timeout:g} s")

    def _fail(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        self._stop_timer()
        if not self._result.called:
            self._result.errback(ProxyError(message, status, reason))
        cast(ITCPTransport, self.transport).abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def cancel(self) -> None:
        """The caller gave up: close the proxy connection."""
        self._stop_timer()
        cast(ITCPTransport, self.transport).abortConnection()


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint:
    """
    Connects to ``host:port`` through an HTTP CONNECT tunnel opened by ``proxy``.

    ``timeout`` bounds the TCP connection to the proxy, ``reply_timeout`` the wait for
    its answer.  The connect Deferred fires with the caller's protocol once the tunnel
    is open (it then owns the proxy connection), or fails with :class:`ProxyError` when
    the proxy cannot be reached, answers something other than 2xx, or nothing usable.
    Cancelling it closes the proxy connection.
    ``proxy_endpoint`` replaces the TCP endpoint to the proxy (tests).
    """

    def __init__(
        self,
        reactor: IReactor,
        proxy: ProxyAddress,
        host: str,
        port: int,
        timeout: float = 30,
        reply_timeout: float = REPLY_TIMEOUT,
        proxy_endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        host = _normal_host(host) if host.startswith("[") else host
        if not valid_host(host):
            raise ValueError(f"cannot CONNECT to {host!r}: not a host name or IP address")
        if not 0 < port <= 65535:
            raise ValueError(f"cannot CONNECT to port {port}: out of range 1-65535")
        self._reactor = reactor
        self.proxy = proxy
        self._host = host
        self._port = port
        self._reply_timeout = reply_timeout
        self.target = format_host_port(host, port)
        self._proxy_endpoint = proxy_endpoint or HostnameEndpoint(
            reactor, proxy.host, proxy.port, timeout=timeout
        )

    def _request(self) -> bytes:
        target = self.target.encode("ascii")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        authorization = self.proxy.authorization()
        if authorization is not None:
            lines.append(b"Proxy-Authorization: " + authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open the tunnel and connect ``protocolFactory``'s protocol through it."""
        tunnel: list[_TunnelProtocol] = []
        connecting: list[Deferred[Any]] = []

        def cancel(d: Deferred[IProtocol]) -> None:
            # Fail first: closing the connection reports a loss to ``d`` otherwise.
            d.errback(ConnectingCancelledError(HostnameAddress(
                self._host.encode("ascii"), self._port)))
            if tunnel and tunnel[0].transport is not None:
                tunnel[0].cancel()
            elif connecting:
                connecting[0].cancel()

        result: Deferred[IProtocol] = Deferred(cancel)

        def build() -> _TunnelProtocol:
            protocol = _TunnelProtocol(self._request(), self, protocolFactory, result)
            tunnel.append(protocol)
            return protocol

        log.debug("connecting to {target} through proxy {proxy}",
                  target=self.target, proxy=str(self.proxy))
        connected = self._proxy_endpoint.connect(Factory.forProtocol(build))
        connecting.append(connected)

        def failed(failure: Failure) -> None:
            if result.called:
                return
            if failure.check(ConnectingCancelledError):
                return
            result.errback(ProxyError(
                f"cannot connect to proxy {self.proxy} (for {self.target}):"
                f" {failure.getErrorMessage()}"
            ))

        connected.addErrback(failed)
        return result
