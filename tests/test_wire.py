"""
Tests for epsproxy.eps.links.wire: the EPS-to-EPS line-framed JSON codec (no sockets).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings as hsettings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.eps.links import wire
from epsproxy.eps.links.wire import (
    DEFAULT_MAX_LINE,
    NO_RESULT,
    PROTOCOL_VERSION,
    ErrorFrame,
    Hello,
    LineDecoder,
    LineTooLong,
    MalformedFrame,
    Ping,
    Pong,
    Request,
    Response,
    WireError,
    encode,
    parse_frame,
)

FRAMES = [
    Hello(PROTOCOL_VERSION, "hd-1"),
    Hello(7, ""),
    Request("1", "getEntry", {"name": "hd-2", "n": [1, 2.5, None, True], "é": "ünï😀"}),
    Request("x" * 1024, "m" * 200, {}),
    Response("1", {"ok": True}),
    Response("2"),
    Response("3", error={"code": -32601, "message": "not found"}),
    Response("4", error={"code": 5, "message": "", "data": {"field": "x"}}),
    Ping("abc"),
    Pong("abc"),
    Ping(""),
    ErrorFrame(wire.ERR_LINE_TOO_LONG, "line exceeds 1048576 bytes"),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=4)
ids = st.text(min_size=1, max_size=40)
frames = st.one_of(
    st.builds(Hello, st.integers(0, 2**31 - 1), st.text(max_size=20)),
    st.builds(Request, ids, st.text(min_size=1, max_size=30), json_objects),
    st.builds(Response, ids, json_objects),
    st.builds(Response, ids),
    st.builds(
        Response,
        ids,
        error=st.fixed_dictionaries(
            {"code": st.integers(-(2**31), 2**31 - 1), "message": st.text()},
            optional={"data": json_objects},
        ),
    ),
    st.builds(Ping, st.text(max_size=20)),
    st.builds(Pong, st.text(max_size=20)),
    st.builds(ErrorFrame, st.integers(0, 100), st.text(max_size=50)),
)


def line(obj: Any) -> bytes:
    """A compact JSON line for ``obj``."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class EncodeTests(SynchronousTestCase):
    """encode / parse_frame round trips and the exact line format."""

    def test_round_trip_every_frame(self) -> None:
        for frame in FRAMES:
            data = encode(frame)
            self.assertTrue(data.endswith(b"\n"))
            self.assertEqual(data.count(b"\n"), 1)
            self.assertEqual(LineDecoder().feed(data), [frame])

    def test_compact_utf8(self) -> None:
        data = encode(Request("7", "m", {"a": "é", "b": [1, 2]}))
        self.assertEqual(data, '{"t":"req","id":"7","m":"m","p":{"a":"é","b":[1,2]}}\n'.encode())

    def test_keys(self) -> None:
        self.assertEqual(encode(Hello(1, "hd-1")), b'{"t":"hello","v":1,"name":"hd-1"}\n')
        self.assertEqual(encode(Response("1", {})), b'{"t":"res","id":"1","r":{}}\n')
        self.assertEqual(encode(Response("1")), b'{"t":"res","id":"1"}\n')
        self.assertEqual(
            encode(Response("1", error={"code": 2, "message": "m"})),
            b'{"t":"res","id":"1","e":{"code":2,"message":"m"}}\n',
        )
        self.assertEqual(encode(Ping("n1")), b'{"t":"ping","n":"n1"}\n')
        self.assertEqual(encode(Pong("n1")), b'{"t":"pong","n":"n1"}\n')
        self.assertEqual(encode(ErrorFrame(1, "bad")), b'{"t":"err","code":1,"msg":"bad"}\n')

    def test_newlines_in_strings_are_escaped(self) -> None:
        frame = Request("1", "m", {"a": "x\ny\r\u2028"})
        data = encode(frame)
        self.assertEqual(data.count(b"\n"), 1)
        self.assertEqual(LineDecoder().feed(data), [frame])

    def test_encode_max_line(self) -> None:
        frame = Request("1", "m", {"a": "x" * 100})
        size = len(encode(frame)) - 1
        self.assertEqual(len(encode(frame, max_line=size)), size + 1)
        self.assertRaises(LineTooLong, encode, frame, max_line=size - 1)

    def test_encode_unencodable(self) -> None:
        for params in [
            {"a": float("nan")},
            {"a": float("inf")},
            {"a": "\ud800"},
            {"a": object()},
            {"a": b"bytes"},
        ]:
            self.assertRaises(MalformedFrame, encode, Request("1", "m", params))
        cyclic: dict[str, Any] = {}
        cyclic["a"] = cyclic
        self.assertRaises(MalformedFrame, encode, Request("1", "m", cyclic))
        self.assertRaises(TypeError, encode, "not a frame")  # programming error

    def test_error_object_normalised(self) -> None:
        response = Response("1", error={"code": 1, "message": "m", "data": None, "x": 1})
        self.assertEqual(response.error, {"code": 1, "message": "m"})

    def test_null_result_is_no_result(self) -> None:
        frame = parse_frame({"t": "res", "id": "1", "r": None, "e": None})
        self.assertIs(frame.result, NO_RESULT)
        self.assertIsNone(frame.error)

    def test_unknown_keys_ignored(self) -> None:
        frame = parse_frame({"t": "ping", "n": "x", "future": [1]})
        self.assertEqual(frame, Ping("x"))

    def test_error_frame_for(self) -> None:
        self.assertEqual(
            wire.error_frame_for(LineTooLong("too long")), ErrorFrame(wire.ERR_LINE_TOO_LONG, "too long")
        )
        self.assertEqual(
            wire.error_frame_for(MalformedFrame("bad")), ErrorFrame(wire.ERR_MALFORMED, "bad")
        )

    @hsettings(deadline=None, max_examples=200)
    @given(frame=frames)
    def test_round_trip_property(self, frame: wire.Frame) -> None:
        self.assertEqual(LineDecoder().feed(encode(frame)), [frame])


