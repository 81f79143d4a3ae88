"""
The JSON-RPC client (SPEC §11.6): calls a server over a pooled, mutually authenticated
connection, through an HTTP CONNECT proxy where one is configured.

Better than the reference (SPEC §23.2 #21-23): the client has timeouts, caps the response
size, checks the response id, keeps connections alive in a pool, and reports transport
problems as :class:`~epsproxy.net.jsonrpc.envelope.TransportError`.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.client import _HTTP11ClientFactory
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from epsproxy.net.dial import tcp_endpoint
from epsproxy.net import connectproxy, tls
from epsproxy.net.reactor import IReactor
from epsproxy.net.jsonrpc.envelope import (
    DEFAULT_TIMEOUT,
    JSONRPCError,
    TransportError,
    encode_json,
    first_json_value,
    random_id,
)
from epsproxy.rules import forms

__all__ = [
    "JSONRPC_CLIENT_SETTINGS",
    "JSONRPCClient",
    "BULK_READ_BYTES",
    "BulkConnectionPool",
    "CappedBody",
    "QuietConnectionPool",
]

log = Logger()

DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# A pooled client connection is dropped after this many idle seconds: less than the
# server's default idle timeout, because a POST is not retried automatically when the
# server has closed the connection just as it is reused.
POOL_IDLE_SECONDS = 20
POOL_CONNECTIONS_PER_HOST = 8


# ---------------------------------------------------------------------------- settings


def _endpoint_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port
    except ValueError as e:
        raise ValueError(f"bad port ({e})") from None
    return text


JSONRPC_CLIENT_SETTINGS = forms.Map(
    {
        "endpoint": forms.Required(forms.Check(forms.String(), _endpoint_url)),
        "tls": forms.Optional(tls.TLS_SETTINGS),
        "server_name": forms.Optional(forms.String(), doc="expected TLS server name"),
        "timeout": forms.Optional(forms.Float(min=0.001), default=DEFAULT_TIMEOUT),
        "max_response_bytes": forms.Optional(
            forms.Integer(min=1), default=DEFAULT_MAX_RESPONSE_BYTES
        ),
        "proxy_url": forms.Optional(
            forms.String(), doc="CONNECT proxy http://[user:pass@]host:port; '' or direct: none"
        ),
        "local": forms.Optional(forms.Boolean(), default=True, doc="accepted, unused"),
    },
    strict=True,
)
"""Settings of a JSON-RPC client (SPEC §11.6 plus timeouts and a response cap)."""


# ------------------------------------------------------------------------------ client


class CappedBody(Protocol):
    """
    Collects an HTTP response body (``response.deliverBody``) into ``done``, giving up
    with :class:`TransportError` (and closing) once it exceeds ``limit`` bytes.
    """

    def __init__(self, limit: int, declared: int | Any) -> None:
        self.limit = limit
        self.declared = declared
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda d: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            # deliverBody's transport is the response body's producer.
            cast(IPushProducer, self.transport).stopProducing()

    def _too_large(self) -> None:
        self._stop()
        if not self.done.called:
            self.done.errback(
                TransportError(f"response larger than {self.limit} bytes")
            )

    def connectionMade(self) -> None:
        if self.declared is not UNKNOWN_LENGTH and self.declared > self.limit:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._too_large()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(TransportError(f"response body cut off ({reason.value})"))


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


BULK_READ_BYTES = 256 * 1024
"""Bytes a :class:`BulkConnectionPool` connection reads at a time, where Twisted reads
64 KiB: each read passes once through the HTTP client and whatever it feeds (the private
proxy's terminated forwarding: the server's request and its TLS layer), so a large
response costs a quarter of the passes.  Over six paired rounds of a 500 MB download
through the terminating private proxy (issue 14, docs/benchmarks.md) it relayed 1.26x
as fast at 0.75x the proxy's CPU per GB; 128 KiB gave 1.09x, 1 MiB was slower (0.88x).
A reader slower than the upstream pauses it once its own transport holds Twisted's
64 KiB; one read more than before may then be held: at most 256 KiB where it was 64."""


class _QuietClientFactory(_HTTP11ClientFactory):
    """One client connection per request burst: no "Starting factory" line for each."""

    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """A persistent connection pool whose connections do not log their start and stop."""

    _factory = _QuietClientFactory


class _BulkReadingProtocol(HTTP11ClientProtocol):
    """An HTTP/1.1 client connection whose socket is read :data:`BULK_READ_BYTES` at a
    time (the socket under TLS, when the upstream is https)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        while transport is not None and not isinstance(transport, FileDescriptor):
            transport = getattr(transport, "transport", None)
        if transport is not None:
            transport.bufferSize = BULK_READ_BYTES


class _BulkClientFactory(_QuietClientFactory):
    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _BulkReadingProtocol(self._quiescentCallback)


class BulkConnectionPool(QuietConnectionPool):
    """A :class:`QuietConnectionPool` for relaying large bodies: its connections read
    :data:`BULK_READ_BYTES` at a time."""

    _factory = _BulkClientFactory


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """
    The client's connections: what ``Agent`` does by default (TCP, TLS for https) but
    over a CONNECT tunnel when :func:`epsproxy.net.connectproxy.proxy_for` names a proxy.
    """

    def __init__(self, reactor: IReactor, policy: IPolicyForHTTPS, timeout: float,
                 proxy_url: str | None) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout
        self._proxy_url = proxy_url

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        proxy = connectproxy.proxy_for(host, uri.port, self._proxy_url)
        endpoint: IStreamClientEndpoint
        if proxy is None:
            endpoint = tcp_endpoint(self._reactor, host, uri.port, self._timeout)
        else:
            endpoint = connectproxy.HTTPConnectEndpoint(
                self._reactor, proxy, host, uri.port, timeout=self._timeout
            )
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")


