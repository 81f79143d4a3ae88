"""
JSON-RPC 2.0 over HTTP(S): the envelope, a twisted.web server and a treq client (SPEC §11).

The pieces, from the wire inwards:

- :func:`parse_request` / :func:`response_object` are the sans-IO envelope rules (§11.2,
  §11.3): content type, the request schema, and the id conversion that keeps ids strings
  inside the program while clients get back exactly the id they sent
  (:func:`id_to_internal`, :func:`id_from_internal`, §22.6).
- :func:`jsonrpc_site` builds a ``Site`` around anything with a
  ``handle(method, params, context)`` method; :class:`Dispatcher` is the usual such thing
  (method name → params schema + handler, §11.4).  :func:`listen_jsonrpc` starts it with
  TLS (:mod:`epsproxy.net.tls`) and connection rate limits (:mod:`epsproxy.net.ratelimit`).
- :class:`JSONRPCClient` calls such a server over a pooled, mutually authenticated
  connection.

Where this does better than the reference (SPEC §23.2 #21-23):

- request bodies are capped (``max_body_bytes``): refused up front by ``Content-Length``
  and cut off while streaming, so chunked or lying bodies cannot exceed the cap either;
  idle connections are closed after ``timeout`` seconds, and a request must arrive whole
  (TLS handshake, headers and body) within ``request_timeout`` seconds of its first byte,
  or get a 408 (slow-loris: twisted.web's idle timeout restarts on every byte);
- every refusal (413, 408, idle timeout, twisted.web's 400) is counted by reason
  (:data:`REFUSAL_REASONS`) through the site's ``refusals`` callable;
- early error replies carry ``"jsonrpc": "2.0"`` (the reference wrote ``"2.0,"``);
- only ``POST`` (and ``OPTIONS`` for CORS preflights) is accepted on the path, other
  methods get 405; an ``OPTIONS`` whose origin is not allowed gets 403 (not the
  "JSON required" error of the reference); a listener that cannot bind fails its start;
- CORS ``Access-Control-Allow-Headers`` is de-duplicated, and ``Vary: Origin`` is sent;
- the client has timeouts, caps the response size, checks the response id, keeps
  connections alive in a pool, and reports transport problems as :class:`TransportError`.

Kept from the reference on purpose: only the first JSON value of a body is read (trailing
bytes are ignored), CORS origin patterns are unanchored ``re.search`` patterns (anchor them
in the settings, like the dev pattern ``^http(?:s)?://localhost\\:\\d+$``; they are
compiled with ``re.ASCII``, closer to Go's RE2), and the path is compared literally (the
reference wrapped it in ``^...$`` as a regex).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol as _Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from epsproxy.net import connectproxy, ratelimit, tls

from epsproxy.rules import forms

__all__ = [
    "JSONRPCError",
    "TransportError",
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "NO_RESULT",
    "RPCRequest",
    "CallContext",
    "Handler",
    "Dispatcher",
    "random_id",
    "id_to_internal",
    "id_from_internal",
    "parse_request",
    "response_object",
    "JSONRPC_SERVER_SETTINGS",
    "REFUSAL_REASONS",
    "JSONRPC_CLIENT_SETTINGS",
    "JSONRPCResource",
    "jsonrpc_site",
    "listen_jsonrpc",
    "JSONRPCClient",
    "CappedBody",
    "CappedRequest",
    "QuietConnectionPool",
]

log = Logger()

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
DEFAULT_REQUEST_TIMEOUT = 10.0
# A pooled client connection is dropped after this many idle seconds: less than the
# server's default idle timeout, because a POST is not retried automatically when the
# server has closed the connection just as it is reused.
POOL_IDLE_SECONDS = 20.0
POOL_CONNECTIONS_PER_HOST = 8

CORS_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS")


# ----------------------------------------------------------------------------- errors


class JSONRPCError(Exception):
    """A JSON-RPC error object: raised by handlers, and by the client for remote errors."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"

    def as_dict(self) -> dict[str, Any]:
        """The ``error`` member of a response (``data`` only when there is some)."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class TransportError(Exception):
    """The client got no usable JSON-RPC response: the message says what went wrong."""


class _Absent:
    def __repr__(self) -> str:
        return "NO_RESULT"


NO_RESULT: Any = _Absent()
"""Returned by a handler for a response without a ``result`` key (unlike ``None``: null)."""


# ------------------------------------------------------------------------------- ids

_ESCAPED_ID = re.compile(r"(n+):(-?[0-9]{1,32})")


def random_id() -> str:
    """A fresh request id: 16 random bytes as 32 lowercase hex characters."""
    return secrets.token_hex(16)


def id_to_internal(raw: str | int | None) -> str:
    """
    A client's JSON-RPC id as the internal id string (SPEC §11.2): absent/``null``/``""``
    → a random id, integer ``N`` → ``"n:N"``, a string like ``"n:5"`` is escaped by
    doubling its run of ``n`` (``"nn:5"``), any other string stays as it is.
    """
    if raw is None or raw == "":
        return random_id()
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise TypeError(f"a JSON-RPC id is a string or an integer, not {type(raw).__name__}")
    if isinstance(raw, int):
        return f"n:{raw}"
    match = _ESCAPED_ID.fullmatch(raw)
    if match:
        return f"{match[1] * 2}:{match[2]}"
    return raw


def id_from_internal(text: str) -> str | int:
    """The inverse of :func:`id_to_internal`: ``"n:N"`` → ``N``, ``"nn:5"`` → ``"n:5"``."""
    match = _ESCAPED_ID.fullmatch(text)
    if match is None:
        return text
    run = len(match[1])
    if run == 1:
        return int(match[2])
    if run % 2 == 0:
        return f"{'n' * (run // 2)}:{match[2]}"
    return text


# -------------------------------------------------------------------------- envelope

_CONTENT_TYPE = re.compile(r"application/json(?:;.*)?", re.IGNORECASE)


class _RequestId(forms.Schema):
    """A request id: a string of at most 1024 characters or a 32-bit integer."""

    _integer = forms.Integer(min=-(2**31), max=2**31 - 1)

    def validate(self, value: Any, path: Any = ()) -> str | int:
        if isinstance(value, str):
            if len(value) > 1024:
                raise forms.FormError("must be at most 1024 characters long", path)
            return value
        try:
            return self._integer.validate(value, path)
        except forms.FormError as e:
            raise forms.FormError(
                f"must be a string or a 32-bit integer ({e.message})", path
            ) from None


REQUEST_SCHEMA = forms.Map(
    {
        "jsonrpc": forms.Required(forms.String(choices=["2.0"])),
        "method": forms.Required(forms.String(min_length=1, max_length=100)),
        "params": forms.Required(forms.AnyMap()),
        "id": forms.Optional(_RequestId()),
    }
)
"""The JSON-RPC request object (lenient: unknown keys are dropped, as in the reference)."""


@dataclass(frozen=True)
class RPCRequest:
    """A parsed request; ``id`` is the internal id string (see :func:`id_to_internal`)."""

    method: str
    params: dict[str, Any]
    id: str


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _first_json_value(body: bytes) -> Any:
    """The first JSON value of ``body`` (UTF-8); raises ValueError if there is none."""
    text = body.decode("utf-8")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        value, _ = _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return value


def parse_request(content_type: str | None, body: bytes) -> RPCRequest:
    """
    Read one JSON-RPC request (SPEC §11.2).  Raises :class:`JSONRPCError` with
    :data:`PARSE_ERROR` ("JSON required") for a wrong content type or a body that is not
    a JSON object, and :data:`INVALID_REQUEST` for an object that is not a request.
    """
    if content_type is None or not _CONTENT_TYPE.fullmatch(content_type):
        raise JSONRPCError(PARSE_ERROR, "JSON required")
    try:
        value = _first_json_value(body)
    except ValueError:  # also UnicodeDecodeError and json.JSONDecodeError
        raise JSONRPCError(PARSE_ERROR, "JSON required") from None
    if not isinstance(value, dict):
        raise JSONRPCError(PARSE_ERROR, "JSON required")
    try:
        request = REQUEST_SCHEMA.validate(value)
    except forms.FormError as e:
        raise JSONRPCError(INVALID_REQUEST, f"invalid request: {e}", e.as_data()) from None
    return RPCRequest(request["method"], request["params"], id_to_internal(request.get("id")))


def response_object(
    internal_id: str | None, result: Any = NO_RESULT, error: JSONRPCError | None = None
) -> dict[str, Any]:
    """
    A response object: ``error`` if given, else ``result`` unless it is
    :data:`NO_RESULT`; the id is converted back to what the client sent (``None`` → null).
    """
    response: dict[str, Any] = {"jsonrpc": "2.0"}
    if error is not None:
        response["error"] = error.as_dict()
    elif result is not NO_RESULT:
        response["result"] = result
    response["id"] = None if internal_id is None else id_from_internal(internal_id)
    return response


def _encode(value: Any) -> bytes:
    # ensure_ascii: a lone surrogate from a \ud800 escape still encodes.
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


# ------------------------------------------------------------------------ dispatching


@dataclass(frozen=True)
class CallContext:
    """
    What a handler knows about a call besides its params: the internal request id, the
    peer's TLS certificate (verified unless the listener does not verify clients; None
    without TLS) and the peer's host address (never log it in full).

    The server also gives the HTTP ``headers`` of the request (e.g. ``Prefer``) and
    ``connection_lost``, a Deferred that fires (with None) if the client goes away before
    it was answered, so a handler that waits long can stop waiting.  Both default to
    None for contexts made elsewhere.
    """

    request_id: str
    peer_certificate: x509.Certificate | None
    peer_host: str | None
    headers: Headers | None = None
    connection_lost: Deferred[None] | None = None


class Handler(Protocol):
    """What :func:`jsonrpc_site` serves: one call in, a result (or a Deferred) out."""

    def handle(self, method: str, params: dict[str, Any], context: CallContext) -> Any:
        """Return the result, :data:`NO_RESULT` or a Deferred; raise JSONRPCError to refuse."""


MethodHandler = Callable[[dict[str, Any], CallContext], Any]


class Dispatcher:
    """A :class:`Handler` mapping method names to a params schema and a handler (§11.4)."""

    def __init__(self) -> None:
        self._methods: dict[str, tuple[forms.Schema | None, MethodHandler]] = {}

    def register(self, name: str, schema: forms.Schema | None, handler: MethodHandler) -> None:
        """Serve ``name``: params are validated by ``schema`` (if any), then ``handler`` runs."""
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        self._methods[name] = (schema, handler)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a registered method."""
        return name in self._methods

    def handle(self, method: str, params: dict[str, Any], context: CallContext) -> Any:
        """Validate and dispatch one call; unknown methods and bad params are refused."""
        try:
            schema, handler = self._methods[method]
        except KeyError:
            raise JSONRPCError(METHOD_NOT_FOUND, "method not found") from None
        if schema is not None:
            try:
                params = schema.validate(params)
            except forms.FormError as e:
                raise JSONRPCError(INVALID_PARAMS, "invalid params", e.as_data()) from None
        return handler(params, context)


