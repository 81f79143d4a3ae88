"""
The floor of the SNI benchmark: what plain Python does per connection on the pooled path,
``python -m bench.sni_floor front TLS_PORT POOL_PORT`` and ``python -m bench.sni_floor back
POOL_PORT SERVER_PORT POOL_SIZE``.

Two processes shaped like our public and private proxies on their pooled path, written
against ``select.epoll`` and sockets with nothing else: the back keeps ``POOL_SIZE``
connections open at the front's pool port (each sends a 32-byte token, and is replaced
when used); the front accepts a TLS client, reads its ClientHello (the proxies' own
parser), writes a header (the length-prefixed server name and the client's address) and
the hello on an idle pooled connection and relays; the back reads the header, dials the
server, writes the rest and relays.  The relay keeps one read of a direction in user
space when the receiver is behind, half-closes, and closes a pair once both directions
have ended.

It is not a proxy: no limits, no deadlines, no announcements, no tokens checked, no
metrics, no logs, no reloading, no TLS termination, and it exits on the first error it
does not expect.  It is here so that each run of ``python -m bench sni`` says, in the same
run, how much of the gap to HAProxy is Python's and how much is our proxies' own
(issue 14): the row "floor" of its table.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time
from typing import Any, Callable

from epsproxy.proxy.clienthello import parse_client_hello

__all__ = ["main"]

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_TOKEN_BYTES = 32
_HEADER = struct.Struct("!H")


class _Loop:
    """An epoll loop: a handler per descriptor, called with the event mask."""

    def __init__(self) -> None:
        self.poller = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}

    def run(self) -> None:
        handlers = self.handlers
        while True:
            for fd, event in self.poller.poll():
                handler = handlers.get(fd)
                if handler is not None:
                    handler(event)


_loop = _Loop()
_buffer = memoryview(bytearray(256 * 1024))


class _End:
    """One connection of a relayed pair: reads into the shared buffer, sends to its peer."""

    __slots__ = ("sock", "fd", "peer", "pending", "ended", "mask")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: _End = self
        self.pending = b""  # bytes for this connection the kernel did not take yet
        self.ended = False  # end-of-stream read from this connection
        self.mask = 0

    def update(self) -> None:
        mask = (0 if self.ended or self.peer.pending else _IN) | (_OUT if self.pending else 0)
        if mask != self.mask:
            if not self.mask:
                _loop.handlers[self.fd] = self.on_event
                _loop.poller.register(self.fd, mask)
            elif not mask:
                _loop.poller.unregister(self.fd)
            else:
                _loop.poller.modify(self.fd, mask)
            self.mask = mask

    def on_event(self, event: int) -> None:
        if event & _OUT:
            self.flush()
        if event & ~_OUT and not self.ended and not self.peer.pending and self.mask:
            self.pump()

    def send(self, data: bytes | memoryview) -> bool:
        """Send to this connection (what it does not take waits); False if it is gone."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent < len(data):
            self.pending = bytes(data[sent:])
        return True

    def pump(self) -> None:
        try:
            n = self.sock.recv_into(_buffer)
        except BlockingIOError:
            return
        except OSError:
            _close(self)
            return
        peer = self.peer
        if not n:
            self.ended = True
            if not peer.pending:
                _shut(peer)
            if not _finished(self):
                self.update()
            return
        if not peer.send(_buffer[:n]):
            _close(self)
            return
        if peer.pending:
            self.update()
            peer.update()

    def flush(self) -> None:
        pending, self.pending = self.pending, b""
        if not self.send(pending):
            _close(self)
            return
        if self.pending:
            return  # still waiting for the receiver
        if self.peer.ended:
            _shut(self)
            if _finished(self):
                return
        self.update()
        self.peer.update()


def _shut(end: _End) -> None:
    try:
        end.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _finished(end: _End) -> bool:
    """Close the pair if both directions have ended and everything was sent."""
    peer = end.peer
    if end.ended and peer.ended and not end.pending and not peer.pending:
        _close(end)
        return True
    return False


