"""
Bulk flows for splice tests over real sockets: a ``Source`` that streams numbered blocks
as a streaming producer (hashing what it sends), and a ``Throttled`` party that reads at
a bounded rate by pausing its own transport between reads.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from tests.support.splice import Peer


@implementer(IPushProducer)
class Source:
    """Streams ``chunks`` blocks of ``chunk_size`` bytes (numbered, so order matters) to a
    transport as its streaming producer, hashing what it sends; half-closes at the end
    unless ``close`` is false."""

    def __init__(self, transport: Any, chunks: int, chunk_size: int = 1 << 20,
                 close: bool = True, seed: bytes = b"") -> None:
        self.transport = transport
        self.left = chunks
        self.block = seed + os.urandom(chunk_size - len(seed))
        self.close = close
        self.sha = hashlib.sha256()
        self.sent = 0
        self.paused = False
        self.producing = False
        transport.registerProducer(self, True)

    def resumeProducing(self) -> None:
        self.paused = False
        if self.producing:
            return
        self.producing = True
        try:
            while not self.paused and self.left > 0:
                self.left -= 1
                chunk = struct.pack(">Q", self.left) + self.block[8:]
                self.sha.update(chunk)
                self.sent += len(chunk)
                self.transport.write(chunk)
            if self.left == 0 and not self.paused:
                self.left = -1
                self.transport.unregisterProducer()
                if self.close:
                    self.transport.loseWriteConnection()
        finally:
            self.producing = False

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self.left = -1

    def digest(self, prefix: bytes = b"") -> str:
        """The SHA-256 of ``prefix`` followed by everything sent."""
        sha = hashlib.sha256(prefix)
        for left in range(self.sent // len(self.block) - 1, -1, -1):
            sha.update(struct.pack(">Q", left) + self.block[8:])
        return sha.hexdigest()


class Throttled(Peer):
    """A party that reads at most about ``rate`` bytes per second: after each read it
    pauses its transport for as long as that read is worth at that rate."""

    def __init__(self, prefix: bytes, rate: float, **kwargs: Any) -> None:
        super().__init__(prefix, **kwargs)
        self.rate = rate
        self.timer: Any = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.timer is None and self.transport.connected:
            self.transport.pauseProducing()
            self.timer = reactor.callLater(len(data) / self.rate, self._resume)

    def _resume(self) -> None:
        self.timer = None
        if self.transport.connected:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        super().connectionLost(reason)
