"""
Meet a peer at a proxy's internal endpoint (SPEC §15, steps 4 and 6).

A public proxy pairs two TCP connections that present the same 32-byte token and then
splices them.  Both EPS servers therefore do the same thing: connect to the endpoint,
write the raw token, and run TLS over the same connection, end to end with the other
EPS (one side as TLS client, the other as TLS server).  The proxy never sees plaintext.

:func:`dial_with_token` does exactly that for any protocol factory: the protocol it
builds sees an ordinary TLS connection (``handshakeCompleted``, peer certificate), as if
it had been accepted by a listener or made by a TLS client endpoint.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from epsproxy.net import tls

__all__ = ["TOKEN_BYTES", "TokenError", "decode_token", "dial_with_token"]

#: Length of a rendezvous token in bytes (SPEC §14.3).
TOKEN_BYTES = 32


class TokenError(ValueError):
    """A token is not the base64 text of exactly :data:`TOKEN_BYTES` bytes."""


def decode_token(text: object) -> bytes:
    """The raw bytes of a base64 token (standard alphabet, padding required)."""
    if not isinstance(text, str) or len(text) > 4 * TOKEN_BYTES:
        raise TokenError("token must be a base64 string of 32 bytes")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise TokenError("token is not valid base64") from None
    if len(raw) != TOKEN_BYTES:
        raise TokenError(f"token must be {TOKEN_BYTES} bytes, not {len(raw)}")
    return raw


class _TokenThenTLS(Protocol):
    """
    Writes the token on the raw connection, then hands the connection to a TLS
    protocol (which wraps the real one).  From then on the reactor delivers every
    event to the TLS protocol directly.
    """

    def __init__(self, token: bytes, tls_protocol: Protocol) -> None:
        self.token = token
        self.tls_protocol = tls_protocol

    def connectionMade(self) -> None:
        transport = self.transport
        transport.write(self.token)
        transport.protocol = self.tls_protocol
        self.tls_protocol.makeConnection(transport)


class _TokenFactory(Factory):
    def __init__(self, token: bytes, tls_factory: TLSMemoryBIOFactory) -> None:
        self.token = token
        self.tls_factory = tls_factory
        self.tls_protocol: Any = None

    def buildProtocol(self, addr: Any) -> Protocol:
        self.tls_protocol = self.tls_factory.buildProtocol(addr)
        return _TokenThenTLS(self.token, self.tls_protocol)


def dial_with_token(
    reactor: Any,
    address: str,
    token: bytes,
    tls_settings: dict[str, Any],
    factory: IProtocolFactory,
    *,
    tls_client_for: str | None,
    timeout: float = 10,
) -> defer.Deferred[Any]:
    """
    Connect to ``address`` (``host:port``), write ``token``, then speak TLS with the
    settings ``tls_settings``: as TLS client verifying the peer as ``tls_client_for``
    when that is a name, as TLS server (requiring a client certificate, unless the
    settings say otherwise) when it is None.  Fires with the protocol ``factory`` built,
    once the TCP connection is made and the token written; the TLS handshake follows.
    """
    if len(token) != TOKEN_BYTES:
        raise TokenError(f"token must be {TOKEN_BYTES} bytes")
    host, port = tls.parse_address(address)
    if not host:
        raise ValueError(f"address {address!r}: a host is needed to connect")
    if tls_client_for is not None:
        creator: Any = tls.client_options(tls_settings, tls_client_for)
        tls_factory = TLSMemoryBIOFactory(creator, True, factory)
    else:
        tls_factory = TLSMemoryBIOFactory(tls.server_options(tls_settings), False, factory)
    token_factory = _TokenFactory(token, tls_factory)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(token_factory)
    return d.addCallback(lambda _: token_factory.tls_protocol.wrappedProtocol)
