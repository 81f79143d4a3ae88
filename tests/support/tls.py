"""
``tls`` settings blocks made from the test PKI, and the two ends of a loopback TLS
connection: a server that greets after the handshake and a client that collects what it
is sent.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from epsproxy.net import tls
from tests.support.pki import pki


def tls_block(
    name: str | None = None, *, source: str = "main", alt: bool = False, ca: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """
    A ``tls`` settings block trusting ``ca`` (the main root unless given) and, with a
    ``name``, presenting ``name``'s TLS identity from PKI ``source``; ``extra`` is added.
    """
    result: dict[str, Any] = {"ca_certificate_files": [str(ca or pki().root)]}
    if name is not None:
        # pki() and pki("main") are distinct lru_cache keys: always call pki() for main.
        crt, key = (pki() if source == "main" else pki(source)).tls(name, alt=alt)
        result.update(certificate_file=str(crt), key_file=str(key))
    result.update(extra)
    return result


@implementer(IHandshakeListener)
class ServerProtocol(Protocol):
    """Greets after a completed handshake and records the peer certificate."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.lost: defer.Deferred = defer.Deferred()
        self.factory.made.append(self.lost)

    def handshakeCompleted(self) -> None:
        self.factory.peers.append(tls.peer_certificate(self.transport))
        self.transport.write(b"welcome")

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class ServerFactory(Factory):
    protocol = ServerProtocol

    def __init__(self) -> None:
        self.connections: list = []
        self.made: list[defer.Deferred] = []
        self.peers: list = []


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """Collects what the server sends; closes once greeted."""

    def __init__(self) -> None:
        self.received = b""
        self.handshake = False
        self.lost: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"welcome":
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IHandshakeListener)
class PeerCertificate(Protocol):
    """Records the server's certificate after the handshake, then hangs up."""

    def __init__(self) -> None:
        self.certificate: defer.Deferred[Any] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.certificate.callback(tls.peer_certificate(self.transport))
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.certificate.called:
            self.certificate.errback(reason)


@defer.inlineCallbacks
def server_certificate(address: str, client_name: str, server_name: str) -> Any:
    """The certificate the TLS server at ``address`` presents to ``client_name``."""
    endpoint = tls.client_endpoint(reactor, address, tls_block(client_name), server_name)
    protocol = yield endpoint.connect(Factory.forProtocol(PeerCertificate))
    certificate = yield protocol.certificate
    return certificate


def handshake_then_close(port: int, server_name: str) -> None:
    """A client (Python's ``ssl``, blocking: run it in a thread) that completes a
    verified handshake with 127.0.0.1:``port`` and closes, as a benchmark's clients do."""
    context = ssl.create_default_context(cafile=str(pki().root))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        context.wrap_socket(raw, server_hostname=server_name).close()
