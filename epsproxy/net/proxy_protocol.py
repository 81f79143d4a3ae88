"""
The PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt), both ways, in one
place: :class:`ProxyHeaderReader` reads a v1 or v2 header from the first bytes of a
connection, however fragmented; :func:`proxy_v2_header` writes a v2 header.

Used by the public proxy's TLS listener (a header from a trusted load balancer), by the
private proxy towards its internal server (the client's address), and between the two
proxies on a pooled connection (:mod:`epsproxy.proxy.pool`): there the header also
carries the TLS server name the client asked for, in the standard ``PP2_TYPE_AUTHORITY``
TLV (:data:`PP2_TYPE_AUTHORITY`), so the private proxy needs no format of its own.

Pure code: no I/O, no reactor.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

from epsproxy.net.hostport import parse_host_port

__all__ = [
    "MAX_PROXY_HEADER",
    "PP2_TYPE_AUTHORITY",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "V2_SIGNATURE",
    "proxy_v2_header",
]

#: Largest PROXY v2 header accepted (address block and TLVs included); v1 has 107.
MAX_PROXY_HEADER = 4096

#: The 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: The v2 TLV type of the host name the client asked for (its TLS SNI), UTF-8.
PP2_TYPE_AUTHORITY = 0x02

_V1_PREFIX = b"PROXY "
_V1_MAX = 107
_V2_BLOCK = {0: 0, 1: 12, 2: 36, 3: 216}  # address block size per family


class ProxyHeaderError(Exception):
    """The connection does not begin with an acceptable PROXY header; text says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """
    A PROXY header: ``source`` is the client address it names, or None when it names
    none (v1 ``UNKNOWN``, v2 ``LOCAL`` health checks, UNIX or unspecified families:
    then the connection's own peer address stands); ``destination`` the address the
    client connected to (None likewise); ``tlvs`` the v2 TLVs by type (the last of a
    type wins); ``rest`` are the bytes after it.
    """

    source: IAddress | None
    rest: bytes
    destination: IAddress | None = None
    tlvs: dict[int, bytes] = field(default_factory=dict)

    @property
    def authority(self) -> str | None:
        """The ``PP2_TYPE_AUTHORITY`` TLV as text (the client's server name), or None."""
        value = self.tlvs.get(PP2_TYPE_AUTHORITY)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyHeaderError("PROXY v2 authority is not UTF-8") from None


def _address(host: bytes | str, port: int, version: int) -> IAddress:
    text = host.decode("ascii") if isinstance(host, bytes) else host
    ip = ipaddress.ip_address(text)
    if ip.version != version:
        raise ValueError(f"not an IPv{version} address")
    if version == 4:
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


def _port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ValueError("bad port")
    return int(text)


def _parse_v1(line: bytes) -> tuple[IAddress | None, IAddress | None]:
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyHeaderError("malformed PROXY v1 header")
    if parts[1] == b"UNKNOWN":
        return None, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 header")
    version = 4 if parts[1] == b"TCP4" else 6
    try:
        source = _address(parts[2], _port(parts[4]), version)
        destination = _address(parts[3], _port(parts[5]), version)
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("bad address in PROXY v1 header") from None
    return source, destination


def _tlvs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyHeaderError("truncated PROXY v2 TLV")
        size = int.from_bytes(data[pos + 1:pos + 3], "big")
        if pos + 3 + size > len(data):
            raise ProxyHeaderError("PROXY v2 TLV longer than the header")
        found[data[pos]] = data[pos + 3:pos + 3 + size]
        pos += 3 + size
    return found


def _parse_v2(header: bytes) -> tuple[IAddress | None, IAddress | None, dict[int, bytes]]:
    command = header[12] & 0x0F
    family, transport = header[13] >> 4, header[13] & 0x0F
    block = header[16:]
    tlvs: dict[int, bytes] = {}
    if family in _V2_BLOCK and len(block) >= _V2_BLOCK[family]:
        tlvs = _tlvs(block[_V2_BLOCK[family]:])
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return None, None, tlvs
    if command != 1:
        raise ProxyHeaderError(f"PROXY v2 command {command}")
    if family == 0 or family == 3:  # UNSPEC, UNIX: no IP address to use
        return None, None, tlvs
    if family not in (1, 2) or transport != 1:
        raise ProxyHeaderError(f"PROXY v2 family {family} transport {transport}")
    size = 4 if family == 1 else 16
    if len(block) < 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 address block too short")
    source_port, destination_port = struct.unpack("!HH", block[2 * size:2 * size + 4])
    # Packed addresses are valid by their size: written as text without re-parsing.
    if family == 1:
        return (IPv4Address("TCP", socket.inet_ntop(socket.AF_INET, block[:4]), source_port),
                IPv4Address("TCP", socket.inet_ntop(socket.AF_INET, block[4:8]),
                            destination_port), tlvs)
    return (IPv6Address("TCP", socket.inet_ntop(socket.AF_INET6, block[:16]), source_port),
            IPv6Address("TCP", socket.inet_ntop(socket.AF_INET6, block[16:32]),
                        destination_port), tlvs)


