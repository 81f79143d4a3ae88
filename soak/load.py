"""
The load process of the soak run: ``python -m soak.load tls|eps ...``.

- ``tls``: ``--clients`` concurrent HTTPS clients, each its own TLS connection to
  127.0.0.1:4433 with SNI ``test.internal-server.local`` (verified against the dev root,
  curl's ``--resolve``), each repeatedly POSTing a random JSON payload that the example
  internal server echoes; the SHA-256 of the answer must equal the payload's.  A client
  keeps its connection (keep-alive) and drops it on purpose at random
  (``--reconnect``) to dial again.  The clients come from ``--sources`` loopback
  addresses (:func:`source_address`), a few clients each, as many users behind their
  own addresses would: the private proxy sees each client's address (the public proxy
  passes it on) and forwards at most ``max_connections_per_client`` (250 in conf/dev,
  a quarter of ``max_connections``) for one address at once.
- ``eps``: ``--calls`` concurrent JSON-RPC calls ``hd-2._ping`` through hd-1's gateway
  (port 5555, hd-1's client certificate), each with a random payload in ``params``;
  ``_ping`` echoes ``params``, which must come back identical (SHA-256), with the call's
  own id, once.

New connections are paced (:class:`Pacer`): the dev public proxy allows each peer 1000
connections per calendar minute on its TLS and internal listeners (``tcp_rate_limits``),
and every SNI connection is also one token connection from the private proxy, so the
clients together open at most ``--per-minute`` connections in any UTC minute.

asyncio + ssl in one process, no threads.  At the end the stream's counters are written
as JSON to ``--out`` (see :class:`soak.report.StreamStats`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from .report import StreamStats, classify, digest

__all__ = ["Pacer", "encode_payload", "ping_request", "read_response", "check_ping", "main",
           "source_address"]

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "conf" / "dev" / "certs"
SNI_DOMAIN = "test.internal-server.local"
SNI_PORT = 4433
GATEWAY_PORT = 5555
MAX_HEADER_LINES = 100

#: The first of the TLS clients' source addresses (127.20.0.1, 127.20.0.2, ...): apart
#: from the attack harness's (127.0.0.2 up, 127.1-127.12) and the network's 127.0.0.1.
FIRST_SOURCE = (127, 20, 0, 1)

#: How many source addresses :func:`source_address` has (127.20.0.1 to 127.20.255.254).
MAX_SOURCES = 254 * 256

#: Connection errors of each class printed with their time and source address.
ERRORS_SHOWN = 50


def source_address(n: int) -> str:
    """The ``n``-th TLS client source address: 127.20.0.1 ... 127.20.0.254, 127.20.1.1 ..."""
    if n < 0 or n >= MAX_SOURCES:
        raise ValueError(f"source address number {n} out of range")
    a, b, c, d = FIRST_SOURCE
    return f"{a}.{b}.{c + n // 254}.{d + n % 254}"


class Pacer:
    """
    Hands out permissions to open a connection: at most ``per_minute`` in each UTC
    minute and ``per_second`` in each second (of ``clock()``).
    """

    def __init__(self, per_minute: int, per_second: int, clock: Any = time.time) -> None:
        self.per_minute = per_minute
        self.per_second = per_second
        self.clock = clock
        self._minute = -1
        self._second = -1
        self._in_minute = 0
        self._in_second = 0

    def try_acquire(self) -> float:
        """0 if a connection may be opened now (and counts it); else seconds to wait."""
        now = self.clock()
        minute, second = int(now // 60), int(now)
        if minute != self._minute:
            self._minute, self._in_minute = minute, 0
        if second != self._second:
            self._second, self._in_second = second, 0
        if self._in_minute >= self.per_minute:
            return (minute + 1) * 60 - now
        if self._in_second >= self.per_second:
            return (second + 1) - now
        self._in_minute += 1
        self._in_second += 1
        return 0.0

    async def acquire(self) -> None:
        while True:
            wait = self.try_acquire()
            if wait <= 0:
                return
            await asyncio.sleep(wait + random.random() * 0.5)


def encode_payload(client: int, n: int, size: int) -> bytes:
    """A compact JSON object of about ``size`` bytes that survives a JSON round trip byte for byte."""
    data = base64.b64encode(os.urandom(max(1, size * 3 // 4))).decode("ascii")
    return json.dumps({"client": client, "n": n, "data": data}, separators=(",", ":")).encode()


async def read_response(reader: asyncio.StreamReader,
                        max_body: int = 16 * 1024 * 1024) -> tuple[int, bytes, bool]:
    """(status, body, server closes) of one HTTP/1.1 response (Content-Length or chunked)."""
    line = await reader.readline()
    if not line:
        raise EOFError("closed before the status line")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    length: int | None = None
    chunked = False
    closes = parts[0] == b"HTTP/1.0"
    for _ in range(MAX_HEADER_LINES):
        header = await reader.readline()
        if not header:
            raise EOFError("closed in the headers")
        if header in (b"\r\n", b"\n"):
            break
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection":
            closes = value.lower() == b"close"
    else:
        raise ValueError("too many header lines")
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(body) > max_body:
                raise ValueError("body too large")
        return status, bytes(body), closes
    if length is None:
        return status, await reader.read(max_body), True
    if length > max_body:
        raise ValueError("body too large")
    return status, await reader.readexactly(length), closes


def _post(host: str, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body


class _Connection:
    """One TLS connection (reader, writer) and whether a request has used it yet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False

    def close(self) -> None:
        self.writer.close()


