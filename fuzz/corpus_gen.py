"""
Write the seed corpora under ``fuzz/corpus/<target>/``: ``python -m fuzz.corpus_gen``.

- clienthello: real ClientHellos made by OpenSSL (pyOpenSSL over a memory BIO: TLS 1.2
  and 1.3, with and without SNI, ALPN, the default post-quantum key share), one re-framed
  over several records, each behind a fragmentation header (:func:`fuzz.targets.split_input`);
- wire: lines of every frame type, a stream of several, a long number, unicode, nesting;
- jsonrpc: requests, for both modes (parse only / whole HTTP request);
- records: signed records (JSON text mode) made with a throw-away dev PKI (only its public
  certificates end up in the corpus, inside ``signature.c``), and mutation seeds.

Files are named by the SHA-1 of their content, as libFuzzer does.  Existing files are
kept; run with ``--clean`` to start over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def _hello(server_name: bytes | None, *, tls12_only: bool = False,
           alpn: list[bytes] | None = None) -> bytes:
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if tls12_only:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
    if alpn:
        context.set_alpn_protos(alpn)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    if server_name is not None:
        connection.set_tlsext_host_name(server_name)
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def _reframe(hello: bytes, size: int) -> bytes:
    """The handshake message of a one-record hello, spread over records of ``size`` bytes."""
    message = hello[5:]
    out = b""
    for i in range(0, len(message), size):
        piece = message[i:i + size]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return out


def clienthello_seeds() -> list[bytes]:
    hellos = [
        _hello(b"public-proxy-1.ga"),
        _hello(b"Internal-Server.example.", alpn=[b"h2", b"http/1.1"]),
        _hello(None),
        _hello(b"a.b", tls12_only=True),
    ]
    seeds = [b"\x00" + h for h in hellos]
    seeds.append(b"\x00" + _reframe(hellos[0], 300))
    seeds.append(b"\x03\x00\x04\x10" + hellos[1])  # fragments of 1, 5, 17 bytes, then the rest
    seeds.append(b"\x20" + hellos[2])  # max_bytes 512: too large
    seeds.append(b"\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return seeds


def wire_seeds() -> list[bytes]:
    from epsproxy.eps.links.wire import (
        ErrorFrame, Hello, Ping, Pong, Request, Response, encode,
    )

    frames = [
        Hello(1, "hd-1"),
        Request("r1", "call", {"service": "api", "params": {"a": [1, 2.5, None, True]}}),
        Response("r1", {"ok": "é✓"}),
        Response("r2", error={"code": -32601, "message": "method not found", "data": {}}),
        Response("r3"),
        Ping("n0"),
        Pong("n0"),
        ErrorFrame(2, "line too long"),
    ]
    lines = [encode(f) for f in frames]
    seeds = [b"\x00" + line for line in lines]
    seeds.append(b"\x00" + b"".join(lines))
    seeds.append(b"\x05\x00\x02\x07\x20\x30" + b"".join(lines[:4]))
    seeds.append(b"\x00" + b'{"t":"req","id":"x","m":"m","p":{"n":12345678901234567890}}\n')
    seeds.append(b"\x00" + b'{"t":"res","id":"x","r":{"s":"\\ud800","f":1e-7,"z":-0.0}}\n')
    seeds.append(b"\x00" + b'{"t":"res","id":"x","r":' + b"[" * 200 + b"]" * 200 + b"}\n")
    seeds.append(b"\x10" + b'{"t":"ping","n":"' + b"x" * 40 + b'"}\n')  # max_line 16
    return seeds


def jsonrpc_seeds() -> list[bytes]:
    requests = [
        b'{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":1}',
        b'{"jsonrpc":"2.0","method":"typed","params":{"n":3,"s":"ab"},"id":"n:5"}',
        b'{"jsonrpc":"2.0","method":"none","params":{}}',
        b'{"jsonrpc":"2.0","method":"refuse","params":{},"id":"abc"} trailing',
        b'{"jsonrpc":"2.0","method":"later","params":{},"id":null}',
        b'{"jsonrpc":"1.0","method":"echo","params":[],"id":1.0}',
        b"[1, 2]",
        b"",
    ]
    seeds = []
    for body in requests:
        seeds.append(b"\x00\x00" + body)  # parse mode, application/json
        seeds.append(b"\x02\x01\x00\x00\x00\x00\x00\x01" + body)  # HTTP mode, raw body
    return seeds


def records_seeds() -> list[bytes]:
    from fuzz.targets import records_context

    context = records_context()
    seeds = [b"\x00\x00" + json.dumps(s).encode() for s in context.bases[:3]]
    deep = json.loads(json.dumps(context.bases[3]))
    deep["record"]["data"][0]["settings"] = {"deep": json.loads("[" * 300 + "]" * 300)}
    seeds.append(b"\x00\x00" + json.dumps(deep).encode())
    seeds += [b"\x02\x00" + bytes([i]) * 8 for i in range(4)]  # mutations of the bases
    seeds.append(b"\x01\x00\x09\x03")  # a built value
    return seeds


GENERATORS = {
    "clienthello": clienthello_seeds,
    "wire": wire_seeds,
    "jsonrpc": jsonrpc_seeds,
    "records": records_seeds,
}


def write(clean: bool = False) -> dict[str, int]:
    """Write every corpus; returns the number of files per target."""
    counts = {}
    for name, generate in GENERATORS.items():
        folder = CORPUS / name
        if clean and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for seed in generate():
            (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        counts[name] = len(list(folder.iterdir()))
    return counts


def main(argv: list[str]) -> int:
    counts = write(clean="--clean" in argv)
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    for name, count in counts.items():
        print(f"{name}: {count} files")
    print(f"total {total} bytes in {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
