"""
The gateway of an EPS: the ``jsonrpc_server`` channel (SPEC §12.1), where the own
operator's applications send JSON-RPC calls into the EPS network.

Each call ``{"method": "<operator>.<method>", "params", "id"}`` becomes an EPS request
whose id is the return address ``"<operator>.<method>(<id>)"`` and goes to the broker,
with the own operator as the caller (a TLS client certificate only admits the
connection).  The broker's answer goes back as a JSON-RPC reply with the caller's
original id: errors of the broker as code ``1``, no answer as ``{"message":
"submitted"}``, results and error data unwrapped from ``{"_": v}``.

Asynchronous calls (docs/protocol.md "Asynchronous calls"): a result that is an
acknowledgement (``"_async": true``) is registered with :class:`AsyncCalls` so the later
result is accepted; with the header ``Prefer: wait=N`` (RFC 7240) the application's
request is held up to N seconds (at most ``async_wait_max``) and answered with the real
result if it comes in time.  The method ``respond`` (no operator) is how a local service
answers a call it acknowledged.

Better than the reference: a method name or id that cannot make a valid address is
refused as an invalid request (400) instead of failing later in the broker, failures
never reach the caller as tracebacks, and :meth:`JSONRPCServerChannel.stop` also closes
the open HTTP connections.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.rules import forms
from epsproxy.eps.addresses import AddressError, make_address, split_method
from epsproxy.eps.asynccalls import AsyncCalls
from epsproxy.eps.asyncrpc import is_acknowledgement, parse_respond, unwrap
from epsproxy.eps.broker import ClientInfo, Request, Response, Startable, Submitter
from epsproxy.net.jsonrpc.envelope import METHOD_NOT_FOUND, CallContext, JSONRPCError
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, JSONRPCListener, jsonrpc_site
from epsproxy.net.reactor import IReactor

__all__ = [
    "GATEWAY_SETTINGS",
    "BROKER_ERROR",
    "INVALID_REQUEST",
    "RESPOND",
    "GatewayError",
    "prefer_wait",
    "JSONRPCServerChannel",
]

log = Logger()

#: JSON-RPC error code of a request the broker could not handle (SPEC §12.1).
BROKER_ERROR = 1
#: JSON-RPC error code of a request that cannot become an EPS request (SPEC §12.1).
INVALID_REQUEST = 400
#: The method a local service calls to answer an acknowledged call.
RESPOND = "respond"
#: Seconds to wait for connections to close gracefully in ``stop`` before aborting them.
CLOSE_GRACE = 2.0

GATEWAY_SETTINGS = forms.Map(
    {
        **JSONRPC_SERVER_SETTINGS.fields,
        "async_wait_max": forms.Optional(
            forms.Float(min=0, max=3600), default=300.0,
            doc="longest wait (seconds) an application may ask for with Prefer: wait=N",
        ),
    },
    strict=True,
)
"""Settings of the ``jsonrpc_server`` channel: a JSON-RPC server's plus ``async_wait_max``."""


class GatewayError(Exception):
    """The gateway was asked to do something it never does (deliver a request)."""


class _Directory(Protocol):
    def own_entry(self) -> dict[str, Any]: ...


_WAIT = re.compile(r"\s*wait\s*=\s*\"?([0-9]{1,10})\"?\s*", re.IGNORECASE)


