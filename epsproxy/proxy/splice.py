"""
Relay bytes between two connections without looking at them (SPEC §14.3, issue 4).

:func:`splice` takes over two connected protocols' connections and copies every byte
from each to the other until both directions are finished:

- **Backpressure both ways.**  Each side is registered as the streaming producer of the
  other side's transport.  On reactor TCP transports (the normal case) a side is paused
  as soon as *anything* it relayed is still unsent, so a direction holds at most one
  read in user space (plus, rarely, one more that the epoll reactor delivers in the same
  batch); reads are up to ``read_bytes`` large and are written through at once (``send()``
  straight from the read, no queueing when the receiver keeps up).  That is the recipe
  measured by ``python -m bench relay`` (docs/benchmarks.md): large reads and
  write-through bring a Python relay near a well-tuned C one, and pausing at any backlog
  keeps memory flat.
  Other transports (wrappers, test transports) use Twisted's own producer thresholds.
- **Reads sized to the receiver.**  A read is never larger than what the receiving
  socket's send buffer is known to take whole, so a slow receiver leaves next to nothing
  in user space.  What it takes is asked of the kernel (``SIOCOUTQ`` against a cached
  ``SO_SNDBUF``) only when what is left of the last answer, less what was sent since, is
  too little for a worthwhile read, not once per read.  When the receiver is that far
  behind (room under ``read_bytes // WAIT_BELOW_FRACTION``), the direction does not read
  small: it waits until the receiving socket is writable (the kernel says so when a
  third of its send buffer is free) and then makes one large read.
- **The splice's own reader.**  Between two reactor TCP transports (Twisted's, or
  subclasses that leave reading and writing to Twisted, such as a capped listener's
  connections) the splice reads each socket itself: ``recv_into`` one preallocated
  buffer shared by every splice of the process (the reactor runs one read at a time,
  and a read leaves the buffer only as a
  copy of what its receiver did not take), ``send()`` from a view of it, and a read that
  filled its size is followed by another in the same reactor event (at most
  :data:`READS_PER_EVENT`).  The transport becomes a small subclass of Twisted's TCP
  transport whose ``doRead`` (what the reactor calls for the descriptor) is the
  splice's; end-of-stream and errors are returned to the reactor as Twisted's own
  ``doRead`` returns them, so half-close, pause/resume and the connection's close are
  Twisted's.
- **Half-close.**  End-of-stream from one side shuts down the write direction of the
  other side (after its queued bytes are sent) and the other direction keeps going; both
  connections are closed when both directions are finished.
- **Errors cut.**  If one connection is lost before both directions are finished, the
  other is aborted, so a cut stream never looks complete to the far end.
- **No read deadline.**  Only an idle timeout applies: no bytes in either direction for
  ``idle_timeout`` seconds closes the pair (the reference kept its 5 s token deadline
  and cut every session after ~5 s, SPEC §23.1 #3).  A proxy's splices share one
  :class:`IdleSweep` (one timer for thousands of pairs, instead of a timer each kept in
  the reactor's heap for the pair's whole life); a splice made without one keeps its
  own timer.

- **The splice engine.**  Given one (``engine``; the proxies' setting ``splice_engine``),
  a pair of two reactor TCP transports leaves the reactor and is relayed by
  :mod:`epsproxy.proxy.splice_engine` (C on a thread of its own, the same policy as
  above, its own idle timeout); the splice hears of it again when it has ended, and
  closes both connections as the engine says (both ended: a clean close; one failed, an
  idle timeout or :meth:`Splice.abort`: resets).  Wrapped transports stay here.

Nothing here knows about tokens; :mod:`epsproxy.proxy.rendezvous_server` decides what to splice.
"""

from __future__ import annotations

import fcntl
import mmap
import socket
import struct
import termios
from typing import Any, cast

from twisted.internet import defer, error, main, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.logs import debug_enabled
from epsproxy.proxy.splice_engine import Ended, Outcome, SpliceEngine

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_READ_BYTES",
    "IdleSweep",
    "SWEEP_SECONDS",
    "READS_PER_EVENT",
    "WAIT_BELOW_FRACTION",
    "SLOW_READ_BYTES",
    "Splice",
    "abort",
    "retarget",
    "splice",
]

log = Logger()

DEFAULT_IDLE_TIMEOUT = 3600.0
"""Default seconds without a byte in either direction before a pair is closed."""

