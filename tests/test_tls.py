"""
Tests for epsproxy.net.tls: settings and mutual TLS over real loopback sockets.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import ssl
import struct
import tempfile
from pathlib import Path

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer, providedBy

from epsproxy.net import tls
from epsproxy.rules.certificates import fingerprint, load_certificate_file
from tests.support.pki import pki
from tests.support.tls import ClientProtocol, ServerFactory, ServerProtocol, tls_block as block


# ------------------------------------------------------------------ protocols


@implementer(IOpenSSLClientConnectionCreator)
class RawClientCreator:
    """Client connections from a hand-made pyOpenSSL context (to test protocol limits)."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class LoopbackMixin:
    """Start a TLS listener on 127.0.0.1:0 and connect clients to it."""

    @defer.inlineCallbacks
    def listen(self, server_tls: dict | None, address: str = "127.0.0.1:0"):
        self.server = ServerFactory()
        endpoint = tls.listen_endpoint(reactor, address, server_tls)
        port = yield endpoint.listen(self.server)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def exchange(self, port: int, client_tls: dict | None, server_name: str | None = "sd-1",
                 creator=None, host: str = "127.0.0.1"):
        """Connect, wait until both sides are closed; return the client protocol."""
        client = ClientProtocol()
        if creator is not None:
            endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, host, port))
        else:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            endpoint = tls.client_endpoint(reactor, address, client_tls, server_name, timeout=5)
        yield endpoint.connect(Factory.forProtocol(lambda: client))
        yield client.lost
        yield defer.gatherResults(self.server.made)
        return client


def assert_refused(test: TestCase, client: ClientProtocol) -> None:
    test.assertEqual(client.received, b"")
    test.assertEqual(test.server.peers, [])


# ------------------------------------------------------------------ handshakes


