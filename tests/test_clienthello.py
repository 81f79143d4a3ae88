"""
The strict ClientHello reader (epsproxy.proxy.clienthello): SPEC §22.3's vector; real
ClientHellos made by OpenSSL (pyOpenSSL with OpenSSL 4 and its X25519MLKEM768 key
share, the ``ssl`` module, ``openssl s_client``) for many names and extension sets,
re-fragmented at every split point and re-recorded across TLS records; the SNI rules;
caps (16 KiB default, 64 KiB configured); and mutated/truncated input, where only
ClientHelloError may escape and buffering stays bounded.
"""

from __future__ import annotations

import os
import shutil

from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from epsproxy.proxy.clienthello import (  # the two readings of a body, compared below
    DEFAULT_MAX_BYTES,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    _parse_body,
    _parse_body_checked,
    parse_client_hello,
    valid_host_name,
)
from tests.support.clienthello import (
    ext,
    hello,
    hello_message,
    message_of,
    openssl_hello,
    records,
    sni_ext,
    stdlib_hello,
)

SPEC_VECTOR = bytes.fromhex(
    "1603010200010001fc0303b66b3f8d6b1c7fbc6def4cf61a86eb5e1ade3dfbb6e1996801539e51efb6a0a620f84e5e"
    "8df6aa1bbf29dc5014996049f7774904aa22d44d1df1d4d124c0365e98003e130213031301c02cc030009fcca9cca8"
    "ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01"
    "0001750000000e000c0000096c6f63616c686f7374000b000403000102000a000c000a001d0017001e001900183374"
    "00000010000e000c02683208687474702f312e31001600000017000000310000000d002a0028040305030603080708"
    "080809080a080b080408050806040105010601030303010302040205020602002b00050403040303002d0002010100"
    "3300260024001d0020094e8ee13e1d3fad26d4966d305b28dc81b3df5317820b338dcba59b77d72c41001500be0000"
    + "00" * 47 * 4
)

X25519MLKEM768 = 0x11EC
KEY_SHARE = 51


def feed_all(reader: ClientHelloReader, chunks) -> ClientHello | None:
    result = None
    for chunk in chunks:
        assert result is None, "bytes fed after the result"
        result = reader.feed(chunk)
    return result


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# -- strategies ----------------------------------------------------------------------

_label = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9_-]{0,62}", fullmatch=True)
host_names = st.lists(_label, min_size=1, max_size=6).map(".".join).filter(
    lambda n: len(n) <= 253
)
alpn_lists = st.none() | st.lists(
    st.sampled_from([b"h2", b"http/1.1", b"acme-tls/1", b"spdy/3", b"x" * 200]),
    min_size=1, max_size=4, unique=True,
)
cipher_strings = st.none() | st.sampled_from(
    ["ECDHE+AESGCM", "ECDHE+CHACHA20", "HIGH:!aNULL", "AES128-SHA", "DEFAULT:@SECLEVEL=0"]
)
versions = st.none() | st.sampled_from([SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])