DEFAULT_READ_BYTES = 768 * 1024
"""Default read size of a splice.  Larger reads cost less per byte (half the reads and
sends at 1 MiB), but the shared read buffer is what a splice holds in user space, and a
process's resident memory grows by as much of it as its largest read has touched: with
1 MiB reads fifty slow receivers grew the relay's RSS by 1.1 MB, more than HAProxy's with
its default buffers (1.0 MB), with 512 KiB by 0.5 MB.  768 KiB is between: over twelve
paired rounds of 2 GB (2026-12-05, ``python -m bench relay``'s transfer) it relayed 1.03x
as fast as 512 KiB at 0.98x the CPU per GB, and 1 MiB 1.04x at 0.95x (docs/benchmarks.md).
A read is never larger than what its receiver is known to take whole, so a slow
receiver still gets small reads."""

SLOW_READ_BYTES = 16 * 1024
"""Smallest read size, towards a receiver whose send buffer is (nearly) full."""

READS_PER_EVENT = 4
"""Most reads the splice's own reader makes in one reactor event (each one only if the
previous filled its size, so the socket likely holds more)."""

WAIT_BELOW_FRACTION = 4
"""A read smaller than ``read_bytes // WAIT_BELOW_FRACTION`` is not made: the direction
waits until its receiving socket is writable instead (one large read then, not many
small ones now)."""

SWEEP_SECONDS = 1.0
"""How often an :class:`IdleSweep` looks for idle pairs (more often when a pair's idle
timeout is under four times this: a quarter of the smallest)."""

_OUTQ = b"\0\0\0\0"

_buffers: dict[int, memoryview] = {}


def _shared_buffer(size: int) -> memoryview:
    """
    The process's read buffer of ``size`` bytes, shared by every splice reading that much.
    Anonymous memory: pages become resident only once a read has reached them.
    """
    view = _buffers.get(size)
    if view is None:
        view = _buffers[size] = memoryview(mmap.mmap(-1, size))
    return view


def _queued(sock: Any) -> int:
    """Bytes in ``sock``'s kernel send queue, not yet acknowledged (``SIOCOUTQ``)."""
    return int.from_bytes(fcntl.ioctl(sock, termios.TIOCOUTQ, _OUTQ), "little")


def _sndbuf(sock: Any) -> int:
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


def retarget(transport: Any, old: IProtocol, new: Protocol) -> None:
    """
    Make ``transport`` deliver its events to ``new`` instead of ``old``.

    Works for reactor transports (``transport.protocol``) and for
    ``twisted.protocols.policies.ProtocolWrapper`` (``wrappedProtocol``); anything else
    raises :class:`TypeError` rather than relaying from a connection it cannot hear.
    """
    if getattr(transport, "protocol", None) is old:
        transport.protocol = new
    elif getattr(transport, "wrappedProtocol", None) is old:
        transport.wrappedProtocol = new
    else:
        raise TypeError(f"cannot take over the connection of {old!r} on {transport!r}")
    new.transport = transport
    new.connected = 1


def _is_fd(transport: Any) -> bool:
    """Whether ``transport`` is a reactor descriptor whose send queue we can inspect."""
    return isinstance(transport, FileDescriptor) and hasattr(transport, "_tempDataLen")


_CLOSED = Failure(main.CONNECTION_DONE)
_ENGINE_ABORTED = Failure(error.ConnectionAborted())
_ENGINE_LOST = Failure(main.CONNECTION_LOST)
# The reasons a splice closes its connections with, made once: a Failure costs some
# twenty Python calls to make and to check (its classes' names), and most pairs of
# short TLS connections end cut (a client that closes with bytes unread resets).
# The engine's own two (the same errors) say the socket needs a close() only: the
# engine has shut both write sides of a finished pair, and set a reset on close
# (SO_LINGER 0) on each side it cut; Twisted would shut down the failed side again
# (which fails, the connection being reset) and set the reset a second time.
_CLOSE_ONLY = (_CLOSED, _ENGINE_ABORTED, _ENGINE_LOST)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class _Spliced(tcp.Connection):
    """
    What a reactor TCP transport becomes when its splice reads it itself: its ``doRead``
    is the splice's (:meth:`_End.doRead`), and a half-close with nothing queued shuts the
    socket's write side at once instead of after a write event that would send nothing
    (Twisted's own steps of that event, in the same order), and closing it once both
    directions are shut builds no Failure of its own and takes Twisted's steps for the
    end of a connection in fewer calls (:class:`_Ending`).
    """

    def doRead(self) -> Any:
        protocol: Any = self.protocol  # a splice's end (typing.cast is a call per read)
        return protocol.doRead()

    def loseWriteConnection(self) -> None:
        if (self._tempDataLen or self.offset != len(self.dataBuffer) or not self.connected
                or self.disconnecting or self._writeDisconnected):
            super().loseWriteConnection()
            return
        self._writeDisconnecting = True
        self.stopWriting()
        self._writeDisconnected = True
        self._closeWriteConnection()

    def _closeWriteConnection(self) -> None:
        # Twisted's, with the protocol known to be a splice's end (no adaptation).
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        protocol: Any = self.protocol  # a splice's end
        try:
            protocol.writeConnectionLost()
        except BaseException:
            failure = Failure()
            log.failure("splice end failed on its write side's end", failure)
            self.connectionLost(failure)

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting and self._writeDisconnected:
            # Twisted's own steps for a connection whose write side is shut, with one
            # shared reason (a Failure costs to build, and only the splice sees it); the
            # reactor lets go of it in :meth:`_Ending.connectionLost`.
            self.connectionLost(_CLOSED)
            return
        super().loseConnection()


