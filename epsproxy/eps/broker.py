"""
The message broker of an EPS (SPEC §9, §10): every request, whether it comes from a
local application or from a remote EPS, passes through :meth:`Broker.deliver`, which
identifies the caller, checks its rights, answers the internal methods (``_ping``,
``_directory``, ``_connectionRequest``) and hands everything else to the first channel
that can deliver it.

Better than the reference, on purpose (SPEC §23.2 #18, #19, §9.3):

- The method that is authorised and the method that is delivered come from one source,
  the address parsed from the request id.  A request whose ``method`` field disagrees
  with that address is refused with an error response (code 400) before anything else
  looks at it, so a peer cannot get ``_ping`` authorised and ``secret`` delivered.
- Loop detection is keyed by (caller, id), not by id alone: two local applications that
  happen to choose the same id no longer collide, while a request that comes back
  through the same caller with the same id is still caught.
- ``params._client`` is always replaced with the caller's entry from our own directory;
  whatever the caller sent under that key is dropped.  The caller's ``params`` dict is
  never modified (a shallow copy gets the ``_client``), and entries are not copied.

Errors come in two kinds, as in the reference: *error responses* (403 permission denied,
400 method/address mismatch, 500 channel error) are :class:`Response` objects that travel
back to the caller like any answer; everything else is a :class:`BrokerError`, which the
calling channel turns into its own wire error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from types import CoroutineType
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.rules import forms
from epsproxy.directory import entries as _entries
from epsproxy.eps.addresses import Address, AddressError, parse_address

__all__ = [
    "PERMISSION_DENIED",
    "CHANNEL_ERROR",
    "INVALID_REQUEST",
    "Request",
    "Response",
    "ClientInfo",
    "BrokerError",
    "Channel",
    "Startable",
    "Closable",
    "Submitter",
    "ConnectionRequestHandler",
    "Directory",
    "Broker",
    "rfc3339nano",
]

log = Logger()

#: Error code of a refused call (SPEC §9.1 ``PermissionDenied``).
PERMISSION_DENIED = 403
#: Error code of a channel that failed to deliver (SPEC §9.1 ``ChannelError``).
CHANNEL_ERROR = 500
#: Error code of a request whose ``method`` field disagrees with its id (§23.2 #18).
INVALID_REQUEST = 400

_INTERNAL_METHODS = ("_ping", "_directory", "_connectionRequest", "_checkpoint")

_DIRECTORY_QUERY = forms.Map(
    {
        "group": forms.Optional(forms.String()),
        "operator": forms.Optional(forms.String()),
        "channels": forms.Optional(forms.StringList()),
    },
    strict=False,
)


@dataclass
class Request:
    """A request inside the EPS network: ``id`` is the return address (SPEC §9.2)."""

    method: str
    params: dict[str, Any] | None
    id: str


@dataclass
class Response:
    """
    An answer: ``result`` is an object or None; ``error`` is ``{code, message, data?}``
    or None (SPEC §9.1).
    """

    id: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass
class ClientInfo:
    """The immediate caller: its operator ``name`` and its directory ``entry`` (§9.3)."""

    name: str
    entry: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The ``_client`` object: ``{"name", "entry"}`` (the entry is not copied)."""
        return {"name": self.name, "entry": self.entry}


class BrokerError(Exception):
    """The broker cannot handle a request; the calling channel turns it into an error."""


class Directory(Protocol):
    """What the broker needs of a directory back-end (SPEC §7)."""

    name: str

    def entries(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    def entry_for(self, name: str) -> dict[str, Any]: ...

    def own_entry(self) -> dict[str, Any]: ...


@runtime_checkable
class Channel(Protocol):
    """
    A channel the broker delivers to (SPEC §12).  ``deliver`` gets the request, its
    caller and the address the broker parsed from the request id (channels never parse
    it again; ``None`` only when a test or tool calls a channel directly); it may return
    a :class:`Response`, None (no answer), or a Deferred of either; a failure becomes a
    500 error response.  A channel that brokers proxy connections (``eps_server``) also
    implements :class:`ConnectionRequestHandler`; one that listens or keeps connections
    implements :class:`Startable`.
    """

    name: str
    type: str

    def can_deliver_to(self, address: Address) -> bool: ...

    def deliver(
        self, request: Request, client_info: ClientInfo, address: Address | None = None
    ) -> defer.Deferred[Response | None]: ...


@runtime_checkable
class Startable(Protocol):
    """A channel with something to start before the node is ready (a listener, links)."""

    def start(self) -> Any:
        """Start; may return a Deferred that fires once started."""

    def stop(self) -> Any:
        """Stop what :meth:`start` started; may return a Deferred."""


@runtime_checkable
class Closable(Protocol):
    """A channel holding resources (connection pools) to release at shutdown."""

    def close(self) -> Any:
        """Release them; may return a Deferred."""


class Submitter(Protocol):
    """Where a channel submits the requests it takes in (the broker, or its Inbox)."""

    def deliver(
        self, request: Request, client_info: ClientInfo | None
    ) -> defer.Deferred[Response | None]: ...


@runtime_checkable
class ConnectionRequestHandler(Protocol):
    """The optional part of a channel that answers ``_connectionRequest`` (§12.6)."""

    def handle_connection_request(
        self, params: dict[str, Any] | None
    ) -> defer.Deferred[Response | None]: ...


def rfc3339nano(seconds: float) -> str:
    """
    ``seconds`` since the epoch as Go's RFC3339Nano in UTC: fraction without trailing
    zeros, none at all for whole seconds, ``Z`` suffix.  Microsecond precision (a float
    holds no more for current dates).
    """
    whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)
    text = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if micros:
        text += "." + f"{micros:06d}".rstrip("0")
    return text + "Z"


