"""
The EPS-to-EPS wire format: line-framed JSON frames (sans-IO codec).

EPS servers talk to each other over mutual TLS.  Where the reference used gRPC (SPEC §12.4)
we send one compact UTF-8 JSON object per ``\\n``-terminated line; ``docs/protocol.md``
describes the whole protocol.  This module only turns frames into bytes and bytes into
frames, with no I/O:

- the frame types (:class:`Hello`, :class:`Request`, :class:`Response`, :class:`Ping`,
  :class:`Pong`, :class:`ErrorFrame`) are frozen dataclasses that validate their fields
  when built, so an invalid frame can neither be sent nor received;
- :func:`encode` writes a frame as one line; :func:`parse_frame` turns a decoded JSON
  object into a frame;
- :class:`LineDecoder` splits a byte stream into frames, enforcing the line limit as soon
  as an unfinished line grows past it.

Lines are written and read with orjson (several times faster than the standard library),
but the standard library's strict codec stays the reference: whenever orjson refuses a
value or line, or a cheap check sees something orjson would treat differently (a value
that does not read back as itself, a number of 19 or more digits), the strict codec does the
work, so what is accepted, refused and produced is the same as with it alone (floats
may be written in another, equally exact form: ``1e-07`` as ``1e-7``).

Every problem with peer input is a :class:`WireError` (:class:`LineTooLong` or
:class:`MalformedFrame`); :func:`error_frame_for` gives the connection-level error frame
to send before closing.  The peer's identity comes from its TLS certificate, never from a
frame.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import orjson

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_LINE",
    "NO_RESULT",
    "ERR_MALFORMED",
    "ERR_LINE_TOO_LONG",
    "ERR_VERSION",
    "ERR_PROTOCOL",
    "ERR_IDENTITY",
    "ERR_TIMEOUT",
    "ERR_SHUTDOWN",
    "WireError",
    "LineTooLong",
    "MalformedFrame",
    "Hello",
    "Request",
    "Response",
    "Ping",
    "Pong",
    "ErrorFrame",
    "Frame",
    "encode",
    "parse_frame",
    "frame_to_object",
    "error_frame_for",
    "LineDecoder",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_LINE = 1 << 20

MAX_ID = 1024
MAX_METHOD = 200
MAX_NAME = 255
MAX_NONCE = 128
MAX_MESSAGE = 4096
_INT32 = (-(2**31), 2**31 - 1)

# Codes of connection-level error frames (docs/protocol.md, "Error frames").
ERR_MALFORMED = 1
ERR_LINE_TOO_LONG = 2
ERR_VERSION = 3
ERR_PROTOCOL = 4
ERR_IDENTITY = 5
ERR_TIMEOUT = 6
ERR_SHUTDOWN = 7


class WireError(Exception):
    """
    Base of the codec's errors: the peer (or the caller) broke the wire format.

    ``reason`` is a short text fit for an error frame and for logs (never the offending
    data).  ``frames`` holds the frames a :meth:`LineDecoder.feed` call decoded before it
    hit the error, so a caller can still act on them.
    """

    code = ERR_MALFORMED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frames: list[Frame] = []


class LineTooLong(WireError):
    """A line (finished or not) is longer than the configured maximum."""

    code = ERR_LINE_TOO_LONG


class MalformedFrame(WireError):
    """A line is not valid UTF-8 JSON, not an object, or not a valid frame."""

    code = ERR_MALFORMED


class _NoResult:
    """Type of :data:`NO_RESULT`."""

    _instance: _NoResult | None = None

    def __new__(cls) -> _NoResult:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_RESULT"

    def __reduce__(self) -> str:
        return "NO_RESULT"


NO_RESULT: Any = _NoResult()
"""A :class:`Response` without ``result`` nor ``error`` (the gRPC transport read this as
``{}``, SPEC §12.4; the caller decides)."""


def _check_str(value: object, what: str, low: int, high: int) -> None:
    if not isinstance(value, str):
        raise MalformedFrame(f"{what} must be a string")
    if not low <= len(value) <= high:
        raise MalformedFrame(f"{what} must have {low}-{high} characters")


def _check_int(value: object, what: str, low: int, high: int) -> None:
    # bool is an int subclass in Python but not a number in JSON.
    if type(value) is not int:
        raise MalformedFrame(f"{what} must be an integer")
    if not low <= value <= high:
        raise MalformedFrame(f"{what} out of range")


def _check_object(value: object, what: str) -> None:
    if not isinstance(value, dict):
        raise MalformedFrame(f"{what} must be an object")


def _check_error(error: object) -> dict[str, Any]:
    _check_object(error, "error")
    assert isinstance(error, dict)
    _check_int(error.get("code"), "error.code", *_INT32)
    _check_str(error.get("message"), "error.message", 0, MAX_MESSAGE)
    clean = {"code": error["code"], "message": error["message"]}
    if error.get("data") is not None:
        _check_object(error["data"], "error.data")
        clean["data"] = error["data"]
    return clean


@dataclass(frozen=True)
class Hello:
    """
    First frame each side sends: its protocol version and the operator name it speaks
    as (informational; the caller checks it against the names of the TLS certificate).
    """

    version: int
    name: str

    def __post_init__(self) -> None:
        _check_int(self.version, "version", 0, 2**31 - 1)
        _check_str(self.name, "name", 0, MAX_NAME)


@dataclass(frozen=True)
class Request:
    """A call of ``method`` with ``params``; answered by a :class:`Response` with the
    same ``id``."""

    id: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        id, method = self.id, self.method
        if (type(id) is str and 0 < len(id) <= MAX_ID and type(method) is str
                and 0 < len(method) <= MAX_METHOD and type(self.params) is dict):
            return  # the common case, checked inline
        _check_str(id, "id", 1, MAX_ID)
        _check_str(method, "method", 1, MAX_METHOD)
        _check_object(self.params, "params")


@dataclass(frozen=True)
class Response:
    """
    The answer to the peer's :class:`Request` with the same ``id``: a ``result`` object,
    an ``error`` object ``{"code": int, "message": str[, "data": object]}``, or neither
    (``result`` is then :data:`NO_RESULT`).  Never both.
    """

    id: str
    result: Any = NO_RESULT
    error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        id = self.id
        if type(id) is not str or not 0 < len(id) <= MAX_ID:
            _check_str(id, "id", 1, MAX_ID)
        if self.result is not NO_RESULT and type(self.result) is not dict:
            _check_object(self.result, "result")
        if self.error is not None:
            if self.result is not NO_RESULT:
                raise MalformedFrame("response has both result and error")
            object.__setattr__(self, "error", _check_error(self.error))


@dataclass(frozen=True)
class Ping:
    """Heartbeat; the peer answers with a :class:`Pong` carrying the same nonce."""

    nonce: str

    def __post_init__(self) -> None:
        _check_str(self.nonce, "nonce", 0, MAX_NONCE)


@dataclass(frozen=True)
class Pong:
    """Answer to a :class:`Ping`."""

    nonce: str

    def __post_init__(self) -> None:
        _check_str(self.nonce, "nonce", 0, MAX_NONCE)


@dataclass(frozen=True)
class ErrorFrame:
    """A connection-level error, sent just before the sender closes the connection."""

    code: int
    message: str

    def __post_init__(self) -> None:
        _check_int(self.code, "code", *_INT32)
        _check_str(self.message, "message", 0, MAX_MESSAGE)


Frame = Union[Hello, Request, Response, Ping, Pong, ErrorFrame]


def frame_to_object(frame: Frame) -> dict[str, Any]:
    """The JSON object of ``frame`` (the compact keys of docs/protocol.md)."""
    if isinstance(frame, Request):
        return {"t": "req", "id": frame.id, "m": frame.method, "p": frame.params}
    if isinstance(frame, Response):
        obj: dict[str, Any] = {"t": "res", "id": frame.id}
        if frame.error is not None:
            obj["e"] = frame.error
        elif frame.result is not NO_RESULT:
            obj["r"] = frame.result
        return obj
    if isinstance(frame, Ping):
        return {"t": "ping", "n": frame.nonce}
    if isinstance(frame, Pong):
        return {"t": "pong", "n": frame.nonce}
    if isinstance(frame, Hello):
        return {"t": "hello", "v": frame.version, "name": frame.name}
    if isinstance(frame, ErrorFrame):
        return {"t": "err", "code": frame.code, "msg": frame.message}
    raise TypeError(f"not a frame: {type(frame).__name__}")


def _parse_req(obj: dict[str, Any]) -> Frame:
    if "p" not in obj:
        raise MalformedFrame("params missing")
    id: Any = obj.get("id")
    method: Any = obj.get("m")
    return Request(id, method, obj["p"])  # the frame checks its fields


def _parse_res(obj: dict[str, Any]) -> Frame:
    result = obj.get("r", NO_RESULT)
    error = obj.get("e")
    # JSON null is "absent", like the Struct-less gRPC fields.
    id: Any = obj.get("id")
    return Response(id, NO_RESULT if result is None else result, error)


# The frame classes check their fields when built: the parsers pass what came.
_PARSERS: dict[str, Callable[[Any], Frame]] = {
    "req": _parse_req,
    "res": _parse_res,
    "ping": lambda o: Ping(o.get("n")),
    "pong": lambda o: Pong(o.get("n")),
    "hello": lambda o: Hello(o.get("v"), o.get("name")),
    "err": lambda o: ErrorFrame(o.get("code"), o.get("msg")),
}


def parse_frame(obj: object) -> Frame:
    """
    Turn a decoded JSON value into a frame; unknown keys are ignored.

    :raises MalformedFrame: not an object, unknown ``t``, or a missing/invalid field.
    """
    if not isinstance(obj, dict):
        raise MalformedFrame("frame must be a JSON object")
    kind = obj.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise MalformedFrame("unknown frame type")
    return parser(obj)


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

# orjson hands subclasses of str/int/dict/list, dataclasses and datetimes to ``default``
# with these options; _refuse sends them to the strict encoder.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


def _refuse(value: object) -> None:
    raise TypeError


def _encode_strict(obj: dict[str, Any]) -> bytes:
    try:
        return _encoder.encode(obj).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        # UnicodeEncodeError is a ValueError.
        raise MalformedFrame(f"frame not encodable ({type(e).__name__})") from None


def encode(frame: Frame, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """
    One line of compact UTF-8 JSON for ``frame``, ``\\n`` included.

    :raises LineTooLong: the line without its ``\\n`` is longer than ``max_line`` bytes.
    :raises MalformedFrame: the frame holds values JSON cannot carry (NaN, infinities,
        lone surrogates, non-JSON types, cycles or extreme nesting).
    """
    obj = frame_to_object(frame)
    try:
        data = orjson.dumps(obj, default=_refuse, option=_ORJSON_OPTIONS)
    except Exception:  # orjson.JSONEncodeError and whatever a value raised
        data = _encode_strict(obj)
    else:
        # orjson also writes what the strict encoder refuses: NaN and infinities (as
        # null), enum members (as their value), UUIDs, its fragments.  Such a line does
        # not read back as the value it was written from (a C-speed check).
        if orjson.loads(data) != obj:
            data = _encode_strict(obj)
    if len(data) > max_line:
        raise LineTooLong(f"frame of {len(data)} bytes exceeds {max_line}")
    return data + b"\n"


def error_frame_for(error: WireError) -> ErrorFrame:
    """The error frame to send before closing a connection because of ``error``."""
    return ErrorFrame(error.code, error.reason[:MAX_MESSAGE])


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


_decoder = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)
# A \uD800-\uDFFF escape may leave a lone surrogate (not UTF-8 encodable) in a string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# orjson reads integers beyond 64 bits as floats; the strict decoder keeps them exact.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def _decode_line(line: bytes) -> Frame:
    if not _LONG_NUMBER.search(line):
        # orjson refuses what the strict decoder refuses (invalid UTF-8, lone
        # surrogates, NaN and infinities, numbers beyond a double's range) and reads the
        # rest as it does; a refused line goes to the strict decoder for its reason.
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
        else:
            return parse_frame(obj)
    return _decode_line_strict(line)


def _decode_line_strict(line: bytes) -> Frame:
    try:
        obj = _decoder.decode(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedFrame("line is not valid UTF-8") from None
    except ValueError:
        raise MalformedFrame("line is not valid JSON") from None
    except RecursionError:
        raise MalformedFrame("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(obj):
        raise MalformedFrame("string with a lone surrogate")
    return parse_frame(obj)


class LineDecoder:
    """
    Split a byte stream into frames.

    :meth:`feed` returns the frames completed by each chunk.  At most ``max_line`` bytes
    of an unfinished line are buffered: :class:`LineTooLong` is raised as soon as more
    arrive, without waiting for the newline.  After any :class:`WireError` the decoder is
    dead and every later :meth:`feed` raises the same kind of error again.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._buffer = bytearray()
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held in the buffer."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add ``data`` to the stream; return the frames whose lines it completed.

        :raises WireError: the stream broke the format (``frames`` on the exception holds
            the frames decoded from this chunk before the bad line).
        """
        if self._error is not None:
            raise type(self._error)(self._error.reason)
        frames: list[Frame] = []
        max_line = self.max_line
        buffer = self._buffer
        # The buffered part has no newline: only search the new bytes.
        search = len(buffer)
        if buffer:
            buffer += data
            stream: bytes | bytearray = buffer
        else:
            stream = data
        start = 0
        try:
            while True:
                end = stream.find(b"\n", search)
                if end < 0:
                    break
                if end - start > max_line:
                    raise LineTooLong(f"line exceeds {max_line} bytes")
                frames.append(_decode_line(bytes(stream[start:end])))
                start = search = end + 1
            if len(stream) - start > max_line:
                raise LineTooLong(f"line exceeds {max_line} bytes")
        except WireError as e:
            self._error = e
            self._buffer = bytearray()
            e.frames = frames
            raise
        if stream is buffer:
            del buffer[:start]
        else:
            self._buffer = bytearray(stream[start:])
        return frames
