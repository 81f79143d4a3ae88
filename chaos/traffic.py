"""
Steady traffic for the chaos run: paced streams of calls whose answers are checked.

A :class:`Stream` calls one function ``rate`` times a second from a small pool of worker
threads (each keeps its own connection, see :class:`GatewayClient`); a tick that finds
every worker busy is counted as ``skipped`` rather than queued, so an outage does not
build a backlog that would later look like a storm.  Every call ends in one
:class:`Outcome` (ok, or the error text), kept in order of completion; the fault code
reads them by time window.

This is plain threads and the standard library (like :mod:`epsproxy.dev.demo`): it must keep
running while the processes it talks to die.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "CallFailed",
    "GatewayClient",
    "Outcome",
    "Stream",
    "Traffic",
    "client_context",
    "https_get",
]


class CallFailed(Exception):
    """A call got an answer, but not the expected one (the text says what came back)."""


@dataclass(frozen=True)
class Outcome:
    """One call: when it started and ended (monotonic seconds), and its error if any."""

    stream: str
    start: float
    end: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def client_context(certs: Path, name: str | None) -> ssl.SSLContext:
    """A TLS client context trusting the dev root, presenting ``name``'s certificate if given."""
    context = ssl.create_default_context(cafile=str(certs / "root.crt"))
    if name:
        context.load_cert_chain(str(certs / f"{name}.crt"), str(certs / f"{name}.key"))
    return context


class _Resolved(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 checking the certificate for ``host`` (curl's --resolve)."""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class GatewayClient:
    """
    JSON-RPC over HTTPS to one server (e.g. hd-1's gateway), one keep-alive connection per
    thread; a connection that failed is dropped and the next call dials again.  With
    ``keepalive=False`` every call has a fresh connection (for callers that may be idle
    longer than the server keeps a connection open).
    """

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext,
                 timeout: float = 5.0, keepalive: bool = True) -> None:
        self.port = port
        self.server_name = server_name
        self.context = context
        self.timeout = timeout
        self.keepalive = keepalive
        self._local = threading.local()
        self._ids = 0

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """The call's result; raises :class:`CallFailed` for a JSON-RPC error, OSError etc."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = _Resolved(self.server_name, self.port, context=self.context,
                                   timeout=self.timeout)
            self._local.connection = connection
        self._ids += 1
        body = json.dumps({"jsonrpc": "2.0", "id": self._ids, "method": method,
                           "params": params})
        try:
            connection.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            if response.will_close or not self.keepalive:
                connection.close()
                self._local.connection = None
        except BaseException:
            connection.close()
            self._local.connection = None
            raise
        reply = json.loads(data)
        if "error" in reply:
            error = reply["error"]
            raise CallFailed(f"error {error.get('code')}: {error.get('message')}")
        return reply.get("result")


def https_get(host: str, port: int, path: str, context: ssl.SSLContext,
              timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a fresh TLS connection to 127.0.0.1:port, verifying ``host``."""
    connection = _Resolved(host, port, context=context, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, CallFailed):
        return str(e)
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:160]


@dataclass
class Stream:
    """``call`` made ``rate`` times a second by at most ``workers`` threads at once."""

    name: str
    rate: float
    call: Callable[[int], None]
    workers: int = 16
    skipped: int = 0
    sent: int = 0
    _busy: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)


class Traffic:
    """Runs :class:`Stream`\\ s until :meth:`stop`; :attr:`outcomes` holds every call."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.outcomes: list[Outcome] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._semaphores: dict[str, threading.Semaphore] = {}

    def start(self) -> None:
        for stream in self.streams:
            work: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            for index in range(stream.workers):
                worker = threading.Thread(target=self._work, args=(stream, work), daemon=True,
                                          name=f"chaos-{stream.name}-{index}")
                worker.start()
            thread = threading.Thread(target=self._tick, args=(stream, work), daemon=True,
                                      name=f"chaos-{stream.name}")
            thread.start()
            self._threads.append(thread)

    def stop(self, wait: float = 10.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        # Let calls in flight finish (each has its own timeout).
        while time.monotonic() < deadline and any(s._busy for s in self.streams):
            time.sleep(0.05)

    def _tick(self, stream: Stream, work: queue.SimpleQueue[int | None]) -> None:
        interval = 1.0 / stream.rate
        next_at = time.monotonic()
        sequence = 0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now < next_at:
                self._stopping.wait(next_at - now)
                continue
            next_at += interval
            if next_at < now - 1:  # fell far behind (a stalled machine): do not burst
                next_at = now
            with stream._lock:
                if stream._busy >= stream.workers:
                    stream.skipped += 1
                    continue
                stream._busy += 1
                stream.sent += 1
            sequence += 1
            work.put(sequence)
        for _ in range(stream.workers):
            work.put(None)

    def _work(self, stream: Stream, work: queue.SimpleQueue[int | None]) -> None:
        """One worker thread of ``stream`` (keeps its connections between calls)."""
        while True:
            sequence = work.get()
            if sequence is None:
                return
            start = time.monotonic()
            error = None
            try:
                stream.call(sequence)
            except Exception as e:  # every failure is an outcome, never a crash of the run
                error = _describe(e)
            finally:
                with stream._lock:
                    stream._busy -= 1
            self.outcomes.append(Outcome(stream.name, start, time.monotonic(), error))

    def window(self, start: float, end: float, stream: str | None = None) -> list[Outcome]:
        """Outcomes of calls that started in [start, end), of ``stream`` if given."""
        return [o for o in list(self.outcomes)
                if start <= o.start < end and (stream is None or o.stream == stream)]