async def _dial(port: int, host: str, context: ssl.SSLContext, stats: StreamStats,
                pacer: Pacer | None, timeout: float,
                source: str | None = None) -> _Connection | None:
    if pacer is not None:
        await pacer.acquire()
    phase = "connect"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=host,
                                    ssl_handshake_timeout=timeout, limit=1024 * 1024,
                                    local_addr=(source, 0) if source else None),
            timeout)
    except Exception as e:  # every failure is counted, never a crash of the run
        kind = classify(e, phase)
        stats.error(kind, f"{type(e).__name__}: {e}")
        if stats.errors[kind] <= ERRORS_SHOWN:
            # When and from where, to find the proxies' log lines of the same moment.
            print(f"[{time.strftime('%Y-%m-%dT%H:%M:%S')}] {kind} from "
                  f"{source or '127.0.0.1'}: {type(e).__name__}: {e}", flush=True)
        return None
    stats.connections += 1
    return _Connection(reader, writer)


async def _exchange(connection: _Connection, request: bytes,
                    timeout: float) -> tuple[int, bytes, bool]:
    connection.writer.write(request)
    await connection.writer.drain()
    return await asyncio.wait_for(read_response(connection.reader), timeout)


async def _request(connection: _Connection, request: bytes, stats: StreamStats,
                   timeout: float) -> tuple[int, bytes, bool] | str:
    """The response, or the error class (recorded) when the request failed."""
    reused = connection.used
    connection.used = True
    try:
        return await _exchange(connection, request, timeout)
    except Exception as e:
        kind = classify(e, "response")
        if reused and kind in ("response_eof", "response_reset"):
            kind = "keepalive_closed"
        stats.error(kind, f"{type(e).__name__}: {e}")
        return kind


async def tls_client(index: int, stats: StreamStats, pacer: Pacer, deadline: float,
                     options: argparse.Namespace, context: ssl.SSLContext) -> None:
    """One HTTPS client until ``deadline``: POST, check the echo, sometimes reconnect."""
    connection: _Connection | None = None
    n = 0
    pending: bytes | None = None
    source = source_address(index % options.sources) if options.sources else None
    try:
        while time.monotonic() < deadline:
            if connection is None:
                connection = await _dial(SNI_PORT, SNI_DOMAIN, context, stats, pacer,
                                         options.timeout, source)
                if connection is None:
                    await asyncio.sleep(1 + random.random())
                    continue
            if pending is None:
                n += 1
                size = random.randint(options.min_bytes, options.max_bytes)
                pending = encode_payload(index, n, size)
            request = _post(SNI_DOMAIN, f"/soak/{index}/{n}", pending)
            stats.requests += 1
            stats.bytes_sent += len(pending)
            started = time.monotonic()
            answer = await _request(connection, request, stats, options.timeout)
            if isinstance(answer, str):
                connection.close()
                connection = None
                if answer != "keepalive_closed":
                    pending = None  # the failure is counted; a new payload next time
                continue
            status, body, closes = answer
            stats.bytes_received += len(body)
            if status != 200:
                stats.error(f"http_{status}", body[:120].decode(errors="replace"))
            elif digest(body) != digest(pending):
                stats.mismatches += 1
                stats.examples.setdefault("mismatch", f"sent {len(pending)} B, got "
                                          f"{len(body)} B: {body[:80]!r}")
            else:
                stats.ok += 1
                stats.latencies.append(time.monotonic() - started)
            pending = None
            if closes or random.random() < options.reconnect:
                connection.close()
                connection = None
                # let the close reach the private proxy before counting a new connection
                await asyncio.sleep(0.2 + random.random() * 0.3)
    finally:
        if connection is not None:
            connection.close()


def ping_request(call_id: str, params: dict[str, Any]) -> bytes:
    """The JSON-RPC body of one ``hd-2._ping`` call."""
    return json.dumps({"jsonrpc": "2.0", "id": call_id, "method": "hd-2._ping",
                       "params": params}, separators=(",", ":")).encode()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def check_ping(reply: Any, call_id: str, params: dict[str, Any]) -> str | None:
    """None if ``reply`` answers call ``call_id`` with ``params`` echoed; else what is wrong."""
    if not isinstance(reply, dict):
        return "reply is not an object"
    if reply.get("id") != call_id:
        return f"id {reply.get('id')!r} for call {call_id!r}"
    if "error" in reply:
        return f"error {reply['error']}"
    result = reply.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("params"), dict):
        return "result has no params"
    echoed = {k: v for k, v in result["params"].items() if k != "_client"}
    if digest(_canonical(echoed)) != digest(_canonical(params)):
        return "params differ"
    if (result.get("serverInfo") or {}).get("name") != "hd-2":
        return f"answered by {(result.get('serverInfo') or {}).get('name')!r}"
    return None