# ---------------------------------------------------------------------------- settings


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text, re.ASCII)
    except re.error as e:
        raise ValueError(f"not a regular expression ({e})") from None


CORS_SETTINGS = forms.Map(
    {
        "allowed_hosts": forms.Optional(
            forms.List(forms.Check(forms.String(), _regex)),
            default=[],
            doc="origin patterns (unanchored regex search)",
        ),
        "allowed_headers": forms.Optional(forms.StringList(), default=[]),
        "allowed_methods": forms.Optional(
            forms.StringList(item=forms.String(choices=CORS_METHODS)),
            default=list(CORS_METHODS),
        ),
    },
    strict=True,
)


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with '/'")
    return text


JSONRPC_SERVER_SETTINGS = forms.Map(
    {
        "bind_address": forms.Required(forms.String(min_length=1), doc="host:port"),
        "path": forms.Optional(forms.Check(forms.String(), _path), default="/jsonrpc"),
        "cors": forms.Optional(CORS_SETTINGS),
        "tls": forms.Optional(tls.TLS_SETTINGS),
        "tcp_rate_limits": forms.Optional(ratelimit.TCP_RATE_LIMITS, default=[]),
        "max_body_bytes": forms.Optional(
            forms.Integer(min=1), default=DEFAULT_MAX_BODY_BYTES
        ),
        "timeout": forms.Optional(
            forms.Float(min=0.001), default=DEFAULT_TIMEOUT, doc="idle timeout, seconds"
        ),
        "request_timeout": forms.Optional(
            forms.Float(min=0.001), default=DEFAULT_REQUEST_TIMEOUT,
            doc="seconds from a request's first byte (or the connection) to its last",
        ),
    },
    strict=True,
)
"""
Settings of a JSON-RPC server (SPEC §11.1 plus ``max_body_bytes``, ``timeout`` and
``request_timeout``).
"""


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


