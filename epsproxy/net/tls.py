"""
Mutual TLS for every listener and outgoing connection of the network (SPEC §18).

One ``tls`` settings block (:data:`TLS_SETTINGS`) describes both sides: the CA files form
the one pool that verifies servers (as a client) and client certificates (as a server);
``certificate_file`` holds our leaf followed by its intermediates; ``key_file`` its key.

- :func:`server_options` / :func:`client_options` turn a block into Twisted connection
  creators, cached per settings (and file modification times), because an EPS opens many
  connections with the same block.
- :func:`listen_endpoint` / :func:`client_endpoint` build endpoints from a ``host:port``
  text (read by :func:`epsproxy.net.hostport.parse_host_port`).
- :func:`peer_certificate` returns the verified peer leaf of a TLS transport.

Choices that differ from the reference, on purpose:

- TLS 1.2 is the minimum; for TLS 1.2 only ECDHE key exchange with AEAD ciphers is
  offered (forward secrecy always; the reference also allowed ``TLS_RSA_WITH_AES_128_GCM``).
  TLS 1.3 keeps OpenSSL's defaults.  The dev PKI is ECDSA P-256, which makes handshakes
  cheaper than the reference's RSA.
- ``validate_client`` (a key that appears in the reference's dev settings and was silently
  ignored there) is refused by the strict schema with a message naming the known keys.
- ``verify_client: false`` with ``request_client_cert: true`` asks the client for a
  certificate and accepts *any* certificate (or none) without verifying it.  Such a
  certificate proves nothing: :func:`peer_certificate` returns it, and callers must not
  treat it as an identity unless the listener verifies clients.
- Rate limiting is applied *outside* the TLS layer (see :class:`TLSServerEndpoint`), so a
  refused peer never costs a handshake.
- A server takes a peer's close without a TLS close_notify alert as a close
  (``SSL_OP_IGNORE_UNEXPECTED_EOF``, as nginx does with OpenSSL 3), where OpenSSL 3 makes
  it an error.  What is read on such a connection is framed by its own protocol (HTTP
  lengths and chunks, JSON-RPC bodies, newline-terminated EPS lines), so a cut stream
  still leaves an incomplete message, which is not acted on.  The error cost every
  such connection an exception whose traceback Twisted keeps in a reference cycle:
  some 26 objects for the garbage collector per closed connection, most of its work in
  the terminating private proxy (issue 14).
- A server encrypts a large write in pieces of :data:`BULK_WRITE_BYTES` (64 KiB), each
  in one OpenSSL call and sent in one piece, at once when the socket has room
  (:class:`BulkTLSProtocol`), where
  Twisted makes one call, one read of the encrypted bytes and one TCP write per 16 KiB
  TLS record: about 61,000 rounds of Python per GB sent, most of what a terminating
  private proxy spent per byte beyond the encryption itself.  The piece's size bounds
  what each connection keeps afterwards: OpenSSL's memory buffer for the encrypted
  bytes stays as large as the largest piece until the connection closes.

Reloading (SIGHUP): a listener's certificate, key and CA pool live in a
:class:`ReloadableServerOptions`, which each new connection asks for the options current
when it arrives; :meth:`ReloadableServerOptions.replace` swaps them (live connections keep
the TLS session they have).  Clients look their options up per connection
(:func:`client_options`), so a rotated file is picked up by the next connection by itself;
:func:`forget_cached` makes sure of it on a reload.

Failed handshakes on a listener are logged by :class:`HandshakeFailures`: one line each
with the blurred peer address, the listener and the reason, at most ``limit`` lines per
minute and listener, then one summary line.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL.SSL import Error as OpenSSLError, WantReadError
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from epsproxy.rules import forms
from epsproxy.rules.certificates import (
    CertificateError,
    load_certificates_file,
    load_private_key_file,
)
from epsproxy.net.connectproxy import HTTPConnectEndpoint, proxy_for
from epsproxy.net.admission import Admission, AdmissionEndpoint
from epsproxy.net.dial import tcp_endpoint, write_at_once
from epsproxy.net.hostport import is_ip, parse_host_port, truncate_ip
from epsproxy.net.ratelimit import RateLimitedFactory
from epsproxy.net.reactor import IReactor

__all__ = [
    "BULK_WRITE_BYTES",
    "BulkTLSFactory",
    "BulkTLSProtocol",
    "TLS_SETTINGS",
    "TLSError",
    "TLSSettingsError",
    "server_options",
    "client_options",
    "forget_cached",
    "ReloadableServerOptions",
    "HandshakeFailures",
    "handshake_failure_reason",
    "peer_certificate",
    "listen_endpoint",
    "client_endpoint",
    "TLSServerEndpoint",
    "MutualTLSPolicy",
]

log = Logger()

TLS_SETTINGS = forms.Map(
    {
        "ca_certificate_files": forms.Required(
            forms.List(forms.String(min_length=1), min_length=1),
            doc="PEM files: the pool that verifies servers and client certificates",
        ),
        "certificate_file": forms.Optional(
            forms.String(), doc="our leaf certificate followed by its intermediates"
        ),
        "key_file": forms.Optional(forms.String(), doc="the private key of our leaf"),
        "server_name": forms.Optional(forms.String(), doc="expected server name (clients)"),
        "verify_client": forms.Optional(
            forms.Boolean(), default=True, doc="servers: require and verify a client cert"
        ),
        "request_client_cert": forms.Optional(
            forms.Boolean(),
            default=False,
            doc="servers: ask for a client cert without verifying it (verify_client false)",
        ),
        "insecure_skip_verify": forms.Optional(
            forms.Boolean(), default=False, doc="clients: do not verify the server (dev only)"
        ),
    },
    strict=True,
)
"""The ``tls`` settings block (SPEC §18); strict, so unknown keys are refused."""

_MODE_ENABLE_PARTIAL_WRITE = 0x1
"""OpenSSL's ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (``ssl.h``): ``SSL_write`` returns after
each record.  pyOpenSSL sets it on every context and exports no name for it."""

BULK_WRITE_BYTES = 64 * 1024
"""The most a TLS server (:class:`BulkTLSProtocol`) encrypts in one OpenSSL call and
hands to TCP in one piece.  OpenSSL's memory buffer for the encrypted bytes keeps the
largest piece's size until the connection closes (about 64 KB then, against some 20 KB
with 16 KiB pieces); 256 KiB pieces streamed 7% faster and would keep 300 KB."""

# TLS 1.2 suites: ECDHE only (forward secrecy), AEAD only.  TLS 1.3 suites are separate
# in OpenSSL and keep their defaults.
_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20")
_MINIMUM = ssl.TLSVersion.TLSv1_2


class TLSError(Exception):
    """Base of the errors of this module."""


class TLSSettingsError(TLSError, ValueError):
    """A ``tls`` block is invalid or names files that cannot be used; says which."""


# --------------------------------------------------------------------------- settings


def _validated(tls: dict[str, Any]) -> dict[str, Any]:
    try:
        return TLS_SETTINGS.validate(tls, ("tls",))
    except forms.FormError as e:
        raise TLSSettingsError(str(e)) from None


def _cache_key(tls: dict[str, Any]) -> str:
    """
    Settings plus the identity of every file they name: a rewritten certificate or key
    file (rotation) produces a new key, so it is picked up by the next connection.
    """
    files = [*tls["ca_certificate_files"]]
    files += [tls[k] for k in ("certificate_file", "key_file") if k in tls]
    stamps: list[tuple[str, int | None, int | None, int | None]] = []
    for name in files:
        try:
            st = os.stat(name)
            stamps.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((name, None, None, None))
    return json.dumps([tls, stamps], sort_keys=True)


def _load(loader: Any, path: str) -> Any:
    try:
        return loader(path)
    except CertificateError as e:
        raise TLSSettingsError(f"tls: {e}") from None


def _trust_root(tls: dict[str, Any]) -> Any:
    authorities = []
    for path in tls["ca_certificate_files"]:
        for certificate in _load(load_certificates_file, path):
            authorities.append(ssl.Certificate(crypto.X509.from_cryptography(certificate)))
    return ssl.trustRootFromCertificates(authorities)


def _own_certificate(tls: dict[str, Any], required: bool) -> dict[str, Any]:
    """``privateKey``/``certificate``/``extraCertChain`` options, or {} when absent."""
    cert_file, key_file = tls.get("certificate_file"), tls.get("key_file")
    if cert_file is None and key_file is None:
        if required:
            raise TLSSettingsError("tls: certificate_file and key_file are required here")
        return {}
    if cert_file is None or key_file is None:
        missing = "certificate_file" if cert_file is None else "key_file"
        raise TLSSettingsError(f"tls.{missing}: is required when the other one is given")
    chain = _load(load_certificates_file, cert_file)
    key = _load(load_private_key_file, key_file)
    if key.public_key() != chain[0].public_key():
        raise TLSSettingsError(
            f"tls: key_file {key_file} does not belong to the first certificate"
            f" of certificate_file {cert_file}"
        )
    # cryptography objects, not pyOpenSSL ones: pyOpenSSL deprecates the latter here.
    return {"privateKey": key, "certificate": chain[0], "extraCertChain": chain[1:]}


# ------------------------------------------------------------------------ servers


def _accept_any(connection: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    return True


@lru_cache(maxsize=32)
def _server_options(key: str) -> ssl.CertificateOptions:
    tls = json.loads(key)[0]
    common = dict(
        _own_certificate(tls, required=True),
        raiseMinimumTo=_MINIMUM,
        acceptableCiphers=_CIPHERS,
    )
    if tls["verify_client"]:
        options = ssl.CertificateOptions(trustRoot=_trust_root(tls), **common)
    else:
        options = ssl.CertificateOptions(**common)
    try:
        context = options.getContext()  # build now: errors surface at start-up
    except (SSL.Error, TypeError, ValueError) as e:
        raise TLSSettingsError(f"tls: OpenSSL refused the settings ({e})") from None
    context.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)  # see the module docstring
    # One OpenSSL call encrypts a whole piece (BulkTLSProtocol), not one record per call.
    context.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    if not tls["verify_client"] and tls["request_client_cert"]:
        # Before any connection uses the context (pyOpenSSL forbids changes after).
        # Ask for a certificate, accept whatever comes (or nothing): see module docstring.
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept_any)
    return options


def server_options(tls: dict[str, Any]) -> ssl.CertificateOptions:
    """
    Server-side TLS options for one ``tls`` block: our key and chain, TLS ≥ 1.2, and a
    required, verified client certificate unless ``verify_client`` is false.

    Raises :class:`TLSSettingsError` naming the block key or file that is wrong.
    """
    return _server_options(_cache_key(_validated(tls)))


class BulkTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS transport, with a large write encrypted :data:`BULK_WRITE_BYTES` at a
    time: one OpenSSL call per piece (server contexts clear OpenSSL's partial-write
    mode), the encrypted bytes read out and written to TCP in one piece.  Twisted's own
    makes those three calls for every 16 KiB record.  Writes of up to one record, and
    any write before the handshake is done, take Twisted's path unchanged.
    """

    def makeConnection(self, transport: Any) -> None:
        """
        As Twisted's, with the transport's interfaces declared on the TLS transport
        once.  Twisted's declares each in turn (every declaration replacing the one
        before), then all of them again: ten declarations per connection over TCP,
        some 4% of a terminating private proxy's Python time per connection.
        """
        if not self._connectWrapped:  # a startTLS upgrade (never ours): Twisted's way
            super().makeConnection(transport)
            return
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        # Declares the interfaces once, connects this and then the wrapped protocol.
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def _write(self, bytes: bytes) -> None:  # Twisted's name for the argument
        size = len(bytes)
        if self._lostTLSConnection or size <= 2**14 or not self._handshakeDone:
            super()._write(bytes)
            return
        view = memoryview(bytes)
        done = 0
        while done < size:
            try:
                done += self._tlsConnection.send(view[done:done + BULK_WRITE_BYTES])
            except WantReadError:  # as Twisted: kept until the peer's bytes come in
                self._bufferedWrite(bytes[done:])
                return
            except OpenSSLError:  # as Twisted: the TLS connection is over
                self._tlsShutdownFinished(Failure())
                return
            self._flush_encrypted()

    def _flush_encrypted(self) -> None:
        """Write what OpenSSL has encrypted to TCP, in as few pieces as it allows."""
        room = BULK_WRITE_BYTES + 2**12  # a piece and its records' headers and tags
        assert self.transport is not None  # connected: a write came through it
        while True:
            try:
                encrypted = self._tlsConnection.bio_read(room)
            except WantReadError:  # nothing (more) to send
                return
            # Sent now when the socket has room (queued as by write() otherwise): no join
            # of the pieces and no wait for a write event.
            write_at_once(self.transport, encrypted)
            if len(encrypted) < room:
                return


class BulkTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose connections are :class:`BulkTLSProtocol`."""

    protocol = BulkTLSProtocol


# ------------------------------------------------------------------------ clients

_warned_insecure: set[str] = set()


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """Client connections that send SNI but verify nothing (``insecure_skip_verify``)."""

    def __init__(self, options: ssl.CertificateOptions, server_name: str) -> None:
        self._context = options.getContext()
        self._sni = None if is_ip(server_name) or not server_name else server_name

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni.encode("idna"))
        return connection


@lru_cache(maxsize=256)
def _client_options(key: str, server_name: str) -> IOpenSSLClientConnectionCreator:
    tls = json.loads(key)[0]
    extra: dict[str, Any] = dict(raiseMinimumTo=_MINIMUM, acceptableCiphers=_CIPHERS)
    own = _own_certificate(tls, required=False)
    if tls["insecure_skip_verify"]:
        options = ssl.CertificateOptions(**own, **extra)
        return _UnverifiedClientCreator(options, server_name)
    trust = _trust_root(tls)
    # Our certificate goes in as CertificateOptions arguments, which is what the
    # ``clientCertificate`` argument amounts to, but keeps the intermediates with it.
    extra.update(own)
    try:
        return ssl.optionsForClientTLS(
            server_name,
            trustRoot=trust,
            extraCertificateOptions=extra,
        )
    except (SSL.Error, TypeError, ValueError) as e:
        raise TLSSettingsError(f"tls: cannot build client options ({e})") from None


def client_options(
    tls: dict[str, Any], server_name: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    Client-side TLS for one ``tls`` block, expecting the server to be ``server_name``
    (falls back to the block's ``server_name``).  Presents our certificate chain when the
    block has one.  ``insecure_skip_verify`` gives a creator that verifies nothing; that
    is logged loudly once per settings block.
    """
    tls = _validated(tls)
    name = server_name or tls.get("server_name") or ""
    if not name and not tls["insecure_skip_verify"]:
        raise TLSSettingsError("tls.server_name: a server name is needed to verify the server")
    key = _cache_key(tls)
    if tls["insecure_skip_verify"] and key not in _warned_insecure:
        _warned_insecure.add(key)
        log.critical(
            "TLS server verification is DISABLED (insecure_skip_verify) for connections"
            " to {server_name}: anyone on the path can impersonate the server",
            server_name=name or "(no name)",
        )
    return _client_options(key, name)