class MutualTLSTests(LoopbackMixin, TestCase):
    timeout = 15
    """Real handshakes between server_options and client_options on loopback."""

    @defer.inlineCallbacks
    def test_mutual_handshake_and_peer_certificate(self):
        port = yield self.listen(block("sd-1"))
        client = yield self.exchange(port, block("hd-1"), "sd-1")
        self.assertEqual(client.received, b"welcome")
        self.assertTrue(client.handshake)
        [peer] = self.server.peers
        expected = load_certificate_file(pki().tls("hd-1")[0])
        self.assertEqual(fingerprint(peer), fingerprint(expected))

    @defer.inlineCallbacks
    def test_server_name_from_settings(self):
        port = yield self.listen(block("sd-1"))
        client = yield self.exchange(port, block("hd-1", server_name="sd-1"), None)
        self.assertEqual(client.received, b"welcome")

    @defer.inlineCallbacks
    def test_client_without_certificate_refused(self):
        port = yield self.listen(block("sd-1"))
        client = yield self.exchange(port, block(None), "sd-1")
        assert_refused(self, client)

    @defer.inlineCallbacks
    def test_foreign_client_refused(self):
        port = yield self.listen(block("sd-1"))
        client = yield self.exchange(port, block("hd-1", source="foreign"), "sd-1")
        assert_refused(self, client)

    @defer.inlineCallbacks
    def test_foreign_server_refused_by_client(self):
        port = yield self.listen(block("sd-1", source="foreign", ca=pki("foreign").root))
        client = yield self.exchange(port, block("hd-1"), "sd-1")
        self.assertEqual(client.received, b"")
        self.assertFalse(client.handshake)
        self.assertIsInstance(client.reason.value, SSL.Error)

    @defer.inlineCallbacks
    def test_wrong_server_name_refused(self):
        port = yield self.listen(block("sd-1"))
        client = yield self.exchange(port, block("hd-1"), "hd-2")
        self.assertEqual(client.received, b"")
        self.assertIsInstance(client.reason.value, VerificationError)

    @defer.inlineCallbacks
    def test_verify_client_false_accepts_anonymous(self):
        port = yield self.listen(block("sd-1", verify_client=False))
        client = yield self.exchange(port, block(None), "sd-1")
        self.assertEqual(client.received, b"welcome")
        self.assertEqual(self.server.peers, [None])

    @defer.inlineCallbacks
    def test_verify_client_false_does_not_ask(self):
        # Without request_client_cert the server does not ask: a client with a
        # certificate is accepted and none is seen.
        port = yield self.listen(block("sd-1", verify_client=False))
        client = yield self.exchange(port, block("hd-1"), "sd-1")
        self.assertEqual(client.received, b"welcome")
        self.assertEqual(self.server.peers, [None])

    @defer.inlineCallbacks
    def test_request_client_cert_accepts_unverified(self):
        port = yield self.listen(
            block("sd-1", verify_client=False, request_client_cert=True)
        )
        client = yield self.exchange(port, block("hd-1", source="foreign"), "sd-1")
        self.assertEqual(client.received, b"welcome")
        [peer] = self.server.peers
        foreign = load_certificate_file(pki("foreign").tls("hd-1")[0])
        self.assertEqual(fingerprint(peer), fingerprint(foreign))

    @defer.inlineCallbacks
    def test_request_client_cert_accepts_anonymous(self):
        port = yield self.listen(
            block("sd-1", verify_client=False, request_client_cert=True)
        )
        client = yield self.exchange(port, block(None), "sd-1")
        self.assertEqual(client.received, b"welcome")
        self.assertEqual(self.server.peers, [None])

    @defer.inlineCallbacks
    def test_insecure_skip_verify(self):
        events: list = []
        self.patch(tls, "log", Logger(observer=events.append))
        self.patch(tls, "_warned_insecure", set())
        port = yield self.listen(block("sd-1", source="foreign", ca=pki("foreign").root,
                                       verify_client=False))
        insecure = block(None, insecure_skip_verify=True)
        client = yield self.exchange(port, insecure, "whatever")
        self.assertEqual(client.received, b"welcome")
        tls.client_options(insecure, "whatever")
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "critical")

    @defer.inlineCallbacks
    def test_tls_1_1_client_refused(self):
        def old_client() -> RawClientCreator:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(SSL.TLS1_VERSION)
            context.set_max_proto_version(SSL.TLS1_1_VERSION)
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
            return RawClientCreator(context)

        # Control: a server deliberately lowered to TLS 1.1 must accept this client,
        # otherwise this OpenSSL cannot speak TLS 1.1 at all and the test proves nothing.
        crt, key = pki().tls("sd-1")
        lowered = tls.server_options(block("sd-1", verify_client=False))
        control = CertificateOptions(
            privateKey=lowered.privateKey,
            certificate=lowered.certificate,
            extraCertChain=lowered.extraCertChain,
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
        )
        control.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.server = ServerFactory()
        from twisted.internet.endpoints import SSL4ServerEndpoint

        control_port = yield SSL4ServerEndpoint(
            reactor, 0, control, interface="127.0.0.1").listen(self.server)
        self.addCleanup(control_port.stopListening)
        probe = yield self.exchange(control_port.getHost().port, None, creator=old_client())
        if probe.received != b"welcome":
            raise SkipTest("this OpenSSL build cannot negotiate TLS 1.1 at all")

        port = yield self.listen(block("sd-1", verify_client=False))
        client = yield self.exchange(port, None, creator=old_client())
        assert_refused(self, client)
        self.assertFalse(client.handshake)

    @defer.inlineCallbacks
    def test_tls_1_2_needs_ecdhe_aead(self):
        def tls12_client(ciphers: bytes) -> RawClientCreator:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            context.set_cipher_list(ciphers)
            return RawClientCreator(context)

        port = yield self.listen(block("sd-1", verify_client=False))
        ok = yield self.exchange(port, None, creator=tls12_client(b"ECDHE-ECDSA-AES128-GCM-SHA256"))
        self.assertEqual(ok.received, b"welcome")
        self.server.made.clear()
        self.server.peers.clear()
        # A CBC suite: OpenSSL supports it, our pinned list does not.
        cbc = yield self.exchange(port, None, creator=tls12_client(b"ECDHE-ECDSA-AES128-SHA"))
        assert_refused(self, cbc)

    def test_verify_modes(self):
        def mode(**settings) -> int:
            return tls.server_options(block("sd-1", **settings)).getContext().get_verify_mode()

        required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.assertEqual(mode() & required, required)
        self.assertEqual(mode(verify_client=False), SSL.VERIFY_NONE)
        asked = mode(verify_client=False, request_client_cert=True)
        self.assertTrue(asked & SSL.VERIFY_PEER)
        self.assertFalse(asked & SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        # request_client_cert changes nothing when clients are verified anyway
        self.assertEqual(mode(request_client_cert=True) & required, required)

    @defer.inlineCallbacks
    def test_ipv6_listener(self):
        try:
            port = yield self.listen(block("sd-1"), "[::1]:0")
        except CannotListenError:
            raise SkipTest("no IPv6 loopback here")
        client = yield self.exchange(port, block("hd-1"), "sd-1", host="::1")
        self.assertEqual(client.received, b"welcome")

    @defer.inlineCallbacks
    def test_a_close_without_close_notify_is_a_close_and_leaves_no_cycle(self):
        # Clients often just close (no TLS close_notify); OpenSSL 3 makes that an
        # error, whose traceback Twisted keeps in a reference cycle.  Our servers take
        # it as a close: nothing of it is left for the garbage collector.
        port = yield self.listen(block("sd-1", verify_client=False))

        def client() -> bytes:
            context = ssl.create_default_context(cafile=str(pki().root))
            with socket.create_connection(("127.0.0.1", port)) as raw:
                tls_socket = context.wrap_socket(raw, server_hostname="sd-1")
                greeting = tls_socket.recv(100)
                tls_socket.close()  # no unwrap(): no close_notify, the TCP close only
            return greeting

        gc.collect()
        flags = gc.get_debug()
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.set_debug, flags)
        self.addCleanup(gc.garbage.clear)
        self.assertEqual((yield threads.deferToThread(client)), b"welcome")
        yield defer.gatherResults(self.server.made)
        [connection] = self.server.connections
        self.assertTrue(connection.reason.check(ConnectionDone), connection.reason)
        gc.collect()
        tls_errors = [o for o in gc.garbage
                      if isinstance(o, Failure) and isinstance(o.value, SSL.Error)]
        self.assertEqual(tls_errors, [])

    def test_servers_take_a_close_without_close_notify_as_a_close(self):
        tls.forget_cached()  # a context no connection has used yet may be asked
        context = tls.server_options(block("sd-1")).getContext()
        # set_options(0) adds nothing and answers the options in force
        self.assertTrue(context.set_options(0) & SSL.OP_IGNORE_UNEXPECTED_EOF)

    @defer.inlineCallbacks
    def test_plain_listener_without_tls(self):
        port = yield self.listen(None, "localhost:0")
        client = ClientProtocol()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(lambda: client))
        self.assertEqual(len(self.server.connections), 1)
        self.assertIsNone(tls.peer_certificate(self.server.connections[0].transport))
        client.transport.loseConnection()
        yield client.lost
        yield defer.gatherResults(self.server.made)


