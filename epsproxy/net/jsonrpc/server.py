"""
The JSON-RPC server (SPEC §11.1, §11.5): a twisted.web resource around a
:class:`~epsproxy.net.jsonrpc.envelope.Handler`, on a guarded site, behind TLS and rate
limits.

- :func:`jsonrpc_site` builds a ``Site`` around anything with a
  ``handle(method, params, context)`` method (usually a
  :class:`~epsproxy.net.jsonrpc.envelope.Dispatcher`); :func:`listen_jsonrpc` starts it
  with TLS (:mod:`epsproxy.net.tls`) and connection rate limits
  (:mod:`epsproxy.net.ratelimit`); :class:`JSONRPCListener` does the same and keeps what
  a settings reload replaces (TLS files, rate limits, timeouts, body and batch caps, CORS).
- :class:`GuardedSite` (with :class:`CappedRequest` and its channel) is the twisted.web
  site every listener of ours uses, the metrics listener too; its access log lines blur
  the client address (:func:`epsproxy.net.hostport.truncate_ip`).
- Every handled request is one ``info`` line with the fields ``caller`` (the client
  certificate's CN or first DNS name, ``-`` without one), ``method``, ``outcome`` and
  ``duration`` (one line per item of a batch, and for notifications too).
- JSON-RPC 2.0 as generic clients speak it (the envelope: the
  :func:`~epsproxy.net.jsonrpc.envelope.parse_body` rules): a
  notification is handled and answered ``204 No Content``; a batch (at most
  ``max_batch`` items) is handled item after item, in order, and answered with an array
  of the replies in request order (200), notifications left out (204 if none is left).
  The items run one after another, as the same requests sent one after another on one
  connection would: a later item sees what an earlier one did, and one connection never
  runs more than one call at a time.  If the client goes away, the items not started
  yet are dropped.

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
- CORS ``Access-Control-Allow-Headers`` is de-duplicated, and ``Vary: Origin`` is sent.

Kept from the reference on purpose: CORS origin patterns are unanchored ``re.search``
patterns (anchor them in the settings, like the dev pattern
``^http(?:s)?://localhost\\:\\d+$``; they are compiled with ``re.ASCII``, closer to Go's
RE2), and the path is compared literally (the reference wrapped it in ``^...$`` as a
regex).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, cast

from cryptography import x509
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from epsproxy.net import admission, ratelimit, tls
from epsproxy.net.hostport import truncate_ip
from epsproxy.net.reactor import IReactor
from epsproxy.net.jsonrpc.envelope import (
    DEFAULT_MAX_BATCH,
    DEFAULT_TIMEOUT,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    BatchItem,
    CallContext,
    Handler,
    JSONRPCError,
    RPCRequest,
    encode_json,
    parse_body,
    response_object,
)
from epsproxy.rules import forms
from epsproxy.rules.certificates import certificate_names
from epsproxy.rules.text import shorten

__all__ = [
    "JSONRPC_SERVER_SETTINGS",
    "CORS_SETTINGS",
    "REFUSAL_REASONS",
    "JSON_CONTENT_TYPE",
    "json_body",
    "CappedRequest",
    "GuardedSite",
    "JSONRPCResource",
    "JSONRPCListener",
    "caller_name",
    "jsonrpc_site",
    "listen_jsonrpc",
]

log = Logger()

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 10.0

CORS_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS")

#: The highest ``max_batch`` a server accepts (the body cap bounds a batch anyway).
MAX_BATCH_LIMIT = 1000


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
        **admission.LISTENER_LIMIT_FIELDS,
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
        "max_batch": forms.Optional(
            forms.Integer(min=1, max=MAX_BATCH_LIMIT), default=DEFAULT_MAX_BATCH,
            doc="most requests in one JSON-RPC batch",
        ),
    },
    strict=True,
)
"""
Settings of a JSON-RPC server (SPEC §11.1 plus ``max_body_bytes``, ``timeout``,
``request_timeout`` and ``max_batch``).
"""


# ------------------------------------------------------------------------------ server

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

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
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + JSON_CONTENT_TYPE
        + b"\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n" + body
    )


def _error_body(message: str) -> bytes:
    """An early refusal's body: a JSON-RPC error object without an id."""
    return encode_json(response_object(None, error=JSONRPCError(INVALID_REQUEST, message)))


