"""
A real HAProxy for a test: it listens on a loopback socket the test binds to port 0 and
passes down (``bind fd@3`` in the configuration), runs in the foreground and is killed
at cleanup; what it writes (its log lines with ``log stdout``) is kept.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor

__all__ = ["HAProxy", "accept_proxy_front", "haproxy_binary", "start_haproxy"]


def haproxy_binary() -> str:
    """HAProxy's path; a test that needs it fails (never skips) without it: CI installs it."""
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        raise AssertionError("haproxy is not installed (make os-deps and CI install it)")
    return found


class HAProxy(protocol.ProcessProtocol):
    """The running HAProxy: its listening ``port`` and everything it wrote."""

    def __init__(self) -> None:
        self.output = b""
        self.port = 0
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for item in list(self._waiting):
            if item[0] in self.output:
                self._waiting.remove(item)
                item[1].callback(None)

    errReceived = outReceived

    def wait_for(self, text: bytes) -> defer.Deferred[None]:
        """Fires once ``text`` appears in what HAProxy wrote."""
        if text in self.output:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((text, waiter))
        return waiter

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def accept_proxy_front(server: str) -> str:
    """
    The configuration of an HAProxy that reads a PROXY header (``accept-proxy``) in front
    of ``server`` (``host:port``) and logs, per connection, the client address it was
    given: ``client=<ip>:<port> frontend=...``.
    """
    return ("global\n  log stdout format raw local0\n"
            "defaults\n  mode tcp\n  log global\n  timeout connect 5s\n"
            "  timeout client 10s\n  timeout server 10s\n"
            "frontend internal\n  bind fd@3 accept-proxy\n"
            "  log-format \"client=%ci:%cp frontend=%fi:%fp\"\n"
            "  default_backend server\n"
            f"backend server\n  server internal {server}\n")


def start_haproxy(test: Any, config: str) -> HAProxy:
    """
    Start HAProxy with ``config`` (its frontend binds ``fd@3``: a loopback socket bound
    to port 0 here); killed at the end of ``test``.
    """
    binary = haproxy_binary()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    test.addCleanup(sock.close)
    folder = tempfile.mkdtemp(prefix="test-haproxy-")
    test.addCleanup(shutil.rmtree, folder, True)
    path = os.path.join(folder, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(config)
    haproxy = HAProxy()
    haproxy.port = sock.getsockname()[1]
    process = reactor.spawnProcess(
        haproxy, binary, [binary, "-db", "-f", path], env=dict(os.environ),
        childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno()},
    )

    def stop() -> defer.Deferred[None]:
        if process.pid is not None:
            process.signalProcess("KILL")
        return haproxy.ended

    test.addCleanup(stop)
    return haproxy