# ------------------------------------------------------------------------------ server

_JSON = b"application/json; charset=utf-8"

#: Why a JSON-RPC server refused a connection, as counted (``<prefix>_http_refusals``):
#: a body over ``max_body_bytes`` (413), a request not whole within ``request_timeout``
#: (408, or an unfinished TLS handshake), an idle connection closed after ``timeout``,
#: malformed HTTP that twisted.web answers with 400 (also lines over its limit), a
#: connection closed at once by the listener's ``tcp_rate_limits``, and a TLS handshake
#: that failed (a client certificate from another CA or none, not TLS at all).
REFUSAL_REASONS = (
    "body_too_large", "request_timeout", "idle_timeout", "bad_request", "rate_limited",
    "handshake_failed",
)


def _raw_response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + _JSON
        + b"\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n" + body
    )


def _error_body(message: str) -> bytes:
    """An early refusal's body: a JSON-RPC error object without an id."""
    return _encode(response_object(None, error=JSONRPCError(INVALID_REQUEST, message)))


def _count_refusal(channel: Any, reason: str) -> None:
    """Count ``reason`` once for ``channel`` (a :class:`_Channel`; others are ignored)."""
    count = getattr(channel, "count_refusal", None)
    if count is not None:
        count(reason)


class CappedRequest(server.Request):
    """
    A request whose body may not exceed the site's ``max_body_bytes``: refused by its
    ``Content-Length`` before anything is read, or as soon as the streamed body (chunked,
    or longer than announced) crosses the cap.  The refusal is a 413 with the JSON body
    of :meth:`refusal` written straight to the connection, which is then closed.
    """

    _refused = False
    _received = 0

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self._limit():
            # No "100 Continue" for a body we refuse anyway.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        self.content = BytesIO()
        limit = self._limit()
        log.info("refused a request body over {limit} bytes", limit=limit)
        _count_refusal(self.channel, "body_too_large")
        self.channel.transport.write(
            _raw_response(b"413 Content Too Large", self.refusal(limit))
        )
        self.channel.loseConnection()

    def refusal(self, limit: int) -> bytes:
        """The body of the 413 answer: a JSON-RPC error object."""
        return _error_body(f"request body too large (limit {limit} bytes)")