def prefer_wait(headers: Any, limit: float) -> float:
    """
    The ``wait`` preference of a request's ``Prefer`` headers (RFC 7240), in seconds,
    capped at ``limit``; 0 when there is none or it is malformed.  ``headers`` is a
    twisted ``Headers`` (or None).
    """
    if headers is None:
        return 0.0
    values = headers.getRawHeaders(b"prefer") or []
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        for preference in text.split(","):
            token = preference.split(";", 1)[0]
            match = _WAIT.fullmatch(token)
            if match:
                return float(min(int(match[1]), limit))
    return 0.0


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class JSONRPCServerChannel(Startable):
    """
    The ``jsonrpc_server`` channel (SPEC §12.1).

    ``settings`` are validated :data:`GATEWAY_SETTINGS`; ``broker`` is where requests are
    submitted (the node's :class:`~epsproxy.eps.inbox.Inbox`, opened once the broker
    exists; None refuses every call); ``directory`` gives the own entry (the caller info
    of every call); ``async_calls``, if given, enables acknowledgements, ``Prefer: wait``
    and ``respond``; ``metrics`` (an :class:`epsproxy.net.metrics.RPCMetrics`) counts the
    calls; ``refusals(reason)``, if given, counts the refused HTTP connections (see
    :func:`epsproxy.net.jsonrpc.server.jsonrpc_site`).
    """

    type = "jsonrpc_server"

    def __init__(
        self,
        name: str,
        own_name: str,
        settings: dict[str, Any],
        broker: Submitter | None,
        directory: _Directory,
        reactor: IReactor,
        async_calls: AsyncCalls | None = None,
        metrics: Any = None,
        refusals: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.own_name = own_name
        self.settings = settings
        self.broker = broker
        self.directory = directory
        self.reactor = reactor
        self.async_calls = async_calls
        self.metrics = metrics
        self.refusals = refusals
        self.port: IListeningPort | None = None
        self.listener: JSONRPCListener | None = None
        self._connections: dict[Any, defer.Deferred[None]] = {}

    # -- the channel interface (never a delivery target) --------------------------------

    def can_deliver_to(self, address: Any) -> bool:
        """Never: the gateway only takes requests in."""
        return False

    def deliver(self, request: Request, client_info: ClientInfo,
                address: Any = None) -> defer.Deferred[Any]:
        """Never called (see :meth:`can_deliver_to`); fails."""
        return defer.fail(GatewayError("the jsonrpc_server channel delivers nothing"))

    # -- listening -----------------------------------------------------------------------

    def start(self) -> defer.Deferred[IListeningPort]:
        """Listen on ``settings["bind_address"]``; fires with the port."""
        site = jsonrpc_site(self, self.settings, reactor=self.reactor, metrics=self.metrics,
                            refusals=self.refusals)
        site.noisy = False
        connections = self._connections
        base = site.protocol

        # The site's protocol class is only known at run time.
        class _Tracked(base):  # type: ignore[misc, valid-type]  # a variable as base
            """The site's HTTP channel, remembered while open so ``stop`` can close it."""

            def connectionMade(self) -> None:
                connections[self] = defer.Deferred()
                super().connectionMade()

            def connectionLost(self, reason: Failure) -> None:
                try:
                    super().connectionLost(reason)
                finally:
                    lost = connections.pop(self, None)
                    if lost is not None:
                        lost.callback(None)

        site.protocol = _Tracked  # type: ignore[method-assign]  # Site builds its protocol class

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            host = port.getHost()
            log.info("gateway {name} listening on {host}:{port}",
                     name=self.name, host=getattr(host, "host", "?"),
                     port=getattr(host, "port", "?"))
            return port

        self.listener = JSONRPCListener(self.reactor, site, self.settings,
                                        name=f"channels[{self.name}]")
        return self.listener.listen().addCallback(listening)

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """
        Use ``settings`` (validated :data:`GATEWAY_SETTINGS`, same address and path) for
        the next connections and requests: TLS files, rate limits, timeouts, body cap,
        CORS and ``async_wait_max``.  Raises :class:`ValueError` having changed nothing.
        """
        if self.listener is not None:
            self.listener.reconfigure(settings)
        self.settings = settings

    def stop(self) -> defer.Deferred[None]:
        """
        Stop listening and close the open connections: idle ones gracefully (aborted
        after :data:`CLOSE_GRACE` seconds), ones with a request in progress at once.
        """
        port, self.port = self.port, None
        stopped: defer.Deferred[Any] | None = (
            None if port is None else defer.maybeDeferred(port.stopListening))
        pending = list(self._connections.items())
        for protocol, _ in pending:
            if getattr(protocol, "requests", None):
                # A request is in progress (maybe waiting for an asynchronous result):
                # a graceful close would wait for it, so cut it off.
                protocol.transport.abortConnection()
            else:
                protocol.transport.loseConnection()
        waits: list[defer.Deferred[Any]] = [lost for _, lost in pending]
        timer = None
        if pending:
            def abort() -> None:
                for protocol, lost in pending:
                    if not lost.called:
                        protocol.transport.abortConnection()

            timer = self.reactor.callLater(CLOSE_GRACE, abort)
        if stopped is not None:
            waits.append(stopped)

        def done(_: Any) -> None:
            if timer is not None and timer.active():
                timer.cancel()

        return defer.gatherResults(waits, consumeErrors=True).addCallback(done)

    # -- calls -----------------------------------------------------------------------------

    def handle(self, method: str, params: dict[str, Any], context: CallContext) -> Any:
        """One JSON-RPC call from a local application (see the module docstring)."""
        if method == RESPOND:
            return self._respond(params, context)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise JSONRPCError(INVALID_REQUEST, "invalid request: params must be an object")
        try:
            operator, name = split_method(method)
            eps_id = make_address(operator, name, context.request_id)
        except AddressError as e:
            log.debug("gateway refused method {method}: {reason}",
                      method=_short(str(method)), reason=str(e))
            raise JSONRPCError(INVALID_REQUEST, f"invalid request: {e}") from None
        broker = self.broker
        if broker is None:
            raise JSONRPCError(BROKER_ERROR, "the EPS is not ready (no broker)", {})
        started = self.reactor.seconds()
        try:
            caller = ClientInfo(self.own_name, self.directory.own_entry())
        except Exception as e:
            log.warn("gateway cannot read the own directory entry: {error}", error=str(e))
            raise JSONRPCError(BROKER_ERROR, f"error retrieving own directory entry: {e}",
                               {}) from None
        d = defer.maybeDeferred(broker.deliver, Request(method, params, eps_id), caller)

        def answered(response: Response | None) -> Any:
            return self._answer(response, operator, eps_id, context)

        def failed(failure: Failure) -> Failure:
            if failure.check(JSONRPCError):
                return failure
            log.debug("gateway call {eps_id}: broker error {error}",
                      eps_id=_short(eps_id), error=str(failure.value)[:300])
            return Failure(JSONRPCError(BROKER_ERROR, str(failure.value), {}))

        def logged(result: Any) -> Any:
            outcome = (
                f"error {result.value.code}" if isinstance(result, Failure)
                and isinstance(result.value, JSONRPCError) else "ok"
            )
            log.debug("gateway call {method} as {eps_id}: {outcome} in {duration:.3f}s",
                      method=_short(method), eps_id=_short(eps_id), outcome=outcome,
                      duration=self.reactor.seconds() - started)
            return result

        return d.addCallbacks(answered, failed).addBoth(logged)

    def _answer(
        self, response: Response | None, operator: str, eps_id: str, context: CallContext
    ) -> Any:
        if response is None:
            return {"message": "submitted"}
        if not isinstance(response, Response):
            raise JSONRPCError(BROKER_ERROR, "unexpected answer from the broker", {})
        if response.error is not None:
            raise self._error(response.error)
        result = response.result
        if self.async_calls is not None and is_acknowledgement(response):
            self.async_calls.expect(operator, eps_id, context.request_id)
            seconds = prefer_wait(context.headers, self.settings["async_wait_max"])
            if seconds > 0:
                return self._wait(operator, eps_id, seconds, result, context)
        return unwrap(result)

    @staticmethod
    def _error(error: Any) -> JSONRPCError:
        if not isinstance(error, dict):
            return JSONRPCError(BROKER_ERROR, "malformed error response", {})
        code = error.get("code")
        if isinstance(code, bool) or not isinstance(code, int):
            code = BROKER_ERROR
        message = error.get("message")
        if not isinstance(message, str):
            message = str(message)
        data = error.get("data")
        return JSONRPCError(code, message, None if data is None else unwrap(data))

    def _wait(
        self, operator: str, eps_id: str, seconds: float, ack: Any, context: CallContext
    ) -> defer.Deferred[Any]:
        """Hold the request until the result comes, or answer the acknowledgement."""
        assert self.async_calls is not None
        waiting = self.async_calls.wait(operator, eps_id, seconds)
        lost = context.connection_lost
        if lost is not None:
            lost.addCallback(lambda _: waiting.cancel())

        def arrived(outcome: dict[str, Any] | None) -> Any:
            if outcome is None:
                return unwrap(ack)
            if "error" in outcome:
                error = outcome["error"]
                raise JSONRPCError(error["code"], error["message"], error.get("data"))
            return outcome["result"]

        def gone(failure: Failure) -> Any:
            failure.trap(defer.CancelledError)
            return unwrap(ack)  # nobody reads it: the connection is gone

        return waiting.addCallbacks(arrived, gone)

    def _respond(self, params: Any, context: CallContext) -> defer.Deferred[Any]:
        """A local service answers a call it acknowledged earlier."""
        if self.async_calls is None:
            raise JSONRPCError(METHOD_NOT_FOUND, "asynchronous calls are not enabled")
        eps_id, result, error, caller = parse_respond(params, context.request_id)
        log.debug("respond for {eps_id}", eps_id=_short(eps_id))
        return self.async_calls.respond(eps_id, result, error, caller=caller)
