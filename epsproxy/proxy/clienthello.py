"""
Read a TLS ClientHello without terminating TLS, to learn the SNI host name
(SPEC §14.6; issue 5).

:class:`ClientHelloReader` is sans-IO: a protocol feeds it whatever the network
delivers and gets back ``None`` (more bytes needed), a :class:`ClientHello` (the host
name and every byte read so far, to be replayed to whoever terminates TLS), or a
:class:`ClientHelloError` (close the connection).  It reassembles the handshake message
however it arrives: split over any number of TCP reads *and* over several TLS records
(TLS 1.3 ClientHellos with post-quantum ``X25519MLKEM768`` key shares are 1.5-1.8 KiB).

Differences from the reference (SPEC §23.1 #1, #12), on purpose:

- Not one read of 2048 bytes: records are read until the handshake message is
  complete, within ``max_bytes`` (default 16 KiB; 64 KiB works) counted over all the
  bytes the hello needs, so buffering is bounded.
- Every length is checked against what is present *and* against its enclosing length:
  records are 1..16384 bytes of type 22 with major version 3 (RFC 8446 §5.1); the
  hello must end its last record; the cipher-suite list is non-empty and even; the
  compression list includes null; the extension block, if any, fills the hello exactly;
  an extension type may appear once.
- ``server_name``: the list length must **equal** the extension data (the reference
  checked this inverted, so an overlong list passed); the list holds exactly one entry,
  of type ``host_name`` (what OpenSSL's own server accepts: other name types have no
  defined length and cannot be skipped).  The name is 1..253 characters (254 with a
  trailing dot) of dot-separated labels of at most 63 letters, digits, ``-`` or ``_``
  starting with a letter, digit or ``_`` (the SPEC's pattern plus ``_``, which real
  host names carry and the reference refused).  It is returned normalised: ASCII lower
  case, without a trailing dot, since DNS names compare case-insensitively.
- Only ``legacy_version`` 03 03 is accepted, as in the reference: every TLS 1.2 and
  1.3 client sends it; TLS 1.0/1.1-only clients are refused.

Errors carry a reason, never the bytes read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_RECORD_LENGTH",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloReader",
    "parse_client_hello",
    "valid_host_name",
]

#: Default cap on the bytes a ClientHello may take (all its records, headers included).
DEFAULT_MAX_BYTES = 16384

#: Largest TLSPlaintext fragment (RFC 8446 §5.1).
MAX_RECORD_LENGTH = 16384

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4

_LABEL = r"[a-zA-Z0-9_][a-zA-Z0-9_-]{0,62}"
_HOST = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?", re.ASCII)


class ClientHelloError(Exception):
    """The bytes are not an acceptable TLS ClientHello; the text says why (no data)."""


@dataclass(frozen=True)
class ClientHello:
    """
    A complete ClientHello.

    ``server_name`` is the normalised SNI host name, or None without the extension;
    ``raw`` is every byte fed so far (the hello's records and anything read after them
    in the same read), to be sent on before anything else.
    """

    server_name: str | None
    raw: bytes = field(repr=False)
    extension_types: tuple[int, ...] = ()
    record_count: int = 1
    hello_length: int = 0  # the handshake message, header included


def valid_host_name(name: bytes) -> str:
    """
    ``name`` (SNI ``host_name`` bytes) as a normalised host name (lower case, no
    trailing dot); raises ClientHelloError if it is not an acceptable one.
    """
    if not name:
        raise ClientHelloError("empty SNI host name")
    if len(name) > 254 or (len(name) == 254 and not name.endswith(b".")):
        raise ClientHelloError(f"SNI host name of {len(name)} bytes (at most 253)")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise ClientHelloError("SNI host name is not ASCII") from None
    if not _HOST.fullmatch(text):
        raise ClientHelloError("SNI host name is not a valid host name")
    return text.rstrip(".").lower()


class _Cursor:
    """Reads big-endian fields from ``data[start:end]``; running out is an error."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        pos = self.pos
        if n > self.end - pos:
            raise ClientHelloError(f"truncated {what}: {n} bytes needed, {self.left} left")
        self.pos = pos + n
        return bytes(self.data[pos:pos + n])

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size: int, what: str) -> bytes:
        return self.take(self.uint(size, f"{what} length"), what)


def _parse_server_name(data: bytes) -> str:
    """
    The host name of a ``server_name`` extension's data: one ``host_name`` filling the
    list, read with index arithmetic; anything else is read again field by field by
    :func:`_parse_server_name_checked`, which names what is wrong.
    """
    n = len(data)
    if (n >= 5 and (data[0] << 8 | data[1]) == n - 2 and data[2] == _HOST_NAME
            and (data[3] << 8 | data[4]) == n - 5):
        return valid_host_name(data[5:])
    return _parse_server_name_checked(data)


