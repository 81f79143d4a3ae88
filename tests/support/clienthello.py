"""
Making TLS ClientHellos for tests: real first flights from pyOpenSSL and the ``ssl``
module, and hand-built handshake messages, extensions and records (to cut, re-record or
break them).
"""

from __future__ import annotations

import ssl
import struct

from OpenSSL import SSL


def openssl_hello(
    name: bytes | None = b"test.internal-server.local",
    *,
    alpn: list[bytes] | None = None,
    ciphers: str | None = None,
    max_version: int | None = None,
    no_ticket: bool = False,
    ocsp: bool = False,
) -> bytes:
    """The first flight of a pyOpenSSL client (what it writes before any answer)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        ctx.set_alpn_protos(alpn)
    if ciphers:
        ctx.set_cipher_list(ciphers.encode())
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if no_ticket:
        ctx.set_options(SSL.OP_NO_TICKET)
    if ocsp:
        ctx.set_ocsp_client_callback(lambda conn, data, extra: True)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if name is not None:
        conn.set_tlsext_host_name(name)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(1 << 20)


def stdlib_hello(name: str | None = "test.internal-server.local", alpn=None) -> bytes:
    """The first flight of the ``ssl`` module's client (the system's OpenSSL)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def message_of(hello: bytes) -> bytes:
    """The handshake message of a one-record hello."""
    assert hello[0] == 22 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    return hello[5:]


def records(message: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """``message`` cut into handshake records of ``sizes`` (repeating the last one)."""
    out, pos, i = bytearray(), 0, 0
    while pos < len(message):
        n = sizes[min(i, len(sizes) - 1)]
        chunk = message[pos:pos + n]
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += n
        i += 1
    return bytes(out)


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    return len(entry).to_bytes(2, "big") + entry


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def hello_message(
    extensions: bytes | None = b"",
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"\x07" * 32,
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    trailer: bytes = b"",
) -> bytes:
    """A ClientHello handshake message; ``extensions`` None leaves the block out."""
    body = (
        version + b"\x42" * 32 + bytes([len(session_id)]) + session_id
        + len(suites).to_bytes(2, "big") + suites + bytes([len(compression)]) + compression
    )
    if extensions is not None:
        body += len(extensions).to_bytes(2, "big") + extensions
    body += trailer
    return b"\x01" + len(body).to_bytes(3, "big") + body


def hello(extensions: bytes | None = b"", **kwargs) -> bytes:
    return records(hello_message(extensions, **kwargs), [16384])
