"""
The JSON-RPC 2.0 envelope (SPEC §11.2-§11.4), sans-IO: what a request and a response look
like, the error codes and types, the id conversion, and the dispatcher a server serves.

- :func:`parse_request` / :func:`response_object` are the envelope rules (§11.2, §11.3):
  content type, the request schema, and the id conversion that keeps ids strings inside
  the program while clients get back exactly the id they sent (:func:`id_to_internal`,
  :func:`id_from_internal`, §22.6).  :func:`parse_body` reads what a server receives:
  one request or a batch of them (JSON-RPC 2.0 §6).
- :class:`Dispatcher` is the usual :class:`Handler`: method name → params schema +
  handler (§11.4); :class:`CallContext` is what a handler knows about a call.
- :class:`JSONRPCError` is an error object (raised by handlers, and by the client for
  remote errors); :class:`TransportError` is the client's "no usable response".

Kept from the reference on purpose: only the first JSON value of a body is read (trailing
bytes are ignored).  Where this follows JSON-RPC 2.0 and the reference did not (so that
generic client libraries work): ``params`` may be left out (read as ``{}``), a request
without an ``id`` member is a notification (:attr:`RPCRequest.notification`: the server
answers nothing), and a JSON array is a batch (:func:`parse_body`).

The HTTP server is :mod:`epsproxy.net.jsonrpc.server`, the client
:mod:`epsproxy.net.jsonrpc.client`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

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
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_BATCH",
    "RPCRequest",
    "BatchItem",
    "CallContext",
    "Handler",
    "MethodHandler",
    "Dispatcher",
    "random_id",
    "id_to_internal",
    "id_from_internal",
    "parse_request",
    "read_request",
    "parse_body",
    "response_object",
    "first_json_value",
    "encode_json",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Seconds: a client's whole call, and a server connection's idle time, by default.
DEFAULT_TIMEOUT = 30.0

#: The most requests one batch may hold, by default (a server's ``max_batch``).
DEFAULT_MAX_BATCH = 32


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
        "params": forms.Required(forms.AnyMap()),  # an absent one is {} (read_request)
        "id": forms.Optional(_RequestId()),
    }
)
"""The JSON-RPC request object (lenient: unknown keys are dropped, as in the reference)."""


@dataclass(frozen=True)
class RPCRequest:
    """
    A parsed request; ``id`` is the internal id string (see :func:`id_to_internal`).
    ``notification``: the request had no ``id`` member, so nothing is answered (its id
    is a random one, as for an absent id in the reference).  ``"id": null`` is not a
    notification: it is answered, with a random id.
    """

    method: str
    params: dict[str, Any]
    id: str
    notification: bool = False


BatchItem = RPCRequest | JSONRPCError
"""One item of a batch: a request, or the -32600 error that answers an invalid item."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def first_json_value(body: bytes) -> Any:
    """The first JSON value of ``body`` (UTF-8); raises ValueError if there is none."""
    text = body.decode("utf-8")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        value, _ = _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return value


def _json_body(content_type: str | None, body: bytes) -> Any:
    """The first JSON value of a body sent as JSON; else PARSE_ERROR "JSON required"."""
    if content_type is None or not _CONTENT_TYPE.fullmatch(content_type):
        raise JSONRPCError(PARSE_ERROR, "JSON required")
    try:
        return first_json_value(body)
    except ValueError:  # also UnicodeDecodeError and json.JSONDecodeError
        raise JSONRPCError(PARSE_ERROR, "JSON required") from None


def read_request(value: Any) -> RPCRequest:
    """
    One decoded request object (SPEC §11.2 step 2-3; a missing ``params`` is ``{}``,
    a missing ``id`` makes a notification).  Raises :class:`JSONRPCError`
    (:data:`INVALID_REQUEST`, with the validation error as ``data``) for anything else,
    a value that is not an object included.
    """
    if isinstance(value, dict) and "params" not in value:
        value = {**value, "params": {}}
    try:
        request = REQUEST_SCHEMA.validate(value)
    except forms.FormError as e:
        raise JSONRPCError(INVALID_REQUEST, f"invalid request: {e}", e.as_data()) from None
    return RPCRequest(
        request["method"], request["params"], id_to_internal(request.get("id")),
        notification="id" not in value,
    )


def parse_request(content_type: str | None, body: bytes) -> RPCRequest:
    """
    Read one JSON-RPC request (SPEC §11.2).  Raises :class:`JSONRPCError` with
    :data:`PARSE_ERROR` ("JSON required") for a wrong content type or a body that is not
    a JSON object, and :data:`INVALID_REQUEST` for an object that is not a request.
    """
    value = _json_body(content_type, body)
    if not isinstance(value, dict):
        raise JSONRPCError(PARSE_ERROR, "JSON required")
    return read_request(value)


def parse_body(
    content_type: str | None, body: bytes, max_batch: int = DEFAULT_MAX_BATCH
) -> RPCRequest | list[BatchItem]:
    """
    What a server received: one request (as :func:`parse_request`), or a batch, a JSON
    array of at most ``max_batch`` items, read as a list with, for each item in order,
    its :class:`RPCRequest` or the :class:`JSONRPCError` (:data:`INVALID_REQUEST`) that
    answers it.  Raises :class:`JSONRPCError` for the body as a whole: PARSE_ERROR as
    :func:`parse_request`, INVALID_REQUEST for an invalid single request, an empty batch
    or one over ``max_batch`` (checked before any item is read).
    """
    value = _json_body(content_type, body)
    if isinstance(value, list):
        if not value:
            raise JSONRPCError(INVALID_REQUEST, "invalid request: empty batch")
        if len(value) > max_batch:
            raise JSONRPCError(
                INVALID_REQUEST,
                f"invalid request: a batch of {len(value)} requests, over the limit of "
                f"{max_batch}",
                {"max_batch": max_batch},
            )
        return [_batch_item(item) for item in value]
    if not isinstance(value, dict):
        raise JSONRPCError(PARSE_ERROR, "JSON required")
    return read_request(value)


def _batch_item(value: Any) -> BatchItem:
    try:
        return read_request(value)
    except JSONRPCError as e:
        return e


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


def encode_json(value: Any) -> bytes:
    """``value`` as compact JSON bytes (never NaN or infinities)."""
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
    """
    What a JSON-RPC server (:func:`epsproxy.net.jsonrpc.server.jsonrpc_site`) serves: one
    call in, a result (or a Deferred) out.
    """

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
