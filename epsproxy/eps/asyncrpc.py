"""
The JSON-RPC-facing parts of asynchronous calls (SPEC §13; docs/protocol.md "Asynchronous
calls"): the error codes and :class:`AsyncCallError`, recognising an acknowledgement
(:func:`is_acknowledgement`), the network form of values (:func:`wrap`, :func:`unwrap`),
checking what services and peers send (:func:`parse_respond` for a service's ``respond``,
:func:`check_result` for a peer's ``_respond``) and :class:`AcknowledgingChannel`, the
callee-side hook on a channel to a local service.  The tables of pending calls on both
ends, and what happens to a result, are :class:`epsproxy.eps.asynccalls.AsyncCalls`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from epsproxy.eps.addresses import Address, AddressError, parse_address
from epsproxy.eps.broker import ClientInfo, Request, Response
from epsproxy.net.jsonrpc.envelope import INVALID_PARAMS, NO_RESULT, JSONRPCError, id_from_internal

if TYPE_CHECKING:
    from epsproxy.eps.asynccalls import AsyncCalls

__all__ = [
    "ACK_KEY",
    "MAX_ID_LENGTH",
    "NOT_FOUND",
    "AMBIGUOUS",
    "BAD_RESULT",
    "DELIVERY_FAILED",
    "AsyncCallError",
    "is_acknowledgement",
    "wrap",
    "unwrap",
    "parse_respond",
    "check_result",
    "AcknowledgingChannel",
]

#: The key that marks a result as an acknowledgement: ``{"_async": true, ...}``.
ACK_KEY = "_async"
#: Longest EPS id accepted in ``respond`` and ``_respond`` (characters).
MAX_ID_LENGTH = 4096
#: Error code: no asynchronous call with this id is waiting (unknown, expired, answered).
NOT_FOUND = 404
#: Error code: several callers wait for the same id and ``respond`` did not say which.
AMBIGUOUS = 409
#: Error code of a malformed ``_respond`` message from a peer.
BAD_RESULT = 400
#: Error code returned to a service when its result could not be passed on (SPEC §12.1).
DELIVERY_FAILED = 1

#: Largest and smallest error code accepted (a Go peer decodes it into an int64).
CODE_RANGE = (-(2**63), 2**63 - 1)
#: Longest id in a log line or an error message (characters) before it is cut short.
LOG_ID_LENGTH = 120


class AsyncCallError(Exception):
    """A ``_respond`` message from a peer is refused; ``code`` and ``message`` say why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"

    def as_dict(self) -> dict[str, Any]:
        """The error object to send back to the peer."""
        return {"code": self.code, "message": self.message}


def is_acknowledgement(response: Response | Any) -> bool:
    """
    Whether ``response`` (a :class:`Response` or a bare result value) acknowledges a call
    that will be answered later: a result object whose ``"_async"`` is ``true``.
    """
    if isinstance(response, Response):
        if response.error is not None:
            return False
        response = response.result
    return isinstance(response, dict) and response.get(ACK_KEY) is True


def wrap(value: Any) -> dict[str, Any]:
    """``value`` as an object for the EPS network: dicts stay, others become ``{"_": v}``."""
    return value if isinstance(value, dict) else {"_": value}


def unwrap(value: Any) -> Any:
    """The inverse of :func:`wrap` when leaving the EPS network: ``{"_": v}`` → ``v``."""
    if isinstance(value, dict) and len(value) == 1 and "_" in value:
        return value["_"]
    return value


def short_id(text: str) -> str:
    """An id cut short enough for a log line or an error message."""
    return text if len(text) <= LOG_ID_LENGTH else text[:LOG_ID_LENGTH] + "…"


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_ID_LENGTH} characters")
    return value


def check_error(error: Any, data_must_be_object: bool) -> dict[str, Any]:
    """An error object ``{code, message, data?}``; unknown keys are dropped."""
    if not isinstance(error, dict):
        raise ValueError(f"error must be an object, not {type(error).__name__}")
    code = error.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        raise ValueError("error.code must be an integer")
    if not CODE_RANGE[0] <= code <= CODE_RANGE[1]:
        raise ValueError("error.code is out of range")
    message = error.get("message")
    if not isinstance(message, str):
        raise ValueError("error.message must be a string")
    checked: dict[str, Any] = {"code": code, "message": message}
    data = error.get("data")
    if data is not None:
        if data_must_be_object and not isinstance(data, dict):
            raise ValueError("error.data must be an object")
        checked["data"] = wrap(data)
    return checked