def _count_refusal(channel: Any, reason: str) -> None:
    """Count ``reason`` once for ``channel`` (a :class:`_Channel`; others are ignored)."""
    count = getattr(channel, "count_refusal", None)
    if count is not None:
        count(reason)


def json_body(request: server.Request, status: int, value: Any) -> bytes:
    """
    Set ``request``'s status and headers for a JSON body and return the body to write:
    ``value`` itself if it is bytes already, else ``value`` encoded.
    """
    body = value if isinstance(value, bytes) else encode_json(value)
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


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
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)

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
        if self.content is not None:
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
        transport = self.channel.transport
        if transport is not None:
            transport.write(_raw_response(b"413 Content Too Large", self.refusal(limit)))
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
        limit = getattr(getattr(self, "site", None), "request_timeout", None)
        self.count_refusal("request_timeout")
        self.setTimeout(None)  # the idle timeout has nothing left to do
        if self.isSecure() and not self._handshake_done:
            log.info("closing a connection without a TLS handshake after {limit}s",
                     limit=limit)
            self._abort()
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
            self._abort()
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
        self._abort()

    def _abort(self) -> None:
        # Our listeners are TCP, or TLS over TCP: their transports can abort.
        cast(ITCPTransport, self.transport).abortConnection()


class GuardedSite(server.Site):
    """
    A Site with the body cap and request deadline its channels and requests read (see
    :class:`CappedRequest`, :class:`_Channel`), and ``refusals(reason)`` to count the
    refused connections (None: not counted).  Every JSON-RPC server uses one, and so does
    the metrics listener: no listener of ours is left to twisted.web's idle timeout alone.
    """

    protocol = _Channel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 wrapper
    requestFactory = CappedRequest
    displayTracebacks = False
    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT
    refusals: Callable[[str], None] | None = None

    def __init__(self, resource: Resource, *args: Any, **kwargs: Any) -> None:
        # Access log lines never carry a full client address, on every listener.
        kwargs.setdefault("logFormatter", _access_log_line)
        super().__init__(resource, *args, **kwargs)