def _short(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters for a log line."""
    return text if len(text) <= limit else text[:limit] + "..."


def _normalised(response: Response) -> Response:
    """``response`` with a non-object result or error data wrapped as ``{"_": v}`` (§9.1)."""
    result, error = response.result, response.error
    if result is not None and not isinstance(result, dict):
        response = dataclasses.replace(response, result={"_": result})
    if isinstance(error, dict) and error.get("data") is not None and not isinstance(
        error["data"], dict
    ):
        response = dataclasses.replace(response, error={**error, "data": {"_": error["data"]}})
    return response


class _Call:
    """Bookkeeping of one delivery, for the metric hook and the call's log line."""

    __slots__ = ("caller", "method", "target", "outcome", "reason")

    def __init__(self, caller: str) -> None:
        self.caller = caller
        self.method = ""
        self.target = "-"
        self.outcome = "failed"
        self.reason = ""


#: Outcomes whose log line is a warning: our side failed, not the caller.
_WARN_OUTCOMES = frozenset({"channel_error"})


class Broker:
    """
    Routes requests between channels (SPEC §10).

    ``directory`` answers ``entries``/``entry_for``/``own_entry``; ``channels`` are
    tried in order (at most one per type); ``clock`` gives the time for ``_ping`` and
    the metric hook; ``observe(method, outcome, seconds)``, if given, is called once
    per delivery with the method from the request id (``""`` if it did not parse) and
    one of ``ok``, ``error_response``, ``denied``, ``invalid``, ``channel_error``,
    ``failed``.  ``on_answer(channel, caller, request_id, response)``, if given, sees
    every response a channel gave (the hook that notices asynchronous acknowledgements).
    ``checkpoints(params, caller)``, if given, answers ``_checkpoint`` (checkpoint gossip,
    :mod:`epsproxy.eps.gossip`).

    Every delivery logs one line when it is done (:meth:`_log_call`), with the fields
    ``caller`` (the operator the calling channel identified: the certificate's name for
    a peer, our own name for the gateway), ``method`` (``operator.method`` from the
    request id, ``-`` if it did not parse), ``outcome`` (as above) and ``duration``
    (seconds); a refusal or failure adds ``reason``.
    """

    #: Call lines carry the broker as their ``log_source`` (several nodes in one process).
    _call_log = Logger()

    def __init__(
        self,
        directory: Directory,
        channels: Sequence[Channel],
        clock: IReactorTime,
        version: str = "development",
        observe: Callable[[str, str, float], None] | None = None,
        on_answer: Callable[[Channel, str, str, Response], None] | None = None,
        checkpoints: Callable[[dict[str, Any] | None, str], dict[str, Any]] | None = None,
    ) -> None:
        seen: set[str] = set()
        for channel in channels:
            kind = _entries.canonical_channel_type(channel.type)
            if kind in seen:
                raise BrokerError(f"channel of same type already exists: {channel.type}")
            seen.add(kind)
        self.directory = directory
        self.channels = tuple(channels)
        self.clock = clock
        self.version = version
        self.observe = observe
        self.on_answer = on_answer
        #: Answers ``_checkpoint`` (checkpoint gossip: params and the caller's name).
        self.checkpoints = checkpoints
        self._in_transit: set[tuple[str | None, str]] = set()

    # -- the entry point ----------------------------------------------------------------

    def deliver(
        self, request: Request, client_info: ClientInfo | None
    ) -> defer.Deferred[Response | None]:
        """
        Handle ``request`` from the caller ``client_info`` (SPEC §10, steps 1-11).
        Fires with the response (None if the channel gave none) or fails with
        :class:`BrokerError`.
        """
        result = self.deliver_now(request, client_info)
        if isinstance(result, defer.Deferred):
            return result
        if isinstance(result, Failure):
            return defer.fail(result)
        return defer.succeed(result)

    def deliver_now(
        self, request: Request, client_info: ClientInfo | None
    ) -> Response | None | Failure | defer.Deferred[Response | None]:
        """
        :meth:`deliver` for callers on a hot path: the same work, but an answer that is
        there at once (the channel answered synchronously, or the broker refused) is
        returned as it is, a :class:`Response`, None or a :class:`Failure` of
        :class:`BrokerError`, instead of in an already-fired Deferred.  Otherwise a
        Deferred, as :meth:`deliver` gives.
        """
        started = self.clock.seconds()
        call = _Call("-" if client_info is None else _short(client_info.name))
        if not isinstance(request.id, str):
            return self._finish(
                Failure(BrokerError("error parsing address: invalid ID format")),
                call, started,
            )
        # 1. Loop detection, keyed by (caller, id) (§23.2 #19).
        key = (client_info.name if client_info is not None else None, request.id)
        if key in self._in_transit:
            return self._finish(
                Failure(BrokerError(
                    f"request {request.id[:200]} is already being processed "
                    "(maybe a delivery loop)"
                )),
                call, started,
            )
        self._in_transit.add(key)
        try:
            result = self._deliver(request, client_info, call)
        except BaseException:
            result = Failure()
        if isinstance(result, defer.Deferred):

            def done(result: Any) -> Any:
                self._in_transit.discard(key)
                return self._finish(result, call, started)

            return result.addBoth(done)
        self._in_transit.discard(key)
        return self._finish(result, call, started)

    def _finish(self, result: Any, call: _Call, started: float) -> Any:
        if isinstance(result, Failure):
            call.outcome = "failed"
            call.reason = _short(result.getErrorMessage(), 500)
        duration = self.clock.seconds() - started
        if self.observe is not None:
            try:
                self.observe(call.method, call.outcome, duration)
            except Exception:
                log.failure("broker metric hook failed")
        self._log_call(call, duration)
        return result

    def _log_call(self, call: _Call, duration: float) -> None:
        """The one log line of a delivery (info; a warning when our side failed)."""
        emit = self._call_log.warn if call.outcome in _WARN_OUTCOMES else self._call_log.info
        if call.reason:
            emit("call {method} from {caller}: {outcome} in {duration:.3f}s ({reason})",
                 method=call.target, caller=call.caller, outcome=call.outcome,
                 duration=duration, reason=call.reason)
        else:
            emit("call {method} from {caller}: {outcome} in {duration:.3f}s",
                 method=call.target, caller=call.caller, outcome=call.outcome,
                 duration=duration)

    # -- steps 2-11 ---------------------------------------------------------------------

    def _deliver(
        self, request: Request, client_info: ClientInfo | None, call: _Call
    ) -> Response | None | Failure | defer.Deferred[Response | None]:
        # 2. Client info.
        if client_info is None:
            raise BrokerError("client info missing")
        # 3. Refresh the caller's entry from our own directory (never trust the caller).
        try:
            remote = self.directory.entry_for(client_info.name)
        except Exception as e:
            raise BrokerError(
                f"error retrieving directory entry for client {client_info.name[:200]}: {e}"
            ) from None
        client = ClientInfo(client_info.name, remote)
        # 4. Our own entry.
        try:
            own = self.directory.own_entry()
        except Exception as e:
            raise BrokerError(f"error retrieving own directory entry: {e}") from None
        # 5. Replace _client in a shallow copy of the params.
        params = request.params
        if params is not None:
            if not isinstance(params, dict):
                raise BrokerError("request params must be an object")
            params = dict(params)
            params["_client"] = client.as_json()
            if type(request) is Request:
                request = Request(request.method, params, request.id)
            else:
                request = dataclasses.replace(request, params=params)
        # 6. The address in the id is the one source of operator and method (§23.2 #18).
        try:
            address = parse_address(request.id)
        except AddressError:
            raise BrokerError("error parsing address: invalid ID format") from None
        call.method = address.method
        expected = f"{address.operator}.{address.method}"
        call.target = _short(expected)
        if request.method != expected:
            call.outcome = "invalid"
            call.reason = "method does not match the request id"
            method = request.method if isinstance(request.method, str) else repr(request.method)
            return Response(
                id=request.id,
                error={
                    "code": INVALID_REQUEST,
                    "message": f"method '{method[:200]}' does not match the address "
                    f"'{expected[:200]}' in the request id",
                },
            )
        # 7. The addressed operator must exist.
        try:
            self.directory.entry_for(address.operator)
        except Exception as e:
            raise BrokerError(
                f"error retrieving directory entry for operator {address.operator[:200]}: {e}"
            ) from None
        # 8. Permission, against our own entry; local callers are not checked.
        own_name = own.get("name")
        if own_name != remote.get("name") and not _entries.can_call(
            remote, own, address.method
        ):
            call.outcome = "denied"
            call.reason = "permission denied"
            return Response(
                id=request.id,
                error={
                    "code": PERMISSION_DENIED,
                    "message": f"Permission denied for method '{address.method}' "
                    f"and client '{client.name}'",
                },
            )
        # 9. Internal methods of our own operator.
        if address.operator == own_name and address.method in _INTERNAL_METHODS:
            return self._internal(request, address, own, call)
        # 10. The first channel that can deliver gets the request; no fall-back.
        for channel in self.channels:
            try:
                can = channel.can_deliver_to(address)
            except Exception as e:
                log.failure("channel {channel} failed to check an address",
                            channel=channel.name)
                raise BrokerError(
                    f"channel {channel.name} failed to check the address: {e}"
                ) from None
            if can:
                return self._via_channel(channel, request, address, client, call)
        # 11. Nobody.
        raise BrokerError("no channel can deliver this request")

    def _via_channel(
        self, channel: Channel, request: Request, address: Address, client: ClientInfo,
        call: _Call,
    ) -> Response | None | Failure | defer.Deferred[Response | None]:
        def checked(response: Any) -> Response | None:
            if response is None:
                call.outcome = "ok"
                return None
            if not isinstance(response, Response):
                raise TypeError(f"unexpected answer of type {type(response).__name__}")
            call.outcome = "ok" if response.error is None else "error_response"
            response = _normalised(response)
            if self.on_answer is not None:
                try:
                    self.on_answer(channel, client.name, request.id, response)
                except Exception:
                    log.failure("broker answer hook failed")
            return response

        def failed(failure: Failure) -> Any:  # a Failure, or the 500 Response
            if failure.check(defer.CancelledError):
                return failure
            call.outcome = "channel_error"
            call.reason = _short(f"channel {channel.name} failed to deliver: {failure.value}",
                                 500)
            return Response(
                id=request.id,
                error={
                    "code": CHANNEL_ERROR,
                    "message": f"Channel {channel.name} encountered an error delivering "
                    f"the message: {failure.value}",
                },
            )

        answer: Any
        try:
            answer = channel.deliver(request, client, address)
        except BaseException:
            return failed(Failure())
        if type(answer) is CoroutineType:
            answer = defer.Deferred.fromCoroutine(answer)
        if isinstance(answer, defer.Deferred):
            return answer.addCallback(checked).addErrback(failed)
        # A synchronous answer is checked at once, without a Deferred.
        if isinstance(answer, Failure):
            return failed(answer)
        try:
            return checked(answer)
        except BaseException:
            return failed(Failure())

    # -- internal methods (step 9) ------------------------------------------------------

    def _internal(
        self, request: Request, address: Address, own: dict[str, Any], call: _Call
    ) -> Response | defer.Deferred[Response | None]:
        if address.method == "_connectionRequest":
            d = self._connection_request(request.params)
            return d.addCallback(self._internal_done, call)
        result: dict[str, Any]
        try:
            if address.method == "_ping":
                result = {
                    "version": self.version,
                    "timestamp": rfc3339nano(self.clock.seconds()),
                    "params": request.params,
                    "serverInfo": own,
                }
            elif address.method == "_checkpoint":
                if self.checkpoints is None:
                    raise BrokerError("this endpoint server gossips no checkpoints")
                result = self.checkpoints(request.params, call.caller)
            else:  # _directory
                query = _DIRECTORY_QUERY.validate(
                    {} if request.params is None else request.params
                )
                result = {"entries": self.directory.entries(query)}
        except Exception as e:
            raise BrokerError(f"error handling internal request: {e}") from None
        call.outcome = "ok"
        return Response(id=address.id, result=result)

    @staticmethod
    def _internal_done(response: Response, call: _Call) -> Response:
        call.outcome = "ok" if response.error is None else "error_response"
        return response

    @defer.inlineCallbacks
    def _connection_request(self, params: dict[str, Any] | None) -> Any:
        """Offer ``_connectionRequest`` to each capable channel in order (§12.6)."""
        for channel in self.channels:
            if not isinstance(channel, ConnectionRequestHandler):
                continue
            try:
                response = yield defer.maybeDeferred(channel.handle_connection_request, params)
            except defer.CancelledError:
                raise
            except Exception as e:
                raise BrokerError(f"error handling internal request: {e}") from None
            if response is None:
                continue
            if not isinstance(response, Response):
                raise BrokerError(
                    "error handling internal request: unexpected answer of type "
                    f"{type(response).__name__} from channel {channel.name}"
                )
            return _normalised(response)
        raise BrokerError("error handling internal request: no channel accepted the request")
