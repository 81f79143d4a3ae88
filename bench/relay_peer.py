"""
The load generators of the relay benchmark (:mod:`bench.relay`): plain blocking or
``selectors`` sockets, no framework, so that the generator costs far less CPU per byte and
per pair than any relay it measures.

``python -m bench.relay_peer ROLE CONFIG_JSON``, ROLE one of:

- ``sink``: receives streams and discards them.  Either listens on ``config["listen"]``
  and accepts ``config["count"]`` connections (a forwarding relay, or a direct
  connection, dials it), or dials ``config["port"]`` once per entry of
  ``config["streams"]`` and presents that entry's handshake (a token relay).  Prints
  ``ready`` when the source may start; reads with ``recv_into`` a preallocated buffer,
  at most ``config["rate"]`` bytes/s per stream when that is set, until every stream
  ends; prints its JSON: bytes per stream, seconds from the first byte to the last end,
  its own CPU seconds.
- ``source``: dials ``config["port"]`` once per entry of ``config["streams"]``, presents
  the handshake, then writes ``config["bytes"]`` bytes on each from one preallocated
  chunk (a ``memoryview``, no copies), shuts its write side and waits for the relay to
  close; prints its JSON.
- ``pairs``: the pairing rate: keeps ``config["in_flight"]`` pairs in progress for
  ``config["seconds"]`` (after ``config["warmup"]``); a pair is two connections that
  present the same token, one byte from the first arriving at the second (so the pair
  is really spliced), and both closed.  Prints its JSON.
- ``idle``: opens ``config["pairs"]`` spliced pairs the same way (or, for a forwarding
  relay, through ``config["listen"]``), leaves them idle, prints ``ready``, closes them
  all when a line arrives on stdin and prints ``closed``.

A handshake is ``{"hello": hex, "expect": hex}``: bytes written right after connecting,
and bytes the relay must answer before the stream is usable (the transit relay's
``ok\\n``).  The kinds of relay (``config["kind"]``): ``forward`` (no handshake),
``ours`` (the 32 raw token bytes, tokens from the relay's control port) and ``transit``
(``please relay TOKEN for side SIDE\\n``, answer ``ok\\n``).
"""

from __future__ import annotations

import base64
import json
import os
import resource
import secrets
import select
import selectors
import socket
import sys
import time
from typing import Any, Callable

from .common import cpu_seconds

__all__ = ["ControlClient", "transit_hello", "main"]

#: The write and read size of the bulk streams (the anchors' client uses 1 MiB too).
CHUNK = 1 << 20
#: ``ok\n``: the transit relay's answer once the partner is there.
TRANSIT_OK = b"ok\n"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _dial(port: int) -> socket.socket:
    # Not socket.create_connection: its getaddrinfo per call would dominate the pairings.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect(("127.0.0.1", port))
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += more
    return data


def transit_hello(token: bytes, side: bytes) -> bytes:
    """The transit relay's current handshake line for a 32-byte token and an 8-byte side."""
    return b"please relay %s for side %s\n" % (token.hex().encode(), side.hex().encode())


