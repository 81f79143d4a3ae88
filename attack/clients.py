"""
The attacker's side: hostile clients over real sockets, plus the real tools (``openssl``,
``curl``) where a tool does the job.

Every attacking socket binds the source address :data:`ATTACKER` (127.0.0.2, another
loopback address on Linux), so per-peer rate limits see the attacker as a peer of its own
and the legitimate canary traffic from 127.0.0.1 keeps its own allowance, as it would on
a real network.  Pacing here (``time.sleep`` between trickled bytes) is the attack itself,
not synchronisation.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = [
    "ATTACKER",
    "attacker",
    "connect",
    "SlowResult",
    "client_hello",
    "slow_connection",
    "run_slow",
    "FloodResult",
    "flood",
    "openssl_client",
    "curl_post",
]

#: Source address of every attacking connection.
ATTACKER = "127.0.0.2"


def attacker(n: int) -> str:
    """The ``n``-th attacking address (127.0.0.2, 127.0.0.3, ...): a peer of its own."""
    return f"127.0.0.{2 + n}"


def connect(port: int, timeout: float = 5.0, source: str = ATTACKER) -> socket.socket:
    """A TCP connection from ``source`` (default :data:`ATTACKER`) to 127.0.0.1:``port``."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def client_hello(server_name: str = "attack.example") -> bytes:
    """The bytes of a real TLS ClientHello (Python's ssl), to trickle or to replay."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@dataclass
class SlowResult:
    """What one slow connection saw: seconds until the server closed it, its first answer."""

    closed_after: float | None = None  # None: still open when the attacker gave up
    answer: bytes = b""
    error: str = ""


def slow_connection(port: int, payload: bytes, *, interval: float, limit: float,
                    tls: ssl.SSLContext | None = None, server_name: str | None = None) -> SlowResult:
    """
    Slowloris: connect, (optionally complete a TLS handshake), then send ``payload`` one
    byte every ``interval`` seconds (an empty payload: send nothing) until the server
    closes the connection or ``limit`` seconds pass.  Whatever the server says is kept.
    """
    result = SlowResult()
    started = time.monotonic()
    try:
        sock = connect(port)
    except OSError as e:
        result.error = f"connect: {e}"
        result.closed_after = 0.0
        return result
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_name)
        sock.setblocking(False)
        sent = 0
        next_send = time.monotonic()
        while time.monotonic() - started < limit:
            now = time.monotonic()
            if sent < len(payload) and now >= next_send:
                try:
                    sock.send(payload[sent:sent + 1])
                    sent += 1
                except (ssl.SSLWantWriteError, BlockingIOError):
                    pass
                next_send = now + interval
            wait = max(0.0, min(next_send - now, limit - (now - started), 1.0))
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                readable, _, _ = select.select([sock], [], [], wait)
                if not readable:
                    continue
            try:
                data = sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            if not data:
                result.closed_after = time.monotonic() - started
                return result
            result.answer += data[: 200 - len(result.answer)]
    except (OSError, ssl.SSLError) as e:
        result.closed_after = time.monotonic() - started
        result.error = f"{type(e).__name__}: {e}"[:120]
        return result
    finally:
        sock.close()
    return result


def run_slow(count: int, make: Callable[[], SlowResult], pace: float = 0.0) -> list[SlowResult]:
    """``count`` slow connections at once (one thread each), started ``pace`` s apart."""
    results: list[SlowResult] = [SlowResult() for _ in range(count)]

    def one(index: int) -> None:
        results[index] = make()

    threads = []
    for index in range(count):
        thread = threading.Thread(target=one, args=(index,), daemon=True)
        thread.start()
        threads.append(thread)
        if pace:
            time.sleep(pace)
    for thread in threads:
        thread.join()
    return results


@dataclass
class FloodResult:
    """Counts of a flood: attempts, and how each ended."""

    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items(), key=lambda i: -i[1]))
        return f"{self.attempts} in {self.seconds:.0f} s ({self.attempts / max(self.seconds, 1e-9):.0f}/s): {parts}"


def flood(attempt: Callable[[], str], *, seconds: float, workers: int,
          limit: int | None = None, at_least: int = 0,
          max_seconds: float | None = None) -> FloodResult:
    """
    Run ``attempt`` (returns its outcome's name) from ``workers`` threads for ``seconds``,
    and past them until ``at_least`` attempts were made (at most ``max_seconds`` in all):
    a flood that must cross a rate limit does so on a slow or busy machine too.
    """
    result = FloodResult()
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + seconds
    give_up_at = started + max(seconds, max_seconds or seconds)

    def running() -> bool:
        now = time.monotonic()
        return now < stop_at or (result.attempts < at_least and now < give_up_at)

    def work() -> None:
        while running():
            with lock:
                if limit is not None and result.attempts >= limit:
                    return
                result.attempts += 1
            try:
                outcome = attempt()
            except (OSError, ssl.SSLError) as e:
                outcome = _classify(e)
            with lock:
                result.add(outcome)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result


def _classify(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"tls: {e.reason or type(e).__name__}".lower()
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, (ConnectionAbortedError, BrokenPipeError)):
        return "closed"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, socket.timeout):
        return "timeout"
    return type(e).__name__


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes (or ``limit`` s): (bytes, seconds)."""
    started = time.monotonic()
    data = b""
    sock.settimeout(limit)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, time.monotonic() - started
            data += chunk[: 4096 - len(data)]
    except (socket.timeout, TimeoutError):
        return data, None
    except (OSError, ssl.SSLError):
        return data, time.monotonic() - started


def openssl_client(port: int, *, cert: Path | None, key: Path | None, ca: Path,
                   server_name: str, chain: Path | None = None, payload: bytes = b"",
                   timeout: float = 15) -> str:
    """
    ``openssl s_client`` to 127.0.0.1:``port`` presenting ``cert`` (the real tool, as an
    operator would use it); returns what it printed about the handshake's end, one line.
    """
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
               server_name, "-CAfile", str(ca), "-verify_return_error", "-quiet",
               "-bind", f"{ATTACKER}:0"]
    if cert is not None and key is not None:
        command += ["-cert", str(cert), "-key", str(key)]
    if chain is not None:  # s_client sends only the leaf of -cert otherwise
        command += ["-cert_chain", str(chain)]
    try:
        done = subprocess.run(command, input=payload, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "openssl: no end within the time limit"
    text = (done.stderr + done.stdout).decode(errors="replace")
    return _summary(text) + f" (exit {done.returncode})"


def _summary(text: str) -> str:
    """The line of an openssl/curl transcript that says how it ended."""
    for marker in ("alert", "error", "errno", "SSL routines", "HTTP/1.1"):
        for line in text.splitlines():
            if marker in line:
                return " ".join(line.split())[:160]
    lines = [line for line in text.splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:160] if lines else "(nothing)"


def curl_post(port: int, server_name: str, body_file: Path, *, cert: Path, key: Path,
              ca: Path, timeout: float = 30) -> str:
    """``curl`` POSTs ``body_file`` as JSON; returns "<status> <first bytes of the body>"."""
    command = ["curl", "-sS", "--max-time", str(timeout), "--interface", ATTACKER,
               "--resolve", f"{server_name}:{port}:127.0.0.1", "--cacert", str(ca),
               "--cert", str(cert), "--key", str(key), "-H", "Content-Type: application/json",
               "--data-binary", f"@{body_file}", "-w", "\n%{http_code}",
               f"https://{server_name}:{port}/jsonrpc"]
    done = subprocess.run(command, capture_output=True, timeout=timeout + 5)
    out = done.stdout.decode(errors="replace").rsplit("\n", 1)
    if len(out) == 2 and out[1].strip().isdigit() and out[1].strip() != "000":
        return f"{out[1].strip()} {out[0][:90]}"
    return "curl: " + " ".join(done.stderr.decode(errors="replace").split())[:140]


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))