class SpecVector(TestCase):
    """SPEC §22.3."""

    def test_vector(self):
        self.assertEqual(len(SPEC_VECTOR), 517)
        h = parse_client_hello(SPEC_VECTOR)
        self.assertEqual(h.server_name, "localhost")
        self.assertEqual(len(h.extension_types), 13)
        self.assertEqual(
            h.extension_types, (0, 11, 10, 13172, 16, 22, 23, 49, 13, 43, 45, 51, 21)
        )
        self.assertEqual((h.record_count, h.hello_length, h.raw), (1, 512, SPEC_VECTOR))

    def test_vector_split_at_every_point_and_byte_by_byte(self):
        for i in range(len(SPEC_VECTOR) + 1):
            reader = ClientHelloReader()
            first = reader.feed(SPEC_VECTOR[:i])
            if i < len(SPEC_VECTOR):
                self.assertIsNone(first)
                first = reader.feed(SPEC_VECTOR[i:])
            self.assertEqual(first.server_name, "localhost")
            self.assertEqual(first.raw, SPEC_VECTOR)
        reader = ClientHelloReader()
        results = [reader.feed(SPEC_VECTOR[i:i + 1]) for i in range(len(SPEC_VECTOR))]
        self.assertEqual(results[:-1], [None] * (len(SPEC_VECTOR) - 1))
        self.assertEqual(results[-1].server_name, "localhost")

    def test_vector_in_records_of_every_size(self):
        message = message_of(SPEC_VECTOR)
        for size in range(1, len(message) + 1):
            data = records(message, [size])
            h = ClientHelloReader().feed(data)
            self.assertEqual((h.server_name, h.raw), ("localhost", data))
            self.assertEqual(h.record_count, -(-len(message) // size))

    def test_bytes_after_the_hello_are_kept_for_replay(self):
        data = SPEC_VECTOR + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03early"
        h = ClientHelloReader().feed(data)
        self.assertEqual(h.raw, data)

    def test_every_proper_prefix_asks_for_more(self):
        for i in range(len(SPEC_VECTOR)):
            self.assertIsNone(ClientHelloReader().feed(SPEC_VECTOR[:i]))
            with self.assertRaises(ClientHelloError):
                parse_client_hello(SPEC_VECTOR[:i])


class RealHellos(TestCase):
    """ClientHellos as OpenSSL writes them."""

    def test_post_quantum_hello_of_pyopenssl(self):
        data = openssl_hello()
        self.assertGreater(len(data), 1500)
        h = parse_client_hello(data)
        self.assertEqual(h.server_name, "test.internal-server.local")
        self.assertIn(KEY_SHARE, h.extension_types)
        body = message_of(data)
        # the hybrid share: ML-KEM-768 encapsulation key (1184) + X25519 (32)
        share = X25519MLKEM768.to_bytes(2, "big") + (1216).to_bytes(2, "big")
        self.assertTrue(share in body, "no X25519MLKEM768 key share")

    def test_post_quantum_hello_at_every_split_point(self):
        data = openssl_hello()
        for i in range(len(data) + 1):
            reader = ClientHelloReader()
            h = reader.feed(data[:i]) or reader.feed(data[i:])
            self.assertEqual(h.server_name, "test.internal-server.local")
            self.assertEqual(h.raw, data)

    def test_post_quantum_hello_over_two_and_many_records(self):
        message = message_of(openssl_hello())
        for sizes in ([1000], [1], [7, 1500, 3], [len(message) - 1]):
            data = records(message, sizes)
            h = parse_client_hello(data)
            self.assertEqual(h.server_name, "test.internal-server.local")
            self.assertGreater(h.record_count, 1)

    def test_stdlib_hellos(self):
        for name in ("localhost", "a.b", "x" * 63 + ".example"):
            h = parse_client_hello(stdlib_hello(name, alpn=["h2", "http/1.1"]))
            self.assertEqual(h.server_name, name)
        self.assertIsNone(parse_client_hello(stdlib_hello(None)).server_name)

    def test_without_sni(self):
        h = parse_client_hello(openssl_hello(None))
        self.assertIsNone(h.server_name)
        self.assertNotIn(0, h.extension_types)

    def test_tls_1_0_and_1_1_only_clients_are_refused(self):
        # legacy_version 0301/0302: SPEC §14.6 accepts 0303 only.
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
            try:
                data = openssl_hello(max_version=version, ciphers="DEFAULT:@SECLEVEL=0")
            except SSL.Error:
                continue  # the library refuses to offer it at all
            if not data:
                continue
            with self.assertRaises(ClientHelloError) as e:
                parse_client_hello(data)
            self.assertIn("client_version", str(e.exception))

    @hsettings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
    @given(
        name=host_names, alpn=alpn_lists, ciphers=cipher_strings, version=versions,
        no_ticket=st.booleans(), ocsp=st.booleans(), cuts=st.lists(st.integers(0, 1 << 16)),
        sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=5),
    )
    def test_any_openssl_hello_however_cut(self, name, alpn, ciphers, version, no_ticket,
                                           ocsp, cuts, sizes):
        data = openssl_hello(name.encode(), alpn=alpn, ciphers=ciphers, max_version=version,
                             no_ticket=no_ticket, ocsp=ocsp)
        for wire in (data, records(message_of(data), sizes)):
            h = feed_all(ClientHelloReader(), chunked(wire, cuts))
            self.assertIsNotNone(h)
            self.assertEqual(h.server_name, name.lower())
            self.assertEqual(h.raw, wire)

    @defer.inlineCallbacks
    def test_openssl_s_client(self):
        """One hello from the real ``openssl s_client`` over a loopback socket."""
        if shutil.which("openssl") is None:
            raise SkipTest("no openssl command")
        got: defer.Deferred[ClientHello] = defer.Deferred()

        class Capture(Protocol):
            def connectionMade(self):
                self.reader = ClientHelloReader()

            def dataReceived(self, data):
                try:
                    h = self.reader.feed(data)
                except ClientHelloError as e:
                    got.errback(e)
                    self.transport.abortConnection()
                    return
                if h is not None:
                    got.callback(h)
                    self.transport.abortConnection()

        port = reactor.listenTCP(0, Factory.forProtocol(Capture), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ended: defer.Deferred[None] = defer.Deferred()

        class Client(protocol.ProcessProtocol):
            def processEnded(self, reason):
                ended.callback(None)

        proc = reactor.spawnProcess(
            Client(), "openssl",
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port.getHost().port}",
             "-servername", "S-Client.Example.ORG", "-alpn", "h2,http/1.1"],
            env=dict(os.environ), usePTY=False,
        )
        h = yield got
        proc.closeStdin()
        yield ended
        self.assertEqual(h.server_name, "s-client.example.org")
        self.assertIn(16, h.extension_types)  # ALPN


