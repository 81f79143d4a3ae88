"""
Channels that deliver requests addressed to the EPS's own operator (SPEC §12.2, §12.3):

- :class:`JSONRPCClientChannel` (``jsonrpc_client``) forwards them to the operator's
  own JSON-RPC service (e.g. the example locations service);
- :class:`StdoutChannel` (``stdout``) prints them and answers nothing.

Better than the reference, on purpose (SPEC §23.2 #18): the method posted to the local
service is the one parsed from the request *id*, the same one the broker authorised (the
broker refuses requests whose ``method`` field disagrees).  Calls have a timeout, and an
optional ``services`` filter limits which of the own directory entry's services this
channel serves.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from epsproxy.directory import entries as _entries
from epsproxy.eps.addresses import Address, AddressError, parse_address
from epsproxy.eps.broker import ClientInfo, Closable, Request, Response
from epsproxy.net.jsonrpc.client import JSONRPCClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError, TransportError
from epsproxy.net.reactor import IReactor

__all__ = [
    "LocalChannelError",
    "LocalServiceUnreachable",
    "JSONRPCClientChannel",
    "StdoutChannel",
]

log = Logger()


class LocalChannelError(Exception):
    """A local channel could not deliver a request."""


class LocalServiceUnreachable(LocalChannelError):
    """The local JSON-RPC service gave no usable answer (down, too slow, garbled)."""


class _OwnEntry(Protocol):
    def own_entry(self) -> dict[str, Any]: ...


def _wrapped(value: Any) -> dict[str, Any]:
    """``value`` as an object: dicts stay as they are, anything else is ``{"_": value}``."""
    return value if isinstance(value, dict) else {"_": value}


class JSONRPCClientChannel(Closable):
    """
    The ``jsonrpc_client`` channel (SPEC §12.2): delivers requests for the own operator
    ``own_name`` to the JSON-RPC service at ``settings["endpoint"]`` (validated
    :data:`epsproxy.net.jsonrpc.JSONRPC_CLIENT_SETTINGS`; its ``timeout`` bounds each call).

    With ``services`` given, only methods of those services (looked up in
    ``directory.own_entry()``) are delivered here; ``directory`` is then required.
    """

    type = "jsonrpc_client"

    def __init__(
        self,
        name: str,
        own_name: str,
        settings: dict[str, Any],
        reactor: IReactor,
        services: frozenset[str] | None = None,
        directory: _OwnEntry | None = None,
    ) -> None:
        if services is not None and directory is None:
            raise LocalChannelError("a services filter needs the directory")
        self.name = name
        self.own_name = own_name
        self.services = services
        self.directory = directory
        self._endpoint = settings["endpoint"]
        self._client = JSONRPCClient(reactor, settings)

    def can_deliver_to(self, address: Address) -> bool:
        """Only the own operator, and only the configured services if there is a filter."""
        if address.operator != self.own_name:
            return False
        if self.services is None:
            return True
        assert self.directory is not None
        service = _entries.service_for(self.directory.own_entry(), address.method)
        return service is not None and service.get("name") in self.services

    def deliver(
        self, request: Request, client_info: ClientInfo, address: Address | None = None
    ) -> defer.Deferred[Response | None]:
        """
        Post the request (method from the broker's ``address``, params as received,
        id = the full EPS id) and convert the answer; fails with
        :class:`LocalServiceUnreachable` when the service gives no usable answer.
        """
        if address is None:  # called directly, not by the broker
            try:
                address = parse_address(request.id)
            except AddressError as e:
                return defer.fail(LocalChannelError(f"cannot deliver: {e}"))
        params = {} if request.params is None else request.params
        d = self._client.call(address.method, params, id=request.id)

        def answered(result: Any) -> Response:
            return Response(id=request.id, result=_wrapped(result))

        def failed(failure: Any) -> Response:
            error = failure.trap(JSONRPCError, TransportError)
            if error is TransportError:
                log.warn("local service at {endpoint} is unreachable: {error}",
                         endpoint=self._endpoint, error=str(failure.value)[:300])
                raise LocalServiceUnreachable(
                    f"local service at {self._endpoint} is unreachable: {failure.value}"
                )
            remote: JSONRPCError = failure.value
            body: dict[str, Any] = {"code": remote.code, "message": remote.message}
            if remote.data is not None:
                body["data"] = _wrapped(remote.data)
            return Response(id=request.id, error=body)

        return d.addCallbacks(answered, failed)

    def push(self, method: str, params: dict[str, Any], id: str) -> defer.Deferred[Any]:
        """Call ``method`` of the local service directly (asynchronous results)."""
        return self._client.call(method, params, id=id)

    def close(self) -> defer.Deferred[None]:
        """Close the pooled connections to the local service."""
        return self._client.close()


class StdoutChannel:
    """
    The ``stdout`` channel (SPEC §12.3): requests for the own operator are printed to
    ``stream`` as indented JSON (keys ``method``, ``params``, ``id``); no answer.
    """

    type = "stdout"

    def __init__(self, name: str, own_name: str, stream: IO[str] | None = None) -> None:
        self.name = name
        self.own_name = own_name
        self._stream = stream

    def can_deliver_to(self, address: Address) -> bool:
        """Only the own operator."""
        return address.operator == self.own_name

    def deliver(
        self, request: Request, client_info: ClientInfo, address: Address | None = None
    ) -> defer.Deferred[Response | None]:
        """Print the request; fires with None."""
        # Looked up per call so a replaced sys.stdout (tests, daemons) is honoured.
        stream = self._stream if self._stream is not None else sys.stdout
        text = json.dumps(
            {"method": request.method, "params": request.params, "id": request.id},
            indent=2, default=str,
        )
        stream.write(text + "\n")
        stream.flush()
        return defer.succeed(None)