@dataclass(frozen=True)
class _Peer:
    """Who sent an HTTP request, read once for all the calls it holds."""

    caller: str
    certificate: x509.Certificate | None
    host: str | None


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
        self._max_batch: int = settings.get("max_batch", DEFAULT_MAX_BATCH)
        self._clock = clock

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """Use the CORS rules and batch cap of ``settings`` (validated) from the next request on."""
        self._cors = settings.get("cors")
        self._max_batch = settings.get("max_batch", DEFAULT_MAX_BATCH)

    def render(self, request: server.Request) -> bytes | int:
        """Route one HTTP request (twisted.web entry point)."""
        request.setHeader(b"server", b"epsproxy")
        if request.path != self._path:
            return json_body(request, 404, {"message": "not found"})
        cors_allowed = self._apply_cors(request) if self._cors is not None else False
        method = request.method
        if method == b"OPTIONS" and cors_allowed:
            request.setResponseCode(200)
            return b""
        if method == b"OPTIONS" and self._cors is not None:
            error = JSONRPCError(INVALID_REQUEST, "invalid request: origin not allowed")
            return json_body(request, 403, response_object(None, error=error))
        if method != b"POST":
            allowed = b"POST, OPTIONS" if self._cors is not None else b"POST"
            request.setHeader(b"allow", allowed)
            text = method.decode("latin-1")[:20]
            error = JSONRPCError(
                INVALID_REQUEST, f"invalid request: HTTP method {text} not allowed, use POST"
            )
            return json_body(request, 405, response_object(None, error=error))
        self._call(request)
        return server.NOT_DONE_YET

    def _apply_cors(self, request: server.Request) -> bool:
        """Set the CORS headers (§11.5) if the Origin is allowed; say whether it is."""
        cors = self._cors
        if cors is None:
            return False
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
        # Read now: once the client has gone, the request has no channel any more.
        transport = request.channel.transport
        caller = caller_name(transport)
        content_type = request.getHeader(b"content-type")
        try:
            parsed = parse_body(
                None if content_type is None else content_type.decode("latin-1"),
                b"" if request.content is None else request.content.read(),
                self._max_batch,
            )
        except JSONRPCError as e:
            encoded, _ = self._record(caller, "-", started, response_object(None, error=e))
            self._reply(request, 400, encoded)
            return
        batch = isinstance(parsed, list)
        items: list[BatchItem] = parsed if isinstance(parsed, list) else [parsed]
        address = request.getClientAddress()
        peer = _Peer(caller, tls.peer_certificate(transport), getattr(address, "host", None))
        gone: list[Failure] = []
        waiting: list[Deferred[None]] = []

        def went_away(failure: Failure) -> None:
            gone.append(failure)
            for lost in waiting:
                if not lost.called:
                    lost.callback(None)

        request.notifyFinish().addErrback(went_away)

        async def run() -> None:
            answers: list[tuple[bytes, bool]] = []
            for index, item in enumerate(items):
                if gone:
                    log.info("client went away: {count} JSON-RPC batch items not run",
                             count=len(items) - index)
                    return
                lost: Deferred[None] = Deferred()
                waiting.append(lost)
                answer = await self._run_item(request, peer, item, lost)
                if answer is not None:
                    answers.append(answer)
            if gone:  # nobody is left to read the answer
                return
            if not answers:
                self._reply(request, 204, None)
            elif batch:
                body = b"[" + b",".join(encoded for encoded, _ in answers) + b"]"
                self._reply(request, 200, body)
            else:
                encoded, failed = answers[0]
                self._reply(request, 400 if failed else 200, encoded)

        Deferred.fromCoroutine(run()).addErrback(
            lambda f: log.failure("cannot answer a JSON-RPC request", f, level=LogLevel.error)
        )

    async def _run_item(
        self, request: server.Request, peer: _Peer, item: BatchItem, lost: Deferred[None]
    ) -> tuple[bytes, bool] | None:
        """
        Handle one request (or answer an invalid batch item) and log it; returns the
        encoded response and whether it is an error, or None for a notification.
        """
        started = self._clock.seconds()
        if not isinstance(item, RPCRequest):
            return self._record(peer.caller, "-", started, response_object(None, error=item))
        context = CallContext(
            request_id=item.id,
            peer_certificate=peer.certificate,
            peer_host=peer.host,
            headers=request.requestHeaders,
            connection_lost=lost,
        )
        try:
            result = await maybeDeferred(self._handler.handle, item.method, item.params, context)
            response = response_object(item.id, result=result)
        except JSONRPCError as e:
            response = response_object(item.id, error=e)
        except Exception:
            log.failure(
                "JSON-RPC method {method} failed", Failure(), level=LogLevel.error,
                method=item.method,
            )
            error = JSONRPCError(INTERNAL_ERROR, "internal error")
            response = response_object(item.id, error=error)
        answer = self._record(peer.caller, item.method, started, response, item.notification)
        return None if item.notification else answer

    def _record(
        self, caller: str, method: str, started: float, response: dict[str, Any],
        notification: bool = False,
    ) -> tuple[bytes, bool]:
        """Encode ``response``, log its line and count it; (encoded, is an error)."""
        error = response.get("error")
        try:
            body = encode_json(response)
        except (TypeError, ValueError) as e:
            log.error(
                "JSON-RPC method {method} returned a result that is not JSON: {error}",
                method=method, error=str(e),
            )
            error = JSONRPCError(INTERNAL_ERROR, "internal error").as_dict()
            body = encode_json({"jsonrpc": "2.0", "error": error, "id": response["id"]})
        outcome = "ok" if error is None else f"error {error['code']}"
        duration = self._clock.seconds() - started
        log.info(
            "JSON-RPC {method} from {caller}: {outcome} in {duration:.3f}s",
            method=shorten(method, 100), outcome=outcome, duration=duration,
            caller=caller, notification=notification,
        )
        if self._metrics is not None:
            self._metrics.observe(method, outcome, duration)
        return body, error is not None

    @staticmethod
    def _reply(request: server.Request, status: int, body: bytes | None) -> None:
        """Write the answer: a JSON body, or nothing at all (``None``: 204 No Content)."""
        if body is None:
            request.setResponseCode(status)
        else:
            request.write(json_body(request, status, body))
        request.finish()


