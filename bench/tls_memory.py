"""
What one idle TLS connection costs a terminating server of ours (issue 14: the
terminating private proxy's memory per idle connection).

``python -m bench.tls_memory [--connections 1000] [--http]``

A Twisted TLS server in this process, with the server options our terminating private
proxy uses (:func:`epsproxy.net.tls.server_options`, the dev PKI's ``internal-server``
certificate), wrapping a protocol that does nothing (or, with ``--http``, twisted.web's
HTTP channel, as the private proxy does); ``bench.sni_client idle`` in another process
opens ``--connections`` (each a verified handshake with SNI) and holds them, silent,
until the server has finished every handshake and is measured.  Printed per connection: the growth of this process's RSS and of the bytes
malloc holds in use (``mallinfo2``: OpenSSL's, and Python's objects over 512 bytes), then,
in a pass of their own, of the Python objects' bytes (``tracemalloc``).  A 20-connection
warm-up runs first.

To see where OpenSSL's bytes are: ``heaptrack python -m bench.tls_memory --connections
500`` and ``heaptrack_print --print-peaks 1`` on its output (Debian's ``heaptrack``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
import tracemalloc
from typing import Any, Callable

from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from zope.interface import implementer

from epsproxy.net import tls

from .sni_network import CERTS, tls_block

__all__ = ["measure", "main"]

WARMUP = 20
SERVER_NAME = "term.internal-server.local"


class _Tracker:
    """How many connections are open and done with their handshake; waits on either."""

    def __init__(self) -> None:
        self.handshakes = 0
        self.open = 0
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((condition, d))
        self.changed()
        return d

    def changed(self) -> None:
        waiting, self._waiting = self._waiting, []
        for condition, d in waiting:
            if condition():
                d.callback(None)
            else:
                self._waiting.append((condition, d))


@implementer(IHandshakeListener)
class _Silent(Protocol):
    """A connection that does nothing, counted by the factory's tracker."""

    def connectionMade(self) -> None:
        self.factory.tracker.open += 1

    def handshakeCompleted(self) -> None:
        self.factory.tracker.handshakes += 1
        self.factory.tracker.changed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.tracker.open -= 1
        self.factory.tracker.changed()


@implementer(IHandshakeListener)
class _Channel(http.HTTPChannel):
    """twisted.web's HTTP channel, counted by its site's tracker."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.tracker.open += 1

    def handshakeCompleted(self) -> None:
        self.factory.tracker.handshakes += 1
        self.factory.tracker.changed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.tracker.open -= 1
        self.factory.tracker.changed()


def _inner(http_channel: bool, tracker: _Tracker) -> Any:
    """The factory wrapped in TLS: twisted.web's site, or one of silent connections."""
    inner: Any
    if http_channel:
        inner = server.Site(resource.Resource())
        inner.protocol = _Channel
    else:
        inner = Factory.forProtocol(_Silent)
    inner.tracker = tracker
    return inner


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's ``mallinfo2``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _holder(port: int, count: int) -> subprocess.Popen:
    """``bench.sni_client idle``: ``count`` connections held until a line on its stdin."""
    config = {"port": port, "sni": SERVER_NAME, "count": count,
              "cafile": str(CERTS / "root.crt")}
    return subprocess.Popen([sys.executable, "-m", "bench.sni_client", "idle",
                             json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


@defer.inlineCallbacks
def _measure(reactor: Any, count: int, http_channel: bool) -> Any:
    tracker = _Tracker()
    options = tls.server_options(tls_block("internal-server", verify_client=False))
    factory = TLSMemoryBIOFactory(options, False, _inner(http_channel, tracker))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    result: dict[str, Any] = {"connections": count, "ready": True}
    try:
        # The warm-up; then RSS and malloc; then Python's objects alone (tracemalloc's own
        # records are malloc'd: they would count as the connections' otherwise).
        for n, step in ((WARMUP, ""), (count, "native"), (count, "python")):
            rss, in_use = _rss(), _malloc_in_use()
            if step == "python":
                tracemalloc.start()
            done = tracker.handshakes
            holder = _holder(port.getHost().port, n)
            assert holder.stdin is not None and holder.stdout is not None
            line = yield threads.deferToThread(holder.stdout.readline)
            if line.decode().strip() != "ready":
                result["ready"] = False
                holder.kill()
                yield threads.deferToThread(holder.wait, 60)
                break
            # The client is done before the server is: wait for the server's side too.
            yield tracker.until(lambda: tracker.handshakes - done >= n)
            if step == "native":
                result["rss"] = (_rss() - rss) / n
                result["malloc"] = (_malloc_in_use() - in_use) / n
            elif step == "python":
                result["python"] = tracemalloc.get_traced_memory()[0] / n
                tracemalloc.stop()
            holder.stdin.write(b"close\n")
            holder.stdin.flush()
            yield threads.deferToThread(holder.wait, 60)
            # Every connection of this pass gone (and freed) before the next one counts.
            yield tracker.until(lambda: tracker.open == 0)
            gc.collect()  # whatever of theirs waits for the collector, too
    finally:
        yield port.stopListening()
    return result


def measure(count: int = 1000, http_channel: bool = False) -> dict[str, Any]:
    """``{"connections", "ready", "rss", "malloc", "python"}``: bytes per idle connection."""
    found: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        found.update(await _measure(reactor, count, http_channel))

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    return found


def report(result: dict[str, Any], http_channel: bool) -> str:
    """The figures of :func:`measure` in one line."""
    if not result.get("ready"):
        return f"the client could not open {result.get('connections')} connections"
    inner = "twisted.web's HTTP channel" if http_channel else "a protocol that does nothing"
    return (f"{result['connections']:,} idle TLS connections to a Twisted TLS server "
            f"({inner}) with our server options, per connection: RSS "
            f"{result['rss'] / 1024:.1f} KB; malloc in use {result['malloc'] / 1024:.1f} KB "
            f"(OpenSSL's allocations, and Python's objects over 512 bytes); Python's "
            f"objects (tracemalloc, a pass of its own) {result['python'] / 1024:.1f} KB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000,
                        help="idle connections held (default 1000)")
    parser.add_argument("--http", action="store_true",
                        help="wrap twisted.web's HTTP channel, as the private proxy does")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 20_000:
        parser.error("--connections must be from 1 to 20000")
    if not (CERTS / "root.crt").is_file():
        print("the dev PKI is missing: make certs", file=sys.stderr)
        return 1
    result = measure(args.connections, args.http)
    print(report(result, args.http))
    return 0 if result.get("ready") else 1


if __name__ == "__main__":
    sys.exit(main())