class SNIRules(TestCase):
    """SPEC §14.6 step 8 and where we are stricter or kinder (module docstring)."""

    def name_of(self, extensions: bytes) -> str | None:
        return parse_client_hello(hello(extensions)).server_name

    def refused(self, data: bytes, why: str) -> None:
        with self.assertRaises(ClientHelloError) as e:
            parse_client_hello(data)
        self.assertIn(why, str(e.exception))

    def test_names(self):
        self.assertEqual(self.name_of(ext(0, sni_ext(b"Test.Internal-Server.LOCAL"))),
                         "test.internal-server.local")
        self.assertEqual(self.name_of(ext(0, sni_ext(b"example.org."))), "example.org")
        self.assertEqual(self.name_of(ext(0, sni_ext(b"_acme.my_host.example"))),
                         "_acme.my_host.example")
        longest = ".".join(["a" * 63] * 3 + ["b" * 61])
        self.assertEqual(len(longest), 253)
        self.assertEqual(self.name_of(ext(0, sni_ext(longest.encode()))), longest)
        self.assertEqual(self.name_of(ext(0, sni_ext(longest.encode() + b"."))), longest)
        self.assertIsNone(self.name_of(ext(10, b"\x00\x02\x00\x1d")))
        self.assertIsNone(parse_client_hello(hello(None)).server_name)

    def test_bad_names(self):
        for name, why in [
            (b"", "empty"),
            (b"a" * 64, "not a valid"),
            (b".".join([b"a" * 63] * 3 + [b"b" * 62]), "254 bytes"),
            (b"-a.example", "not a valid"),
            (b"a..example", "not a valid"),
            (b"a.example..", "not a valid"),
            (b"a b.example", "not a valid"),
            (b"a\x00.example", "not a valid"),
            ("bücher.example".encode(), "not ASCII"),
            (b"*.example", "not a valid"),
        ]:
            with self.subTest(name=name):
                self.refused(hello(ext(0, sni_ext(name))), why)

    def test_list_length_must_match_exactly(self):
        entry = b"\x00\x00\x09localhost"
        for listed in (len(entry) - 1, len(entry) + 1, len(entry) + 100):
            # The reference let every longer list length pass (SPEC §23.1 #12).
            data = listed.to_bytes(2, "big") + entry
            self.refused(hello(ext(0, data)), "list length")
        self.refused(hello(ext(0, b"\x00\x00")), "empty server_name list")
        self.refused(hello(ext(0, b"\x00")), "truncated")
        self.refused(hello(ext(0, b"")), "truncated")

    def test_exactly_one_host_name(self):
        one = b"\x00\x00\x09localhost"
        two = one + b"\x00\x00\x07example"
        self.refused(hello(ext(0, len(two).to_bytes(2, "big") + two)), "more than one")
        odd = b"\x01\x00\x09localhost"
        self.refused(hello(ext(0, len(odd).to_bytes(2, "big") + odd)), "unknown type")
        short = b"\x00\x00\x0alocalhost"
        self.refused(hello(ext(0, len(short).to_bytes(2, "big") + short)), "truncated")

    def test_structure(self):
        sni = ext(0, sni_ext(b"localhost"))
        cases = [
            (hello(sni + sni), "twice"),
            (hello(sni, version=b"\x03\x01"), "client_version"),
            (hello(sni, version=b"\x03\x04"), "client_version"),
            (hello(sni, session_id=b"x" * 33), "session id"),
            (hello(sni, suites=b""), "cipher suite"),
            (hello(sni, suites=b"\x13\x01\x13"), "cipher suite"),
            (hello(sni, compression=b""), "compression"),
            (hello(sni, compression=b"\x01"), "compression"),
            (hello(sni, trailer=b"\x00"), "extensions length"),
            (hello(sni + b"\x00"), "truncated"),
            (records(hello_message(sni)[:-1], [16384]), "truncated"),
            (records(hello_message(sni) + b"\x02\x00\x00\x00", [16384]), "last record"),
            (records(b"\x02" + hello_message(sni)[1:], [16384]), "not a ClientHello"),
            (b"\x17" + hello(sni)[1:], "not a TLS handshake"),
            (b"\x16\x02" + hello(sni)[2:], "not TLS"),
            (b"\x16\x03\x01\x00\x00" + hello(sni)[5:], "record of 0 bytes"),
            (b"\x16\x03\x01\x40\x01", "record of 16385 bytes"),
            (b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", "record type 71"),
            (b"\x80\x2e\x01\x03\x01", "record type 128"),  # SSLv2-style hello
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "record type 80"),
        ]
        for data, why in cases:
            with self.subTest(why=why):
                self.refused(data, why)

    def test_garbage_fails_on_its_first_byte(self):
        reader = ClientHelloReader()
        with self.assertRaises(ClientHelloError):
            reader.feed(b"G")
        with self.assertRaises(ClientHelloError):
            reader.feed(SPEC_VECTOR)  # spent
        with self.assertRaises(ClientHelloError):
            ClientHelloReader().feed(b"\x16\x03\x01\x00\x10\x02")  # a ServerHello record

    def test_valid_host_name(self):
        self.assertEqual(valid_host_name(b"A.b"), "a.b")
        with self.assertRaises(ClientHelloError):
            valid_host_name(b"a:443")


