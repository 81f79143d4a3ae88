"""
A real ``redis-server`` for tests, started on a free loopback port and stopped afterwards.

Readiness is detected by polling with ``PING`` through the reactor (a bounded number of
tries, a short pause between them), never by a fixed sleep.  If the port chosen turns out
to be taken by the time Redis binds it, another one is tried.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class RedisServerError(Exception):
    """redis-server is missing, did not start, or did not answer PING in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exited = False

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exited = True
        self.ended.callback(None)


class _Ping(protocol.Protocol):
    def __init__(self) -> None:
        self.answer: defer.Deferred[bytes] = defer.Deferred()
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n" in self.buffer and not self.answer.called:
            self.answer.callback(self.buffer.split(b"\r\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


class RedisServer:
    """
    One ``redis-server`` process.

    ``port`` fixes the port (to restart a server where clients expect it), otherwise a
    free one is chosen.  ``extra_args`` are appended to the command line
    (``["--requirepass", "x"]``).
    ``appendonly=True`` turns on the append-only file with ``appendfsync always`` (for tests
    that restart Redis and expect the data back); pass the same ``directory`` to a second
    RedisServer to start it on the first one's data.
    """

    executable = "redis-server"
    ping_tries = 200
    ping_interval = 0.025  # seconds between PING tries: at most ~5 s in all
    port_tries = 3

    def __init__(
        self,
        reactor: Any = None,
        *,
        appendonly: bool = False,
        directory: Path | None = None,
        extra_args: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="epsproxy-redis-"))
        self.port = port
        self._fixed_port = bool(port)
        self._process: _Process | None = None
        self._transport: Any = None

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"`` for the store settings."""
        return f"127.0.0.1:{self.port}"

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start the server; fires once it answers PING."""
        path = shutil.which(self.executable)
        if path is None:
            raise RedisServerError(
                "redis-server is not installed (apt-get install redis-server); the store"
                " tests need a real one"
            )
        last_output = b""
        for _ in range(1 if self._fixed_port else self.port_tries):
            if not self._fixed_port:
                self.port = _free_port()
            self._process = _Process()
            args = [
                path,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--dir", str(self.directory),
                "--appendonly", "yes" if self.appendonly else "no",
            ]
            if self.appendonly:
                args += ["--appendfsync", "always"]
            args += self.extra_args
            self._transport = self.reactor.spawnProcess(
                self._process, path, args, env=dict(os.environ)
            )
            ready = yield self._wait_ready()
            if ready:
                return self
            last_output = self._process.output
            if b"in use" not in last_output:
                break
        yield self.kill()
        raise RedisServerError(
            f"redis-server did not start: {last_output.decode(errors='replace')[-2000:]}"
        )

    @defer.inlineCallbacks
    def _wait_ready(self) -> Any:
        assert self._process is not None
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=1)
        for _ in range(self.ping_tries):
            if self._process.exited:
                return False
            try:
                ping = _Ping()
                yield connectProtocol(endpoint, ping)
                answer = yield ping.answer
                # a server started with --requirepass answers -NOAUTH: up all the same
                if answer == b"+PONG" or answer.startswith(b"-NOAUTH"):
                    return True
            except Exception:
                pass
            yield task.deferLater(self.reactor, self.ping_interval, lambda: None)
        return False

    def _signal(self, name: str) -> defer.Deferred[None]:
        process = self._process
        if process is None or process.exited:
            return defer.succeed(None)
        try:
            self._transport.signalProcess(name)
        except Exception:
            pass  # already gone
        return process.ended

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM and wait for the process to exit (Redis flushes its AOF first)."""
        yield self._signal("TERM")

    @defer.inlineCallbacks
    def kill(self) -> Any:
        """SIGKILL and wait for the process to exit."""
        yield self._signal("KILL")

    @defer.inlineCallbacks
    def cleanup(self) -> Any:
        """Kill the server if it still runs and remove a directory this object made."""
        yield self.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["RedisServer", "RedisServerError"]
