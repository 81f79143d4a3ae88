"""
HTTP CONNECT proxies in tests: a real tinyproxy on loopback (the only proof that tunnels
work against a real proxy), and an environment without proxy variables.

tinyproxy comes from Debian (``apt-get install tinyproxy``; CI and ``make os-deps``
install it).  Without it the tests that start one FAIL, on purpose.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

PROXY_VARIABLES = ("https_proxy", "all_proxy", "no_proxy", "http_proxy")


def clean_environment(test: Any, **values: str) -> None:
    """Remove every proxy variable from os.environ, set ``values``; undone after the test."""
    names = [n for v in PROXY_VARIABLES for n in (v, v.upper())] + list(values)
    saved = {name: os.environ.get(name) for name in names}

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    test.addCleanup(restore)
    for name in names:
        os.environ.pop(name, None)
    os.environ.update(values)


class _Process(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int | None] = Deferred()
        self.errors = b""

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


class Tinyproxy:
    """A tinyproxy in the foreground, on 127.0.0.1, logging to a file of its own."""

    def __init__(self, test: TestCase, connect_ports: tuple[int, ...] = ()) -> None:
        self.test = test
        self.connect_ports = connect_ports
        self.directory = Path(tempfile.mkdtemp(prefix="epsproxy-tinyproxy-"))
        test.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.log = self.directory / "tinyproxy.log"
        self.port = 0
        self.mark = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        binary = shutil.which("tinyproxy") or (
            "/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None)
        if binary is None:
            self.test.fail("tinyproxy is not installed: `apt-get install -y tinyproxy`"
                           " (make os-deps and CI install it); the proxy tests need it")
        # tinyproxy cannot listen on port 0 nor take a listening socket (tinyproxy.conf(5)
        # has no such option).  So the port is reserved: a socket with SO_REUSEADDR is
        # bound to 127.0.0.1:0 and NOT listening, which keeps the kernel from handing the
        # port to anyone else, while tinyproxy (which also sets SO_REUSEADDR) can still
        # bind and listen on it.  The reservation is dropped once tinyproxy listens.
        # Should another process listen there first, tinyproxy exits with "Could not
        # create listening sockets" and we retry on a new port.
        for _ in range(5):
            reserve = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reserve.bind(("127.0.0.1", 0))
            try:
                self.port = reserve.getsockname()[1]
                if await self._run(binary):
                    return
            finally:
                reserve.close()
        self.test.fail("tinyproxy could not listen on a free port in 5 attempts")

    async def _run(self, binary: str) -> bool:
        conf = self.directory / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", f'LogFile "{self.log}"',
                 "LogLevel Info", "MaxClients 50", "Timeout 60"]
        lines += [f"ConnectPort {p}" for p in self.connect_ports]
        conf.write_text("\n".join(lines) + "\n")
        self.log.write_text("")
        process = _Process()
        transport = reactor.spawnProcess(process, binary, [binary, "-d", "-c", str(conf)],
                                         env={"PATH": "/usr/bin:/bin"})
        deadline = reactor.seconds() + 10
        while not process.ended.called:
            try:
                probe = await connectProtocol(
                    HostnameEndpoint(reactor, "127.0.0.1", self.port, timeout=1), Protocol())
            except Exception:
                if reactor.seconds() > deadline:
                    transport.signalProcess("KILL")
                    await process.ended
                    self.test.fail(f"tinyproxy did not listen on port {self.port} within 10 s")
                await task.deferLater(reactor, 0.02, lambda: None)
                continue
            probe.transport.loseConnection()
            self.test.addCleanup(self._stop, transport, process)
            self.mark = len(self.log.read_bytes())
            return True
        errors = process.errors.decode(errors="replace")
        if "Could not create listening sockets" in errors:
            return False
        self.test.fail(f"tinyproxy exited ({process.ended.result}): {errors.strip()}"
                       f"\n{self.log.read_text(errors='replace')}")
        return False

    async def _stop(self, transport: Any, process: _Process) -> None:
        if not process.ended.called:
            transport.signalProcess("TERM")
            timer = reactor.callLater(5, lambda: process.ended.called
                                      or transport.signalProcess("KILL"))
            await process.ended
            if timer.active():
                timer.cancel()

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged since it became ready."""
        text = self.log.read_bytes()[self.mark:].decode(errors="replace")
        return [line.split("): ", 1)[1] for line in text.splitlines()
                if "Request (file descriptor" in line]