def network_outcome(result: Any, error: Any) -> dict[str, Any]:
    """``{"result": obj}`` or ``{"error": {...}}`` in network form, from a service's answer."""
    if (result is NO_RESULT) == (error is None):
        raise ValueError("give exactly one of result and error")
    if error is not None:
        return {"error": check_error(error, data_must_be_object=False)}
    return {"result": wrap(result)}


def external_outcome(outcome: dict[str, Any]) -> dict[str, Any]:
    """A network-form outcome as a JSON-RPC client should see it (values unwrapped)."""
    if "error" in outcome:
        error = dict(outcome["error"])
        if "data" in error:
            error["data"] = unwrap(error["data"])
        return {"error": error}
    return {"result": unwrap(outcome["result"])}


def parse_respond(
    params: Any, request_id: str
) -> tuple[str, Any, dict[str, Any] | None, str | None]:
    """
    Read the params of a service's ``respond`` call: ``(eps_id, result, error, caller)``
    where ``result`` is :data:`epsproxy.net.jsonrpc.NO_RESULT` when an error is given.

    The id of the call being answered is ``params.id`` or else the JSON-RPC id of the
    ``respond`` request (``request_id``, internal form).  The JSON-RPC id only counts
    when it is an EPS address, so a service whose client library picks its own ids can
    put the address in ``params.id``; when both are addresses they must agree.
    ``params.client`` (optional) names the caller when several callers wait for the
    same id.  Exactly one of ``params.result`` / ``params.error`` must be present.
    Raises :class:`JSONRPCError` (``INVALID_PARAMS``) with a message saying what is wrong.
    """

    def refuse(message: str) -> JSONRPCError:
        return JSONRPCError(INVALID_PARAMS, f"invalid params: {message}")

    if not isinstance(params, dict):
        raise refuse("params must be an object")
    given = params.get("id")
    if given is not None:
        try:
            given = check_id(given, "params.id")
        except ValueError as e:
            raise refuse(str(e)) from None
    external = id_from_internal(request_id) if isinstance(request_id, str) else None
    outer: str | None = None
    if isinstance(external, str) and external and len(external) <= MAX_ID_LENGTH:
        try:
            parse_address(external)
            outer = external
        except AddressError:
            outer = None
    if given is not None and outer is not None and given != outer:
        raise refuse("params.id and the request id name different calls")
    eps_id = given if given is not None else outer
    if eps_id is None:
        raise refuse(
            "respond needs the id of the call it answers (the id the service received, "
            "operator.method(id)) as the request id or as params.id"
        )
    caller = params.get("client")
    if caller is not None and (not isinstance(caller, str) or not caller
                               or len(caller) > MAX_ID_LENGTH):
        raise refuse("params.client must be a non-empty operator name")
    has_result, has_error = "result" in params, "error" in params
    if has_result == has_error:
        raise refuse("give exactly one of params.result and params.error")
    if has_error:
        try:
            check_error(params["error"], data_must_be_object=False)
        except ValueError as e:
            raise refuse(str(e)) from None
        return eps_id, NO_RESULT, params["error"], caller
    return eps_id, params["result"], None, caller


def check_result(params: Any) -> dict[str, Any]:
    """A peer's ``_respond`` params in checked network form; ValueError says what is wrong."""
    if not isinstance(params, dict):
        raise ValueError("params must be an object")
    check_id(params.get("id"), "id")
    has_result, has_error = "result" in params, "error" in params
    if has_result == has_error:
        raise ValueError("give exactly one of result and error")
    if has_error:
        return {"error": check_error(params["error"], data_must_be_object=True)}
    if not isinstance(params["result"], dict):
        raise ValueError("result must be an object")
    return {"result": params["result"]}


class AcknowledgingChannel:
    """
    A channel to a local service, wrapped so that acknowledgements it returns are noted
    in ``async_calls`` (the callee-side hook).  Wrap only channels to the own services
    (``jsonrpc_client``): an acknowledgement passing through from another operator is
    not ours to note.  Everything else is the wrapped channel's.
    """

    def __init__(self, channel: Any, async_calls: AsyncCalls) -> None:
        self.channel = channel
        self.async_calls = async_calls
        self.name = channel.name
        self.type = channel.type

    def can_deliver_to(self, address: Address) -> bool:
        return self.channel.can_deliver_to(address)

    def deliver(
        self, request: Request, client_info: ClientInfo, address: Address | None = None
    ) -> defer.Deferred[Response | None]:
        d = defer.maybeDeferred(self.channel.deliver, request, client_info, address)

        def noted(response: Any) -> Any:
            if isinstance(response, Response) and is_acknowledgement(response):
                self.async_calls.acknowledged(client_info.name, request.id)
            return response

        return d.addCallback(noted)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)
