"""
The rendezvous token (epsproxy.net.token): its text form in JSON-RPC with hostile input
(malformed, oversized, truncated, wrong type), its log tag, and dialling with a token
then speaking TLS over a real loopback socket.
"""

from __future__ import annotations

import base64

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from epsproxy.net import tls
from epsproxy.net.token import (
    TOKEN_BYTES,
    TokenError,
    decode_token,
    dial_with_token,
    encode_token,
    new_token,
    new_tokens,
    token_tag,
)
from tests.support.tls import tls_block


class Text(TestCase):
    """The base64 text that carries a token in JSON-RPC."""

    def test_round_trip(self) -> None:
        token = new_token()
        self.assertEqual(len(token), TOKEN_BYTES)
        text = encode_token(token)
        self.assertEqual(text, base64.b64encode(token).decode("ascii"))
        self.assertEqual(decode_token(text), token)

    def test_new_tokens_differ(self) -> None:
        self.assertEqual(len({new_token() for _ in range(100)}), 100)

    def test_tokens_made_in_one_read_are_whole_and_differ(self) -> None:
        tokens = new_tokens(100) + new_tokens(100)
        self.assertEqual({len(token) for token in tokens}, {TOKEN_BYTES})
        self.assertEqual(len(set(tokens)), 200)
        self.assertEqual(new_tokens(0), [])

    def test_encode_refuses_a_wrong_length(self) -> None:
        for raw in (b"", b"x" * (TOKEN_BYTES - 1), b"x" * (TOKEN_BYTES + 1)):
            with self.assertRaises(TokenError):
                encode_token(raw)

    def test_truncated(self) -> None:
        text = encode_token(new_token())
        for cut in (text[:-1], text[:-4], text[:4], ""):
            with self.assertRaises(TokenError):
                decode_token(cut)
        e = self.assertRaises(TokenError, decode_token, base64.b64encode(b"x" * 31).decode())
        self.assertIn("32 bytes, not 31", str(e))

    def test_oversized(self) -> None:
        for text in (base64.b64encode(b"x" * 33).decode(), "A" * 10**6,
                     base64.b64encode(b"x" * 96).decode()):
            with self.assertRaises(TokenError):
                decode_token(text)

    def test_malformed(self) -> None:
        good = encode_token(b"\xfb" * TOKEN_BYTES)  # uses "+" and "/"
        for text in (
            good.replace("+", "-").replace("/", "_"),  # URL-safe alphabet
            good.rstrip("="),  # padding missing
            good[:20] + " " + good[20:],  # whitespace
            good[:20] + "\n" + good[20:],
            good[:-1] + "\u00e9",  # not ASCII
            "\x00" * 44,
            "=" * 44,
            "é" * 44,
        ):
            with self.assertRaises(TokenError, msg=repr(text)):
                decode_token(text)

    def test_not_a_string(self) -> None:
        for value in (None, 32, b"x" * 44, encode_token(new_token()).encode(), ["x"], {}):
            with self.assertRaises(TokenError, msg=repr(value)):
                decode_token(value)

    def test_token_error_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(TokenError, ValueError))


class Tag(TestCase):
    def test_short_stable_and_not_the_token(self) -> None:
        token = new_token()
        tag = token_tag(token)
        self.assertEqual(len(tag), 4)
        self.assertEqual(tag, token_tag(token))
        int(tag, 16)  # hex digits


class _TokenThenTLSServer(Protocol):
    """A listener's side of :func:`dial_with_token`: reads the token, then serves TLS."""

    def __init__(self, tls_factory: TLSMemoryBIOFactory, tokens: list[bytes]) -> None:
        self.tls_factory = tls_factory
        self.tokens = tokens
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < TOKEN_BYTES:
            return
        self.tokens.append(self.buffer[:TOKEN_BYTES])
        tls_protocol = self.tls_factory.buildProtocol(self.transport.getPeer())
        self.transport.protocol = tls_protocol
        tls_protocol.makeConnection(self.transport)
        tls_protocol.dataReceived(self.buffer[TOKEN_BYTES:])


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)


class Dial(TestCase):
    timeout = 30

    def test_wrong_token_length_is_refused_before_connecting(self) -> None:
        for token in (b"", b"x" * 31, b"x" * 33):
            with self.assertRaises(TokenError):
                dial_with_token(reactor, "127.0.0.1:1", token, tls_block("hd-1"),
                                Factory(), tls_client_for="hd-2")

    def test_an_address_without_host_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            dial_with_token(reactor, ":443", new_token(), tls_block("hd-1"), Factory(),
                            tls_client_for="hd-2")

    @defer.inlineCallbacks
    def test_token_then_mutual_tls(self):
        tokens: list[bytes] = []
        tls_factory = TLSMemoryBIOFactory(
            tls.server_options(tls_block("hd-2")), False, Factory.forProtocol(_Echo))
        port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _TokenThenTLSServer(tls_factory, tokens)),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        got: defer.Deferred[bytes] = defer.Deferred()

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"hello")

            def dataReceived(self, data):
                got.callback(data)

        token = new_token()
        client = yield dial_with_token(
            reactor, f"127.0.0.1:{port.getHost().port}", token, tls_block("hd-1"),
            Factory.forProtocol(Client), tls_client_for="hd-2")
        self.addCleanup(client.transport.abortConnection)
        answer = yield got
        self.assertEqual(answer, b"echo:hello")
        self.assertEqual(tokens, [token])
        peer = client.transport.getPeerCertificate().to_cryptography()
        self.assertIn("hd-2", peer.subject.rfc4514_string())
