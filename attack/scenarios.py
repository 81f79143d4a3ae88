"""
The attacks of ``make attack``, one function each.  Each returns :class:`Row`\\ s: what the
attacker did and saw, which counters must have moved, and whether the target held.

The targets are the dev network's listeners (conf/dev/roles/*):

==============================  =====  ===========================  ======================
listener                         port  deadline that must close it  metrics (port)
==============================  =====  ===========================  ======================
sd-1 JSON-RPC (mTLS)             3322  request_timeout 10 s         sd_* (2111)
hd-1 gateway (mTLS)              5555  request_timeout 10 s         eps_* (2112)
hd-2 eps_server (mTLS)           8889  hello_timeout 10 s           eps_* (2113)
public proxy TLS (SNI)           4433  hello_timeout 5 s            proxy_* (2114)
public proxy internal            9999  read_timeout 5 s             proxy_* (2114)
public proxy JSON-RPC (mTLS)     6655  request_timeout 10 s         proxy_* (2114)
private proxy JSON-RPC (HTTP)    8877  request_timeout 10 s         private_proxy_* (2118)
hd-1 metrics (HTTP)              2112  request_timeout 10 s         metrics_* (2112)
==============================  =====  ===========================  ======================
"""

from __future__ import annotations

import json
import os
import re
import secrets
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chaos.traffic import GatewayClient, client_context
from epsproxy.dev import demo

from .clients import (
    attacker,
    client_hello,
    connect,
    curl_post,
    flood,
    openssl_client,
    read_until_closed,
    run_slow,
    slow_connection,
)

CERTS = demo.CERTS
ROOT_CA = CERTS / "root.crt"

#: (label, port, kind, seconds the deadline allows, metrics port, counter that must move)
LISTENERS = (
    ("sd-1 JSON-RPC", 3322, "https", 10, 2111, r'sd_http_refusals_total\{reason="request_timeout"\}'),
    ("hd-1 gateway", 5555, "https", 10, 2112, r'eps_http_refusals_total\{reason="request_timeout"\}'),
    ("hd-2 eps_server", 8889, "eps", 10, 2113, r'eps_peer_refusals_total\{reason="hello_timeout"\}'),
    ("public proxy TLS (SNI)", 4433, "sni", 5, 2114, r'proxy_tls_connections_total\{outcome="timeouts"\}'),
    ("public proxy internal", 9999, "token", 5, 2114, r"proxy_timeouts_total"),
    ("public proxy JSON-RPC", 6655, "https", 10, 2114, r'proxy_http_refusals_total\{reason="request_timeout"\}'),
    ("private proxy JSON-RPC (HTTP)", 8877, "http", 10, 2118, r'private_proxy_http_refusals_total\{reason="request_timeout"\}'),
    ("hd-1 metrics (HTTP)", 2112, "http", 10, 2112, r'metrics_http_refusals_total\{reason="request_timeout"\}'),
)

SERVER_NAMES = {3322: "sd-1", 5555: "hd-1", 8889: "hd-2", 6655: "public-proxy-1.ga",
                8877: "private-proxy-1.ga", 4433: demo.SNI_DOMAIN}

#: Slack on a deadline: a loaded 2-CPU machine runs the timer late.
SLACK = 3.0


@dataclass
class Row:
    """One line of the report."""

    attack: str
    target: str
    saw: str
    held: bool
    counters: list[tuple[int, str]] = field(default_factory=list)  # (metrics port, regex)
    moved: str = ""  # filled in by the runner
    counted: bool = True  # filled in by the runner


def _operator_context(name: str, *, folder: Path = CERTS, verify: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ROOT_CA))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(folder / f"{name}.crt"), str(folder / f"{name}.key"))
    return context


def _anonymous_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _closing(results: list, deadline: float) -> tuple[bool, str]:
    closed = [r.closed_after for r in results if r.closed_after is not None]
    still_open = len(results) - len(closed)
    worst = max(closed) if closed else float("nan")
    answers = sorted({r.answer.split(b"\r\n", 1)[0].decode(errors="replace")[:40]
                      for r in results if r.answer})
    text = (f"{len(closed)}/{len(results)} closed, latest after {worst:.1f} s"
            + (f"; {still_open} STILL OPEN" if still_open else "")
            + (f"; answered {', '.join(answers)}" if answers else ""))
    return still_open == 0 and worst <= deadline + SLACK, text


# --------------------------------------------------------------------- slowloris


