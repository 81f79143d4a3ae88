"""
The fuzz targets: one function per parser of hostile input, each taking the fuzzer's
bytes and raising :class:`AssertionError` (or letting an unexpected exception escape)
when the code under test misbehaves.

Each target checks more than "does not crash":

- :func:`client_hello`: :class:`~epsproxy.proxy.clienthello.ClientHelloReader` fed the
  input cut into fuzzer-chosen fragments and fed it whole must agree (same outcome, same
  hello); only ``ClientHelloError`` escapes; while it asks for more it holds at most
  ``max_bytes``; a hello's ``raw`` is exactly the bytes fed; a spent reader refuses;
  :func:`~epsproxy.proxy.clienthello.parse_client_hello` agrees with the reader.
- :func:`wire`: :class:`~epsproxy.eps.links.wire.LineDecoder` fed fragments gives the frames
  and the error that the strict standard-library decoder gives line by line (the orjson
  fast path must not change what is accepted nor what comes out, types included); only
  ``WireError`` escapes; buffering stays within ``max_line``; every decoded frame
  re-encodes to one line that decodes to the same frame.
- :func:`jsonrpc`: :func:`~epsproxy.net.jsonrpc.parse_request` with a fuzzed content type and
  body (only ``JSONRPCError``; the client's id comes back as sent), or a whole HTTP
  request through the JSON-RPC ``Site`` (``HTTPChannel`` on a ``StringTransport``, a
  :class:`~epsproxy.net.jsonrpc.Dispatcher` behind it): exactly one HTTP response whose body
  is a JSON-RPC response object; no timer left behind.
- :func:`records`: ``normalise_signed_record`` / ``verify_record`` / ``structured_hash``
  on JSON text, on values built by the data provider and on mutations of real signed
  records, against a fixed trust store from a dev PKI made once: only ``RecordError`` /
  ``FormError`` escape (``ValueError`` from ``structured_hash``), and anything that
  verifies is one of the records really signed (no forgery).

Fragmented targets read a small header first (:func:`split_input`).  The targets import
without atheris; :data:`TARGETS` lists them with their libFuzzer ``-max_len``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import tempfile
import atexit
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fuzz.provider import provider

__all__ = [
    "TARGETS",
    "Target",
    "split_input",
    "same",
    "client_hello",
    "wire",
    "jsonrpc",
    "records",
    "records_context",
]


# ------------------------------------------------------------------------- helpers


def split_input(data: bytes) -> tuple[int, list[bytes], bytes]:
    """
    ``(flags, fragments, payload)`` of a fragmented target's input: byte 0 is ``flags``
    (its low 4 bits count the fragment-size bytes that follow, each a size of 1-256
    bytes); the rest is the payload, cut at those sizes, its remainder one last fragment.
    """
    if not data:
        return 0, [], b""
    flags = data[0]
    count = flags & 0x0F
    sizes = data[1:1 + count]
    payload = data[1 + count:]
    fragments = []
    pos = 0
    for size in sizes:
        if pos >= len(payload):
            break
        fragments.append(payload[pos:pos + size + 1])
        pos += size + 1
    if pos < len(payload):
        fragments.append(payload[pos:])
    return flags, fragments, payload


def _pick(fdp: Any, values: Any) -> Any:
    """One of ``values`` (a sequence), chosen by the provider."""
    return values[fdp.ConsumeIntInRange(0, len(values) - 1)]


def same(a: Any, b: Any) -> bool:
    """Equality of JSON-like values that also compares types (``1 != 1.0 != True``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


# --------------------------------------------------------------------- ClientHello


def _read_hello(max_bytes: int, fragments: list[bytes]) -> tuple[str, Any, bytes]:
    """Feed ``fragments`` to a fresh reader: ("hello"|"error"|"more", result, fed)."""
    from epsproxy.proxy.clienthello import ClientHelloError, ClientHelloReader

    reader = ClientHelloReader(max_bytes)
    fed = bytearray()
    for piece in fragments:
        fed += piece
        try:
            hello = reader.feed(piece)
        except ClientHelloError as e:
            assert "\n" not in str(e)
            assert reader.buffered == 0, "a failed reader keeps its bytes"
            _assert_spent(reader)
            return "error", str(e), bytes(fed)
        if hello is None:
            assert reader.buffered == len(fed)
            assert reader.buffered <= max_bytes, (
                f"reader holds {reader.buffered} bytes, over max_bytes={max_bytes}"
            )
            continue
        assert hello.raw == bytes(fed), "ClientHello.raw is not the bytes fed"
        assert reader._parsed <= max_bytes, "the hello's records exceed max_bytes"
        assert 4 < hello.hello_length <= max_bytes
        assert 1 <= hello.record_count
        assert len(set(hello.extension_types)) == len(hello.extension_types)
        if hello.server_name is not None:
            assert (0 in hello.extension_types)
            from epsproxy.proxy.clienthello import valid_host_name

            assert valid_host_name(hello.server_name.encode("ascii")) == hello.server_name
            assert hello.server_name == hello.server_name.lower()
            assert not hello.server_name.endswith(".")
        else:
            assert 0 not in hello.extension_types
        assert reader.buffered == 0
        _assert_spent(reader)
        return "hello", hello, bytes(fed)
    return "more", None, bytes(fed)


def _assert_spent(reader: Any) -> None:
    from epsproxy.proxy.clienthello import ClientHelloError

    try:
        reader.feed(b"\x16\x03\x01")
    except ClientHelloError:
        return
    raise AssertionError("a spent reader accepted more bytes")


def _hello_fields(hello: Any) -> tuple:
    return (hello.server_name, hello.extension_types, hello.record_count, hello.hello_length)


_HELLO_LIMITS = (16384, 16384, 512, 65536)


def client_hello(data: bytes) -> None:
    """Fuzz target for the ClientHello reader (see the module docstring)."""
    from epsproxy.proxy.clienthello import ClientHelloError, parse_client_hello

    flags, fragments, payload = split_input(data)
    max_bytes = _HELLO_LIMITS[(flags >> 4) & 3]
    kind, result, fed = _read_hello(max_bytes, fragments)
    whole_kind, whole, _ = _read_hello(max_bytes, [payload] if payload else [])
    assert kind == whole_kind, f"fragmented: {kind} ({result}), whole: {whole_kind} ({whole})"
    if kind == "hello":
        assert _hello_fields(result) == _hello_fields(whole)
        assert whole.raw == payload and payload.startswith(fed)
    try:
        parsed = parse_client_hello(payload, max_bytes)
    except ClientHelloError:
        assert kind != "hello", "parse_client_hello refused what the reader accepted"
    else:
        assert kind == "hello", "parse_client_hello accepted what the reader did not"
        assert _hello_fields(parsed) == _hello_fields(whole)


# ---------------------------------------------------------------------------- wire


_LINE_LIMITS = (65536, 16, 256, 4096)


def _frame_value(frame: Any) -> tuple[str, dict]:
    from epsproxy.eps.links.wire import frame_to_object

    return type(frame).__name__, frame_to_object(frame)


def _same_frames(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        name_x, obj_x = _frame_value(x)
        name_y, obj_y = _frame_value(y)
        if name_x != name_y or not same(obj_x, obj_y):
            return False
    return True


def _reference_decode(payload: bytes, max_line: int) -> tuple[list, type | None]:
    """Frames and error class of ``payload`` decoded line by line by the strict codec."""
    from epsproxy.eps.links.wire import LineTooLong, MalformedFrame, _decode_line_strict

    *complete, tail = payload.split(b"\n")
    frames = []
    for line in complete:
        if len(line) > max_line:
            return frames, LineTooLong
        try:
            frames.append(_decode_line_strict(line))
        except MalformedFrame:
            return frames, MalformedFrame
    if len(tail) > max_line:
        return frames, LineTooLong
    return frames, None


def wire(data: bytes) -> None:
    """Fuzz target for the EPS line decoder and encoder (see the module docstring)."""
    from epsproxy.eps.links.wire import DEFAULT_MAX_LINE, LineDecoder, WireError, encode

    flags, fragments, payload = split_input(data)
    max_line = _LINE_LIMITS[(flags >> 4) & 3]
    decoder = LineDecoder(max_line)
    frames: list = []
    error: WireError | None = None
    for piece in fragments:
        try:
            got = decoder.feed(piece)
        except WireError as e:
            assert isinstance(e.reason, str) and "\n" not in e.reason
            frames += e.frames
            error = e
            break
        frames += got
        assert decoder.buffered <= max_line, (
            f"decoder holds {decoder.buffered} bytes, over max_line={max_line}"
        )
    if error is not None:
        assert decoder.buffered == 0
        try:
            decoder.feed(b"{}\n")
        except WireError as again:
            assert type(again) is type(error)
        else:
            raise AssertionError("a failed decoder accepted more input")
    expected, expected_error = _reference_decode(payload, max_line)
    assert _same_frames(frames, expected), "orjson path and strict decoder disagree"
    assert (type(error) if error else None) is expected_error, (
        f"decoder raised {error!r}, the strict decoder {expected_error}"
    )
    for frame in frames:
        line = encode(frame)
        assert line.endswith(b"\n") and b"\n" not in line[:-1]
        back = LineDecoder(DEFAULT_MAX_LINE).feed(line)
        assert _same_frames(back, [frame]), f"{frame!r} does not round-trip ({line[:200]!r})"


# ------------------------------------------------------------------------- JSON-RPC


_CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON;",
    "text/plain",
    None,
    "application/jsonx",
)


def _check_parse(content_type: str | None, body: bytes) -> None:
    from epsproxy.net.jsonrpc.envelope import (
        INVALID_REQUEST,
        PARSE_ERROR,
        JSONRPCError,
        encode_json as _encode,
        first_json_value as _first_json_value,
        id_from_internal,
        parse_request,
        response_object,
    )

    try:
        request = parse_request(content_type, body)
    except JSONRPCError as e:
        assert e.code in (PARSE_ERROR, INVALID_REQUEST)
        _encode(response_object(None, error=e))
        return
    assert type(request.method) is str and 1 <= len(request.method) <= 100
    assert type(request.params) is dict
    assert type(request.id) is str and request.id
    sent = _first_json_value(body).get("id")
    if sent is not None and sent != "":
        back = id_from_internal(request.id)
        if isinstance(sent, float):
            # forms.Integer takes 1.0 for 1: the reply carries the integer.
            assert type(back) is int and back == sent
        else:
            assert same(back, sent), f"id {sent!r} comes back as {back!r}"
    response = response_object(request.id, error=JSONRPCError(1, "x"))
    _encode(response)


@functools.lru_cache(maxsize=None)
def _dispatcher() -> Any:
    from twisted.internet.defer import succeed

    from epsproxy.rules import forms
    from epsproxy.net.jsonrpc.envelope import NO_RESULT, Dispatcher, JSONRPCError

    dispatcher = Dispatcher()
    dispatcher.register("echo", None, lambda params, context: params)
    dispatcher.register(
        "typed",
        forms.Map({"n": forms.Required(forms.Integer(min=0, max=10)),
                   "s": forms.Optional(forms.String(max_length=5))}, strict=True),
        lambda params, context: {"n": params["n"]},
    )
    dispatcher.register("none", None, lambda params, context: NO_RESULT)
    dispatcher.register("later", None, lambda params, context: succeed({"ok": True}))

    def refuse(params: dict, context: Any) -> Any:
        raise JSONRPCError(-32000, "refused", {"why": "fuzz"})

    dispatcher.register("refuse", None, refuse)
    return dispatcher


@functools.lru_cache(maxsize=None)
def _site(max_body: int, cors: bool) -> tuple[Any, Any]:
    from twisted.internet.task import Clock

    from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site

    raw: dict[str, Any] = {"bind_address": "127.0.0.1:0", "max_body_bytes": max_body}
    if cors:
        raw["cors"] = {"allowed_hosts": [r"^https://ok\.example$"], "allowed_headers": ["x-a"]}
    settings = JSONRPC_SERVER_SETTINGS.validate(raw)
    clock = Clock()
    return jsonrpc_site(_dispatcher(), settings, reactor=clock), clock


_METHODS = (b"POST", b"POST", b"GET", b"OPTIONS", b"PUT")
_PATHS = (b"/jsonrpc", b"/jsonrpc", b"/other", b"/jsonrpc?x=1")
_RPC_METHODS = ("echo", "typed", "none", "later", "refuse", "missing")


def _http_body(fdp: Any) -> bytes:
    """A request body: fuzzed bytes, or a request object around fuzzed params/id."""
    if fdp.ConsumeBool():
        return fdp.ConsumeBytes(fdp.remaining_bytes())
    method = _pick(fdp, _RPC_METHODS)
    shape = fdp.ConsumeIntInRange(0, 3)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    if shape == 0:
        return b'{"jsonrpc":"2.0","method":"%s","params":%s,"id":1}' % (method.encode(), rest)
    if shape == 1:
        return b'{"jsonrpc":"2.0","method":"%s","params":{},"id":%s}' % (method.encode(), rest)
    if shape == 2:
        return b'{"jsonrpc":"2.0","method":"%s","params":{"n":%s}}' % (method.encode(), rest)
    return b'{"jsonrpc":"2.0","method":' + rest + b',"params":{}}'


def _parse_http_response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response: {raw[:200]!r}"
    status_line, *header_lines = head.split(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split(b" ")[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        assert len(body) >= length, "body shorter than its Content-Length"
        assert len(body) == length, "more than one response, or bytes after the body"
    return status, headers, body


def _check_rpc_body(body: bytes) -> None:
    value = json.loads(body)
    if isinstance(value, list):  # a batch: a reply per request that is not a notification
        assert value, "an empty array answers nothing"
        for item in value:
            _check_rpc_object(item)
        return
    _check_rpc_object(value)


def _check_rpc_object(value: Any) -> None:
    assert isinstance(value, dict) and value.get("jsonrpc") == "2.0", value
    assert "id" in value
    assert isinstance(value["id"], (str, int, type(None))) and not isinstance(value["id"], bool)
    assert ("result" in value) + ("error" in value) <= 1
    if "error" in value:
        error = value["error"]
        assert type(error.get("code")) is int and type(error.get("message")) is str


def _check_http(fdp: Any, content_type: str | None) -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    max_body = _pick(fdp, (4 * 1024 * 1024, 64))
    cors = fdp.ConsumeBool()
    method = _pick(fdp, _METHODS)
    path = _pick(fdp, _PATHS)
    chunked = fdp.ConsumeBool()
    origin = _pick(fdp, (None, b"https://ok.example", b"https://evil.example"))
    body = _http_body(fdp)
    site, clock = _site(max_body, cors)
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: fuzz"]
    if content_type is not None:
        value = content_type.encode("utf-8", "surrogatepass")
        value = value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
        lines.append(b"Content-Type: " + value)
    if origin is not None:
        lines.append(b"Origin: " + origin)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        framed = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        framed = body
    request = b"\r\n".join(lines) + b"\r\n\r\n" + framed
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 1))
    protocol.makeConnection(transport)
    try:
        protocol.dataReceived(request)
        status, headers, payload = _parse_http_response(transport.value())
        if status == 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # twisted.web's own "Bad Request": the header we built is not HTTP
            # (e.g. a content type with leading/trailing or control bytes).
            return
        if status == 413:
            # The body cap comes first, whatever the path and method.
            assert len(body) > max_body, (len(body), max_body)
            _check_rpc_body(payload)
            return
        if path == b"/other":
            assert status == 404, status
            return
        if method == b"OPTIONS" and status == 200:
            assert cors and origin == b"https://ok.example" and payload == b""
            return
        assert status in (200, 204, 400, 403, 405, 413), status
        if status in (200, 204):
            assert method == b"POST", method
        if status == 204:  # notifications only: nothing is answered
            assert payload == b"", payload
            return
        _check_rpc_body(payload)
    finally:
        protocol.connectionLost(Failure(ConnectionDone()))
    assert not [c for c in clock.getDelayedCalls() if c.active()], "timers left behind"


def jsonrpc(data: bytes) -> None:
    """Fuzz target for JSON-RPC request handling (see the module docstring)."""
    fdp = provider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    index = fdp.ConsumeIntInRange(0, len(_CONTENT_TYPES))
    if index < len(_CONTENT_TYPES):
        content_type = _CONTENT_TYPES[index]
    else:
        content_type = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64))
    if mode < 2:
        _check_parse(content_type, fdp.ConsumeBytes(fdp.remaining_bytes()))
    else:
        _check_http(fdp, content_type)