def _parse_server_name_checked(data: bytes) -> str:
    c = _Cursor(data)
    listed = c.uint(2, "server_name list length")
    if listed != c.left:
        raise ClientHelloError(
            f"server_name list length {listed} does not match its extension ({c.left})"
        )
    if listed == 0:
        raise ClientHelloError("empty server_name list")
    name_type = c.uint(1, "server_name type")
    if name_type != _HOST_NAME:
        raise ClientHelloError(f"server_name of unknown type {name_type}")
    name = c.vector(2, "host_name")
    if c.left:
        raise ClientHelloError("more than one name in server_name")
    return valid_host_name(name)


class _Irregular(Exception):
    """The quick reading of a ClientHello found something to look at closely."""


def _parse_body(body: bytes) -> tuple[str | None, tuple[int, ...]]:
    """
    The SNI host name and the extension types of a ClientHello body.  The fields before
    the extensions are read with index arithmetic (this runs for every new TLS client);
    anything short or out of place is read again by :func:`_parse_body_checked`, which
    names what is wrong.
    """
    end = len(body)
    try:
        if body[0] != 3 or body[1] != 3:
            raise _Irregular
        pos = 35 + body[34]  # version, random, session id length, session id
        if body[34] > 32:
            raise _Irregular
        suites = body[pos] << 8 | body[pos + 1]
        pos += 2 + suites
        if not suites or suites % 2 or pos >= end:
            raise _Irregular
        methods = body[pos]
        pos += 1
        if pos + methods > end or 0 not in body[pos:pos + methods]:
            raise _Irregular
        pos += methods
        if pos == end:
            return None, ()
        if (body[pos] << 8 | body[pos + 1]) != end - pos - 2:
            raise _Irregular
    except (_Irregular, IndexError):
        return _parse_body_checked(body)
    return _extensions(body, pos + 2, end)