def forget_cached() -> None:
    """
    Drop every cached server and client option set, so the next :func:`server_options`
    or :func:`client_options` reads the files again (a reload does this: a file rewritten
    within the same timestamp tick and size would otherwise look unchanged).
    """
    _server_options.cache_clear()
    _client_options.cache_clear()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    The TLS server side of a listener whose ``tls`` block can be replaced while it runs:
    every new connection uses the options current when it is accepted; connections
    already open are not touched.
    """

    def __init__(self, tls: dict[str, Any]) -> None:
        self.settings = tls
        self.options = server_options(tls)

    def replace(self, tls: dict[str, Any]) -> None:
        """
        Use ``tls`` for the next connections.  The new options are built first: on
        :class:`TLSSettingsError` (a missing file, a key that does not match) nothing
        changes.
        """
        options = server_options(tls)
        self.settings, self.options = tls, options

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A connection from the current options (:class:`IOpenSSLServerConnectionCreator`)."""
        return SSL.Connection(self.options.getContext(), None)


# ---------------------------------------------------------------------- endpoints


# ------------------------------------------------------------------ failed handshakes

#: OpenSSL reason texts (lower case, substrings) -> the reason a log line gives.
_HANDSHAKE_REASONS = (
    (("peer did not return a certificate", "certificate required"), "no client certificate"),
    (("certificate verify failed", "unknown ca", "unable to get local issuer"), "unknown CA"),
    (("certificate expired", "certificate has expired"), "certificate expired"),
    (("wrong version number", "http request", "unknown protocol", "packet length too long",
      "unexpected message", "record layer failure", "wrong ssl version",
      "unsupported protocol"), "not TLS or an unsupported TLS version"),
    (("no shared cipher", "no suitable signature", "no shared group"), "no shared cipher"),
)


