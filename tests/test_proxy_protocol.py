"""
The PROXY protocol in one place (:mod:`epsproxy.net.proxy_protocol`): what the writer
makes the reader reads back (addresses and the authority TLV a pooled connection
carries), read however fragmented, and hostile headers refused with a reason.
"""

from __future__ import annotations

import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import TestCase

from epsproxy.net.proxy_protocol import (
    MAX_PROXY_HEADER,
    PP2_TYPE_AUTHORITY,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderReader,
    proxy_v2_header,
)


class RoundTrip(TestCase):
    """proxy_v2_header's output read back by ProxyHeaderReader."""

    def test_addresses_and_authority(self) -> None:
        header = proxy_v2_header("192.0.2.1:4000", "198.51.100.2:443",
                                 authority="www.example.org")
        read = ProxyHeaderReader().feed(header + b"\x16\x03\x01rest")
        assert read is not None
        self.assertEqual(read.source, IPv4Address("TCP", "192.0.2.1", 4000))
        self.assertEqual(read.destination, IPv4Address("TCP", "198.51.100.2", 443))
        self.assertEqual(read.authority, "www.example.org")
        self.assertEqual(read.rest, b"\x16\x03\x01rest")

    def test_ipv6_without_server(self) -> None:
        read = ProxyHeaderReader().feed(proxy_v2_header("[2001:db8::1]:5", authority="a.b"))
        assert read is not None
        self.assertEqual(read.source, IPv6Address("TCP", "2001:db8::1", 5))
        self.assertEqual(read.destination, IPv6Address("TCP", "::", 0))
        self.assertEqual(read.authority, "a.b")

    def test_address_objects_give_the_same_header_as_texts(self) -> None:
        for client, server, text_client, text_server in (
            (IPv4Address("TCP", "192.0.2.1", 4000), IPv4Address("TCP", "198.51.100.2", 443),
             "192.0.2.1:4000", "198.51.100.2:443"),
            (IPv6Address("TCP", "2001:db8::1", 5), None, "[2001:db8::1]:5", None),
        ):
            self.assertEqual(proxy_v2_header(client, server, authority="a.b"),
                             proxy_v2_header(text_client, text_server, authority="a.b"))

    def test_an_object_that_is_not_an_ip_address_and_port_is_refused(self) -> None:
        class Unix:
            name = "/run/socket"

        class NoPort:
            host = "192.0.2.1"
            port = None

        for bad in (Unix(), NoPort(), IPv4Address("TCP", "192.0.2.1", 70000),
                    IPv4Address("TCP", "not an ip", 1), 42):
            with self.assertRaises(ValueError):
                proxy_v2_header(bad)
        with self.assertRaises(ValueError):  # families that differ
            proxy_v2_header(IPv4Address("TCP", "192.0.2.1", 1), IPv6Address("TCP", "::1", 2))

    def test_local_with_authority(self) -> None:
        read = ProxyHeaderReader().feed(proxy_v2_header(None, authority="x.example"))
        assert read is not None
        self.assertIsNone(read.source)
        self.assertEqual(read.authority, "x.example")

    def test_one_byte_at_a_time(self) -> None:
        header = proxy_v2_header("192.0.2.1:4000", authority="www.example.org")
        reader = ProxyHeaderReader()
        results = [reader.feed(header[i:i + 1]) for i in range(len(header))]
        self.assertTrue(all(r is None for r in results[:-1]))
        last = results[-1]
        assert last is not None
        self.assertEqual((last.authority, last.rest), ("www.example.org", b""))

    def test_v1_destination(self) -> None:
        read = ProxyHeaderReader().feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n")
        assert read is not None
        self.assertEqual(read.destination, IPv4Address("TCP", "192.0.2.2", 2))
        self.assertIsNone(read.authority)

    def test_bad_arguments(self) -> None:
        for bad in ({"client": "nonsense"}, {"client": "192.0.2.1:1", "server": "[::1]:2"},
                    {"client": "192.0.2.1:1", "authority": ""},
                    {"client": "192.0.2.1:1", "authority": "a" * 256}):
            self.assertRaises(ValueError, proxy_v2_header, **bad)


def _v2(body: bytes, command: int = 0x21, family: int = 0x11) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


class Hostile(TestCase):
    """Headers that must be refused, each with a reason, never an exception of another kind."""

    def refused(self, data: bytes, why: str, max_bytes: int = MAX_PROXY_HEADER) -> None:
        with self.assertRaises(ProxyHeaderError) as e:
            ProxyHeaderReader(max_bytes).feed(data)
        self.assertIn(why, str(e.exception))

    def test_truncated_tlv(self) -> None:
        addresses = bytes(12)
        self.refused(_v2(addresses + b"\x02\x00"), "truncated PROXY v2 TLV")

    def test_tlv_longer_than_header(self) -> None:
        self.refused(_v2(bytes(12) + b"\x02\x00\x09abc"), "longer than the header")

    def test_authority_not_utf8(self) -> None:
        read = ProxyHeaderReader().feed(_v2(bytes(12) + bytes([PP2_TYPE_AUTHORITY, 0, 2])
                                            + b"\xff\xfe"))
        assert read is not None
        with self.assertRaises(ProxyHeaderError):
            read.authority

    def test_oversized(self) -> None:
        self.refused(_v2(bytes(12) + bytes([4]) + struct.pack("!H", 300) + bytes(300)),
                     "PROXY v2 header of", max_bytes=256)

    def test_not_a_header(self) -> None:
        self.refused(b"\x16\x03\x01\x00", "not a PROXY header")
        self.refused(V2_SIGNATURE + b"\x31\x11\x00\x00", "version 3")
        self.refused(_v2(bytes(12), command=0x22), "command 2")