# -------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordsContext:
    """A dev PKI's trust store, and real signed records to mutate (made once)."""

    trust: Any
    bases: tuple[dict, ...]  # signed records: a chain by hd-1, then one by hd-2
    signed_keys: frozenset[str]  # (record, hash, parent_hash) of every record hd-1 signed
    pins: Any
    vocabulary: tuple[Any, ...]


def _signed_key(normalised: dict) -> str:
    """
    What a signature vouches for: the record *as hashed*.  The structured hash skips
    zero values inside objects (SPEC §4.2: null, false, 0, "", []), so a record with an
    added ``"x": null`` is the same signed record — found by this target, documented in
    docs/robustness.md — and every consumer treats a zero value like an absent one.
    """
    from epsproxy.rules.records import structured_hash

    return json.dumps(
        [structured_hash(normalised["record"]).hex(), normalised["hash"],
         normalised["parent_hash"]]
    )


@functools.lru_cache(maxsize=None)
def records_context() -> RecordsContext:
    """Make the dev PKI (in a temporary folder, removed at exit) and sign the bases."""
    from epsproxy.rules.certificates import load_private_key_file
    from epsproxy.dev.pki import create_pki
    from epsproxy.rules.records import Pins, TrustStore, normalise_signed_record, sign_record

    folder = Path(tempfile.mkdtemp(prefix="epsproxy-fuzz-pki-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    dev = create_pki(folder / "certs", names=("hd-1", "hd-2"), groups={"hd-1": ("sd-admin",)})
    trust = TrustStore.from_files([dev.root], [dev.intermediate])
    admin_crt, admin_key = dev.signing("hd-1")
    other_crt, other_key = dev.signing("hd-2")
    alt_crt, _ = dev.signing("hd-1", alt=True)
    key, pem = load_private_key_file(admin_key), admin_crt.read_text()
    chain = []
    parent = ""
    for record in _base_records(dev):
        signed = sign_record(record, parent, key, pem)
        chain.append(signed)
        parent = signed["hash"]
    stranger = sign_record(_base_records(dev)[0], parent, load_private_key_file(other_key),
                           other_crt.read_text())
    keys = frozenset(_signed_key(normalise_signed_record(s)) for s in chain)
    vocabulary = (
        "", "sd-admin", "hd-1", "hd-2", "certificates", "groups", "services", "settings",
        "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.123456789+01:00", chain[0]["hash"],
        chain[-1]["hash"], "0" * 64, "A" * 64, other_crt.read_text(), alt_crt.read_text(),
        dev.root.read_text(), "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----",
        chain[0]["signature"]["r"], chain[1]["signature"]["s"], "1" * 100, "\ud800",
        -0.0, 0, 1, 2**31, 2**64, 1e308, 5e-324, True, False, None, [], {}, ["call"],
    )
    return RecordsContext(trust, (*chain, stranger), keys, Pins.from_records(chain[:1]),
                          vocabulary)


def _base_records(dev: Any) -> list[dict]:
    fingerprints = dev.fingerprints("hd-1")
    return [
        {"name": "hd-1", "section": "groups", "data": ["health-departments"],
         "created_at": "2024-05-17T10:00:00Z"},
        {"name": "hd-1", "section": "certificates", "created_at": "2024-05-17T10:00:01.5+02:00",
         "data": [{"fingerprint": fingerprints["signing"], "key_usage": "signing"},
                  {"fingerprint": fingerprints["encryption"], "key_usage": "encryption"}]},
        {"name": "hd-1", "section": "services", "created_at": "2024-05-17T10:00:02Z",
         "data": [{"name": "api", "permissions": [{"group": "g", "rights": ["call"]}],
                   "methods": [{"name": "get", "parameters": [
                       {"name": "id", "validators": [{"type": "int",
                                                      "parameters": {"min": 1}}]}]}]}]},
        {"name": "hd-1", "section": "settings", "created_at": "2024-05-17T10:00:03Z",
         "data": [{"operator": "op-1", "service": "", "environment": "",
                   "settings": {"a": [1, 2.5, -0.0, True, None, "x"], "b": {"c": "d"}}}]},
    ]


_KEYS = ("parent_hash", "hash", "signature", "record", "r", "s", "c", "name", "section",
         "data", "created_at", "fingerprint", "key_usage", "permissions", "group", "rights",
         "methods", "parameters", "validators", "type", "settings", "operator", "service",
         "environment")


def _value(fdp: Any, vocabulary: tuple, depth: int) -> Any:
    """A JSON-like value built from the provider (nesting up to ``depth``)."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**70), 2**70)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if kind in (5, 6):
        return copy.deepcopy(_pick(fdp, vocabulary))
    if kind == 7:
        return [_value(fdp, vocabulary, depth - 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 8:
        # A deep chain: reaches the nesting limits cheaply.
        inner: Any = fdp.ConsumeUnicodeNoSurrogates(4)
        for _ in range(fdp.ConsumeIntInRange(0, 600)):
            inner = [inner] if fdp.ConsumeBool() else {"k": inner}
        return inner
    result = {}
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        key = (_pick(fdp, _KEYS) if fdp.ConsumeBool()
               else fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12)))
        result[key] = _value(fdp, vocabulary, depth - 1)
    return result


def _mutate(fdp: Any, value: Any, vocabulary: tuple) -> Any:
    """Walk into ``value`` along provider-chosen keys and change what is there."""
    parent: Any = None
    key: Any = None
    node = value
    while isinstance(node, (dict, list)) and node and fdp.ConsumeIntInRange(0, 3):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, _pick(fdp, keys)
        node = node[key]
    operation = fdp.ConsumeIntInRange(0, 4)
    if parent is None:
        return _value(fdp, vocabulary, 3) if operation == 0 else value
    if operation == 0:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif operation == 1 and isinstance(parent, dict):
        parent[_pick(fdp, _KEYS)] = _value(fdp, vocabulary, 3)
    elif operation == 2 and isinstance(node, str) and node:
        index = fdp.ConsumeIntInRange(0, len(node) - 1)
        parent[key] = node[:index] + fdp.ConsumeUnicodeNoSurrogates(2) + node[index + 1:]
    else:
        parent[key] = _value(fdp, vocabulary, 3)
    return value


def _check_record(value: Any, context: RecordsContext, as_list: bool) -> None:
    from epsproxy.rules import forms
    from epsproxy.rules.records import (
        RecordError,
        normalise_signed_record,
        structured_hash,
        verify_record,
    )

    try:
        structured_hash(value)
    except ValueError:
        pass
    try:
        normalised = normalise_signed_record(value)
    except forms.FormError:
        normalised = None
    preceding = list(context.bases[:1]) if as_list else context.pins
    try:
        signer = verify_record(value, preceding, context.trust)
    except RecordError as e:
        assert isinstance(e.reason, str)
        return
    assert normalised is not None, "verified a record that does not normalise"
    assert _signed_key(normalised) in context.signed_keys, "a forged record verified"
    assert signer.name == "hd-1" and "sd-admin" in signer.groups


def records(data: bytes) -> None:
    """Fuzz target for record verification (see the module docstring)."""
    from epsproxy.rules.records import loads

    context = records_context()
    fdp = provider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    as_list = fdp.ConsumeBool()
    if mode == 0:
        text = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            value = loads(text)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError included
            return
    elif mode == 1:
        value = _value(fdp, context.vocabulary, 6)
    else:
        value = copy.deepcopy(_pick(fdp, context.bases))
        for _ in range(fdp.ConsumeIntInRange(0 if mode == 2 else 1, 4)):
            value = _mutate(fdp, value, context.vocabulary)
    _check_record(value, context, as_list)


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Target:
    """A fuzz target and the libFuzzer ``-max_len`` it is run with."""

    name: str
    function: Callable[[bytes], None]
    max_len: int
    description: str


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("clienthello", client_hello, 16 * 1024 + 17,
               "ClientHelloReader.feed (fragments) + parse_client_hello"),
        Target("wire", wire, 64 * 1024 + 17, "LineDecoder.feed (fragments) + encode round trip"),
        Target("jsonrpc", jsonrpc, 16 * 1024,
               "parse_request + JSONRPCResource over HTTPChannel/StringTransport"),
        Target("records", records, 16 * 1024,
               "normalise_signed_record / verify_record / structured_hash"),
    )
}
