"""
Shared test helpers.

Tests are ``twisted.trial`` TestCases so that both ``pytest`` (the README's runner) and
``trial tests`` run them.  Expensive fixtures (a whole dev PKI) are made once per test
process in a temporary folder and removed when the process exits.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults


@functools.lru_cache(maxsize=None)
def _pki_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="epsproxy-test-pki-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def pki(label: str = "main"):
    """
    A complete dev PKI (``epsproxy.dev.pki.create_pki``) for tests, made once per process.

    ``pki()`` is the one the tests trust; ``pki("foreign")`` is an unrelated CA with the
    same names, for "certificate from another CA" refusals.
    """
    return _pki(label)


@functools.lru_cache(maxsize=None)
def _pki(label: str):
    from epsproxy.dev.pki import create_pki

    base = _pki_root() / label
    return create_pki(base / "certs", directory_dir=base / "directory")


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