class JSONRPCClient:
    """
    Calls a JSON-RPC server (SPEC §11.6) over a persistent connection pool, with mutual
    TLS from the settings (validated :data:`JSONRPC_CLIENT_SETTINGS`).  Connections go
    through an HTTP CONNECT proxy when :func:`epsproxy.net.connectproxy.proxy_for` names one
    for the endpoint (``proxy_url``, else ``HTTPS_PROXY``/``NO_PROXY`` and friends), for
    ``https://`` (TLS end-to-end inside the tunnel) and ``http://`` alike; a malformed
    proxy URL raises ValueError from the constructor.  The reply's ``jsonrpc`` member is
    not checked (the reference's early error replies say ``"2.0,"``); its ``id`` is.
    Unusable TLS settings raise :class:`epsproxy.net.tls.TLSSettingsError` from the
    constructor.
    """

    def __init__(self, reactor: IReactor, settings: dict[str, Any]) -> None:
        from treq.client import HTTPClient

        self._reactor = reactor
        self._endpoint = settings["endpoint"]
        self._url = self._endpoint.encode("utf-8")
        self._timeout = settings.get("timeout", DEFAULT_TIMEOUT)
        self._max_response = settings.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
        target = urlsplit(self._endpoint)
        target_port = target.port or (443 if target.scheme == "https" else 80)
        proxy_url = settings.get("proxy_url")
        proxy = connectproxy.proxy_for(target.hostname or "", target_port, proxy_url)
        if proxy is not None:
            log.info("JSON-RPC calls to {target} go through the proxy {proxy}",
                     target=f"{target.hostname}:{target_port}", proxy=str(proxy))
        tls_settings = settings.get("tls")
        server_name = settings.get("server_name")
        policy: IPolicyForHTTPS = BrowserLikePolicyForHTTPS()
        if tls_settings is not None:
            policy = tls.MutualTLSPolicy(tls_settings, server_name)
            if self._endpoint.startswith("https:"):
                # Unusable TLS settings fail here, at start-up, not at the first call.
                tls.client_options(tls_settings, server_name or urlsplit(self._endpoint).hostname)
        self._pool = QuietConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = POOL_CONNECTIONS_PER_HOST
        self._pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
        endpoints = _EndpointFactory(reactor, policy, self._timeout, proxy_url)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
        self._http = HTTPClient(agent)

    def call(
        self,
        method: str,
        params: dict[str, Any],
        id: str | int | None = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """
        Call ``method`` with ``params``; fires with the ``result`` (None if the reply has
        none), fails with :class:`JSONRPCError` for an error reply and with
        :class:`TransportError` for anything else (no connection, timeout, not JSON-RPC,
        too large, wrong id).  ``id`` defaults to a random one; ``timeout`` (seconds, for
        the whole call) to the settings' ``timeout``.
        """
        request_id = random_id() if id is None else id
        limit = self._timeout if timeout is None else timeout
        d = Deferred.fromCoroutine(self._call(method, params, request_id))
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(limit, expire)

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure) and not result.check(JSONRPCError):
                return Failure(TransportError(
                    f"no answer from {self._endpoint} within {limit:g}s"
                ))
            return result

        return d.addBoth(settle)

    async def _call(self, method: str, params: dict[str, Any], request_id: str | int) -> Any:
        if not isinstance(params, dict):
            raise TypeError("params must be a dict")
        body = encode_json({"jsonrpc": "2.0", "method": method, "params": params, "id": request_id})
        try:
            response = await self._http.post(
                self._url,
                data=body,
                headers=Headers({b"Content-Type": [b"application/json"],
                                 b"Accept": [b"application/json"]}),
            )
            raw: IResponse = response.original
            collector = CappedBody(self._max_response, raw.length)
            raw.deliverBody(collector)
            data = await collector.done
        except (TransportError, CancelledError):
            raise
        except DNSLookupError as e:
            raise TransportError(f"cannot resolve {self._endpoint}: {e}") from None
        except connectproxy.ProxyError as e:
            raise TransportError(f"cannot connect to {self._endpoint}: {e}") from None
        except ConnectError as e:
            raise TransportError(f"cannot connect to {self._endpoint}: {e}") from None
        except Exception as e:
            raise TransportError(f"request to {self._endpoint} failed: {_describe(e)}") from None
        return self._result(raw.code, data, request_id)

    def _result(self, status: int, data: bytes, request_id: str | int) -> Any:
        try:
            reply = first_json_value(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise TransportError(f"HTTP {status} from {self._endpoint}: not a JSON-RPC response")
        error = reply.get("error")
        if error is not None:
            if not (
                isinstance(error, dict)
                and isinstance(error.get("code"), int)
                and not isinstance(error.get("code"), bool)
                and isinstance(error.get("message"), str)
            ):
                raise TransportError(f"HTTP {status} from {self._endpoint}: malformed error")
            if reply.get("id") is not None and not _same_id(reply.get("id"), request_id):
                raise TransportError(f"{self._endpoint} answered another request id")
            raise JSONRPCError(error["code"], error["message"], error.get("data"))
        if not _same_id(reply.get("id"), request_id):
            raise TransportError(f"{self._endpoint} answered another request id")
        return reply.get("result")

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        return self._pool.closeCachedConnections()


def _describe(error: Exception) -> str:
    """One line for the nested failures twisted.web's client reports."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(
            f"{type(r.value).__name__}: {r.getErrorMessage()}" for r in reasons
        )
    return f"{type(error).__name__}: {error}"
