"""Tracking the server side of real loopback connections, so tests can wait and clean up."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults


class ConnectionTracker:
    """
    The server-side connections a factory builds, so a test can wait for the server to
    see a disconnect and abort whatever is still open at cleanup (trial's reactor must be
    clean).  ``transports[i]`` is the transport of the connection whose end fires
    ``closed[i]``.
    """

    def __init__(self) -> None:
        self.transports: list[Any] = []
        self.closed: list[Deferred[None]] = []

    def track(self, factory: Any) -> Any:
        """Make ``factory`` record each protocol it builds; returns ``factory``."""
        build = factory.buildProtocol

        def tracked(addr: Any) -> Any:
            protocol = build(addr)
            if protocol is None:
                return None
            lost: Deferred[None] = Deferred()
            made, gone = protocol.makeConnection, protocol.connectionLost

            def makeConnection(transport: Any) -> None:
                self.transports.append(transport)
                made(transport)

            def connectionLost(reason: Any) -> None:
                gone(reason)
                lost.callback(None)

            protocol.makeConnection, protocol.connectionLost = makeConnection, connectionLost
            self.closed.append(lost)
            return protocol

        factory.buildProtocol = tracked
        return factory

    def close_all(self) -> Deferred[Any]:
        """Abort the connections still open; fires once every tracked one has ended."""
        for transport, lost in zip(self.transports, self.closed):
            if not lost.called:
                transport.abortConnection()
        return gatherResults(self.closed)