@implementer(IHandshakeListener)
class _Channel(http.HTTPChannel):
    """
    HTTP/1.1 only (no HTTP/2 negotiation), and idle connections are closed without
    logging the peer's full address (twisted.web's own message would).

    A request deadline (the site's ``request_timeout``) runs from the connection's start
    (so it covers the TLS handshake) and from the first byte of each later request, and
    stops when the request is whole (``allContentReceived``): twisted.web's idle timeout
    restarts on every byte, so alone it never stops a client trickling its headers.  A
    late request gets a 408 and the connection closes; a TLS handshake still unfinished
    at the deadline is cut at once (nothing can be written to it).  Bytes a client
    pipelines while its previous request is handled do not start the deadline: they are
    parsed, and timed, once that request is done.

    Every refusal is counted once per connection through the site's ``refusals``.
    """

    _request_timer: IDelayedCall | None = None
    _refusal: str | None = None
    _handshake_done = False

    # -- refusals --------------------------------------------------------------------

    def count_refusal(self, reason: str) -> None:
        """Count the connection's (first) refusal with the site's ``refusals``."""
        if self._refusal is not None:
            return
        self._refusal = reason
        count = getattr(getattr(self, "site", None), "refusals", None)
        if count is None:
            return
        try:
            count(reason)
        except Exception:
            log.failure("counting a refused HTTP connection failed")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's 400 for malformed request lines, headers and chunked bodies.
        self.count_refusal("bad_request")
        self._cancel_request_deadline()
        super()._respondToBadRequestAndDisconnect()

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close silently; a line this long is a bad request too.
        self._respondToBadRequestAndDisconnect()

    # -- the request deadline --------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_request_deadline()

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (:class:`IHandshakeListener`)."""
        self._handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: read nothing more, the connection is closing
        if not self._handlingRequest:
            self._start_request_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # Also reached for pipelined bytes replayed after a request was answered within
        # the same dataReceived, where the deadline was not started yet.  Not for the
        # one empty line twisted.web skips after a request (old browsers send it).
        if line:
            self._start_request_deadline()
        super().lineReceived(line)

    def allContentReceived(self) -> None:
        self._cancel_request_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_request_deadline()
        if self.isSecure() and not self._handshake_done:
            self.count_refusal("handshake_failed")  # (not if our deadline cut it first)
        super().connectionLost(reason)

    def _start_request_deadline(self) -> None:
        if self._request_timer is not None or self._refusal is not None:
            return
        limit = getattr(getattr(self, "site", None), "request_timeout", None)
        if limit:
            self._request_timer = self.callLater(limit, self._request_timed_out)

    def _cancel_request_deadline(self) -> None:
        timer, self._request_timer = self._request_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self._refusal is not None or self.transport is None:
            return
        limit = getattr(self.site, "request_timeout", None)
        self.count_refusal("request_timeout")
        self.setTimeout(None)  # the idle timeout has nothing left to do
        if self.isSecure() and not self._handshake_done:
            log.info("closing a connection without a TLS handshake after {limit}s",
                     limit=limit)
            self.transport.abortConnection()
            return
        log.info("closing a connection whose request took over {limit}s", limit=limit)
        self.transport.write(_raw_response(
            b"408 Request Timeout", _error_body(f"request not received within {limit:g}s")
        ))
        self._close_within_abort_timeout()

    def timeoutConnection(self) -> None:
        log.info("closing an idle HTTP connection")
        self.count_refusal("idle_timeout")
        self._cancel_request_deadline()
        if self.isSecure() and not self._handshake_done:
            self.transport.abortConnection()
            return
        self._close_within_abort_timeout()

    def _close_within_abort_timeout(self) -> None:
        """Close gracefully, and abort if the peer still holds on after ``abortTimeout``."""
        if self.abortTimeout is not None:
            # Same attribute as HTTPChannel uses, so its connectionLost cancels the call.
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self._abortingCall = None
        self.transport.abortConnection()


class GuardedSite(server.Site):
    """
    A Site with the body cap and request deadline its channels and requests read (see
    :class:`CappedRequest`, :class:`_Channel`), and ``refusals(reason)`` to count the
    refused connections (None: not counted).  Every JSON-RPC server uses one, and so does
    the metrics listener: no listener of ours is left to twisted.web's idle timeout alone.
    """

    protocol = _Channel
    requestFactory = CappedRequest
    displayTracebacks = False
    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT
    refusals: Callable[[str], None] | None = None


class JSONRPCResource(Resource):
    """The HTTP side of a JSON-RPC server: routing, methods, CORS, envelope, logging."""

    isLeaf = True

    def __init__(
        self, handler: Handler, settings: dict[str, Any], clock: IReactorTime,
        metrics: Any = None,
    ) -> None:
        super().__init__()
        self._handler = handler
        self._metrics = metrics
        self._path = settings["path"].encode("utf-8")
        self._cors = settings.get("cors")
        self._clock = clock

    def render(self, request: server.Request) -> bytes | int:
        """Route one HTTP request (twisted.web entry point)."""
        request.setHeader(b"server", b"epsproxy")
        if request.path != self._path:
            return self._json(request, 404, {"message": "not found"})
        cors_allowed = self._apply_cors(request) if self._cors is not None else False
        method = request.method
        if method == b"OPTIONS" and cors_allowed:
            request.setResponseCode(200)
            return b""
        if method == b"OPTIONS" and self._cors is not None:
            error = JSONRPCError(INVALID_REQUEST, "invalid request: origin not allowed")
            return self._json(request, 403, response_object(None, error=error))
        if method != b"POST":
            allowed = b"POST, OPTIONS" if self._cors is not None else b"POST"
            request.setHeader(b"allow", allowed)
            text = method.decode("latin-1")[:20]
            error = JSONRPCError(
                INVALID_REQUEST, f"invalid request: HTTP method {text} not allowed, use POST"
            )
            return self._json(request, 405, response_object(None, error=error))
        self._call(request)
        return server.NOT_DONE_YET

    def _apply_cors(self, request: server.Request) -> bool:
        """Set the CORS headers (§11.5) if the Origin is allowed; say whether it is."""
        cors = self._cors
        request.setHeader(b"vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin is None:
            return False
        text = origin.decode("latin-1")
        if not any(pattern.search(text) for pattern in cors["allowed_hosts"]):
            return False
        requested = (request.getHeader(b"access-control-request-headers") or b"").decode(
            "latin-1"
        )
        headers = [h.strip().lower() for h in requested.split(",")]
        headers += [h.lower() for h in cors["allowed_headers"]]
        unique = list(dict.fromkeys(h for h in headers if h))
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"access-control-max-age", b"60")
        request.setHeader(b"access-control-allow-headers", ", ".join(unique).encode("latin-1"))
        request.setHeader(
            b"access-control-allow-methods", ", ".join(cors["allowed_methods"]).encode()
        )
        return True

    def _call(self, request: server.Request) -> None:
        started = self._clock.seconds()
        content_type = request.getHeader(b"content-type")
        try:
            call = parse_request(
                None if content_type is None else content_type.decode("latin-1"),
                request.content.read(),
            )
        except JSONRPCError as e:
            self._finish(request, "-", started, response_object(None, error=e))
            return
        address = request.getClientAddress()
        lost: Deferred[None] = Deferred()
        context = CallContext(
            request_id=call.id,
            peer_certificate=tls.peer_certificate(request.channel.transport),
            peer_host=getattr(address, "host", None),
            headers=request.requestHeaders,
            connection_lost=lost,
        )
        gone: list[Failure] = []

        def went_away(failure: Failure) -> None:
            gone.append(failure)
            lost.callback(None)

        request.notifyFinish().addErrback(went_away)
        d = maybeDeferred(self._handler.handle, call.method, call.params, context)

        def answered(result: Any) -> dict[str, Any]:
            return response_object(call.id, result=result)

        def failed(failure: Failure) -> dict[str, Any]:
            if failure.check(JSONRPCError):
                return response_object(call.id, error=failure.value)
            log.failure(
                "JSON-RPC method {method} failed", failure, level=LogLevel.error,
                method=call.method,
            )
            error = JSONRPCError(INTERNAL_ERROR, "internal error")
            return response_object(call.id, error=error)

        d.addCallbacks(answered, failed)
        d.addCallback(
            lambda response: gone or self._finish(request, call.method, started, response)
        )
        d.addErrback(
            lambda f: log.failure("cannot answer a JSON-RPC request", f, level=LogLevel.error)
        )

    def _finish(
        self, request: server.Request, method: str, started: float, response: dict[str, Any]
    ) -> None:
        error = response.get("error")
        try:
            body = _encode(response)
        except (TypeError, ValueError) as e:
            log.error(
                "JSON-RPC method {method} returned a result that is not JSON: {error}",
                method=method, error=str(e),
            )
            error = JSONRPCError(INTERNAL_ERROR, "internal error").as_dict()
            body = _encode({"jsonrpc": "2.0", "error": error, "id": response["id"]})
        outcome = "ok" if error is None else f"error {error['code']}"
        duration = self._clock.seconds() - started
        log.debug(
            "JSON-RPC {method}: {outcome} in {duration:.3f}s",
            method=method, outcome=outcome, duration=duration,
        )
        if self._metrics is not None:
            self._metrics.observe(method, outcome, duration)
        request.write(self._json(request, 200 if error is None else 400, body))
        request.finish()

    @staticmethod
    def _json(request: server.Request, status: int, value: Any) -> bytes:
        """Set status and headers for a JSON body; returns the body to write."""
        body = value if isinstance(value, bytes) else _encode(value)
        request.setResponseCode(status)
        request.setHeader(b"content-type", _JSON)
        request.setHeader(b"content-length", str(len(body)).encode())
        return body


def _access_log_line(timestamp: str, request: server.Request) -> str:
    """twisted.web's combined log line, with the client address cut to its network part."""
    address = getattr(request.getClientAddress(), "host", "-")
    line = http.combinedLogFormatter(timestamp, request)
    return line.replace(f'"{address}"', f'"{ratelimit.truncate_ip(address)}"', 1)