def slowloris(count: int = 10, interval: float = 0.5) -> list[Row]:
    """
    On every listener at once: ``count`` silent connections and ``count`` that trickle the
    start of what that listener expects (a TLS ClientHello, a token, HTTP headers) one byte
    every ``interval`` s; and on the HTTPS servers ``count`` connections that complete the
    handshake with a valid client certificate, then trickle HTTP headers (the variant that
    twisted.web's idle timeout alone does not stop).  Every connection must be closed by the
    listener's deadline.
    """
    hello = client_hello(demo.SNI_DOMAIN)
    headers = b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000
    rows: list[Row] = []
    lock = threading.Lock()

    def attack(label: str, port: int, kind: str, deadline: float, metrics: int, counter: str) -> None:
        limit = deadline + 30
        variants: list[tuple[str, Callable]] = [
            ("silent", lambda: slow_connection(port, b"", interval=interval, limit=limit))]
        if kind in ("https", "eps", "sni"):
            variants.append(("trickled ClientHello", lambda: slow_connection(
                port, hello, interval=interval, limit=limit)))
        if kind == "token":
            variants.append(("trickled token", lambda: slow_connection(
                port, secrets.token_bytes(32), interval=interval, limit=limit)))
        if kind == "http":
            variants.append(("trickled headers", lambda: slow_connection(
                port, headers if port != 2112 else headers.replace(b"POST /jsonrpc", b"GET /metrics"),
                interval=interval, limit=limit)))
        if kind == "https":
            context = _operator_context("hd-1", verify=False)
            variants.append(("valid cert, trickled headers", lambda: slow_connection(
                port, headers, interval=interval, limit=limit, tls=context,
                server_name=SERVER_NAMES[port])))
        if kind == "eps":
            context = _operator_context("hd-1", verify=False)
            variants.append(("valid cert, no hello", lambda: slow_connection(
                port, b"", interval=interval, limit=limit, tls=context,
                server_name=SERVER_NAMES[port])))
        for name, make in variants:
            # Paced under the SD's 10 connections/s per peer, so the deadline is what is tested.
            results = run_slow(count, make, pace=0.15)
            held, saw = _closing(results, deadline)
            with lock:
                rows.append(Row("slowloris: " + name, f"{label} :{port}", saw, held,
                                [(metrics, counter)] if counter else []))

    threads = [threading.Thread(target=attack, args=listener, daemon=True) for listener in LISTENERS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    order = [f"{label} :{port}" for label, port, *_ in LISTENERS]
    rows.sort(key=lambda r: order.index(r.target))
    return rows


# ------------------------------------------------------------ handshake floods


def _handshake(port: int, server_name: str | None, context: ssl.SSLContext, source: str,
               wait_answer: bool) -> str:
    sock = connect(port, source=source)
    try:
        tls = context.wrap_socket(sock, server_hostname=server_name)
        if not wait_answer:
            tls.close()
            return "handshake completed"
        tls.settimeout(10)
        data = tls.recv(1)  # TLS 1.3: a refused client certificate shows up here
        return "answered" if data else "closed after handshake"
    finally:
        sock.close()


#: Attempts a handshake flood makes at least (within 60 s): over the dev public proxy's
#: ``tcp_rate_limits`` of 1,000 a minute per address, whose refusals the announced-SNI
#: row counts, however slowly the machine makes handshakes.
FLOOD_AT_LEAST = 1300

#: (target, port, server name, wait for an answer, metrics port, counter that must move)
HANDSHAKE_FLOODS = (
    ("sd-1 JSON-RPC :3322", 3322, "sd-1", True, 2111,
     r'sd_http_refusals_total\{reason="rate_limited"\}'),
    ("hd-2 eps_server :8889", 8889, "hd-2", True, 2113,
     r'eps_peer_refusals_total\{reason="handshake_failed"\}'),
    ("hd-1 gateway :5555", 5555, "hd-1", True, 2112,
     r'eps_http_refusals_total\{reason="handshake_failed"\}'),
    ("public proxy TLS, unknown SNI :4433", 4433, "flood.example", True, 2114,
     r'proxy_tls_connections_total\{outcome="no_route"\}'),
    # Announced: each handshake goes through the public proxy, a token, the private proxy
    # (which terminates TLS) and back; the attacker hangs up once it is done.
    ("public proxy TLS, announced SNI :4433", 4433, demo.SNI_DOMAIN, False, 2114,
     r'proxy_tls_connections_total\{outcome="rate_limited"\}'),
)


def handshake_flood(index: int, seconds: float = 8, workers: int = 6) -> list[Row]:
    """
    Full TLS handshakes as fast as ``workers`` threads can make them for ``seconds``, from
    an attacking address of this flood's own (:data:`HANDSHAKE_FLOODS` [``index``]):
    without a client certificate at the mTLS servers, with an SNI nobody announced and
    with one that is announced at the public proxy.  Legitimate traffic keeps running
    from its own address (see the canary column).
    """
    target, port, name, wait_answer, metrics, counter = HANDSHAKE_FLOODS[index]
    source = attacker(1 + index)  # a fresh peer: its own rate-limit allowance
    context = _anonymous_context()  # made once: loading the system CAs costs ~30 ms
    result = flood(lambda: _handshake(port, name, context, source, wait_answer),
                   seconds=seconds, workers=workers, at_least=FLOOD_AT_LEAST, max_seconds=60)
    return [Row("handshake flood", target, result.describe(), True, [(metrics, counter)])]


# ---------------------------------------------------------- connection flood


def connection_flood(port: int, label: str, metrics: int, counter: str, source: str, *,
                     total: int = 3000, deadline: float = 5) -> Row:
    """
    Open ``total`` TCP connections to ``port`` as fast as possible from one address and
    hold them: the rate limit must close what is over it at once, the deadline the rest.
    """
    sockets = []
    refused = 0
    started = time.monotonic()
    for _ in range(total):
        try:
            sockets.append(connect(port, timeout=2, source=source))
        except OSError:
            refused += 1
    opened = time.monotonic() - started
    closed_at: list[float] = []
    for sock in sockets:
        _, seconds = read_until_closed(sock, max(0.1, deadline + SLACK + 5 - (time.monotonic() - started)))
        if seconds is not None:
            closed_at.append(time.monotonic() - started)
        sock.close()
    still = len(sockets) - len(closed_at)
    worst = max(closed_at) if closed_at else 0.0
    saw = (f"{len(sockets)} opened in {opened:.1f} s ({refused} refused at connect); "
           f"all closed by {worst:.1f} s" if not still else f"{still} STILL OPEN")
    return Row("connection flood (held)", f"{label} :{port}", saw,
               still == 0 and worst <= opened + deadline + SLACK, [(metrics, counter)])


CONNECTION_FLOODS = (
    (4433, "public proxy TLS", 2114, r'proxy_tls_connections_total\{outcome="rate_limited"\}',
     3000, 5),
    (9999, "public proxy internal", 2114, r"proxy_internal_rate_limited_connections_total",
     3000, 5),
    (8889, "hd-2 eps_server", 2113, r'eps_peer_refusals_total\{reason="hello_timeout"\}',
     500, 10),
)
"""(port, label, metrics port, counter, connections, deadline) of each connection flood."""


def connection_floods(index: int) -> list[Row]:
    port, label, metrics, counter, total, deadline = CONNECTION_FLOODS[index]
    return [connection_flood(port, label, metrics, counter, attacker(10 + index),
                             total=total, deadline=deadline)]


# ------------------------------------------------------------------- tokens


def _token_attempt(token: bytes, source: str) -> str:
    sock = connect(9999, source=source)
    try:
        sock.sendall(token + b"GET / HTTP/1.1\r\n\r\n")
        data, seconds = read_until_closed(sock, 10)
        if seconds is None:
            return "NOT CLOSED"
        return "answered" if data else "closed"
    finally:
        sock.close()


def random_tokens(count: int = 1500) -> list[Row]:
    """``count`` random tokens at the internal endpoint, from one attacking address."""
    result = flood(lambda: _token_attempt(secrets.token_bytes(32), attacker(20)), seconds=60,
                   workers=8, limit=count)
    return [Row("random tokens", "public proxy internal :9999", result.describe(),
                result.outcomes.get("closed", 0) + result.outcomes.get("reset", 0) == result.attempts,
                [(2114, r"proxy_refusals_total|proxy_internal_rate_limited_connections_total")])]


def replayed_token(replays: int = 500) -> list[Row]:
    """One token ``replays`` times: refused every time (a used token is tested in tests/)."""
    token = secrets.token_bytes(32)
    result = flood(lambda: _token_attempt(token, attacker(21)), seconds=60, workers=8,
                   limit=replays)
    return [Row("one token replayed", "public proxy internal :9999", result.describe(),
                result.outcomes.get("closed", 0) + result.outcomes.get("reset", 0) == result.attempts,
                [(2114, r"proxy_refusals_total|proxy_internal_rate_limited_connections_total")])]


# --------------------------------------------------------------- certificates


def _http_handshake(prefix: str) -> dict[str, str]:
    counter = prefix + r'_http_refusals_total\{reason="handshake_failed"\}'
    return {"foreign CA": counter, "no client certificate": counter}


def certificates(foreign: Path) -> list[Row]:
    """
    ``openssl s_client`` with a certificate from another CA (a PKI made by ``eps certs``
    elsewhere), with hd-1's second certificate (right CA, not pinned in the directory) and
    with none; each must be refused.  The EPS link also sends a hello line, which an
    unidentified peer must never get an answer to.
    """
    rows = []
    hello = b'{"type":"hello","version":1,"name":"hd-1"}\n'
    cases = [
        ("foreign CA", foreign / "hd-1.crt", foreign / "hd-1.key", foreign / "intermediate.crt"),
        ("right CA, not pinned", CERTS / "hd-1-alt.crt", CERTS / "hd-1-alt.key",
         CERTS / "intermediate.crt"),
        ("no client certificate", None, None, None),
    ]
    targets = [
        ("hd-2 eps_server :8889", 8889, "hd-2", 2113, {
            "foreign CA": r'eps_peer_refusals_total\{reason="handshake_failed"\}',
            "right CA, not pinned": r'eps_peer_refusals_total\{reason="identity"\}',
            "no client certificate": r'eps_peer_refusals_total\{reason="handshake_failed"\}'}),
        ("sd-1 JSON-RPC :3322", 3322, "sd-1", 2111, _http_handshake("sd")),
        ("hd-1 gateway :5555", 5555, "hd-1", 2112, _http_handshake("eps")),
        ("public proxy JSON-RPC :6655", 6655, "public-proxy-1.ga", 2114, _http_handshake("proxy")),
    ]
    for target, port, name, metrics, counters in targets:
        for case, cert, key, chain in cases:
            if port != 8889 and case == "right CA, not pinned":
                continue  # HTTPS servers check the CA only; who may call what is the EPS's job
            saw = openssl_client(port, cert=cert, key=key, chain=chain, ca=ROOT_CA,
                                 server_name=name,
                                 payload=hello if port == 8889 else
                                 b'POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}')
            refused = not re.search(r'"type": ?"hello"|HTTP/1\.1 2', saw)
            counter = counters.get(case)
            rows.append(Row(f"certificate: {case}", target, saw, refused,
                            [(metrics, counter)] if counter else []))
    # the proxy's JSON-RPC server answers only its own EPS: hd-1's valid certificate
    client = GatewayClient(6655, "public-proxy-1.ga", client_context(CERTS, "hd-1"), timeout=10)
    try:
        client.call("requestConnection", {"to": "hd-2", "channel": "eps_server"})
        rows.append(Row("certificate: valid, not the proxy's EPS", "public proxy JSON-RPC :6655",
                        "ANSWERED", False))
    except Exception as e:  # noqa: BLE001 - the refusal is the expected outcome
        rows.append(Row("certificate: valid, not the proxy's EPS", "public proxy JSON-RPC :6655",
                        str(e)[:120], True,
                        [(2114, r'proxy_jsonrpc_requests_total\{method="requestConnection",outcome="error [^o]')]))
    return rows


def foreign_pki(folder: Path) -> Path:
    """A complete second dev PKI (its own root) made by the project's ``eps certs``."""
    subprocess.run([str(demo.BIN / "eps"), "certs", str(folder)], check=True,
                   capture_output=True)
    return folder


# ------------------------------------------------------------------- records


def _signed(record: dict, parent: str, pki: Path, name: str) -> dict:
    """``record`` signed as the next record after ``parent`` with ``pki``'s ``name``-sign key."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from epsproxy.rules.records import sign_record

    key = load_pem_private_key((pki / f"{name}-sign.key").read_bytes(), None)
    return sign_record(record, parent, key, (pki / f"{name}-sign.crt").read_text())


def records(foreign: Path) -> list[Row]:
    """
    Records at the SD that must all be refused, its tip unchanged afterwards: a would-be
    next record changed after it was signed (hash kept, and hash recomputed), one signed
    with another CA's key, the tip and an old record replayed, two records reordered.
    """
    from epsproxy.rules.records import record_hash

    sd = GatewayClient(3322, "sd-1", client_context(CERTS, "hd-1"), timeout=10)
    chain = sd.call("getRecords", {})
    tip = sd.call("getTip", {})
    last, before = chain[-1], chain[-2]
    record = dict(last["record"], created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    edited = _signed(record, last["hash"], CERTS, "hd-1")  # valid until edited: never sent as is
    edited["record"] = dict(edited["record"], name="attacker")
    rehashed = json.loads(json.dumps(edited))
    rehashed["hash"] = record_hash(rehashed["record"])
    cases = [
        ("record edited after signing", [edited]),
        ("edited, hash recomputed", [rehashed]),
        ("signed by a foreign CA", [_signed(record, last["hash"], foreign, "hd-1")]),
        ("replayed record (the tip again)", [last]),
        ("replayed old record", [chain[0]]),
        ("reordered records", [last, before]),
    ]
    rows = []
    for name, batch in cases:
        try:
            sd.call("submitRecords", {"records": batch})
            saw, refused = "ACCEPTED", False
        except Exception as e:  # noqa: BLE001 - a refusal is what we want
            saw, refused = str(e)[:120], True
        rows.append(Row(name, "sd-1 submitRecords :3322", saw, refused,
                        [(2111, r'sd_jsonrpc_requests_total\{method="submitRecords",outcome="error')]))
    after = sd.call("getTip", {})
    rows.append(Row("records: tip afterwards", "sd-1 :3322",
                    "unchanged" if after == tip else f"CHANGED {tip} -> {after}", after == tip))
    return rows


# ------------------------------------------------------------------ oversized


def oversized(scratch: Path) -> list[Row]:
    """5 MiB JSON-RPC bodies with curl (cap 4 MiB), a 5 MiB EPS line (cap 1 MiB), a 64 KiB ClientHello."""
    body = scratch / "big.json"
    body.write_bytes(b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"p":"'
                     + b"a" * (5 << 20) + b'"}}')
    rows = []
    for target, port, name, metrics, counter in [
        ("hd-1 gateway :5555", 5555, "hd-1", 2112, r'eps_http_refusals_total\{reason="body_too_large"\}'),
        ("sd-1 JSON-RPC :3322", 3322, "sd-1", 2111, r'sd_http_refusals_total\{reason="body_too_large"\}'),
        ("public proxy JSON-RPC :6655", 6655, "public-proxy-1.ga", 2114,
         r'proxy_http_refusals_total\{reason="body_too_large"\}'),
    ]:
        saw = curl_post(port, name, body, cert=CERTS / "hd-1.crt", key=CERTS / "hd-1.key",
                        ca=ROOT_CA)
        rows.append(Row("5 MiB body (curl)", target, saw, saw.startswith("413"),
                        [(metrics, counter)]))
    # one 2 MiB line (no newline) on an identified EPS link
    sock = connect(8889)
    tls = _operator_context("hd-1", verify=False).wrap_socket(sock, server_hostname="hd-2")
    try:
        tls.sendall(b"a" * (5 << 20))
    except OSError:
        pass
    data, seconds = read_until_closed(tls, 15)
    tls.close()
    text = data.decode(errors="replace").replace("\n", " ")[-120:]
    rows.append(Row("5 MiB line (no newline)", "hd-2 eps_server :8889",
                    f"closed after {seconds:.1f} s; said {text}" if seconds is not None else "NOT CLOSED",
                    seconds is not None,
                    [(2113, r'eps_peer_refusals_total\{reason="line_too_long"\}')]))
    # a ClientHello whose handshake message claims 64 KiB (over max_hello_bytes 16 KiB)
    handshake = b"\x01" + (65536).to_bytes(3, "big") + b"\x03\x03" + os.urandom(16000)
    records_ = b"".join(b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
                        for chunk in (handshake[i:i + 16384] for i in range(0, len(handshake), 16384)))
    sock = connect(4433)
    try:
        sock.sendall(records_ + os.urandom(40000))
    except OSError:
        pass
    data, seconds = read_until_closed(sock, 10)
    sock.close()
    rows.append(Row("64 KiB ClientHello", "public proxy TLS :4433",
                    f"closed after {seconds:.2f} s" if seconds is not None else "NOT CLOSED",
                    seconds is not None,
                    [(2114, r'proxy_tls_connections_total\{outcome="malformed"\}')]))
    return rows


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="epsproxy-attack-"))