def caller_name(transport: Any) -> str:
    """
    The name a request log gives its caller: the client certificate's CN, else its first
    DNS name, else ``-`` (no TLS, or no certificate).
    """
    certificate = tls.peer_certificate(transport)
    if certificate is None:
        return "-"
    names = certificate_names(certificate)
    return shorten(names[0], 100) if names else "-"


def _access_log_line(timestamp: str, request: server.Request) -> str:
    """twisted.web's combined log line, with the client address cut to its network part."""
    address = getattr(request.getClientAddress(), "host", "-")
    line = http.combinedLogFormatter(timestamp, request)
    return line.replace(f'"{address}"', f'"{truncate_ip(address)}"', 1)


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

        reactor = default_reactor
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


class JSONRPCListener:
    """
    The listening side of a JSON-RPC server: ``site`` (from :func:`jsonrpc_site`) on
    ``settings["bind_address"]``, over TLS when ``settings`` has ``tls`` (client
    certificates required unless it says otherwise; failed handshakes logged naming the
    listener ``name``) and behind ``tcp_rate_limits`` (the connections they refuse are
    counted as ``"rate_limited"`` by the site's ``refusals``, if it has any).

    :meth:`reconfigure` applies new settings to the running listener: TLS files, rate
    limits, idle and request timeouts, the body and batch caps and CORS.  The address, the path and
    whether TLS is on are fixed (a restart changes them).
    """

    def __init__(
        self, reactor: IReactor, site: server.Site, settings: dict[str, Any],
        *, name: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.site = site
        self.settings = settings
        # Capped (max_connections*, epsproxy.net.admission): at the cap it stops accepting.
        self.admission = admission.listener_admission(name or settings["bind_address"], settings)
        self.endpoint = tls.listen_endpoint(
            reactor, settings["bind_address"], settings.get("tls"), name=name,
            admission=self.admission)
        self.limiter = ratelimit.RateLimiter(
            settings.get("tcp_rate_limits") or [], reactor, on_refused=self._rate_limited)
        self.port: IListeningPort | None = None

    def _rate_limited(self, reason: str) -> None:
        count = getattr(self.site, "refusals", None)
        if count is not None:
            count("rate_limited")

    def listen(self) -> Deferred[IListeningPort]:
        """Listen; the Deferred fails if the address cannot be bound."""

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return self.endpoint.listen(self.limiter.wrap(self.site)).addCallback(listening)

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """
        Apply ``settings`` (validated :data:`JSONRPC_SERVER_SETTINGS`) to the next
        connections and requests; open connections keep their TLS session.  Raises
        :class:`ValueError` (:class:`epsproxy.net.tls.TLSSettingsError` for unusable TLS
        files) having changed nothing.
        """
        for key in ("bind_address", "path"):
            if settings[key] != self.settings[key]:
                raise ValueError(f"{key}: changing it needs a restart")
        if (settings.get("tls") is None) != (self.settings.get("tls") is None):
            raise ValueError("tls: turning TLS on or off needs a restart")
        limits = ratelimit.TCP_RATE_LIMITS(list(settings.get("tcp_rate_limits") or []))
        options = self.endpoint.options if isinstance(self.endpoint, tls.TLSServerEndpoint) else None
        if isinstance(options, tls.ReloadableServerOptions) and settings.get("tls") is not None:
            options.replace(settings["tls"])  # the one step that can fail: first
        self.limiter.reconfigure(limits)
        admission.reconfigure_from(self.admission, settings)
        site = self.site
        site.timeOut = settings["timeout"]
        if isinstance(site, GuardedSite):
            site.max_body_bytes = settings["max_body_bytes"]
            site.request_timeout = settings.get("request_timeout", DEFAULT_REQUEST_TIMEOUT)
        resource = getattr(site, "resource", None)
        if isinstance(resource, JSONRPCResource):
            resource.reconfigure(settings)
        self.settings = settings


def listen_jsonrpc(
    reactor: IReactor, site: server.Site, settings: dict[str, Any]
) -> Deferred[IListeningPort]:
    """
    Listen on ``settings["bind_address"]``, over TLS when ``settings`` has ``tls`` and
    behind ``tcp_rate_limits`` (see :class:`JSONRPCListener`, which also reloads).  The
    Deferred fails if the address cannot be bound.
    """
    return JSONRPCListener(reactor, site, settings).listen()