class _Ending(tcp.Connection):
    """
    Twisted's ``Connection.connectionLost`` for a spliced transport, in fewer calls:
    the reactor lets go of the descriptor in one step (epsproxy's reactor), and a
    connection closed after both directions were shut (:data:`_CLOSED`) is closed
    without a ``shutdown`` first (there is nothing left to shut).  It sits under the
    transport's own class (an admitted connection gives its slot back first, a client
    tells its connector after), where Twisted's ``Connection`` is.
    """

    def connectionLost(self, reason: Failure) -> None:
        if not hasattr(self, "socket"):
            return  # called twice (as in Twisted)
        self.disconnected = 1
        self.connected = 0
        producer = self.producer
        if producer is not None:
            self.producer = None
            producer.stopProducing()
        forget = getattr(self.reactor, "forget", None)
        if forget is not None:
            forget(self)
        else:
            self.stopReading()
            self.stopWriting()
        if reason in _CLOSE_ONLY:  # identity (Failure has no __eq__): a tuple of three
            try:
                self.socket.close()
            except OSError:
                pass
        else:
            self._closeSocket(not reason.check(error.ConnectionAborted))
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)


class _SplicedServer(_Spliced, tcp.Server, _Ending):
    """An accepted TCP connection read by its splice."""


class _SplicedClient(_Spliced, tcp.Client, _Ending):
    """A dialled TCP connection read by its splice."""

    _commonConnection = _Ending  # BaseClient.connectionLost calls it by this name


_SPLICED: dict[type, type | None] = {
    tcp.Server: _SplicedServer, tcp.Client: _SplicedClient,
    _SplicedServer: None, _SplicedClient: None,
}
"""Transport classes met so far, and the class that lets the splice read them itself
(None: it may not, or already does)."""


def _spliced_class(cls: type) -> type | None:
    """
    The class a transport of class ``cls`` becomes to be read by its splice, or None.
    Twisted's TCP transports and their subclasses that leave reading and writing to
    Twisted (an admitted listener's connections, which only count themselves in and
    out) get a subclass of their own with :class:`_Spliced` first, made once per class.
    """
    try:
        return _SPLICED[cls]
    except KeyError:
        pass
    made: type | None = None
    if not issubclass(cls, _Spliced):
        for base in (tcp.Server, tcp.Client):
            if issubclass(cls, base) and all(
                getattr(cls, name) is getattr(base, name)
                for name in ("doRead", "doWrite", "writeSomeData", "loseWriteConnection",
                             "loseConnection", "_closeWriteConnection")
            ):
                namespace = {"_commonConnection": _Ending} if base is tcp.Client else {}
                made = type(f"_Spliced{cls.__name__}", (_Spliced, cls, _Ending), namespace)
                break
    _SPLICED[cls] = made
    return made


