"""
The splice engine (epsproxy.proxy.splice_engine and its C part, issue 14), on plain TCP
sockets over loopback: bytes given first, half-close both ways, abort and the idle
timeout (resets), a failed side cutting the pair, a descriptor it cannot watch, bad
arguments, a failing handler, and a pair it cannot take.  The real-socket tests of the splice run with the
engine too (EngineRealSockets in test_splice.py, EngineOwnReader in
test_splice_reader.py).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import TestCase

from epsproxy.proxy.rendezvous_server import Rendezvous
from epsproxy.proxy.splice_engine import Ended, Outcome, SpliceEngine
from tests.support.splice import Peer, connect, engine, listen


def _engine() -> SpliceEngine:
    found: SpliceEngine = engine()
    return found


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(10)  # a test that goes wrong fails, it does not hang
    return client, server


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"end-of-stream after {len(data)} of {size} bytes")
        data += chunk
    return data


class Engine(TestCase):
    """The engine itself, with plain TCP sockets."""

    timeout = 30

    def pair(self) -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
        """Two TCP connections over loopback: (a, left) and (right, b); left and right go
        to the engine, a and b are the test's (blocking)."""
        a, left = _tcp_pair()
        right, b = _tcp_pair()
        for s in (a, left, right, b):
            self.addCleanup(s.close)
        left.setblocking(False)
        right.setblocking(False)
        return a, left, right, b

    def add(self, left: socket.socket, right: socket.socket, **kwargs) -> tuple[int, defer.Deferred[Ended]]:
        d: defer.Deferred[Ended] = defer.Deferred()
        kwargs.setdefault("read_bytes", 65536)
        kwargs.setdefault("idle_timeout", 0.0)
        handle = _engine().add(left.fileno(), right.fileno(), d.callback, **kwargs)
        return handle, d

    @defer.inlineCallbacks
    def end_both_ways(self, a: socket.socket, b: socket.socket,
                      ended: defer.Deferred[Ended]):
        """End-of-stream from both of the test's sockets: the pair must finish."""
        a.shutdown(socket.SHUT_WR)
        b.shutdown(socket.SHUT_WR)
        result = yield ended
        self.assertEqual(result.outcome, Outcome.FINISHED)

    @defer.inlineCallbacks
    def test_bytes_given_first_go_first_and_end_of_stream_finishes(self):
        a, left, right, b = self.pair()
        _, ended = self.add(left, right, to_left=b"<", to_right=b">")
        a.sendall(b"hello")
        a.shutdown(socket.SHUT_WR)
        b.sendall(b"world")
        b.shutdown(socket.SHUT_WR)
        result = yield ended
        self.assertEqual(result.outcome, Outcome.FINISHED)
        # Counted as the Python splice counts: the bytes given first too.
        self.assertEqual((result.left_to_right, result.right_to_left), (6, 6))
        self.assertEqual(b.recv(100), b">hello")
        self.assertEqual(a.recv(100), b"<world")
        self.assertEqual((a.recv(1), b.recv(1)), (b"", b""))  # end-of-stream both ways

    @defer.inlineCallbacks
    def test_an_end_of_stream_right_behind_the_bytes_is_never_lost(self):
        # A read that does not fill its size ends the reads of that event unless the
        # event said the peer closed: so bytes and the end-of-stream behind them, sent
        # together before the pair is handed over (already queued when the engine starts
        # watching) or after it, must both arrive, every time.
        for n in range(120):
            size = 1 + (n * 7919) % 150_000
            a, left, right, b = self.pair()
            b.settimeout(10)  # a lost end-of-stream fails the test, it does not hang it
            before = n % 2 == 0
            if before:
                a.sendall(b"x" * size)
                a.shutdown(socket.SHUT_WR)
            _, ended = self.add(left, right)
            if not before:
                a.sendall(b"x" * size)
                a.shutdown(socket.SHUT_WR)
            received = 0
            while chunk := b.recv(1 << 20):  # to the end-of-stream (or the 10 s timeout)
                received += len(chunk)
            self.assertEqual(received, size)
            b.shutdown(socket.SHUT_WR)  # only now: no event of the other side helps
            result = yield ended
            self.assertEqual(result.outcome, Outcome.FINISHED)
            self.assertEqual((result.left_to_right, result.right_to_left), (size, 0))

    @defer.inlineCallbacks
    def test_a_fast_receiver_is_not_asked_its_room_before_every_read(self):
        # Issue 14: the receiver's room (SIOCOUTQ and SO_SNDBUF, two system calls) is
        # asked only when what is known of it does not promise a whole read.
        a, left, right, b = self.pair()
        b.settimeout(10)  # a stalled relay fails the test, it does not hang it
        handle, ended = self.add(left, right, read_bytes=65536)
        size = 32 * 1024 * 1024
        sender = threading.Thread(target=a.sendall, args=(b"x" * size,))
        sender.start()
        received = 0
        while received < size:
            received += len(b.recv(1 << 20))
        sender.join()
        counts = _engine().counts(handle)  # live still: no end-of-stream yet
        self.assertEqual(counts.left_to_right, size)
        self.assertGreaterEqual(counts.reads, size // 65536)
        self.assertGreater(counts.room_queries, 0)
        self.assertLess(counts.room_queries, counts.reads // 4)  # every read until then
        yield self.end_both_ways(a, b, ended)

    @defer.inlineCallbacks
    def test_a_short_exchange_never_asks_the_room(self):
        # A TLS handshake's flights are a few kilobytes: reads of at most
        # SLOW_READ_BYTES need no room asked (what a send leaves is held, one read as
        # always), so a short connection makes no SIOCOUTQ / SO_SNDBUF calls at all.
        a, left, right, b = self.pair()
        b.settimeout(10)
        handle, ended = self.add(left, right, read_bytes=65536)
        for flight in (b"h" * 300, b"f" * 3000, b"q" * 900):
            a.sendall(flight)
            self.assertEqual(_recv_exactly(b, len(flight)), flight)
            b.sendall(flight[::-1])
            self.assertEqual(_recv_exactly(a, len(flight)), flight[::-1])
        counts = _engine().counts(handle)
        self.assertEqual((counts.left_to_right, counts.right_to_left), (4200, 4200))
        self.assertGreaterEqual(counts.reads, 6)
        self.assertEqual(counts.room_queries, 0)
        yield self.end_both_ways(a, b, ended)

    @defer.inlineCallbacks
    def test_abort_and_idle_end_a_pair_with_resets(self):
        a, left, right, b = self.pair()
        handle, ended = self.add(left, right)
        _engine().abort(handle)
        result = yield ended
        self.assertEqual(result.outcome, Outcome.ABORTED)
        self.assertEqual(_engine().counts(handle).left_to_right, 0)  # ended: zeros
        a2, left2, right2, b2 = self.pair()
        started = time.monotonic()
        _, ended = self.add(left2, right2, idle_timeout=0.2)
        result = yield ended
        self.assertEqual(result.outcome, Outcome.IDLE)
        self.assertGreaterEqual(time.monotonic() - started, 0.19)

    @defer.inlineCallbacks
    def test_a_failed_side_cuts_the_pair(self):
        a, left, right, b = self.pair()
        _, ended = self.add(left, right)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # a reset: the right side fails
        result = yield ended
        self.assertEqual(result.outcome, Outcome.CUT_RIGHT)
        # The left side was set to reset on close: its peer sees a reset, not an end.
        left.close()
        with self.assertRaises(ConnectionResetError):
            a.recv(10)

    @defer.inlineCallbacks
    def test_a_descriptor_it_cannot_watch_ends_the_pair_at_once(self):
        r = os.open(os.devnull, os.O_RDONLY)  # a file: epoll refuses to watch it
        self.addCleanup(os.close, r)
        a, left, right, b = self.pair()
        d: defer.Deferred[Ended] = defer.Deferred()
        _engine().add(r, right.fileno(), d.callback, read_bytes=1024, idle_timeout=0.0)
        result = yield d
        self.assertEqual(result.outcome, Outcome.ABORTED)

    def test_bad_arguments_are_refused(self):
        engine = _engine()
        a, left, right, b = self.pair()
        with self.assertRaises(ValueError):
            engine.add(left.fileno(), left.fileno(), lambda e: None, read_bytes=1024,
                       idle_timeout=0.0)
        with self.assertRaises(ValueError):
            engine.add(-1, right.fileno(), lambda e: None, read_bytes=1024, idle_timeout=0.0)
        with self.assertRaises(ValueError):
            engine.add(left.fileno(), right.fileno(), lambda e: None, read_bytes=0,
                       idle_timeout=0.0)
        with self.assertRaises(TypeError):
            engine.add(left.fileno(), right.fileno(), lambda e: None,
                       to_left="text", read_bytes=1024, idle_timeout=0.0)  # type: ignore[arg-type]
        self.assertEqual(len(engine), 0)

    @defer.inlineCallbacks
    def test_a_handler_that_fails_is_logged_and_the_others_still_run(self):
        a, left, right, b = self.pair()
        c, left2, right2, d_ = self.pair()
        engine = _engine()

        def broken(ended: Ended) -> None:
            raise RuntimeError("boom")

        h1 = engine.add(left.fileno(), right.fileno(), broken, read_bytes=1024,
                        idle_timeout=0.0)
        second: defer.Deferred[Ended] = defer.Deferred()
        h2 = engine.add(left2.fileno(), right2.fileno(), second.callback, read_bytes=1024,
                        idle_timeout=0.0)
        engine.abort(h1)
        engine.abort(h2)
        result = yield second
        self.assertEqual(result.outcome, Outcome.ABORTED)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(engine), 0)


class NoDescriptors(TestCase):
    def test_a_reactor_that_cannot_watch_descriptors_gets_no_engine(self):
        self.assertIsNone(SpliceEngine.shared(object()))


class _Refusing:
    """An engine that cannot take a pair (out of memory, its thread not started)."""

    def add(self, *args: object, **kwargs: object) -> int:
        raise MemoryError("no room for a pair")


class EngineFailure(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_a_pair_the_engine_cannot_take_is_cut_and_logged(self):
        rv = Rendezvous(reactor, engine=_Refusing())  # type: ignore[arg-type]  # a stub
        port = listen(self, rv)
        token = rv.new_token()
        a = yield connect(self, port, Peer(token, keep=False))
        b = yield connect(self, port, Peer(token, keep=False))
        reasons = yield defer.gatherResults([a.closed, b.closed])
        for reason in reasons:
            self.assertNotIsInstance(reason, ConnectionDone)  # cut: a reset, not an end
        self.assertEqual(rv.active_splices, 0)
        self.assertEqual(len(self.flushLoggedErrors(MemoryError)), 1)