class Caps(TestCase):
    """Bounded buffering: the default 16 KiB cap, 64 KiB when configured."""

    def big(self, padding: int) -> bytes:
        return hello_message(ext(0, sni_ext(b"big.example")) + ext(21, b"\x00" * padding))

    def test_64_kib_works_when_configured(self):
        message = self.big(60000)
        data = records(message, [16384])
        self.assertLessEqual(len(data), 65536)
        h = ClientHelloReader(max_bytes=65536).feed(data)
        self.assertEqual((h.server_name, h.record_count), ("big.example", 4))
        # and cut into 100-byte pieces
        reader = ClientHelloReader(max_bytes=65536)
        h = feed_all(reader, [data[i:i + 100] for i in range(0, len(data), 100)])
        self.assertEqual(h.server_name, "big.example")

    def test_over_the_cap_fails_as_soon_as_a_length_says_so(self):
        data = records(self.big(20000), [16384])
        with self.assertRaises(ClientHelloError):
            ClientHelloReader().feed(data[:5])  # a full record cannot fit with its header
        data = records(self.big(20000), [10000])
        reader = ClientHelloReader()
        self.assertIsNone(reader.feed(data[:8]))
        with self.assertRaises(ClientHelloError) as e:
            reader.feed(data[8:9])  # the handshake length is known: too big
        self.assertIn(str(DEFAULT_MAX_BYTES), str(e.exception))
        # Many small records that would only add up over the cap: refused at the record
        # that crosses it, never buffered past it.
        data = records(self.big(15800), [100])
        self.assertGreater(len(data), DEFAULT_MAX_BYTES)
        self.assertLess(len(data) - 5 * (len(data) // 105), DEFAULT_MAX_BYTES)
        reader = ClientHelloReader()
        with self.assertRaises(ClientHelloError):
            for i in range(0, len(data), 50):
                reader.feed(data[i:i + 50])
                self.assertLessEqual(reader.buffered, DEFAULT_MAX_BYTES)

    def test_exactly_at_the_cap(self):
        for extra in range(-2, 3):
            message = hello_message(ext(0, sni_ext(b"edge.example")) + ext(21, b""))
            pad = DEFAULT_MAX_BYTES - 5 - len(message) + extra
            data = records(self.big(pad), [16384])
            if len(data) <= DEFAULT_MAX_BYTES:
                self.assertEqual(parse_client_hello(data).server_name, "big.example")
            else:
                with self.assertRaises(ClientHelloError):
                    parse_client_hello(data)

    def test_max_bytes_must_be_sane(self):
        with self.assertRaises(ValueError):
            ClientHelloReader(max_bytes=8)


_PQ = None


def pq_hello() -> bytes:
    global _PQ
    if _PQ is None:
        _PQ = openssl_hello(alpn=[b"h2"])
    return _PQ


def mutated(data: bytearray, flips: list[tuple[int, int]],
            insert: tuple[int, bytes] | None, cut: int | None) -> bytes:
    """``data`` with bytes overwritten (positions wrapped), bytes inserted, then cut."""
    for pos, value in flips:
        data[pos % len(data)] = value
    if insert is not None:
        pos = insert[0] % (len(data) + 1)
        data[pos:pos] = insert[1]
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    return bytes(data)


def _outcome(parse, body: bytes):
    try:
        return parse(body)
    except ClientHelloError as e:
        return ("error", str(e))


class QuickReading(TestCase):
    """
    The fields before the extensions are read with index arithmetic, and a body it finds
    anything wrong with is read again field by field: both readings agree on every body,
    result or error message.
    """

    @hsettings(deadline=None, max_examples=600)
    @given(
        source=st.sampled_from(["pq", "spec", "built", "no-extensions"]),
        flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
        cut=st.none() | st.integers(0, 1 << 16),
        insert=st.none() | st.tuples(st.integers(0, 1 << 16), st.binary(max_size=8)),
    )
    def test_both_readings_agree(self, source, flips, cut, insert):
        if source == "pq":
            body = bytearray(message_of(pq_hello())[4:])
        elif source == "spec":
            body = bytearray(message_of(SPEC_VECTOR)[4:])
        elif source == "built":
            body = bytearray(hello_message(ext(0, sni_ext(b"a.example")))[4:])
        else:
            body = bytearray(hello_message(None)[4:])
        data = mutated(body, flips, insert, cut)
        self.assertEqual(_outcome(_parse_body, data), _outcome(_parse_body_checked, data))


    def test_both_readings_agree_on_each_bad_field_and_every_truncation(self):
        variants = {
            "usual": hello_message(ext(0, sni_ext(b"a.example"))),
            "no extensions": hello_message(None),
            "empty extensions": hello_message(b""),
            "version 0302": hello_message(b"", version=b"\x03\x02"),
            "33-byte session id": hello_message(b"", session_id=b"\x07" * 33),
            "no session id": hello_message(ext(0, sni_ext(b"a.example")), session_id=b""),
            "odd cipher suites": hello_message(b"", suites=b"\x13\x01\x13"),
            "no cipher suites": hello_message(b"", suites=b""),
            "no null compression": hello_message(b"", compression=b"\x01"),
            "no compression": hello_message(b"", compression=b""),
            "a byte after the extensions": hello_message(ext(0, sni_ext(b"a.example")),
                                                         trailer=b"\x00"),
            "a byte after the methods": hello_message(None, trailer=b"\x00"),
            "a repeated extension": hello_message(ext(0, sni_ext(b"a.example")) + ext(16, b"")
                                                  + ext(16, b"")),
            "a repeated extension, then a short one": hello_message(
                ext(16, b"") + ext(16, b"") + b"\x00\x2b\x00\x09"),
            "two names": hello_message(ext(0, b"\x00\x0e\x00\x00\x04a.ex\x00\x00\x04b.ex")),
            "a name of another type": hello_message(ext(0, b"\x00\x07\x01\x00\x04a.ex")),
            "a name list longer than its extension": hello_message(
                ext(0, b"\x00\x09\x00\x00\x04a.ex")),
            "a name longer than its list": hello_message(ext(0, b"\x00\x07\x00\x00\x05a.ex")),
            "an empty name list": hello_message(ext(0, b"\x00\x00")),
            "a bad host name": hello_message(ext(0, sni_ext(b"a..example"))),
        }
        for name, message in variants.items():
            body = message[4:]
            for cut in range(len(body) + 1):
                data = body[:cut]
                self.assertEqual(_outcome(_parse_body, data),
                                 _outcome(_parse_body_checked, data), (name, cut))


class HostileInput(TestCase):
    """Mutated, truncated and random input: only ClientHelloError, bounded buffers."""

    def run_reader(self, data: bytes, cuts: list[int], max_bytes: int) -> None:
        reader = ClientHelloReader(max_bytes)
        for chunk in chunked(data, cuts):
            try:
                result = reader.feed(chunk)
            except ClientHelloError as e:
                self.assertNotIn("\\x", str(e))
                return
            if result is not None:
                if result.server_name is not None:
                    valid_host_name(result.server_name.encode())
                return
            self.assertLessEqual(reader.buffered, max_bytes)

    @hsettings(deadline=None, max_examples=400)
    @given(
        source=st.sampled_from(["pq", "spec", "built"]),
        flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
        cut=st.none() | st.integers(0, 1 << 16),
        insert=st.none() | st.tuples(st.integers(0, 1 << 16), st.binary(max_size=40)),
        cuts=st.lists(st.integers(0, 1 << 16), max_size=30),
        max_bytes=st.sampled_from([600, 1600, DEFAULT_MAX_BYTES]),
    )
    def test_mutated_hellos(self, source, flips, cut, insert, cuts, max_bytes):
        if source == "pq":
            data = bytearray(pq_hello())
        elif source == "spec":
            data = bytearray(SPEC_VECTOR)
        else:
            data = bytearray(records(hello_message(ext(0, sni_ext(b"a.example"))), [20]))
        self.run_reader(mutated(data, flips, insert, cut), cuts, max_bytes)

    @hsettings(deadline=None, max_examples=300)
    @given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=20))
    def test_random_bytes(self, data, cuts):
        self.run_reader(data, cuts, 1000)

    @hsettings(deadline=None, max_examples=300)
    @given(
        body=st.binary(max_size=600),
        sizes=st.lists(st.integers(1, 700), min_size=1, max_size=4),
        cuts=st.lists(st.integers(0, 3000), max_size=10),
    )
    def test_random_handshake_bodies_in_records(self, body, sizes, cuts):
        data = records(b"\x01" + len(body).to_bytes(3, "big") + body, sizes)
        assume(data)
        self.run_reader(data, cuts, 2000)
