"""
The rendezvous token (SPEC §14.3, §15): everything both sides know about it.

A public proxy pairs two TCP connections that present the same token and splices them.
The proxy makes the token (:func:`new_token`), sends it to both EPS servers as base64
text inside JSON-RPC (:func:`encode_token`, :func:`decode_token`), and each EPS server
connects to the proxy's internal endpoint, writes the raw token and then speaks TLS end
to end with the other EPS server (:func:`dial_with_token`).  The proxy never sees
plaintext.

Tokens are secrets: logs carry only :func:`token_tag`.  The server side (pairing by
token at the internal endpoint) is :mod:`epsproxy.proxy.rendezvous_server`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from epsproxy.net import tls
from epsproxy.net.dial import Dialled, dial, write_at_once
from epsproxy.net.hostport import parse_host_port
from epsproxy.net.reactor import IReactor

__all__ = [
    "TOKEN_BYTES",
    "TokenError",
    "decode_token",
    "dial_with_token",
    "encode_token",
    "new_token",
    "new_tokens",
    "token_tag",
]

#: Length of a rendezvous token in bytes (SPEC §14.3).
TOKEN_BYTES = 32


class TokenError(ValueError):
    """A token is not the base64 text of exactly :data:`TOKEN_BYTES` bytes."""


def new_token() -> bytes:
    """A fresh random token, from the operating system's secure source."""
    return secrets.token_bytes(TOKEN_BYTES)


def new_tokens(count: int) -> list[bytes]:
    """``count`` fresh random tokens from one read of the operating system's secure
    source (one system call, not one per token: a public proxy issues pool tokens by
    the hundred)."""
    pool = secrets.token_bytes(TOKEN_BYTES * count)
    return [pool[i:i + TOKEN_BYTES] for i in range(0, TOKEN_BYTES * count, TOKEN_BYTES)]


def _check_length(token: bytes) -> None:
    if len(token) != TOKEN_BYTES:
        raise TokenError(f"token must be {TOKEN_BYTES} bytes, not {len(token)}")


def encode_token(token: bytes) -> str:
    """The text that carries ``token`` in JSON-RPC: standard base64 with padding."""
    _check_length(token)
    return base64.b64encode(token).decode("ascii")


def decode_token(text: object) -> bytes:
    """The raw bytes of a base64 token (standard alphabet, padding required)."""
    # The length check comes first so that a peer cannot make us decode a huge string.
    if not isinstance(text, str) or len(text) > 4 * TOKEN_BYTES:
        raise TokenError(f"token must be a base64 string of {TOKEN_BYTES} bytes")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise TokenError("token is not valid base64") from None
    _check_length(raw)
    return raw


def token_tag(token: bytes) -> str:
    """A short label for a token in logs: not reversible, not usable to pair."""
    return hashlib.sha256(token).hexdigest()[:4]


class _TokenThenTLS(Dialled):
    """
    Writes the token on the raw connection, then hands the connection to a TLS
    protocol (which wraps the real one), built by ``tls_factory`` now that the
    connection is made.  From then on the reactor delivers every event to the TLS
    protocol directly, and nothing holds this object.
    """

    tls_protocol: Any = None

    def __init__(self, token: bytes, tls_factory: TLSMemoryBIOFactory) -> None:
        self.token = token
        self.tls_factory = tls_factory

    def connectionMade(self) -> None:
        transport: Any = self.transport  # a reactor TCP transport: its protocol is switched
        self.tls_protocol = self.tls_factory.buildProtocol(transport.getPeer())
        write_at_once(transport, self.token)
        transport.protocol = self.tls_protocol
        self.tls_protocol.makeConnection(transport)
        super().connectionMade()  # dial()'s Deferred fires


def dial_with_token(
    reactor: IReactor,
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

    The protocol sees an ordinary TLS connection (``handshakeCompleted``, peer
    certificate), as if it had been accepted by a listener or made by a TLS client
    endpoint.
    """
    if len(token) != TOKEN_BYTES:
        raise TokenError(f"token must be {TOKEN_BYTES} bytes")
    host, port = parse_host_port(address)
    if not host:
        raise ValueError(f"address {address!r}: a host is needed to connect")
    if tls_client_for is not None:
        creator: Any = tls.client_options(tls_settings, tls_client_for)
        tls_factory = TLSMemoryBIOFactory(creator, True, factory)
    else:
        tls_factory = tls.BulkTLSFactory(tls.server_options(tls_settings), False, factory)
    # dial(): no endpoint, factory or connector of Twisted's is kept with the
    # connection (through an endpoint, the connection's transport and its connector
    # were left in a reference cycle with the TLS factory after the close).
    d = dial(reactor, host, port, timeout, _TokenThenTLS(token, tls_factory))
    return d.addCallback(lambda dialled: dialled.tls_protocol.wrappedProtocol)
