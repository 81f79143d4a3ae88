"""
The floor of the relay benchmark: the least a Python relay can do per byte,
``python -m bench.relay_floor PORT TARGET_PORT BUFFER_BYTES``.

A forwarding relay like socat's ``TCP-LISTEN`` to ``TCP`` (no tokens): for each accepted
connection it dials the target and runs two threads, one per direction, each a loop of a
blocking ``recv_into`` of one preallocated ``BUFFER_BYTES`` buffer and a ``sendall`` of
what it read; end-of-stream shuts the other side's write direction, and the pair is
closed once both directions have ended.  A blocking ``sendall`` waits until the receiver
has taken everything, so the next read finds the bytes that arrived meanwhile: reads are
as large as socat's, and Python runs a few calls per read.

It is not a relay to run: no limits, no backpressure beyond the one buffer, no idle
timeout, a thread per direction, and it never frees what a pair's failure leaves.  It is
here so that each run of ``python -m bench relay`` says, in the same run, how close to
the C relays a Python relay can come at all (issue 14): the row "floor" of its table.
"""

from __future__ import annotations

import socket
import sys
import threading

__all__ = ["main"]


def _pump(source: socket.socket, sink: socket.socket, size: int, ended: threading.Barrier
          ) -> None:
    """Copy ``source`` to ``sink`` until end-of-stream or an error, then end the direction."""
    view = memoryview(bytearray(size))
    recv_into, sendall = source.recv_into, sink.sendall
    try:
        while True:
            n = recv_into(view)
            if not n:
                break
            sendall(view[:n])
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for one in (source, sink):
            try:
                one.shutdown(socket.SHUT_RDWR)  # wakes the other direction's thread
            except OSError:
                pass
    try:
        if ended.wait() == 0:  # both directions are done: one of them closes the pair
            source.close()
            sink.close()
    except threading.BrokenBarrierError:
        pass


def main(argv: list[str]) -> None:
    port, target, size = (int(a) for a in argv)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", target))
        except OSError:
            client.close()
            continue
        ended = threading.Barrier(2)
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=_pump, args=(source, sink, size, ended),
                             daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