# ------------------------------------------------------------------ bulk writes


class _Sender(ServerProtocol):
    """Writes ``factory.payload`` (in one write, at ``factory.when``) and closes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.factory.when == "at once":  # before the handshake: Twisted keeps it
            self._send()

    def handshakeCompleted(self) -> None:
        self.factory.peers.append(tls.peer_certificate(self.transport))
        if self.factory.when == "after the handshake":
            self._send()

    def _send(self) -> None:
        self.transport.write(self.factory.payload)
        self.transport.write(b"end")  # a small write after a bulk one keeps its place
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.transport.write(b"too late")  # ignored, as by any closed transport


class _SenderFactory(ServerFactory):
    protocol = _Sender

    def __init__(self, payload: bytes, when: str) -> None:
        super().__init__()
        self.payload = payload
        self.when = when


class _Writes(StringTransport):
    """A transport that remembers the size of each write."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: bytes) -> None:
        self.sizes.append(len(data))
        super().write(data)


class _Counting(Protocol):
    """Counts its connectionMade calls."""

    made = 0

    def connectionMade(self) -> None:
        self.made += 1


class MakeConnectionTests(LoopbackMixin, TestCase):
    """Our TLS servers take on their transport's interfaces as Twisted's do, declared
    once (Twisted declares them ten times over TCP)."""

    def _connected(self, protocol_class: type, connect_wrapped: bool = True):
        factory = TLSMemoryBIOFactory(tls.server_options(block("sd-1", verify_client=False)),
                                      False, Factory.forProtocol(_Counting))
        wrapped = _Counting()
        protocol = protocol_class(factory, wrapped, _connectWrapped=connect_wrapped)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, wrapped, factory, transport

    def test_the_same_interfaces_and_connections_as_twisteds(self):
        for connect_wrapped in (True, False):
            ours, ours_wrapped, ours_factory, ours_transport = self._connected(
                tls.BulkTLSProtocol, connect_wrapped)
            theirs, theirs_wrapped, _, _ = self._connected(
                TLSMemoryBIOProtocol, connect_wrapped)
            self.assertEqual(set(providedBy(ours)), set(providedBy(theirs)), connect_wrapped)
            if connect_wrapped:  # ours: a server's transport takes them all on
                self.assertTrue(set(providedBy(ours_transport)) <= set(providedBy(ours)))
            self.assertEqual(ours_wrapped.made, theirs_wrapped.made, connect_wrapped)
            self.assertEqual(ours_wrapped.made, 1 if connect_wrapped else 0)
            self.assertIs(ours.transport, ours_transport)
            self.assertIn(ours, ours_factory.protocols)
            self.assertIsNotNone(ours.getHandle())  # the OpenSSL connection, accepting
            self.assertEqual(ours_transport.value(), b"")  # a server waits for a hello

    @defer.inlineCallbacks
    def test_a_listeners_connection_is_a_tcp_transport_with_tls(self):
        port = yield self.listen(block("sd-1", verify_client=False))
        client = yield self.exchange(port, block(None), "sd-1")
        self.assertEqual(client.received, b"welcome")
        [connection] = self.server.connections
        for interface in (ITCPTransport, ISSLTransport, ISystemHandle):
            self.assertTrue(interface.providedBy(connection.transport), interface)
        self.assertEqual(connection.transport.getPeer().host, "127.0.0.1")