class InvalidFrameTests(SynchronousTestCase):
    """Every field rule, both when building a frame and when parsing one."""

    def assertMalformed(self, obj: Any) -> None:
        self.assertRaises(MalformedFrame, parse_frame, obj)
        with self.assertRaises(MalformedFrame):
            LineDecoder().feed(line(obj))

    def test_not_objects(self) -> None:
        for obj in [[], [{"t": "ping", "n": ""}], "ping", 1, None, True]:
            self.assertMalformed(obj)

    def test_unknown_or_missing_type(self) -> None:
        for obj in [{}, {"t": "bogus"}, {"t": 1}, {"t": None}, {"t": ["req"]}, {"T": "ping"}]:
            self.assertMalformed(obj)

    def test_request_fields(self) -> None:
        good = {"t": "req", "id": "1", "m": "m", "p": {}}
        self.assertEqual(parse_frame(good), Request("1", "m", {}))
        for key, bad in [
            ("id", 1),
            ("id", ""),
            ("id", "x" * 1025),
            ("id", None),
            ("m", ""),
            ("m", "m" * 201),
            ("m", 3),
            ("p", []),
            ("p", None),
            ("p", "x"),
        ]:
            self.assertMalformed({**good, key: bad})
        for key in ["id", "m", "p"]:
            self.assertMalformed({k: v for k, v in good.items() if k != key})

    def test_response_fields(self) -> None:
        for obj in [
            {"t": "res"},
            {"t": "res", "id": 5, "r": {}},
            {"t": "res", "id": "1", "r": []},
            {"t": "res", "id": "1", "r": "ok"},
            {"t": "res", "id": "1", "r": {}, "e": {"code": 1, "message": "m"}},
            {"t": "res", "id": "1", "e": []},
            {"t": "res", "id": "1", "e": {"message": "m"}},
            {"t": "res", "id": "1", "e": {"code": 1}},
            {"t": "res", "id": "1", "e": {"code": "1", "message": "m"}},
            {"t": "res", "id": "1", "e": {"code": 1.5, "message": "m"}},
            {"t": "res", "id": "1", "e": {"code": True, "message": "m"}},
            {"t": "res", "id": "1", "e": {"code": 2**31, "message": "m"}},
            {"t": "res", "id": "1", "e": {"code": 1, "message": 2}},
            {"t": "res", "id": "1", "e": {"code": 1, "message": "m", "data": [1]}},
        ]:
            self.assertMalformed(obj)

    def test_other_frames(self) -> None:
        for obj in [
            {"t": "hello", "name": "a"},
            {"t": "hello", "v": "1", "name": "a"},
            {"t": "hello", "v": True, "name": "a"},
            {"t": "hello", "v": -1, "name": "a"},
            {"t": "hello", "v": 1},
            {"t": "hello", "v": 1, "name": "x" * 256},
            {"t": "ping"},
            {"t": "ping", "n": 1},
            {"t": "pong", "n": None},
            {"t": "pong", "n": "x" * 129},
            {"t": "err", "code": 1},
            {"t": "err", "msg": "x"},
            {"t": "err", "code": False, "msg": "x"},
            {"t": "err", "code": 1, "msg": "x" * 4097},
        ]:
            self.assertMalformed(obj)

    def test_constructors_validate(self) -> None:
        self.assertRaises(MalformedFrame, Request, "", "m", {})
        self.assertRaises(MalformedFrame, Request, "1", "m", [])  # type: ignore[arg-type]
        self.assertRaises(MalformedFrame, Response, "1", {}, {"code": 1, "message": "m"})
        self.assertRaises(MalformedFrame, Hello, 1.0, "a")  # type: ignore[arg-type]
        self.assertRaises(MalformedFrame, Ping, None)  # type: ignore[arg-type]