class ControlClient:
    """The control channel of our relay process (:mod:`bench.relay_ours`): fresh tokens."""

    def __init__(self, port: int) -> None:
        self.sock = _dial(port)
        self.file = self.sock.makefile("rb")

    def tokens(self, count: int) -> list[bytes]:
        self.sock.sendall(b"new %d\n" % count)
        out = []
        for _ in range(count):
            line = self.file.readline()
            if not line.strip():
                raise ConnectionError(f"control channel answered {line!r}")
            out.append(base64.b64decode(line))
        return out

    def stats(self) -> dict[str, Any]:
        self.sock.sendall(b"stats\n")
        return json.loads(self.file.readline())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Handshakes:
    """
    The two handshakes of each new pair (first party, second party) for one relay kind.
    Our relay's tokens come from its control port in batches; with a ``selector`` the
    next batch is asked for ahead of need and read as it arrives, so that the pairs in
    flight never wait for tokens.
    """

    def __init__(self, config: dict[str, Any], batch: int = 1024,
                 selector: selectors.BaseSelector | None = None) -> None:
        self.kind = config["kind"]
        self.size = batch
        self.control = ControlClient(config["control"]) if self.kind == "ours" else None
        self.batch: list[bytes] = []
        self.asked = 0          # tokens asked for and not yet read
        self.partial = b""
        self.selector = selector
        if self.control is not None and selector is not None:
            self.batch = self.control.tokens(self.size)
            self.control.sock.setblocking(False)
            selector.register(self.control.sock, selectors.EVENT_READ, None)

    def readable(self) -> None:
        """Read what the control channel sent (called when its socket is readable)."""
        assert self.control is not None
        try:
            data = self.control.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("the control channel closed")
        *lines, self.partial = (self.partial + data).split(b"\n")
        self.batch += [base64.b64decode(line) for line in lines]
        self.asked -= len(lines)

    def next(self) -> tuple[bytes, bytes, bytes]:
        """``(first's hello, second's hello, what each must be answered before data)``."""
        if self.kind == "ours":
            assert self.control is not None
            if self.selector is None:
                if not self.batch:
                    self.batch = self.control.tokens(self.size)
            else:
                if len(self.batch) + self.asked < self.size and not self.asked:
                    self.control.sock.sendall(b"new %d\n" % self.size)
                    self.asked = self.size
                while not self.batch:
                    select.select([self.control.sock], [], [], 5.0)
                    self.readable()
            token = self.batch.pop()
            return token, token, b""
        token = secrets.token_bytes(32)
        return (transit_hello(token, secrets.token_bytes(8)),
                transit_hello(token, secrets.token_bytes(8)), TRANSIT_OK)

    def close(self) -> None:
        if self.control is not None:
            if self.selector is not None:
                self.selector.unregister(self.control.sock)
            self.control.close()


# -- bulk streams ------------------------------------------------------------------------

def _open_streams(config: dict[str, Any]) -> list[tuple[socket.socket, bytes]]:
    """Dial once per stream and write its hello; returns each socket with its expectation."""
    out = []
    for stream in config["streams"]:
        sock = _dial(config["port"])
        if stream.get("hello"):
            sock.sendall(bytes.fromhex(stream["hello"]))
        out.append((sock, bytes.fromhex(stream.get("expect", ""))))
    return out


def sink(config: dict[str, Any]) -> dict[str, Any]:
    _raise_nofile()
    rate = float(config.get("rate") or 0)
    chunk = int(config.get("chunk") or CHUNK)
    if config.get("listen"):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", config["listen"]))
        listener.listen(1024)
        print("ready", flush=True)
        socks = []
        for _ in range(config["count"]):
            sock, _address = listener.accept()
            socks.append(sock)
        listener.close()
        leftovers = [b""] * len(socks)
    else:
        opened = _open_streams(config)
        print("ready", flush=True)
        socks, leftovers = [], []
        for sock, expect in opened:
            # The answer may arrive with the first data bytes in one segment.
            data = b""
            while len(data) < len(expect):
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("relay closed before answering the handshake")
                data += more
            if data[:len(expect)] != expect:
                raise ConnectionError(f"relay answered {data[:len(expect)]!r}")
            socks.append(sock)
            leftovers.append(data[len(expect):])
    cpu = _cpu()
    got = [len(x) for x in leftovers]
    buf = bytearray(chunk)
    first = time.perf_counter() if any(got) else None
    if len(socks) == 1 and not rate:
        [sock] = socks
        recv_into = sock.recv_into
        while True:
            n = recv_into(buf)
            if not n:
                break
            if first is None:
                first = time.perf_counter()
            got[0] += n
    else:
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        paused: set[int] = set()
        open_ = len(socks)
        # The throttle's clock starts with the first byte (not while the source starts).
        started = first or 0.0
        while open_:
            events = selector.select(0.002 if paused else None)
            now = time.perf_counter()
            if first is None and events:
                first = started = now
            # The throttle: stream i may have read at most rate * elapsed (plus one chunk).
            for index in list(paused):
                if got[index] < rate * (now - started):
                    paused.discard(index)
                    selector.register(socks[index], selectors.EVENT_READ, index)
            for key, _mask in events:
                index = key.data
                allowed = chunk
                if rate:
                    allowed = min(chunk, int(rate * (now - started)) + chunk - got[index])
                try:
                    n = socks[index].recv_into(buf, allowed)
                except BlockingIOError:
                    continue
                if not n:
                    selector.unregister(socks[index])
                    open_ -= 1
                    continue
                got[index] += n
                if rate and got[index] >= rate * (now - started):
                    selector.unregister(socks[index])
                    paused.add(index)
        selector.close()
    ended = time.perf_counter()
    for sock in socks:
        sock.close()
    return {"bytes": got, "seconds": ended - (first or ended), "cpu": _cpu() - cpu}