class BulkWriteTests(LoopbackMixin, TestCase):
    """Our TLS servers encrypt a large write in pieces of BULK_WRITE_BYTES."""

    timeout = 30

    @defer.inlineCallbacks
    def _download(self, payload: bytes, when: str, *, read: int | None = None):
        """Serve ``payload`` on a real listener; a client reads it all (or ``read``
        bytes, then resets the connection); return what the client read."""
        self.server = _SenderFactory(payload, when)
        endpoint = tls.listen_endpoint(reactor, "127.0.0.1:0", block("sd-1", verify_client=False))
        port = yield endpoint.listen(self.server)
        self.addCleanup(port.stopListening)

        def client() -> bytes:
            context = ssl.create_default_context(cafile=str(pki().root))
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as raw:
                tls_socket = context.wrap_socket(raw, server_hostname="sd-1")
                got = bytearray()
                while read is None or len(got) < read:
                    chunk = tls_socket.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
                if read is not None:  # a reset: the server's writes fail mid-stream
                    linger = struct.pack("ii", 1, 0)
                    tls_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            return bytes(got)

        received = yield threads.deferToThread(client)
        yield defer.gatherResults(self.server.made)
        return received

    @defer.inlineCallbacks
    def test_a_large_write_arrives_whole_and_in_order(self):
        payload = os.urandom(3 * tls.BULK_WRITE_BYTES + 12345)
        received = yield self._download(payload, "after the handshake")
        self.assertEqual(received, payload + b"end")

    @defer.inlineCallbacks
    def test_a_large_write_before_the_handshake_is_sent_after_it(self):
        payload = os.urandom(2 * tls.BULK_WRITE_BYTES + 1)
        received = yield self._download(payload, "at once")
        self.assertEqual(received, payload + b"end")

    @defer.inlineCallbacks
    def test_a_client_resetting_mid_write_ends_the_connection_quietly(self):
        payload = os.urandom(32 * tls.BULK_WRITE_BYTES)  # more than the sockets hold
        received = yield self._download(payload, "after the handshake", read=100_000)
        self.assertEqual(received[:100_000], payload[:100_000])
        [connection] = self.server.connections
        self.assertIsInstance(connection.reason.value, Exception)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_pieces_are_encrypted_and_written_at_most_bulk_write_bytes_at_a_time(self):
        # The piece's size bounds what OpenSSL's buffer for encrypted bytes keeps.
        server = tls.BulkTLSFactory(tls.server_options(block("sd-1", verify_client=False)),
                                    False, Factory.forProtocol(Protocol))
        protocol = server.buildProtocol(None)
        transport = _Writes()
        protocol.makeConnection(transport)
        context = SSL.Context(SSL.TLS_METHOD)
        client = SSL.Connection(context, None)
        client.set_connect_state()
        while not protocol._handshakeDone:  # a handshake in memory, flight by flight
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                protocol.dataReceived(client.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
            client.bio_write(transport.value())
            transport.clear()
        transport.sizes.clear()
        payload = os.urandom(5 * tls.BULK_WRITE_BYTES - 7)
        protocol._write(payload)  # what the write buffer hands on
        self.assertEqual(len(transport.sizes), 5)
        self.assertTrue(all(size <= tls.BULK_WRITE_BYTES + 4096 for size in transport.sizes),
                        transport.sizes)
        client.bio_write(transport.value())
        received = b""
        while len(received) < len(payload):
            received += client.recv(1 << 16)
        self.assertEqual(received, payload)

    def test_server_contexts_encrypt_a_piece_in_one_call(self):
        tls.forget_cached()  # a context no connection has used yet may be changed
        context = tls.server_options(block("sd-1")).getContext()
        # set_mode(0) adds nothing and answers the modes in force: partial writes off
        self.assertEqual(context.set_mode(0) & 0x1, 0)


# ------------------------------------------------------------------ settings


class SettingsTests(SynchronousTestCase):
    """TLS_SETTINGS and the errors of server_options / client_options."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tls-test-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def test_defaults(self):
        value = tls.TLS_SETTINGS.validate({"ca_certificate_files": ["a.pem"]})
        self.assertEqual(value, {
            "ca_certificate_files": ["a.pem"],
            "verify_client": True,
            "request_client_cert": False,
            "insecure_skip_verify": False,
        })

    def test_validate_client_refused(self):
        with self.assertRaises(tls.TLSSettingsError) as e:
            tls.server_options(block("sd-1", validate_client=True))
        self.assertIn("tls.validate_client", str(e.exception))
        self.assertIn("unknown key", str(e.exception))

    def test_bad_shapes(self):
        for bad in [
            {},
            {"ca_certificate_files": []},
            {"ca_certificate_files": "root.crt"},
            {"ca_certificate_files": [""]},
            {"ca_certificate_files": ["a"], "verify_client": "yes"},
            {"ca_certificate_files": ["a"], "certificate_file": 3},
            [],
            None,
        ]:
            with self.assertRaises(tls.TLSSettingsError, msg=repr(bad)):
                tls.server_options(bad)

    def test_missing_ca_file(self):
        missing = str(self.dir / "nope.crt")
        with self.assertRaises(tls.TLSSettingsError) as e:
            tls.server_options(block("sd-1", ca=missing))
        self.assertIn(missing, str(e.exception))

    def test_missing_certificate_and_key_files(self):
        for key in ("certificate_file", "key_file"):
            settings = block("sd-1")
            settings[key] = str(self.dir / f"missing-{key}")
            with self.assertRaises(tls.TLSSettingsError) as e:
                tls.server_options(settings)
            self.assertIn(settings[key], str(e.exception))

    def test_garbage_pem(self):
        garbage = self.dir / "garbage.crt"
        garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        for key in ("certificate_file", "key_file"):
            settings = block("sd-1")
            settings[key] = str(garbage)
            with self.assertRaises(tls.TLSSettingsError) as e:
                tls.server_options(settings)
            self.assertIn(str(garbage), str(e.exception))
        with self.assertRaises(tls.TLSSettingsError):
            tls.server_options(block("sd-1", ca=garbage))

    def test_empty_and_binary_files(self):
        for content in (b"", os.urandom(3000)):
            bad = self.dir / "bad.pem"
            bad.write_bytes(content)
            with self.assertRaises(tls.TLSSettingsError):
                tls.server_options(block("sd-1", ca=bad))

    def test_key_not_matching_certificate(self):
        settings = block("sd-1")
        settings["key_file"] = str(pki().tls("hd-1")[1])
        with self.assertRaises(tls.TLSSettingsError) as e:
            tls.server_options(settings)
        self.assertIn("does not belong", str(e.exception))

    def test_server_needs_certificate(self):
        with self.assertRaises(tls.TLSSettingsError) as e:
            tls.server_options(block(None))
        self.assertIn("certificate_file", str(e.exception))

    def test_half_identity(self):
        settings = block("hd-1")
        del settings["key_file"]
        with self.assertRaises(tls.TLSSettingsError) as e:
            tls.client_options(settings, "sd-1")
        self.assertIn("key_file", str(e.exception))

    def test_client_needs_server_name(self):
        with self.assertRaises(tls.TLSSettingsError) as e:
            tls.client_options(block("hd-1"))
        self.assertIn("server_name", str(e.exception))

    def test_server_options_cached(self):
        settings = block("sd-1")
        self.assertIs(tls.server_options(settings), tls.server_options(dict(settings)))

    def test_cache_follows_file_changes(self):
        crt, key = pki().tls("sd-1")
        shutil.copy(crt, self.dir / "s.crt")
        shutil.copy(key, self.dir / "s.key")
        settings = block(None, certificate_file=str(self.dir / "s.crt"),
                         key_file=str(self.dir / "s.key"))
        first = tls.server_options(settings)
        other_crt, other_key = pki().tls("sd-1", alt=True)
        shutil.copy(other_crt, self.dir / "s.crt")
        shutil.copy(other_key, self.dir / "s.key")
        os.utime(self.dir / "s.crt", ns=(1, 1))
        second = tls.server_options(settings)
        self.assertIsNot(first, second)
        alt = load_certificate_file(other_crt)
        self.assertEqual(second.certificate, alt)

    def test_client_options_cached_per_server_name(self):
        settings = block("hd-1")
        self.assertIs(tls.client_options(settings, "sd-1"), tls.client_options(settings, "sd-1"))
        self.assertIsNot(tls.client_options(settings, "sd-1"),
                         tls.client_options(settings, "op-1"))

    def test_extra_chain_sent(self):
        options = tls.server_options(block("sd-1"))
        intermediate = load_certificate_file(pki().intermediate)
        self.assertEqual(list(options.extraCertChain), [intermediate])

    def test_peer_certificate_without_tls(self):
        self.assertIsNone(tls.peer_certificate(object()))
        self.assertIsNone(tls.peer_certificate(None))

        class NoCert:
            def getPeerCertificate(self):
                return None

        self.assertIsNone(tls.peer_certificate(NoCert()))

    def test_listen_endpoint_bad_address(self):
        with self.assertRaises(ValueError):
            tls.listen_endpoint(reactor, "nonsense", None)

    def test_client_endpoint_needs_host(self):
        with self.assertRaises(ValueError):
            tls.client_endpoint(reactor, ":80", None)