def _take_unsent(transport: Any) -> bytes:
    """The bytes a reactor transport queues unsent, taken out of its queue."""
    if not _unsent(transport):
        return b""
    data = bytes(transport.dataBuffer[transport.offset:]) + b"".join(
        transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return data


def _unsent(transport: Any) -> int:
    """Bytes queued in user space by a reactor transport and not yet sent."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def abort(transport: Any) -> None:
    """Close ``transport`` now (``abortConnection``; a transport without it: lose it)."""
    method = getattr(transport, "abortConnection", None)
    if method is not None:
        method()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol, IPushProducer)
class _End(Protocol):
    """
    One side of a splice: the protocol of one connection, and the producer that feeds
    the other connection's transport.
    """

    def __init__(self, splice: Splice, name: str) -> None:
        self.splice = splice
        self.name = name
        self.peer: _End = None  # type: ignore[assignment]  # set by Splice
        self.out: Any = None  # the other side's transport
        self.fast = False
        self.reading_done = False  # end-of-stream received from this side
        self.writing_done = False  # our write direction has been shut down
        self.lost = False
        self.bytes_in = 0
        self.peak_unsent = 0
        self.waits = 0  # times this direction waited for its receiver's socket
        self.read_bytes = splice.read_bytes
        # Read sizing (reactor transports): the next read's size; bytes the out socket is
        # known to take whole (a lower bound: only our sends add to its queue); its send
        # buffer size as last asked (0: ask), re-asked when it looks too small.
        self.read_size = splice.read_bytes  # 0: size it from the room first
        self.slow_size = min(SLOW_READ_BYTES, splice.read_bytes)
        self.wait_below = max(self.slow_size, splice.read_bytes // WAIT_BELOW_FRACTION)
        self.wait_at = self.wait_below  # the same, or less for a small send buffer
        self.credit = 0
        self.sndbuf = 0
        self._buffer: memoryview | None = None  # the shared read buffer (own reader)

    # -- read sizing: keep it short, it runs once per read

    def _next_read(self, count: int) -> int:
        """
        ``count`` bytes just went out whole: the size of the next read, no larger than
        what the out socket is sure to take whole (so a slow receiver never leaves a
        large remainder in user space), or 0 when that is too little to be worth a read:
        then wait until the out socket is writable.  Asks the kernel only when what is
        left of the room it last reported (less what was sent since) is too little to
        be worth a read, and not after a message smaller than :data:`SLOW_READ_BYTES`
        (it could leave at most one read unsent, which the pause at any backlog covers).
        """
        credit = self.credit - count
        if 0 < count < self.slow_size and self.read_size:
            # A small message barely moves the room: keep the size, ask no one.
            self.credit = credit
            return self.read_size
        if credit < self.wait_below:
            credit = self._room()
        self.credit = credit
        if credit >= self.read_bytes:
            return self.read_bytes
        return credit if credit >= self.wait_at else 0

    def _room(self) -> int:
        """
        Bytes the kernel would still take whole on the out socket: half the room
        between its send buffer size and its queue (``SIOCOUTQ``); the kernel accounts
        buffer overhead too.  Without a socket to ask (not Linux, a wrapper), one read.
        """
        try:
            sock = self.out.socket
            queued = _queued(sock)
            room = (self.sndbuf - queued) // 2
            if room < self.read_bytes:
                # Autotuning may have grown the buffer since it was last asked.
                self.sndbuf = size = _sndbuf(sock)
                room = (size - queued) // 2
                # Waiting for writability pays only if it frees much more than is free
                # now: the kernel wakes writers when a third of the buffer is free.
                self.wait_at = min(self.wait_below, max(self.slow_size, size // 8))
        except (OSError, AttributeError, ValueError, TypeError):
            return self.read_bytes
        return room if room > 0 else 0

    def _pause_for(self, out: Any) -> None:
        """Pause this side until ``out`` has sent everything it holds and is writable
        (its ``doWrite`` then resumes its paused producer, us)."""
        if not out.producerPaused:
            out.producerPaused = True
            transport: Any = self.transport
            transport.pauseProducing()

    def _held(self, data: bytes) -> None:
        """
        ``data`` could not be sent at once: queue it on the out transport and pause this
        side until the out transport has sent everything (so one read is the most a
        direction holds); the next read is sized from the room then left.
        """
        out = self.out
        out.write(data)
        unsent = _unsent(out)
        if unsent > self.peak_unsent:
            self.peak_unsent = unsent
        self.read_size = 0
        self.credit = 0
        # Twisted's own doRead (a wrapper's source) reads bufferSize: read small.
        cast(Any, self.transport).bufferSize = self.slow_size
        self._pause_for(out)

    # -- the data path: keep it short, it runs once per read (up to read_bytes)

    def doRead(self) -> Any:
        """
        The reactor's read event on this side's TCP socket (installed as its transport's
        ``doRead`` when both sides are reactor TCP transports): read into the shared
        buffer and send straight from it.  Returns what Twisted's ``doRead`` returns: None,
        or the connection's loss.  End-of-stream is handled here, as the reactor would
        (the socket is no longer read, then the half-close), without its steps between.
        """
        transport: Any = self.transport
        recv_into = transport.socket.recv_into
        out = self.out
        send = out.socket.send
        view = self._buffer
        if view is None:
            view = self._buffer = _shared_buffer(self.read_bytes)
        splice = self.splice
        splice.last_active = splice._seconds()
        for _ in range(READS_PER_EVENT):
            size = self.read_size
            if not size:  # after a wait for the out socket: as much as it takes now
                size = self._next_read(0) or self.slow_size
            try:
                n = recv_into(view, size)
            except BlockingIOError:
                return None
            except OSError:
                return main.CONNECTION_LOST
            if not n:
                transport.stopReading()
                try:
                    self.readConnectionLost()
                except BaseException:
                    log.failure("splice end failed on end-of-stream")
                    return main.CONNECTION_LOST
                return None
            self.bytes_in += n
            if self.peer.lost:
                return None
            if out._tempDataLen or out.offset != len(out.dataBuffer):
                self._held(bytes(view[:n]))
                return None
            try:
                sent = send(view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # The out transport finds the error itself when it writes (and closes).
                out.write(bytes(view[:n]))
                return None
            if sent != n:
                self._held(bytes(view[sent:n]))
                return None
            drained = n < size
            if n < self.slow_size and self.read_size:
                # _next_read's first case in line (a small message: the size stays).
                self.credit -= n
                size = self.read_size
            else:
                size = self.read_size = self._next_read(n)
            if not size:
                # The receiver is behind: read again once its socket is writable (the
                # kernel says so when a third of its send buffer is free), one large
                # read then rather than many small ones now.
                self.waits += 1
                self._pause_for(out)
                out.startWriting()
                return None
            if drained:
                return None  # the read did not fill its size: the socket is empty
        return None

    def dataReceived(self, data: bytes) -> None:
        # Bytes read by Twisted's doRead (a wrapper transport, or bytes from before the
        # splice): the same policy as doRead's, through the transport's own write.
        if self.peer.lost:
            return
        splice = self.splice
        self.bytes_in += len(data)
        splice.last_active = splice._seconds()
        out = self.out
        if self.fast:
            # A reactor TCP transport or a wrapper of one (bufferSize, pauseProducing);
            # annotated, not cast, so the per-read path does no extra work.
            transport: Any = self.transport
            if not out._tempDataLen and out.offset == len(out.dataBuffer):
                sent = out.writeSomeData(data)
                if sent.__class__ is int:
                    if sent == len(data):
                        # Sent whole.  The next read is no larger than the room left in
                        # the receiver's send buffer, so it too goes out whole.
                        size = self.read_size = self._next_read(sent) or self.slow_size
                        transport.bufferSize = size
                        return
                    data = data[sent:]
            self._held(data)
        else:
            out.write(data)

    # -- IPushProducer, for the other side's transport

    def pauseProducing(self) -> None:
        if not self.lost:
            cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        # Never resume a side that has ended: the reactor would read EOF again.
        if not self.reading_done and not self.lost:
            cast(IPushProducer, self.transport).resumeProducing()

    def stopProducing(self) -> None:
        # The other transport is gone; its connectionLost decides what happens to us.
        pass

    # -- IHalfCloseableProtocol

    def readConnectionLost(self) -> None:
        if self.reading_done:
            return
        self.reading_done = True
        # Held here: shutting the other side's write direction may finish and close the
        # pair before this returns, and a closed pair's ends are unlinked (Splice._closed).
        splice, peer = self.splice, self.peer
        if peer is None or peer.lost:
            return
        out = self.out
        # Unregister first: a paused producer would be resumed instead of the socket
        # being shut down once the queue drains.
        if self.fast and not getattr(out, "TLS", True):
            # FileDescriptor.unregisterProducer's steps (a TCP transport without TLS).
            out.producer = None
            if out.connected and out.disconnecting:
                out.startWriting()
        else:
            out.unregisterProducer()
        lose_write = getattr(out, "loseWriteConnection", None)
        if lose_write is None:
            out.loseConnection()
        else:
            lose_write()
        splice._check_finished()

    def writeConnectionLost(self) -> None:
        self.writing_done = True
        splice = self.splice
        if splice is not None:
            splice._check_finished()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.lost:
            return
        self.lost = True
        splice = self.splice
        if splice is not None:
            splice._end_lost(self, reason)


class Splice:
    """
    Two connections relaying to each other; made by :func:`splice`.

    ``done`` fires (with None) once both connections are closed.  ``tag`` is a short
    label for logs (never a secret).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        read_bytes: int = DEFAULT_READ_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        tag: str = "",
        sweep: IdleSweep | None = None,
        engine: SpliceEngine | None = None,
    ) -> None:
        if read_bytes < 1:
            raise ValueError("read_bytes must be positive")
        self._clock = clock
        self._sweep = sweep
        self._seconds = clock.seconds
        self.read_bytes = read_bytes
        self.idle_timeout = idle_timeout
        self.tag = tag
        self.left = _End(self, "left")
        self.right = _End(self, "right")
        self.left.peer, self.right.peer = self.right, self.left
        self.done: defer.Deferred[None] = defer.Deferred()
        self.started = self.last_active = clock.seconds()
        self.own_reader = False  # whether the splice reads both sockets itself
        self.finished = False  # both directions completed normally
        self.closed = False
        self._idle_call: Any = None
        self._engine = engine
        self.engine_handle: int | None = None  # while the engine relays the pair

    @property
    def bytes_relayed(self) -> int:
        """Bytes relayed so far, both directions together."""
        if self.engine_handle is not None:
            assert self._engine is not None
            counts = self._engine.counts(self.engine_handle)
            return counts.left_to_right + counts.right_to_left
        return self.left.bytes_in + self.right.bytes_in

    @property
    def waits(self) -> int:
        """Times a direction waited for its receiver's socket to become writable rather
        than read little (both directions together; the splice's own reader only)."""
        if self.engine_handle is not None:
            assert self._engine is not None
            return self._engine.counts(self.engine_handle).waits
        return self.left.waits + self.right.waits

    def peak_unsent(self) -> int:
        """The most bytes one direction held unsent in user space (reactor transports;
        a pair the engine relays: known once it has ended, what it holds now before)."""
        if self.engine_handle is not None:
            return max(self.unsent())
        return max(self.left.peak_unsent, self.right.peak_unsent)

    def unsent(self) -> tuple[int, int]:
        """Bytes queued unsent now towards (left, right), where measurable (else 0)."""
        if self.engine_handle is not None:
            assert self._engine is not None
            counts = self._engine.counts(self.engine_handle)
            return counts.held_for_left, counts.held_for_right
        return tuple(  # type: ignore[return-value]  # always two items: one per end
            _unsent(e.transport) if _is_fd(e.transport) and not e.lost else 0
            for e in (self.left, self.right)
        )

    def _start(
        self,
        left: IProtocol,
        right: IProtocol,
        to_left: bytes,
        to_right: bytes,
        left_eof: bool,
        right_eof: bool,
    ) -> None:
        if self._engine is not None and self._start_engine(
                left, right, to_left, to_right, left_eof, right_eof):
            return
        ends = (self.left, self.right)
        for end, old in zip(ends, (left, right)):
            transport = old.transport  # type: ignore[attr-defined]  # not in IProtocol
            retarget(transport, old, end)
            end.peer.fast = _is_fd(transport)  # what the other end writes to
            if end.peer.fast:
                # The read size of a reactor TCP transport is its bufferSize; its own
                # pause threshold (the same attribute) no longer matters, we pause at
                # any backlog.  Let doWrite send a whole read per call.
                transport.bufferSize = self.read_bytes
                transport.SEND_LIMIT = max(transport.SEND_LIMIT, self.read_bytes)
        for end in ends:
            out: Any = end.peer.transport
            end.out = out
            if (end.fast and not getattr(out, "TLS", True) and out.producer is None
                    and not out.disconnected):
                # FileDescriptor.registerProducer's steps for a streaming producer.
                out.producer = end
                out.streamingProducer = True
            else:
                out.registerProducer(end, True)
        lt, rt = self.left.transport, self.right.transport
        left_class, right_class = _spliced_class(type(lt)), _spliced_class(type(rt))
        if left_class is not None and right_class is not None:
            # The splice's own reader for both sockets (see the module docstring).
            self.own_reader = True
            lt.__class__ = left_class
            rt.__class__ = right_class
        if self.idle_timeout > 0:
            if self._sweep is not None:
                self._sweep.add(self)
            else:
                self._idle_call = self._clock.callLater(self.idle_timeout, self._idle_check)
        for end, eof in ((self.left, left_eof), (self.right, right_eof)):
            if not eof:
                producer: Any = end.transport  # a push producer (typing.cast is a call)
                producer.resumeProducing()
        # Bytes read before the splice existed go first, through the normal path
        # (counted, and pausing their source if they cannot all be sent at once).
        if to_right and not self.closed:
            self.left.dataReceived(to_right)
        if to_left and not self.closed:
            self.right.dataReceived(to_left)
        if left_eof and not self.closed:
            self.left.readConnectionLost()
        if right_eof and not self.closed:
            self.right.readConnectionLost()

    def _start_engine(
        self,
        left: IProtocol,
        right: IProtocol,
        to_left: bytes,
        to_right: bytes,
        left_eof: bool,
        right_eof: bool,
    ) -> bool:
        """
        Hand the pair to the splice engine if both connections are reactor TCP
        transports that are open both ways (anything else: False, the Python splice
        takes it).  Bytes a transport still queues go first, before ``to_left`` /
        ``to_right``; the transports leave the reactor (the engine reads and writes
        their sockets) and are closed here once the engine reports the pair ended.
        """
        engine = self._engine
        assert engine is not None
        lt: Any = left.transport  # type: ignore[attr-defined]  # not in IProtocol
        rt: Any = right.transport  # type: ignore[attr-defined]  # not in IProtocol
        left_class, right_class = _spliced_class(type(lt)), _spliced_class(type(rt))
        if left_class is None or right_class is None:
            return False
        for t in (lt, rt):
            if not t.connected or t.disconnecting or t._writeDisconnected:
                return False
        retarget(lt, left, self.left)
        retarget(rt, right, self.right)
        to_left = _take_unsent(lt) + to_left
        to_right = _take_unsent(rt) + to_right
        forget = getattr(self._clock, "forget", None)
        for t in (lt, rt):
            if forget is not None:
                forget(t)
            else:
                t.stopReading()
                t.stopWriting()
        lt.__class__ = left_class
        rt.__class__ = right_class
        self.own_reader = True
        try:
            self.engine_handle = engine.add(
                lt.fileno(), rt.fileno(), self._engine_ended,
                to_left=to_left, to_right=to_right, left_eof=left_eof, right_eof=right_eof,
                read_bytes=self.read_bytes, idle_timeout=self.idle_timeout,
            )
        except Exception:
            # Out of memory, or the engine's thread could not start: this pair is cut
            # (both sides see a reset), the next one is tried again.
            log.failure("the splice engine could not take a pair; closing it")
            for t in (lt, rt):  # what the engine does to the sockets of a pair it cuts
                try:
                    t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass
            self._engine_ended(Ended(Outcome.ABORTED, 0, 0, 0, 0))
        return True

    def _engine_ended(self, ended: Ended) -> None:
        """The engine's report: close both connections as the outcome says."""
        self.engine_handle = None
        left, right = self.left, self.right
        left.bytes_in, right.bytes_in = ended.left_to_right, ended.right_to_left
        left.waits, left.peak_unsent = ended.waits, ended.peak_held
        outcome = ended.outcome
        if outcome is Outcome.FINISHED:
            self.finished = True
            reasons = (_CLOSED, _CLOSED)
        elif outcome is Outcome.CUT_LEFT:
            reasons = (_ENGINE_LOST, _ENGINE_ABORTED)
        elif outcome is Outcome.CUT_RIGHT:
            reasons = (_ENGINE_ABORTED, _ENGINE_LOST)
        else:
            if outcome is Outcome.IDLE:
                log.info("splice {tag} idle for {seconds:.0f}s, closing", tag=self.tag,
                         seconds=self.idle_timeout)
            reasons = (_ENGINE_ABORTED, _ENGINE_ABORTED)
        for end, reason in zip((left, right), reasons):
            end.lost = True
            transport: Any = end.transport
            try:
                transport.connectionLost(reason)
            except Exception:
                log.failure("closing a spliced connection failed")
        self._closed()

    def _check_finished(self) -> None:
        left, right = self.left, self.right
        if left.reading_done and right.reading_done and left.writing_done and right.writing_done:
            if not self.finished:
                self.finished = True
                for end in (left, right):
                    if not end.lost:
                        transport = end.transport
                        assert transport is not None
                        transport.loseConnection()

    def _end_lost(self, end: _End, reason: Failure | None) -> None:
        peer = end.peer
        if not peer.lost:
            if self.finished:
                transport = peer.transport
                assert transport is not None
                transport.loseConnection()
            else:
                # One side is gone before both directions finished: cut the other so
                # it never mistakes a truncated stream for a complete one.
                abort(peer.transport)
            return
        self._closed()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sweep is not None:
            self._sweep.discard(self)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if not self.finished and debug_enabled():
            # Completed pairs are counted (metrics), not logged: an event costs even when
            # no observer wants debug lines, and pairing is the hot path.
            log.debug(
                "splice {tag} cut after {seconds:.1f}s: {up} bytes left->right,"
                " {down} bytes right->left",
                tag=self.tag,
                seconds=self._seconds() - self.started,
                up=self.left.bytes_in,
                down=self.right.bytes_in,
            )
        self.done.callback(None)
        # Both connections are closed, so no event reaches the ends any more: unlink them
        # from the splice and from each other, so that the pair, its transports and their
        # buffers are freed at once rather than left to the garbage collector as cycles.
        for end in (self.left, self.right):
            end.splice = end.peer = None  # type: ignore[assignment]  # unlinked once closed

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.closed:
            return
        now = self._seconds()
        remaining = self.last_active + self.idle_timeout - now
        if remaining > 0:
            self._idle_call = self._clock.callLater(remaining, self._idle_check)
            return
        self._idle_expired(now)

    def _idle_expired(self, now: float) -> None:
        log.info("splice {tag} idle for {seconds:.0f}s, closing", tag=self.tag,
                 seconds=now - self.last_active)
        self.abort()

    def abort(self) -> None:
        """Close both connections now, dropping anything still queued (a pair the
        engine relays: as soon as the engine has let go of it)."""
        if self.engine_handle is not None:
            assert self._engine is not None
            self._engine.abort(self.engine_handle)
            return
        for end in (self.left, self.right):
            if not end.lost:
                abort(end.transport)


