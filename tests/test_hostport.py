"""
Host and port text, IP checks and addresses blurred for logs (epsproxy.net.hostport):
parse_host_port vectors, garbage and hostile input, format_host_port round trips,
valid_host/is_ip, peer keys (IPv6 per /64) and truncated addresses.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.net.hostport import (
    format_host_port,
    is_ip,
    parse_host_port,
    peer_key,
    truncate_ip,
    valid_host,
)


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


class ParseAddressTests(SynchronousTestCase):
    """parse_host_port vectors (SPEC §22.4 style) and garbage."""

    def test_vectors(self):
        cases = {
            "localhost:3322": ("localhost", 3322),
            "127.0.0.1:0": ("127.0.0.1", 0),
            "[::1]:80": ("::1", 80),
            "[2001:db8::1]:65535": ("2001:db8::1", 65535),
            ":80": ("", 80),
            "sd-1.example.org:443": ("sd-1.example.org", 443),
            "internal_server:1": ("internal_server", 1),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_host_port(text), expected, text)

    def test_default_port(self):
        self.assertEqual(parse_host_port("example.org", 443), ("example.org", 443))
        self.assertEqual(parse_host_port("[::1]", 443), ("::1", 443))
        with self.assertRaises(ValueError):
            parse_host_port("example.org")

    def test_garbage(self):
        for text in [
            "", ":", "host:", "host:port", "host:-1", "host:65536", "host:99999999",
            "::1:80", "[::1", "[::1]80", "[nothost]:80", "[1.2.3.4]:80", "a b:80",
            "host:+80", "host: 80", "host:80 ", "-host:80", "ho/st:80", "héllo:80",
            "host:８０", "a" * 300 + ":80", "[]:80", "host:0x50",
        ]:
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_host_port(text)

    def test_not_a_string(self):
        for value in (None, 80, b"host:80", ["host", 80]):
            with self.assertRaises(ValueError):
                parse_host_port(value)
        for port in ("443", [443], 4.5):  # (unhashable ones too: the parse is cached)
            with self.assertRaises(ValueError):
                parse_host_port("example.org", port)

    def test_cached_answers_and_errors_stay_the_same(self):
        for _ in range(2):
            self.assertEqual(parse_host_port("[::1]:8443"), ("::1", 8443))
            with self.assertRaises(ValueError):
                parse_host_port("host:99999999")

    @settings(deadline=None, max_examples=200)
    @given(st.text(max_size=40))
    def test_never_crashes(self, text):
        try:
            host, port = parse_host_port(text)
        except ValueError:
            return
        self.assertTrue(0 <= port <= 65535)
        self.assertIsInstance(host, str)

    @settings(deadline=None, max_examples=100)
    @given(st.ip_addresses(), st.integers(0, 65535))
    def test_round_trip(self, ip, port):
        text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        self.assertEqual(parse_host_port(text), (str(ip), port))


class HostilePortTextTests(SynchronousTestCase):
    """Input a peer or a careless setting could send: none of it gets through."""

    def test_hostile(self):
        for text in [
            "host:80\x00", "\x00host:80", "host\r\n:80", "host:80\r\nX: y", "host:80/path",
            "user@host:80", "http://host:80", "[::1]:80:80", "[::1]]:80", "[[::1]]:80",
            "[::1%\r\nX: y]:80", "[fe80::1% x]:80", "host:" + "9" * 1000, "h" * 254 + ":80",
            "host.:80x", ".host:80", "host:80\u2028", "\u0130stanbul:80", "[::1]:\u0668\u0660",
        ]:
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_host_port(text)

    def test_scoped_ipv6(self):
        self.assertEqual(parse_host_port("[fe80::1%eth0]:80"), ("fe80::1%eth0", 80))

    def test_long_input_is_refused_quickly(self):
        for text in ("a" * 10**6 + ":80", "[" + ":" * 10**6 + "]:80", "a:" + "1" * 10**6):
            with self.assertRaises(ValueError):
                parse_host_port(text)

    def test_messages_name_the_text(self):
        e = self.assertRaises(ValueError, parse_host_port, "host:port")
        self.assertIn("'host:port'", str(e))

    @settings(deadline=None, max_examples=100)
    @given(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True), st.integers(0, 65535))
    def test_format_round_trip(self, host, port):
        self.assertEqual(parse_host_port(format_host_port(host, port)), (host, port))

    @settings(deadline=None, max_examples=100)
    @given(st.ip_addresses(), st.integers(0, 65535))
    def test_format_round_trip_ip(self, ip, port):
        self.assertEqual(parse_host_port(format_host_port(str(ip), port)), (str(ip), port))

    def test_format_brackets_ipv6_only(self):
        self.assertEqual(format_host_port("::1", 80), "[::1]:80")
        self.assertEqual(format_host_port("192.0.2.1", 80), "192.0.2.1:80")
        self.assertEqual(format_host_port("example.org", 443), "example.org:443")


class HostTests(SynchronousTestCase):
    """is_ip and valid_host: what may be connected to or written into a request line."""

    def test_is_ip(self):
        for text in ("127.0.0.1", "::1", "2001:db8::1", "::ffff:192.0.2.1"):
            self.assertTrue(is_ip(text), text)
        for text in ("", "localhost", "[::1]", "1.2.3", "256.0.0.1", "::1:80:x", " 127.0.0.1",
                     "127.0.0.1\n", "127.0.0.1/8", "x" * 1000, "::1%\r\nX: y", "fe80::1% x"):
            self.assertFalse(is_ip(text), repr(text))

    def test_valid_host(self):
        for host in ("example.org", "sd-1", "internal_server", "192.0.2.1", "::1", "a" * 253):
            self.assertTrue(valid_host(host), host)
        for host in ("", "-x", ".x", "a b", "a\r\nb", "a/b", "a:b", "[::1]", "h\u00e9", "a" * 254,
                     "x\x00", "user@host", "host%0d"):
            self.assertFalse(valid_host(host), repr(host))


class KeyTests(SynchronousTestCase):
    """Peer keys (IPv6 per /64, SPEC §23.1 #11) and log truncation."""

    def test_ipv4(self):
        self.assertEqual(peer_key(v4("192.0.2.7")), "192.0.2.7")

    def test_ipv6_per_64(self):
        a = peer_key(v6("2001:db8:1:2::1"))
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(peer_key(v6("2001:db8:1:2:ffff:ffff:ffff:ffff")), a)
        self.assertNotEqual(peer_key(v6("2001:db8:1:3::1")), a)
        self.assertEqual(peer_key(v6("fe80::1%eth0")), "fe80::/64")

    def test_ipv4_mapped(self):
        self.assertEqual(peer_key(v6("::ffff:192.0.2.7")), "192.0.2.7")

    def test_other_addresses(self):
        self.assertEqual(peer_key(UNIXAddress(b"/tmp/sock")), "UNIXAddress")
        self.assertEqual(peer_key(UNIXAddress(None)), "UNIXAddress")
        self.assertEqual(peer_key(v4("not-an-ip")), "not-an-ip")
        self.assertEqual(peer_key(object()), "object")

    def test_truncate(self):
        self.assertEqual(truncate_ip("192.0.2.7"), "192.0.x.x")
        self.assertEqual(truncate_ip("2001:db8:1:2::/64"), "2001:db8::/32")
        self.assertEqual(truncate_ip("2001:0db8:0001::1"), "2001:db8::/32")
        self.assertEqual(truncate_ip("::1"), "0:0::/32")
        for garbage in ("", "host", "UNIXAddress", "1.2.3", "x" * 1000):
            self.assertEqual(truncate_ip(garbage), "unknown")
