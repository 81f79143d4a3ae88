"""
Regression tests for defects found by ``make fuzz`` (``fuzz/``, docs/robustness.md).

Each test replays the minimised input the fuzzer found, over a real loopback connection
where the defect is in a network path.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from epsproxy.net.jsonrpc.envelope import PARSE_ERROR, Dispatcher
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc
from fuzz.provider import provider
from fuzz.targets import jsonrpc as jsonrpc_target


class _Collect(Protocol):
    """Sends one request, collects everything until the connection closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            head, _, body = self.received.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(body) >= int(line[15:]):
                    self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


class ContentTypeLineBreak(TestCase):
    """
    Found by the ``jsonrpc`` target: a POST whose Content-Type holds a byte that Python's
    ``email`` package treats as a line break (``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``,
    ``\\x85``) made twisted.web's form parsing (``Request.requestReceived`` →
    ``_parseContentType``) raise ``ValueError`` out of ``dataReceived``: no response,
    the connection dropped and an "Unhandled Error" traceback logged for each such
    request.  A JSON-RPC server never needs form parsing; it is now switched off.
    """

    @inlineCallbacks
    def _post(self, content_type: bytes):
        dispatcher = Dispatcher()
        dispatcher.register("echo", None, lambda params, context: params)
        settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0"})
        site = jsonrpc_site(dispatcher, settings)
        port = yield listen_jsonrpc(reactor, site, settings)
        self.addCleanup(port.stopListening)
        body = b'{"jsonrpc":"2.0","method":"echo","params":{},"id":7}'
        request = (
            b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        client = _Collect(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield endpoint.connect(Factory.forProtocol(lambda: client))
        received = yield client.closed
        return received

    @inlineCallbacks
    def test_vertical_tab_in_content_type(self):
        received = yield self._post(b"application/json\x0b; x=1")
        self.assertTrue(received.startswith(b"HTTP/1.1 400 "), received[:100])
        body = json.loads(received.partition(b"\r\n\r\n")[2])
        self.assertEqual(body["error"]["code"], PARSE_ERROR)

    @inlineCallbacks
    def test_next_line_byte_with_valid_prefix(self):
        received = yield self._post(b"application/json; charset=utf-8\x85x")
        self.assertTrue(received.startswith(b"HTTP/1.1 "), received[:100])
        body = json.loads(received.partition(b"\r\n\r\n")[2])
        self.assertEqual(body["jsonrpc"], "2.0")

    def test_fuzz_input(self):
        """The fuzzer's own input (atheris' data provider reads it as HTTP mode)."""
        if provider(b"") .__class__.__name__ == "FallbackProvider":
            raise SkipTest("the input decodes as found only with atheris installed")
        jsonrpc_target(b'\x00\x00{"jsonrpc":"2.0","method":"\xff\xff\xff\xff\xff"method":"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"params":{},"id"g')


class SigningCertificateWithMalformedIssuer(TestCase):
    """
    Found by ``python -m fuzz records`` after 226,585 executions: a signing certificate
    whose issuer name holds a BIT STRING attribute of the wrong type parsed fine, then
    made chain building raise TypeError (cryptography parses names lazily).  It must be
    refused as an invalid record instead.
    """

    INPUTS = (
        "/wFR/Xvyeo56ewEBeg==",  # issuer name with a wrongly typed BIT STRING
        "/wFR/UyOenp6ewEBeg==",  # X.509 version 66: cryptography's InvalidVersion
        # A signed record with an added null key still verifies: the structured hash
        # skips zero values (SPEC §4.2), so it is the same signed record.
        "/wFR/f////96OnsBASt6",
    )

    def test_fuzz_inputs(self):
        import base64

        from fuzz.targets import records

        for text in self.INPUTS:
            records(base64.b64decode(text))  # raises if anything but a refusal escapes

    def test_refused_with_a_reason(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from epsproxy.rules.records import InvalidRecord, load_signer
        from tests.support.pki import pki

        crt, _ = pki().signing("hd-1")
        der = bytearray(x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(
            serialization.Encoding.DER))
        # The issuer's commonName (UTF8String, tag 0x0c) becomes a BIT STRING (0x03).
        issuer_cn = der.find(b"\x06\x03\x55\x04\x03\x0c")
        self.assertGreater(issuer_cn, 0)
        der[issuer_cn + 5] = 0x03
        pem = "-----BEGIN CERTIFICATE-----\n" + base64_lines(bytes(der)) + \
            "-----END CERTIFICATE-----\n"
        with self.assertRaises(InvalidRecord) as e:
            load_signer(pem)
        self.assertIn("cannot be parsed", e.exception.reason)


def base64_lines(data: bytes) -> str:
    import base64

    text = base64.b64encode(data).decode()
    return "".join(text[i:i + 64] + "\n" for i in range(0, len(text), 64))