class IdleSweep:
    """
    The idle timeouts of many splices on one timer: every :data:`SWEEP_SECONDS` (or a
    quarter of the smallest idle timeout among its splices, if less) it closes those
    that relayed nothing for their ``idle_timeout``, so a pair is closed within that
    interval after its timeout.  The timer runs only while it holds a splice.  A timer
    per splice would stay in the reactor's heap for the pair's whole life (memory per
    idle pair, and a push, a cancel and heap comparisons in Python per connection).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._splices: dict[Splice, None] = {}
        self._call: Any = None
        self._interval = SWEEP_SECONDS

    def __len__(self) -> int:
        return len(self._splices)

    def add(self, splice: Splice) -> None:
        """Watch ``splice`` (its ``idle_timeout`` is positive) until :meth:`discard`."""
        self._splices[splice] = None
        interval = min(SWEEP_SECONDS, splice.idle_timeout / 4)
        if self._call is None:
            self._interval = interval
            self._call = self._clock.callLater(interval, self._run)
        elif interval < self._interval:
            self._interval = interval
            self._call.cancel()
            self._call = self._clock.callLater(interval, self._run)

    def discard(self, splice: Splice) -> None:
        """Stop watching ``splice`` (closed); the timer stops with the last one."""
        self._splices.pop(splice, None)
        if not self._splices and self._call is not None:
            self._call.cancel()
            self._call = None

    def _run(self) -> None:
        self._call = None
        now = self._clock.seconds()
        smallest = SWEEP_SECONDS * 4
        expired = []
        for splice in self._splices:
            timeout = splice.idle_timeout
            if now - splice.last_active >= timeout:
                expired.append(splice)
            elif timeout < smallest:
                smallest = timeout
        for splice in expired:
            self._splices.pop(splice, None)
            splice._idle_expired(now)
        if self._splices and self._call is None:
            self._interval = min(SWEEP_SECONDS, smallest / 4)
            self._call = self._clock.callLater(self._interval, self._run)


def splice(
    clock: IReactorTime,
    left: IProtocol,
    right: IProtocol,
    *,
    to_left: bytes = b"",
    to_right: bytes = b"",
    left_eof: bool = False,
    right_eof: bool = False,
    read_bytes: int = DEFAULT_READ_BYTES,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    tag: str = "",
    sweep: IdleSweep | None = None,
    engine: SpliceEngine | None = None,
) -> Splice:
    """
    Take over the connections of two connected protocols and relay between them.

    ``to_left``/``to_right`` are bytes to deliver before anything relayed (bytes read
    before the splice started, a replayed ClientHello); ``left_eof``/``right_eof`` say a
    side already sent end-of-stream.  The protocols get no further events; their
    transports may be paused, the splice resumes them.  ``read_bytes`` is the read size
    on reactor TCP transports, and so the most one direction holds in user space (a
    direction that backs up reads :data:`SLOW_READ_BYTES` at a time until its receiver
    keeps up again); ``idle_timeout`` (seconds, 0 = none) closes a pair that relays
    nothing for that long, timed by ``sweep`` (shared by a proxy's splices) or, without
    one, by a timer of its own.  With ``engine``, a pair of two reactor TCP connections
    is relayed by the splice engine (C, on its thread; :mod:`epsproxy.proxy.splice_engine`)
    with the same policy, and everything else by the Python splice.
    """
    s = Splice(clock, read_bytes=read_bytes, idle_timeout=idle_timeout, tag=tag,
               sweep=sweep, engine=engine)
    s._start(left, right, to_left, to_right, left_eof, right_eof)
    return s