def jsonrpc_site(
    handler: Handler,
    settings: dict[str, Any],
    *,
    reactor: IReactorTime | None = None,
    metrics: Any = None,
    refusals: Callable[[str], None] | None = None,
) -> server.Site:
    """
    A ``Site`` serving ``handler`` at ``settings["path"]`` (validated
    :data:`JSONRPC_SERVER_SETTINGS`), with the body cap, request deadline and idle
    timeout of the settings.  ``reactor`` times requests and idle connections (default:
    the global reactor); ``metrics`` (an :class:`epsproxy.net.metrics.RPCMetrics`) counts and
    times each call, and counts refused connections unless ``refusals`` is given:
    ``refusals(reason)`` is called once per refused connection with one of
    :data:`REFUSAL_REASONS`.  Access log lines never carry a full client address.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor  # type: ignore[assignment]
    resource = JSONRPCResource(handler, settings, reactor, metrics)
    # No form parsing: a JSON-RPC body is never a form, and twisted.web's Content-Type
    # parsing raised out of dataReceived on some bytes (fuzz/, tests/test_fuzz_regressions.py).
    site = GuardedSite(
        resource, timeout=settings["timeout"], reactor=reactor, logFormatter=_access_log_line,
        parsePOSTFormSubmission=False,
    )
    site.max_body_bytes = settings["max_body_bytes"]
    site.request_timeout = settings.get("request_timeout", DEFAULT_REQUEST_TIMEOUT)
    if refusals is None:
        refusals = getattr(metrics, "refused", None)
    site.refusals = refusals
    return site


def listen_jsonrpc(
    reactor: Any, site: server.Site, settings: dict[str, Any]
) -> Deferred[IListeningPort]:
    """
    Listen on ``settings["bind_address"]``, over TLS when ``settings`` has ``tls`` (client
    certificates required unless it says otherwise) and behind ``tcp_rate_limits`` (the
    connections they refuse are counted as ``"rate_limited"`` by the site's
    ``refusals``, if it has any).  The Deferred fails if the address cannot be bound.
    """
    endpoint = tls.listen_endpoint(reactor, settings["bind_address"], settings.get("tls"))
    factory: Any = site
    if settings.get("tcp_rate_limits"):
        def rate_limited(reason: str) -> None:
            count = getattr(site, "refusals", None)
            if count is not None:
                count("rate_limited")

        factory = ratelimit.rate_limited(
            site, settings["tcp_rate_limits"], reactor, on_refused=rate_limited
        )
    return endpoint.listen(factory)


# ------------------------------------------------------------------------------ client


class CappedBody(_Protocol):
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
            self.transport.stopProducing()

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

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(TransportError(f"response body cut off ({reason.value})"))


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


class _QuietClientFactory(_HTTP11ClientFactory):
    """One client connection per request burst: no "Starting factory" line for each."""

    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """A persistent connection pool whose connections do not log their start and stop."""

    _factory = _QuietClientFactory


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """
    The client's connections: what ``Agent`` does by default (TCP, TLS for https) but
    over a CONNECT tunnel when :func:`epsproxy.net.connectproxy.proxy_for` names a proxy.
    """

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, timeout: float,
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
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
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

    def __init__(self, reactor: Any, settings: dict[str, Any]) -> None:
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
        body = _encode({"jsonrpc": "2.0", "method": method, "params": params, "id": request_id})
        try:
            response = await self._http.post(
                self._url,
                data=body,
                headers={b"Content-Type": [b"application/json"],
                         b"Accept": [b"application/json"]},
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
            reply = _first_json_value(data)
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