class DecoderTests(SynchronousTestCase):
    """LineDecoder: fragmentation, limits, hostile bytes, and the dead state."""

    stream = b"".join(encode(f) for f in FRAMES)

    def test_many_frames_in_one_feed(self) -> None:
        self.assertEqual(LineDecoder().feed(self.stream * 50), FRAMES * 50)

    def test_split_at_every_position(self) -> None:
        for i in range(len(self.stream) + 1):
            decoder = LineDecoder()
            got = decoder.feed(self.stream[:i]) + decoder.feed(self.stream[i:])
            self.assertEqual(got, FRAMES, f"split at {i}")
            self.assertEqual(decoder.buffered, 0)

    def test_byte_by_byte(self) -> None:
        decoder = LineDecoder()
        got = []
        for i in range(len(self.stream)):
            got.extend(decoder.feed(self.stream[i : i + 1]))
        self.assertEqual(got, FRAMES)

    @hsettings(deadline=None, max_examples=100)
    @given(cuts=st.lists(st.integers(0, len(stream)), max_size=30))
    def test_random_fragmentation(self, cuts: list[int]) -> None:
        bounds = [0, *sorted(cuts), len(self.stream)]
        decoder = LineDecoder()
        got = []
        for a, b in zip(bounds, bounds[1:]):
            got.extend(decoder.feed(self.stream[a:b]))
        self.assertEqual(got, FRAMES)

    def test_partial_line_kept(self) -> None:
        decoder = LineDecoder()
        data = encode(Ping("x"))
        self.assertEqual(decoder.feed(data[:-1]), [])
        self.assertEqual(decoder.buffered, len(data) - 1)
        self.assertEqual(decoder.feed(b"\n" + data[:3]), [Ping("x")])
        self.assertEqual(decoder.buffered, 3)

    def test_oversized_detected_before_newline(self) -> None:
        decoder = LineDecoder()
        chunk = b"x" * 65536
        fed = 0
        with self.assertRaises(LineTooLong):
            while fed < 2 * DEFAULT_MAX_LINE:
                decoder.feed(chunk)
                fed += len(chunk)
        # The chunk that pushed the unfinished line past the limit raised.
        self.assertEqual(fed, DEFAULT_MAX_LINE)
        self.assertEqual(decoder.buffered, 0)

    def test_oversized_after_complete_lines(self) -> None:
        decoder = LineDecoder(max_line=100)
        data = encode(Ping("a")) + b"y" * 101
        with self.assertRaises(LineTooLong) as cm:
            decoder.feed(data)
        self.assertEqual(cm.exception.frames, [Ping("a")])

    def test_oversized_complete_line_in_one_chunk(self) -> None:
        frame = Request("1", "m", {"a": "x" * 200})
        size = len(encode(frame)) - 1
        self.assertRaises(LineTooLong, LineDecoder(max_line=size - 1).feed, encode(frame))

    def test_exactly_max_line_accepted(self) -> None:
        base = len(encode(Request("1", "m", {"a": ""}))) - 1
        frame = Request("1", "m", {"a": "x" * (DEFAULT_MAX_LINE - base)})
        data = encode(frame)
        self.assertEqual(len(data), DEFAULT_MAX_LINE + 1)
        decoder = LineDecoder()
        # Unfinished, exactly at the limit: still buffered.
        self.assertEqual(decoder.feed(data[:-1]), [])
        self.assertEqual(decoder.feed(b"\n"), [frame])
        self.assertEqual(LineDecoder().feed(data), [frame])
        with self.assertRaises(LineTooLong):
            LineDecoder().feed(data[:-1] + b" \n")

    def test_small_limit(self) -> None:
        decoder = LineDecoder(max_line=23)
        self.assertEqual(decoder.feed(b'{"t":"ping","n":"abcd"}\n'[:23]), [])
        self.assertRaises(LineTooLong, decoder.feed, b"}")
        self.assertRaises(ValueError, LineDecoder, 0)

    def test_hostile_lines(self) -> None:
        for data in [
            b"\xff\xfe\n",
            b'{"t":"ping","n":"\xc3"}\n',
            b'{"t":"ping","n":"\xed\xa0\x80"}\n',  # encoded surrogate
            b'{"t":"ping","n":"\\ud800"}\n',  # escaped lone surrogate
            b'{"t":"ping","n":"x","k":"\\udc00"}\n',
            b"\xef\xbb\xbf" + encode(Ping("x")),  # BOM
            b"\n",
            b" \n",
            b"not json\n",
            b'{"t":"ping","n":"x"} trailing\n',
            b'{"t":"ping","n":"x"}{"t":"ping","n":"x"}\n',
            b'{"t":"ping","n":"x"\n',
            b'{"t":"req","id":"1","m":"m","p":{"a":NaN}}\n',
            b'{"t":"req","id":"1","m":"m","p":{"a":Infinity}}\n',
            b'{"t":"req","id":"1","m":"m","p":{"a":1e999}}\n',
            b'{"t":"req","id":"1","m":"m","p":{"a":' + b"9" * 5000 + b"}}\n",
            b"[" * 100000 + b"\n",
            b'{"t":"req","id":"1","m":"m","p":' + b'{"a":' * 50000 + b"\n",
            b'{"t":"req","id":"1","m":"m","p":' + b"[" * 5000 + b"]" * 5000 + b"}\n",
            b"\x00\n",
            b'"\\u0000"\n',
        ]:
            with self.assertRaises(MalformedFrame, msg=repr(data[:60])):
                LineDecoder().feed(data)

    def test_paired_surrogate_escape_accepted(self) -> None:
        self.assertEqual(LineDecoder().feed(b'{"t":"ping","n":"\\ud83d\\ude00"}\n'), [Ping("\U0001f600")])

    def test_crlf_tolerated(self) -> None:
        self.assertEqual(LineDecoder().feed(b'{"t":"ping","n":"x"}\r\n'), [Ping("x")])

    def test_dead_after_error(self) -> None:
        decoder = LineDecoder()
        self.assertRaises(MalformedFrame, decoder.feed, b"junk\n" + encode(Ping("x")))
        self.assertRaises(MalformedFrame, decoder.feed, encode(Ping("x")))
        self.assertRaises(MalformedFrame, decoder.feed, b"")
        decoder = LineDecoder(max_line=4)
        self.assertRaises(LineTooLong, decoder.feed, b"12345")
        with self.assertRaises(LineTooLong) as cm:
            decoder.feed(b"\n")
        self.assertEqual(cm.exception.frames, [])

    def test_frames_before_error_reported(self) -> None:
        with self.assertRaises(MalformedFrame) as cm:
            LineDecoder().feed(encode(Ping("a")) + encode(Pong("b")) + b"[]\n" + encode(Ping("c")))
        self.assertEqual(cm.exception.frames, [Ping("a"), Pong("b")])

    @hsettings(deadline=None, max_examples=300)
    @given(chunks=st.lists(st.binary(max_size=80), max_size=8), limit=st.integers(1, 64))
    def test_arbitrary_bytes_only_raise_wire_errors(self, chunks: list[bytes], limit: int) -> None:
        decoder = LineDecoder(max_line=limit)
        try:
            for chunk in chunks:
                for frame in decoder.feed(chunk):
                    encode(frame)  # anything decoded can be sent on
        except WireError:
            pass

    @hsettings(deadline=None, max_examples=200)
    @given(value=json_values)
    def test_arbitrary_json_only_raise_wire_errors(self, value: Any) -> None:
        for obj in [value, {"t": "req", "id": "1", "m": "m", "p": value}, {"t": "res", "id": "1", "e": value}]:
            try:
                frames = LineDecoder().feed(line(obj))
            except WireError:
                continue
            self.assertEqual(len(frames), 1)
            self.assertEqual(LineDecoder().feed(encode(frames[0])), frames)

    def test_long_line_in_tiny_chunks(self) -> None:
        # Many tiny chunks of one long line (the decoder only searches the new bytes).
        decoder = LineDecoder()
        frame = Request("1", "m", {"a": "x" * 200_000})
        data = encode(frame)
        got = []
        for i in range(0, len(data), 7):
            got.extend(decoder.feed(data[i : i + 7]))
        self.assertEqual(got, [frame])