def handshake_failure_reason(reason: Failure | None, received: bool) -> str:
    """
    Why a TLS handshake failed, in a few words: from the OpenSSL error in ``reason``,
    or how the connection ended; ``received`` says whether the peer sent anything.
    """
    value = None if reason is None else reason.value
    if isinstance(value, SSL.Error):
        texts = [
            str(item[-1]) for item in (value.args[0] if value.args else [])
            if isinstance(item, tuple) and item
        ]
        joined = "; ".join(texts).lower()
        for needles, text in _HANDSHAKE_REASONS:
            if any(needle in joined for needle in needles):
                return text
        return ("TLS error: " + "; ".join(texts))[:200] if texts else "TLS error"
    if not received:
        return "closed before sending anything"
    return "closed during the handshake"


class HandshakeFailures:
    """
    The log of one listener's failed TLS handshakes: one line per failure with the
    blurred peer address, the listener's name and the reason, at most ``limit`` lines
    per ``period`` seconds; past that, failures are only counted and one summary line
    says how many were left out once the period ends (or the listener stops), so a flood
    cannot fill the disk.
    """

    def __init__(
        self, clock: IReactorTime, listener: str, *, limit: int = 10, period: float = 60.0
    ) -> None:
        self.clock = clock
        self.listener = listener
        self.limit = limit
        self.period = period
        #: Failed handshakes since start (logged or not).
        self.count = 0
        self._window_start: float | None = None
        self._logged = 0
        self._suppressed = 0
        self._timer: IDelayedCall | None = None

    def failed(self, peer: str, reason: str) -> None:
        """Record one failed handshake from ``peer`` (an address; blurred here)."""
        self.count += 1
        now = self.clock.seconds()
        if self._window_start is None or now - self._window_start >= self.period:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged < self.limit:
            self._logged += 1
            log.info(
                "failed TLS handshake on {listener} from {peer}: {reason}",
                listener=self.listener, peer=truncate_ip(peer), reason=reason,
            )
            return
        self._suppressed += 1
        if self._timer is None:
            self._timer = self.clock.callLater(
                max(0.0, self._window_start + self.period - now), self._period_over
            )

    def _period_over(self) -> None:
        self._timer = None
        self.flush()
        self._window_start = None

    def flush(self) -> None:
        """Write the summary line of the failures left out so far, if any."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._suppressed:
            log.warn(
                "failed TLS handshakes on {listener}: ... and {count} more in the last"
                " {period:g} s (not logged one by one)",
                listener=self.listener, count=self._suppressed, period=self.period,
            )
            self._suppressed = 0


class _WatchedTLSProtocol(BulkTLSProtocol):
    """A server-side TLS connection that reports a handshake that never completed."""

    _received = False
    factory: _WatchedTLSFactory

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._handshakeDone:
            why = self._reason or reason
            try:
                assert self.transport is not None  # still connected to its TCP transport
                peer = getattr(self.transport.getPeer(), "host", "")
                self.factory.failures.failed(
                    str(peer), handshake_failure_reason(why, self._received))
            except Exception:
                log.failure("logging a failed TLS handshake failed")
        super().connectionLost(reason)


class _WatchedTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` for servers whose failed handshakes are logged."""

    protocol = _WatchedTLSProtocol

    def __init__(
        self, creator: Any, wrappedFactory: IProtocolFactory, failures: HandshakeFailures
    ) -> None:
        super().__init__(creator, False, wrappedFactory)
        self.failures = failures

    def doStop(self) -> None:
        self.failures.flush()
        super().doStop()


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    A TCP listener whose connections are wrapped in TLS by ``TLSMemoryBIOFactory``
    (what ``SSL4ServerEndpoint`` does internally), for IPv4 and IPv6 alike.

    ``options`` are the server's TLS options: a :class:`ReloadableServerOptions` (what
    :func:`listen_endpoint` gives, so the listener's certificate can be replaced), or
    plain ``CertificateOptions``.  Failed handshakes are logged by ``failures`` (a
    :class:`HandshakeFailures`; by default one for the listener's ``name``).

    If the factory given to :meth:`listen` is a rate-limited one
    (:class:`epsproxy.net.ratelimit.RateLimitedFactory`), the limiter is moved outside the
    TLS layer: a refused peer is closed straight after accept, before any handshake.
    (Refusing inside the TLS layer would not even work: ``TLSMemoryBIOFactory`` cannot
    handle an inner factory that returns None.)
    """

    def __init__(
        self,
        tcp: IStreamServerEndpoint,
        options: ssl.CertificateOptions | ReloadableServerOptions,
        *,
        failures: HandshakeFailures | None = None,
        name: str = "TLS listener",
        clock: IReactorTime | None = None,
    ) -> None:
        self.tcp = tcp
        self.options = options
        if failures is None:
            if clock is None:
                from twisted.internet import reactor as default_reactor

                clock = default_reactor
            failures = HandshakeFailures(clock, name)
        self.failures = failures

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen with ``protocolFactory`` behind TLS (and the limiter in front)."""
        if isinstance(protocolFactory, RateLimitedFactory):
            inner = _WatchedTLSFactory(
                self.options, protocolFactory.wrappedFactory, self.failures)
            outer: IProtocolFactory = protocolFactory.rewrap(inner)
        else:
            outer = _WatchedTLSFactory(self.options, protocolFactory, self.failures)
        return self.tcp.listen(outer)


def listen_endpoint(
    reactor: IReactor,
    bind_address: str,
    tls: dict[str, Any] | None,
    backlog: int = 1024,
    *,
    name: str | None = None,
    admission: Admission | None = None,
) -> IStreamServerEndpoint:
    """
    A server endpoint for ``bind_address`` (``host:port`` text; ``localhost`` means
    127.0.0.1, ``":port"`` all IPv4 interfaces, ``"[::]:port"`` all interfaces), with TLS
    from :func:`server_options` when ``tls`` is given: then it is a
    :class:`TLSServerEndpoint` whose ``options`` can be replaced, and whose failed
    handshakes are logged naming the listener ``name`` (default: the address).

    With ``admission`` the listener is capped (:mod:`epsproxy.net.admission`): it stops
    accepting at the cap, and closes connections over the per-address cap before TLS.
    """
    host, port = parse_host_port(bind_address)
    if host == "localhost":
        host = "127.0.0.1"
    tcp: IStreamServerEndpoint
    if admission is not None:
        tcp = AdmissionEndpoint(reactor, port, admission, backlog=backlog, interface=host)
    elif ":" in host:
        tcp = TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    else:
        tcp = TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    if tls is None:
        return tcp
    return TLSServerEndpoint(
        tcp, ReloadableServerOptions(tls), name=name or bind_address, clock=reactor)


def client_endpoint(
    reactor: IReactor,
    address: str,
    tls: dict[str, Any] | None,
    server_name: str | None = None,
    timeout: float = 30,
    proxy_url: str | None = None,
) -> IStreamClientEndpoint:
    """
    A client endpoint to ``address`` (``host:port``), over TLS verified against
    ``server_name`` (default: the block's ``server_name``, else the host) when ``tls`` is
    given.  ``timeout`` bounds the TCP connection attempt only.

    When :func:`epsproxy.net.connectproxy.proxy_for` names a proxy for the address (from
    ``proxy_url``, else ``HTTPS_PROXY``/``NO_PROXY`` and friends), the connection is an
    HTTP CONNECT tunnel through it, with TLS end-to-end inside the tunnel.
    """
    host, port = parse_host_port(address)
    if not host:
        raise ValueError(f"address {address!r}: a host is needed to connect")
    proxy = proxy_for(host, port, proxy_url)
    endpoint: IStreamClientEndpoint
    if proxy is None:
        endpoint = tcp_endpoint(reactor, host, port, timeout)
    else:
        endpoint = HTTPConnectEndpoint(reactor, proxy, host, port, timeout=timeout)
    if tls is None:
        return endpoint
    name = server_name or tls.get("server_name") or host
    return wrapClientTLS(client_options(tls, name), endpoint)


# ---------------------------------------------------------------------- peer identity


def peer_certificate(transport: Any) -> x509.Certificate | None:
    """
    The leaf certificate the peer presented on a TLS ``transport`` (for a twisted.web
    request: ``request.channel.transport``), or None without TLS or without a
    certificate.  It is verified unless the server was configured not to verify.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        certificate = get()
    except (SSL.Error, AttributeError):
        return None
    if certificate is None:
        return None
    return certificate.to_cryptography()


# ------------------------------------------------------------------ HTTPS clients


@implementer(IPolicyForHTTPS)
class MutualTLSPolicy:
    """
    The TLS of an HTTPS client (a twisted.web ``Agent``, treq) from one ``tls`` block: our
    certificate chain presented, the server verified as ``server_name`` or, without one,
    as the host of the URL.  The JSON-RPC client and the private proxy's upstream
    requests both use it.
    """

    def __init__(self, settings: dict[str, Any], server_name: str | None = None) -> None:
        self._settings = settings
        self._server_name = server_name

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The connection creator for ``hostname`` (:class:`IPolicyForHTTPS`)."""
        return client_options(self._settings, self._server_name or hostname.decode("ascii"))