async def eps_caller(index: int, stats: StreamStats, seen: set[str], deadline: float,
                     options: argparse.Namespace, context: ssl.SSLContext) -> None:
    """One caller of ``hd-2._ping`` through hd-1's gateway until ``deadline``."""
    connection: _Connection | None = None
    n = 0
    try:
        while time.monotonic() < deadline:
            if connection is None:
                connection = await _dial(GATEWAY_PORT, "hd-1", context, stats, None,
                                         options.timeout)
                if connection is None:
                    await asyncio.sleep(1 + random.random())
                    continue
            n += 1
            call_id = f"{index}-{n}"
            size = random.randint(options.min_bytes, options.max_bytes)
            params = {"caller": index, "n": n,
                      "data": base64.b64encode(os.urandom(max(1, size * 3 // 4))).decode()}
            body = ping_request(call_id, params)
            stats.requests += 1
            stats.bytes_sent += len(body)
            started = time.monotonic()
            answer = await _request(connection, _post("hd-1", "/jsonrpc", body), stats,
                                    options.timeout)
            if answer == "keepalive_closed":
                # never answered: send the same call again on a new connection
                n -= 1
                stats.requests -= 1
                stats.bytes_sent -= len(body)
            if isinstance(answer, str):
                connection.close()
                connection = None
                continue
            status, data, closes = answer
            stats.bytes_received += len(data)
            if status != 200:
                stats.error(f"http_{status}", data[:120].decode(errors="replace"))
            else:
                try:
                    reply = json.loads(data)
                except ValueError:
                    reply = None
                wrong = check_ping(reply, call_id, params)
                if wrong is not None and wrong.startswith("error"):
                    stats.error("jsonrpc_error", wrong)
                elif wrong is not None:
                    stats.mismatches += 1
                    stats.examples.setdefault("mismatch", wrong)
                elif call_id in seen:
                    stats.mismatches += 1
                    stats.examples.setdefault("mismatch", f"duplicate answer {call_id}")
                else:
                    seen.add(call_id)
                    stats.ok += 1
                    stats.latencies.append(time.monotonic() - started)
            if closes:
                connection.close()
                connection = None
    finally:
        if connection is not None:
            connection.close()


def _raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def _progress(stats: StreamStats, deadline: float) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(10)
        print(f"[{stats.name} {time.monotonic() - started:4.0f} s] requests {stats.requests} "
              f"ok {stats.ok} mismatches {stats.mismatches} connections {stats.connections} "
              f"errors {dict(stats.errors)}", flush=True)


async def run(options: argparse.Namespace) -> StreamStats:
    deadline = time.monotonic() + options.seconds
    if options.stream == "tls":
        stats = StreamStats("sni-echo")
        context = ssl.create_default_context(cafile=str(CERTS / "root.crt"))
        pacer = Pacer(options.per_minute, options.per_second)
        tasks = [tls_client(i, stats, pacer, deadline, options, context)
                 for i in range(options.clients)]
    else:
        stats = StreamStats("p2p-ping")
        context = ssl.create_default_context(cafile=str(CERTS / "root.crt"))
        context.load_cert_chain(str(CERTS / "hd-1.crt"), str(CERTS / "hd-1.key"))
        seen: set[str] = set()
        tasks = [eps_caller(i, stats, seen, deadline, options, context)
                 for i in range(options.clients)]
    progress = asyncio.ensure_future(_progress(stats, deadline))
    await asyncio.gather(*tasks)
    progress.cancel()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", choices=("tls", "eps"))
    parser.add_argument("--clients", type=int, default=1000,
                        help="concurrent clients (tls) or calls in flight (eps)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--min-bytes", type=int, default=1024)
    parser.add_argument("--max-bytes", type=int, default=64 * 1024)
    parser.add_argument("--reconnect", type=float, default=0.02,
                        help="chance that a tls client reconnects after a request")
    parser.add_argument("--per-minute", type=int, default=900,
                        help="new tls connections per UTC minute at most")
    parser.add_argument("--per-second", type=int, default=40,
                        help="new tls connections per second at most")
    parser.add_argument("--sources", type=int, default=250,
                        help="loopback source addresses the tls clients are spread over "
                             "(0: all from 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--out", required=True, help="file for the counters (JSON)")
    options = parser.parse_args(argv)
    if not 0 <= options.sources <= MAX_SOURCES:
        parser.error(f"--sources must be 0 to {MAX_SOURCES}")
    limit = _raise_fd_limit(options.clients * 2 + 256)
    print(f"soak.load {options.stream}: {options.clients} clients for {options.seconds:g} s "
          f"(fd limit {limit})", flush=True)
    stats = asyncio.run(run(options))
    Path(options.out).write_text(json.dumps(stats.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