def source(config: dict[str, Any]) -> dict[str, Any]:
    _raise_nofile()
    total = int(config["bytes"])
    chunk = memoryview(os.urandom(int(config.get("chunk") or CHUNK)))
    socks = []
    for sock, expect in _open_streams(config):
        if expect and _read_exactly(sock, len(expect)) != expect:
            raise ConnectionError("relay refused the handshake")
        socks.append(sock)
    cpu = _cpu()
    started = time.perf_counter()
    if len(socks) == 1:
        [sock] = socks
        send, size, left = sock.send, len(chunk), total
        while left:
            view = chunk if left >= size else chunk[:left]
            while view:
                view = view[send(view):]
            left -= min(left, size)
        sock.shutdown(socket.SHUT_WR)
    else:
        selector = selectors.DefaultSelector()
        left = {}
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_WRITE)
            left[sock] = total
        while left:
            for key, _mask in selector.select():
                sock = key.fileobj
                try:
                    sent = sock.send(chunk[:min(len(chunk), left[sock])])
                except BlockingIOError:
                    continue
                left[sock] -= sent
                if not left[sock]:
                    del left[sock]
                    selector.unregister(sock)
                    sock.shutdown(socket.SHUT_WR)
        selector.close()
        for sock in socks:
            sock.setblocking(True)
    sent_at = time.perf_counter()
    for sock in socks:
        # Wait for the relay to pass on the sink's end, so nothing is cut short.
        sock.settimeout(60)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
    return {"bytes": total * len(socks), "seconds": sent_at - started, "cpu": _cpu() - cpu}


# -- pairings --------------------------------------------------------------------------

class _Pair:
    """One pair in progress: the two sockets and what each still has to receive."""

    __slots__ = ("first", "second", "ok_first", "want", "got", "started")

    def __init__(self, first: socket.socket, second: socket.socket, expect: bytes) -> None:
        self.first, self.second = first, second
        self.ok_first = not expect   # the first party may send its byte once answered
        self.want = expect + b"x"    # what the second party must receive
        self.got = b""
        self.started = time.perf_counter()


def _start_pair(handshakes: Handshakes, port: int, selector: selectors.BaseSelector) -> _Pair:
    hello_b, hello_a, expect = handshakes.next()
    # The waiting party ("B", which dials the relay first) and the caller ("A").
    second = _dial(port)
    second.sendall(hello_b)
    first = _dial(port)
    first.sendall(hello_a + (b"" if expect else b"x"))
    pair = _Pair(first, second, expect)
    second.setblocking(False)
    selector.register(second, selectors.EVENT_READ, (pair, False))
    if expect:
        first.setblocking(False)
        selector.register(first, selectors.EVENT_READ, (pair, True))
    return pair


def _close_pair(pair: _Pair, selector: selectors.BaseSelector) -> None:
    for sock in (pair.first, pair.second):
        try:
            selector.unregister(sock)
        except KeyError:
            pass
        sock.close()


