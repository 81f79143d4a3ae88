"""
A proxy's client to its own endpoint server, as both proxy modes keep it:

- :class:`TrackedClient` says whether the endpoint server answers (for readiness),
  learnt from the calls the proxy makes anyway (requests for connections, notifications,
  the private proxy's periodic re-announcements), so a readiness probe costs no call;
- :class:`RetiredClients` closes the clients a reload replaced once their calls had
  their time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from epsproxy.net.jsonrpc.client import JSONRPCClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError

__all__ = ["TrackedClient", "RetiredClients"]


class TrackedClient(JSONRPCClient):
    """
    A :class:`JSONRPCClient` to the proxy's own endpoint server that remembers how its
    last finished call went: ``unreachable`` is None after an answer (a JSON-RPC error
    is an answer too: the endpoint server replied) or before any call, else why the
    last call got no answer (no connection, timeout, not JSON-RPC).
    """

    unreachable: str | None = None

    def call(
        self,
        method: str,
        params: dict[str, Any],
        id: str | int | None = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """:meth:`JSONRPCClient.call`, noting whether the endpoint server answered."""
        return super().call(method, params, id=id, timeout=timeout).addBoth(self._seen)

    def _seen(self, result: Any) -> Any:
        if isinstance(result, Failure) and result.check(CancelledError):
            return result  # we gave up (stopping): says nothing about the server
        if isinstance(result, Failure) and not result.check(JSONRPCError):
            self.unreachable = result.getErrorMessage()
        else:
            self.unreachable = None
        return result


class RetiredClients:
    """Clients replaced by a reload, each closed ``grace`` seconds later (or at stop)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._timers: dict[JSONRPCClient, IDelayedCall] = {}

    def retire(self, client: JSONRPCClient, grace: float) -> None:
        """Close ``client`` in ``grace`` seconds: calls in flight may still finish."""

        def close() -> None:
            if self._timers.pop(client, None) is not None:
                client.close()

        self._timers[client] = self.clock.callLater(grace, close)

    async def close_all(self) -> None:
        """Close every retired client now."""
        timers, self._timers = self._timers, {}
        for client, timer in timers.items():
            if timer.active():
                timer.cancel()
            await client.close()