def _parse_body_checked(body: bytes) -> tuple[str | None, tuple[int, ...]]:
    """
    :func:`_parse_body` field by field, each shortfall or bad value named in its error:
    what a hello that the quick reading finds anything wrong with goes through.
    """
    c = _Cursor(body)
    version = c.take(2, "client_version")
    if version != b"\x03\x03":
        raise ClientHelloError(f"client_version {version.hex()} (only 0303 is accepted)")
    c.take(32, "random")
    session_id_length = c.uint(1, "session id length")
    if session_id_length > 32:
        raise ClientHelloError(f"session id of {session_id_length} bytes (at most 32)")
    c.take(session_id_length, "session id")
    suites = c.vector(2, "cipher suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError(f"cipher suite list of {len(suites)} bytes")
    methods = c.vector(1, "compression methods")
    if 0 not in methods:
        raise ClientHelloError("compression methods without null")
    if not c.left:
        return None, ()
    total = c.uint(2, "extensions length")
    if total != c.left:
        raise ClientHelloError(
            f"extensions length {total} does not match the rest of the hello ({c.left})"
        )
    return _extensions_checked(body, c.pos, c.end)


def _extensions(body: bytes, pos: int, end: int) -> tuple[str | None, tuple[int, ...]]:
    """
    The SNI host name and the extension types of the extensions in ``body[pos:end]``,
    read in place (this runs for every new TLS client): a type and a length of two bytes
    each, then that many bytes.  Anything wrong (short, repeated) is read again by
    :func:`_extensions_checked`, which stops at the first fault and names it.
    """
    start = pos
    types: list[int] = []
    append = types.append
    name_at = name_end = -1
    while pos < end:
        if end - pos < 4:
            return _extensions_checked(body, start, end)
        ext_type = body[pos] << 8 | body[pos + 1]
        length = body[pos + 2] << 8 | body[pos + 3]
        pos += 4
        if length > end - pos:
            return _extensions_checked(body, start, end)
        append(ext_type)
        if ext_type == _SERVER_NAME:
            name_at, name_end = pos, pos + length
        pos += length
    if len(set(types)) != len(types):
        return _extensions_checked(body, start, end)
    server_name = None if name_at < 0 else _parse_server_name(body[name_at:name_end])
    return server_name, tuple(types)


def _extensions_checked(body: bytes, pos: int, end: int) -> tuple[str | None, tuple[int, ...]]:
    """:func:`_extensions`, one extension at a time, each fault named where it is."""
    server_name: str | None = None
    types: list[int] = []
    seen: set[int] = set()  # (a list would be quadratic in a hostile hello's extensions)
    while pos < end:
        if end - pos < 4:
            raise ClientHelloError(f"truncated extension header: 4 bytes needed, "
                                   f"{end - pos} left")
        ext_type = body[pos] << 8 | body[pos + 1]
        length = body[pos + 2] << 8 | body[pos + 3]
        pos += 4
        if length > end - pos:
            raise ClientHelloError(f"truncated extension {ext_type}: {length} bytes "
                                   f"needed, {end - pos} left")
        if ext_type in seen:
            raise ClientHelloError(f"extension {ext_type} appears twice")
        seen.add(ext_type)
        types.append(ext_type)
        if ext_type == _SERVER_NAME:
            server_name = _parse_server_name_checked(body[pos:pos + length])
        pos += length
    return server_name, tuple(types)


class ClientHelloReader:
    """
    Reassembles one ClientHello from the first bytes of a connection (see the module
    docstring).  :meth:`feed` returns None until the hello is complete, then the
    :class:`ClientHello`; malformed, non-TLS or oversized input raises
    :class:`ClientHelloError`, at the first byte that proves it where possible (an
    HTTP request fails on its first byte).  Whenever it asks for more, it holds at most
    ``max_bytes`` (:attr:`buffered`).  After a result or an error the reader is spent.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < _RECORD_HEADER + _HANDSHAKE_HEADER:
            raise ValueError("max_bytes is too small for any ClientHello")
        self.max_bytes = max_bytes
        self._raw = bytearray()
        self._parsed = 0  # bytes of _raw that are whole records already taken
        self._message = bytearray()  # handshake bytes reassembled from records
        self._needed: int | None = None  # length of the handshake message, header included
        self._records = 0
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held so far."""
        return len(self._raw)

    def feed(self, data: bytes) -> ClientHello | None:
        """Take the next bytes of the connection; see the class docstring."""
        if self._done:
            raise ClientHelloError("the reader is spent")
        try:
            self._raw += data
            return self._advance()
        except ClientHelloError:
            self._done = True
            self._raw = bytearray()
            self._message = bytearray()
            raise

    def _advance(self) -> ClientHello | None:
        raw = self._raw
        while True:
            start = self._parsed
            available = len(raw) - start
            if available < 1:
                return None
            if raw[start] != _HANDSHAKE:
                raise ClientHelloError(f"record type {raw[start]}: not a TLS handshake")
            if available >= 2 and raw[start + 1] != 3:
                raise ClientHelloError(f"record version major {raw[start + 1]}: not TLS")
            if available < _RECORD_HEADER:
                if len(raw) > self.max_bytes:
                    raise ClientHelloError(f"ClientHello over {self.max_bytes} bytes")
                return None
            length = int.from_bytes(raw[start + 3:start + 5], "big")
            if length == 0 or length > MAX_RECORD_LENGTH:
                raise ClientHelloError(f"handshake record of {length} bytes")
            end = start + _RECORD_HEADER + length
            if end > self.max_bytes:
                raise ClientHelloError(f"ClientHello over {self.max_bytes} bytes")
            self._peek(raw, start + _RECORD_HEADER, min(end, len(raw)))
            if len(raw) < end:
                return None
            self._message += raw[start + _RECORD_HEADER:end]
            self._parsed = end
            self._records += 1
            self._check_header()
            needed = self._needed
            if needed is not None and len(self._message) >= needed:
                if len(self._message) > needed:
                    raise ClientHelloError("data after the ClientHello in its last record")
                self._done = True
                name, types = _parse_body(bytes(self._message[_HANDSHAKE_HEADER:]))
                hello = ClientHello(name, bytes(raw), types, self._records, needed)
                self._raw = bytearray()
                self._message = bytearray()
                return hello

    def _peek(self, raw: bytearray, start: int, end: int) -> None:
        """Check the handshake header early, from a record still arriving."""
        if self._needed is not None or start >= end:
            return
        have = bytes(self._message) + bytes(raw[start:end])
        if have[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"handshake type {have[0]}: not a ClientHello")
        if len(have) >= _HANDSHAKE_HEADER:
            self._set_needed(have)

    def _check_header(self) -> None:
        if self._needed is None and len(self._message) >= _HANDSHAKE_HEADER:
            self._set_needed(bytes(self._message[:_HANDSHAKE_HEADER]))

    def _set_needed(self, header: bytes) -> None:
        if header[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"handshake type {header[0]}: not a ClientHello")
        length = int.from_bytes(header[1:4], "big")
        needed = _HANDSHAKE_HEADER + length
        # The fewest bytes on the wire: the message plus one header per full record.
        records = -(-needed // MAX_RECORD_LENGTH)
        if needed + records * _RECORD_HEADER > self.max_bytes:
            raise ClientHelloError(f"ClientHello of {needed} bytes over {self.max_bytes}")
        self._needed = needed


def parse_client_hello(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ClientHello:
    """The ClientHello at the start of ``data``; an incomplete one is an error."""
    hello = ClientHelloReader(max_bytes).feed(data)
    if hello is None:
        raise ClientHelloError("truncated ClientHello")
    return hello