def pairs(config: dict[str, Any]) -> dict[str, Any]:
    """See the module docstring."""
    _raise_nofile()
    port, in_flight = config["port"], config["in_flight"]
    selector = selectors.DefaultSelector()
    handshakes = Handshakes(config, selector=selector)
    latencies: list[float] = []
    errors = 0
    counting = False
    done = 0

    def run_until(deadline: float) -> None:
        nonlocal errors, done
        while time.perf_counter() < deadline:
            for key, _mask in selector.select(1.0):
                if key.data is None:
                    handshakes.readable()
                    continue
                pair, is_first = key.data
                sock = key.fileobj
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if is_first:
                    # The transit relay's "ok\n" to the first party: now it may send.
                    if data != TRANSIT_OK:
                        errors += 1
                        _replace(pair)
                        continue
                    selector.unregister(sock)
                    sock.setblocking(True)
                    sock.sendall(b"x")
                    continue
                pair.got += data
                if not data or not pair.want.startswith(pair.got):
                    errors += 1
                    _replace(pair)
                elif pair.got == pair.want:
                    if counting:
                        latencies.append(time.perf_counter() - pair.started)
                        done += 1
                    _replace(pair)

    def _replace(pair: _Pair) -> None:
        _close_pair(pair, selector)
        _start_pair(handshakes, port, selector)

    for _ in range(in_flight):
        _start_pair(handshakes, port, selector)
    run_until(time.perf_counter() + float(config.get("warmup", 0)))
    counting = True
    relay_pid = config.get("relay_pid")
    relay_cpu = cpu_seconds(relay_pid) if relay_pid else 0.0
    cpu = _cpu()
    started = time.perf_counter()
    run_until(started + float(config["seconds"]))
    elapsed = time.perf_counter() - started
    cpu = _cpu() - cpu
    relay_cpu = cpu_seconds(relay_pid) - relay_cpu if relay_pid else float("nan")
    handshakes.close()
    for key in list(selector.get_map().values()):
        selector.unregister(key.fileobj)
        key.fileobj.close()
    selector.close()
    latencies.sort()
    pick: Callable[[float], float] = (
        lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3
        if latencies else float("nan"))
    return {"pairs": done, "seconds": elapsed, "errors": errors, "cpu": cpu,
            "relay_cpu": relay_cpu,
            "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def idle(config: dict[str, Any]) -> None:
    """See the module docstring (prints instead of returning: it has two moments)."""
    _raise_nofile()
    count, port = config["pairs"], config["port"]
    held: list[socket.socket] = []
    if config["kind"] == "forward":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", config["listen"]))
        listener.listen(1024)
        for _ in range(count):
            first = _dial(port)
            second, _address = listener.accept()
            first.sendall(b"x")
            if _read_exactly(second, 1) != b"x":
                raise ConnectionError("relay garbled the byte")
            held += [first, second]
        listener.close()
    else:
        handshakes = Handshakes(config, batch=count)
        for _ in range(count):
            hello_b, hello_a, expect = handshakes.next()
            second = _dial(port)
            second.sendall(hello_b)
            first = _dial(port)
            first.sendall(hello_a)
            if expect and _read_exactly(first, len(expect)) != expect:
                raise ConnectionError("relay refused the handshake")
            first.sendall(b"x")
            if _read_exactly(second, len(expect) + 1) != expect + b"x":
                raise ConnectionError("relay garbled the byte")
            held += [first, second]
        handshakes.close()
    print("ready", flush=True)
    sys.stdin.readline()
    for sock in held:
        sock.close()
    print("closed", flush=True)


def main(argv: list[str]) -> None:
    role, config = argv[0], json.loads(argv[1])
    if role == "idle":
        idle(config)
        return
    roles = {"sink": sink, "source": source, "pairs": pairs}
    if role not in roles:
        raise SystemExit(f"unknown role {role!r}")
    print(json.dumps(roles[role](config)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