def _close(end: _End) -> None:
    for one in (end, end.peer):
        if one.mask:
            _loop.poller.unregister(one.fd)
            one.mask = 0
        _loop.handlers.pop(one.fd, None)
        one.sock.close()


def _relay(a: socket.socket, b: socket.socket, to_b: bytes) -> None:
    """Relay between ``a`` and ``b``, ``to_b`` sent to ``b`` first."""
    left, right = _End(a), _End(b)
    left.peer, right.peer = right, left
    if to_b and not right.send(to_b):
        _close(left)
        return
    left.update()
    right.update()


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _on_readable(sock: socket.socket, handler: Callable[[int], None]) -> None:
    _loop.handlers[sock.fileno()] = handler
    _loop.poller.register(sock.fileno(), _IN)


def _forget(sock: socket.socket) -> None:
    _loop.poller.unregister(sock.fileno())
    del _loop.handlers[sock.fileno()]


def front(tls_port: int, pool_port: int) -> None:
    idle: list[socket.socket] = []
    tls, pool = _listen(tls_port), _listen(pool_port)

    def pooled(sock: socket.socket) -> Callable[[int], None]:
        def token(_: int) -> None:
            data = sock.recv(64)
            _forget(sock)
            if len(data) == _TOKEN_BYTES:
                idle.append(sock)
            else:
                sock.close()
        return token

    def client(sock: socket.socket, peer: Any) -> Callable[[int], None]:
        data = bytearray()

        def hello(_: int) -> None:
            try:
                more = sock.recv(16384)
            except BlockingIOError:
                return
            if not more:
                _forget(sock)
                sock.close()
                return
            data.extend(more)
            if len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                return
            _forget(sock)
            name = (parse_client_hello(bytes(data)).server_name or "").encode()
            head = (_HEADER.pack(len(name)) + name + socket.inet_aton(peer[0])
                    + _HEADER.pack(peer[1]))
            _relay(sock, idle.pop(), head + bytes(data))
        return hello

    def accept(listener: socket.socket,
               made: Callable[[socket.socket, Any], None]) -> Callable[[int], None]:
        def on(_: int) -> None:
            while True:
                try:
                    sock, peer = listener.accept()
                except BlockingIOError:
                    return
                sock.setblocking(False)
                made(sock, peer)
        return on

    _on_readable(pool, accept(pool, lambda s, _: _on_readable(s, pooled(s))))
    _on_readable(tls, accept(tls, lambda s, p: _on_readable(s, client(s, p))))


def _wait_for(port: int, seconds: float = 30) -> None:
    """Block until something listens on ``port`` (the front, started first)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def back(pool_port: int, server_port: int, size: int) -> None:
    token = os.urandom(_TOKEN_BYTES)
    _wait_for(pool_port)

    def dial(port: int, then: Callable[[socket.socket], None]) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fd = sock.fileno()

        def connected(_: int) -> None:
            _loop.poller.unregister(fd)
            del _loop.handlers[fd]
            then(sock)
        _loop.handlers[fd] = connected
        _loop.poller.register(fd, _OUT)

    def pooled(sock: socket.socket) -> None:
        sock.send(token)

        def header(_: int) -> None:
            data = sock.recv(16384)
            _forget(sock)
            dial(pool_port, pooled)  # the replacement
            if not data:
                sock.close()
                return
            rest = data[_HEADER.size + _HEADER.unpack_from(data)[0] + 6:]
            dial(server_port, lambda server: _relay(sock, server, rest))
        _on_readable(sock, header)

    for _ in range(size):
        dial(pool_port, pooled)


def main(argv: list[str]) -> None:
    role, *ports = argv
    numbers = [int(p) for p in ports]
    if role == "front":
        front(*numbers)
    elif role == "back":
        back(*numbers)
    else:
        raise SystemExit(f"unknown role {role!r} (front or back)")
    print("ready", flush=True)
    _loop.run()


if __name__ == "__main__":
    main(sys.argv[1:])