class ProxyHeaderReader:
    """
    Reads a PROXY protocol v1 or v2 header from the first bytes of a connection,
    however fragmented: :meth:`feed` returns None until it is complete, then a
    :class:`ProxyHeader`; anything else raises :class:`ProxyHeaderError` as soon as the
    bytes prove it.  Holds at most ``max_bytes`` (:data:`MAX_PROXY_HEADER`) plus one read.
    """

    def __init__(self, max_bytes: int = MAX_PROXY_HEADER) -> None:
        self._buffer = b""
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Take the next bytes; see the class docstring."""
        self._buffer += data
        buf = self._buffer
        if not buf:
            return None
        if buf[:1] == b"P":
            if not buf.startswith(_V1_PREFIX[:len(buf)]):
                raise ProxyHeaderError("not a PROXY header")
            end = buf.find(b"\r\n", 0, _V1_MAX)
            if end < 0:
                if len(buf) >= _V1_MAX:
                    raise ProxyHeaderError("PROXY v1 header without CRLF in 107 bytes")
                return None
            source, destination = _parse_v1(buf[:end])
            return ProxyHeader(source, buf[end + 2:], destination)
        if not buf.startswith(V2_SIGNATURE[:len(buf)]) and not buf.startswith(V2_SIGNATURE):
            raise ProxyHeaderError("not a PROXY header")
        if len(buf) > 12 and buf[12] >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2 version {buf[12] >> 4}")
        if len(buf) < 16:
            return None
        total = 16 + int.from_bytes(buf[14:16], "big")
        if total > self.max_bytes:
            raise ProxyHeaderError(f"PROXY v2 header of {total} bytes")
        if len(buf) < total:
            return None
        source, destination, tlvs = _parse_v2(buf[:total])
        return ProxyHeader(source, buf[total:], destination, tlvs)


def _ip_port(address: str | Any) -> tuple[bytes, int]:
    """
    An ``"ip:port"`` text, or an address object with ``host`` and ``port`` (a parsed
    header's, a transport's: no text made and read back per connection), as the packed
    address (4 or 16 bytes) and the port; ValueError if it is neither.
    """
    if isinstance(address, str):
        host, port = parse_host_port(address)
    else:
        found_host, found_port = getattr(address, "host", None), getattr(address, "port", None)
        if (not isinstance(found_host, str) or not isinstance(found_port, int)
                or not 0 <= found_port <= 65535):
            raise ValueError(f"not an IP address and port: {type(address).__name__}")
        host, port = found_host, found_port
    try:  # the C parser first: this runs for every pooled or forwarded connection
        return socket.inet_pton(socket.AF_INET, host), port
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host), port
    except OSError:
        return ipaddress.ip_address(host).packed, port  # its error, or a scoped IPv6


def proxy_v2_header(
    client: str | Any | None = None, server: str | Any | None = None, *,
    authority: str | None = None,
) -> bytes:
    """
    A PROXY protocol v2 header: a ``PROXY`` command over TCP from ``client`` to
    ``server`` (``"ip:port"`` texts or address objects with ``host`` and ``port``; an
    absent server is the family's zero address, port 0), or a ``LOCAL`` command when
    ``client`` is None; with ``authority`` a
    ``PP2_TYPE_AUTHORITY`` TLV naming it.  Raises ValueError for an address that is not
    an IP address and port, families that differ, or an authority over 255 bytes.
    """
    tlv = b""
    if authority is not None:
        name = authority.encode("utf-8")
        if not name or len(name) > 255:
            raise ValueError("authority must be 1 to 255 bytes")
        tlv = bytes([PP2_TYPE_AUTHORITY]) + struct.pack("!H", len(name)) + name
    if client is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlv)) + tlv
    source, source_port = _ip_port(client)
    if server is None:
        target, target_port = bytes(len(source)), 0
    else:
        target, target_port = _ip_port(server)
    if len(source) != len(target):
        raise ValueError("client and server addresses are of different families")
    family = 0x11 if len(source) == 4 else 0x21
    body = source + target + struct.pack("!HH", source_port, target_port) + tlv
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
