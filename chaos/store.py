"""
Redis as the datastore of the chaos run (``python -m chaos --store redis``, issue 6
"Faults": kill -9 and restart Redis when it is the store).

- :class:`RedisProcess` — one real ``redis-server`` on a free loopback port, with the
  append-only file fsynced on every write (``--appendonly yes --appendfsync always``) in a
  folder under the run dir, so that it can be killed with SIGKILL and started again on the
  same port and data;
- :func:`write_overlays` — settings folders (in the run dir, conf/dev untouched) that
  :func:`epsproxy.dev.demo.start` merges after the roles' own, giving the SD and both proxies
  their own key in that Redis;
- :class:`RedisClient` — a few synchronous commands (``LLEN``, ``LRANGE``) to look at
  what Redis holds;
- :class:`RecordWriter` — signs change records as hd-1 and submits them to the SD in this
  process (the ``rec`` stream and the probes), remembering every acknowledged one.

Plain threads and sockets, like the rest of the chaos package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from epsproxy.dev import demo

from .traffic import CallFailed, GatewayClient, client_context

__all__ = [
    "STORE_ROLES",
    "RecordWriter",
    "RedisClient",
    "RedisError",
    "RedisProcess",
    "write_overlays",
]

#: The roles that keep state in a datastore, the settings section holding it, and their key.
STORE_ROLES = {
    "sd-1": ("directory", "chaos:sd-1:records"),
    "public-proxy-1": ("public", "chaos:public-proxy-1:announcements"),
    "private-proxy-1": ("private", "chaos:private-proxy-1:announcements"),
}


class RedisError(Exception):
    """redis-server did not start, or a command failed (the text says which)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class RedisProcess:
    """
    ``redis-server`` for the chaos run: pid in ``run_dir/redis.pid`` (so the fault code
    signals it like a role), output in ``run_dir/redis.out``, data in
    ``run_dir/redis-data``.
    """

    name = "redis"

    def __init__(self, run_dir: Path, port: int = 0) -> None:
        self.run_dir = run_dir
        self.port = port
        self.data = run_dir / "redis-data"
        self.pid_file = run_dir / f"{self.name}.pid"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def clean(self) -> None:
        """Stop a server left by an earlier run from this run dir and drop its data."""
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)

    def start(self, seconds: float = 20) -> float:
        """Start (on :attr:`port`, or a free one first); seconds until it answers PING."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RedisError("redis-server is not installed (apt-get install redis-server)")
        if not self.port:
            self.port = free_port()
        self.data.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.data), "--appendonly", "yes", "--appendfsync", "always"],
            stdin=subprocess.DEVNULL, stdout=open(self.run_dir / "redis.out", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid_file.write_text(f"{self.process.pid}\n")
        client = RedisClient(self.port, timeout=1)
        while time.monotonic() - started < seconds:
            if self.process.poll() is not None:
                tail = (self.run_dir / "redis.out").read_text(errors="replace")[-2000:]
                raise RedisError(f"redis-server exited with {self.process.returncode}: {tail}")
            try:
                if client.command("PING") == "PONG":
                    return time.monotonic() - started
            except (OSError, RedisError):
                pass
            time.sleep(0.05)
        raise RedisError(f"redis-server did not answer PING on {self.address} in {seconds:.0f} s")

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF), SIGKILL after 10 s; only our own redis-server."""
        if not self.pid_file.exists():
            return
        try:
            pid = int(self.pid_file.read_text().strip())
        except ValueError:
            self.pid_file.unlink()
            return
        if demo._alive(pid) and _is_redis(pid):
            os.killpg(pid, signal.SIGTERM)
            if not demo._wait_gone(pid, 10):
                os.killpg(pid, signal.SIGKILL)
                demo._wait_gone(pid, 5)
            print(f"stopped redis-server (pid {pid})")
        self.pid_file.unlink()


class RedisClient:
    """A blocking RESP client for a few commands, one connection per command."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout

    def command(self, *args: str | bytes | int) -> Any:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as s:
            s.sendall(request)
            reader = s.makefile("rb")
            return self._reply(reader)

    def _reply(self, reader: Any) -> Any:
        line = reader.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError("connection closed in the middle of a reply")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = reader.read(length + 2)
            return data[:-2]
        if kind == b"*":
            return [self._reply(reader) for _ in range(int(rest))]
        raise RedisError(f"unexpected reply {line[:40]!r}")

    def digest(self, key: str, count: int) -> str:
        """SHA-256 over the first ``count`` elements of list ``key`` (to compare later)."""
        h = hashlib.sha256()
        for item in self.command("LRANGE", key, 0, count - 1) if count else []:
            h.update(b"%d:" % len(item) + item)
        return h.hexdigest()


def write_overlays(run_dir: Path, address: str) -> dict[str, Path]:
    """
    One settings folder per store role under ``run_dir/settings`` that replaces the
    role's ``datastore`` with its own key in the Redis at ``address``; returns
    ``{role: folder}`` for :func:`epsproxy.dev.demo.start`.
    """
    overlays = {}
    for role, (section, key) in STORE_ROLES.items():
        folder = run_dir / "settings" / role
        folder.mkdir(parents=True, exist_ok=True)
        datastore = {"type": "redis", "settings": {"addresses": [address], "key": key}}
        (folder / "zz-chaos-redis.json").write_text(
            json.dumps({section: {"datastore!": datastore}}, indent=2) + "\n")
        overlays[role] = folder
    return overlays


class RecordWriter:
    """
    Change records signed with hd-1's key (an operator's ``groups`` set to a fresh tag:
    ``chaos-probe`` for the probes, ``chaos-rec`` for the stream) and submitted to sd-1 over JSON-RPC: ``getTip``, then ``submitRecords``
    on it.  Submits are serialised in this process, so the stream and the probes never
    race each other for the tip.  :attr:`acked` holds the hash of every acknowledged one.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        from epsproxy.cli import Signing, _load_role

        self.signing = Signing(_load_role(str(demo.CONF / "roles" / "hd-1")))
        self.client = GatewayClient(3322, "sd-1", client_context(demo.CERTS, "hd-1"),
                                    timeout=timeout, keepalive=False)
        self.acked: list[str] = []
        self._lock = threading.Lock()

    def submit(self, tag: str, name: str = "chaos-probe") -> str:
        """Submit one record; its hash once acknowledged (raises otherwise)."""
        from epsproxy.rules import records as records_mod
        from epsproxy.cli import now_rfc3339

        record = records_mod.normalise_record(
            {"name": name, "section": "groups", "data": [tag],
             "created_at": now_rfc3339()})
        with self._lock:
            tip = self.client.call("getTip", {})
            signed = records_mod.sign_record(record, tip["hash"] if tip else "",
                                             self.signing.key, self.signing.certificate_pem)
            result = self.client.call("submitRecords", {"records": [signed]})
            if result != "ok":
                raise CallFailed(f"submitRecords: {result!r}")
            self.acked.append(signed["hash"])
        return str(signed["hash"])

    def chain(self) -> list[str]:
        """The hashes of the SD's selected chain, in order."""
        return [r["hash"] for r in self.client.call("getRecords", {})]

    def lost(self) -> tuple[int, int, list[str]]:
        """Acknowledged records missing from the SD's chain: (lost, checked, examples)."""
        chain = set(self.chain())
        with self._lock:
            acked = list(self.acked)
        missing = [h for h in acked if h not in chain]
        return len(missing), len(acked), [h[:16] for h in missing[:5]]
