"""
A small sans-IO reader and writer of RESP2, the Redis wire format, for the few short
conversations the store has outside txredisapi: asking a Sentinel where the master is
(``SENTINEL get-master-addr-by-name``) and checking a server's ``ROLE`` before handing the
connection to txredisapi (:mod:`epsproxy.store.redis_sentinel`).

A peer that answers garbage (an HTTP server, a truncated or oversized reply, arrays nested
without end) gets :class:`RespError` with a one-line reason, never an unbounded buffer:
replies are capped at :data:`MAX_REPLY_BYTES` and :data:`MAX_DEPTH` levels of nesting.
Imports nothing but the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

__all__ = ["RespError", "ErrorReply", "Reply", "RespReader", "encode_command",
           "MAX_REPLY_BYTES", "MAX_DEPTH"]

#: The longest reply (or unparsed run of bytes) accepted; Sentinel and ROLE replies are tiny.
MAX_REPLY_BYTES = 64 * 1024
#: Arrays inside arrays (ROLE on a master is two deep).
MAX_DEPTH = 4


_INTEGER = re.compile(rb"-?[0-9]+")


class RespError(ValueError):
    """Bytes that are not a RESP2 reply we accept."""


@dataclass(frozen=True)
class ErrorReply:
    """A ``-ERR ...`` reply: a refusal by the server, not a protocol error."""

    message: str


Reply = Union[bytes, int, None, ErrorReply, list["Reply"]]


def encode_command(*args: str | bytes | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class RespReader:
    """Feed bytes, get complete replies: ``feed(data) -> list[Reply]``."""

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def rest(self) -> bytes:
        """Bytes received after the last complete reply."""
        return self._buffer

    def feed(self, data: bytes) -> list[Reply]:
        """Every reply completed by ``data``; RespError if the bytes cannot be one."""
        self._buffer += data
        replies: list[Reply] = []
        while self._buffer:
            try:
                reply, end = self._parse(0, 0)
            except _Incomplete:
                if len(self._buffer) > MAX_REPLY_BYTES:
                    raise RespError(f"reply longer than {MAX_REPLY_BYTES} bytes") from None
                break
            replies.append(reply)
            self._buffer = self._buffer[end:]
        return replies

    def _line(self, start: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            if len(self._buffer) - start > MAX_REPLY_BYTES:
                raise RespError("reply line without an end")
            raise _Incomplete()
        return self._buffer[start:end], end + 2

    def _parse(self, start: int, depth: int) -> tuple[Reply, int]:
        line, end = self._line(start)
        if not line:
            raise RespError("empty reply line")
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body, end
        if kind == b"-":
            return ErrorReply(body.decode("utf-8", "replace")), end
        if kind == b":":
            return _integer(body), end
        if kind == b"$":
            length = _integer(body)
            if length == -1:
                return None, end
            if not 0 <= length <= MAX_REPLY_BYTES:
                raise RespError(f"bulk string length {length} out of range")
            if len(self._buffer) < end + length + 2:
                raise _Incomplete()
            if self._buffer[end + length : end + length + 2] != b"\r\n":
                raise RespError("bulk string not followed by CRLF")
            return self._buffer[end : end + length], end + length + 2
        if kind == b"*":
            count = _integer(body)
            if count == -1:
                return None, end
            if depth >= MAX_DEPTH:
                raise RespError(f"arrays nested deeper than {MAX_DEPTH}")
            if not 0 <= count <= MAX_REPLY_BYTES // 4:
                raise RespError(f"array length {count} out of range")
            items: list[Reply] = []
            for _ in range(count):
                item, end = self._parse(end, depth + 1)
                items.append(item)
            return items, end
        raise RespError(f"not a RESP reply: starts with {line[:20]!r}")


def _integer(body: bytes) -> int:
    if len(body) > 20 or not _INTEGER.fullmatch(body):
        raise RespError(f"not an integer: {body[:20]!r}")
    return int(body)
