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
  process (the ``rec`` stream and the probes), remembering every acknowledged one;
- :class:`SentinelGroup` — with ``--store redis-sentinel`` (issue 15): a replica of that
  ``redis-server`` and three ``redis-sentinel`` (quorum 2) watching it as
  :data:`MASTER_NAME`, so that killing the master is a failover, not an outage.

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
    "SentinelGroup",
    "SentinelProcess",
    "write_overlays",
]

#: The master's name in the sentinels' configuration (``--store redis-sentinel``).
MASTER_NAME = "chaos"

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
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"redis-server" in cmdline or b"redis-sentinel" in cmdline
    except OSError:
        return False


class RedisProcess:
    """
    ``redis-server`` for the chaos run: pid in ``run_dir/redis.pid`` (so the fault code
    signals it like a role), output in ``run_dir/redis.out``, data in
    ``run_dir/redis-data``.
    """

    executable = "redis-server"

    def __init__(self, run_dir: Path, port: int = 0, *, name: str = "redis",
                 extra_args: list[str] | None = None) -> None:
        self.run_dir = run_dir
        self.port = port
        self.name = name
        #: Appended to the command line (a replica's ``--replicaof``).
        self.extra_args = list(extra_args or [])
        self.data = run_dir / f"{name}-data"
        self.pid_file = run_dir / f"{self.name}.pid"
        self.output = run_dir / f"{self.name}.out"
        self.process: subprocess.Popen[bytes] | None = None

    def command_line(self, executable: str) -> list[str]:
        return [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.data), "--appendonly", "yes", "--appendfsync", "always",
                *self.extra_args]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def clean(self) -> None:
        """Stop a server left by an earlier run from this run dir and drop its data."""
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)

    def start(self, seconds: float = 20) -> float:
        """Start (on :attr:`port`, or a free one first); seconds until it answers PING."""
        executable = shutil.which(self.executable)
        if executable is None:
            raise RedisError(f"{self.executable} is not installed"
                             f" (apt-get install {self.executable})")
        if not self.port:
            self.port = free_port()
        self.data.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command_line(executable),
            stdin=subprocess.DEVNULL, stdout=open(self.output, "ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid_file.write_text(f"{self.process.pid}\n")
        client = RedisClient(self.port, timeout=1)
        while time.monotonic() - started < seconds:
            if self.process.poll() is not None:
                tail = self.output.read_text(errors="replace")[-2000:]
                raise RedisError(f"{self.executable} exited with {self.process.returncode}:"
                                 f" {tail}")
            try:
                if client.command("PING") == "PONG":
                    return time.monotonic() - started
            except (OSError, RedisError):
                pass
            time.sleep(0.05)
        raise RedisError(f"{self.executable} did not answer PING on {self.address}"
                         f" in {seconds:.0f} s")

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
            print(f"stopped {self.name} (pid {pid})")
        self.pid_file.unlink()


class SentinelProcess(RedisProcess):
    """One ``redis-sentinel`` watching ``master`` as :data:`MASTER_NAME` (quorum 2)."""

    executable = "redis-sentinel"

    def __init__(self, run_dir: Path, name: str, master: RedisProcess) -> None:
        super().__init__(run_dir, name=name)
        self.master = master

    def command_line(self, executable: str) -> list[str]:
        config = self.data / "sentinel.conf"  # Sentinel rewrites it: one per process
        if not config.exists():
            config.write_text("\n".join([
                f"port {self.port}",
                "bind 127.0.0.1",
                f"dir {self.data}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                f"sentinel failover-timeout {MASTER_NAME} 5000",
            ]) + "\n")
        return [executable, str(config)]


class SentinelGroup:
    """
    A replica of ``master`` and three sentinels watching it (``--store redis-sentinel``).
    The master itself stays the run's ``redis`` process, the one the fault kills; its
    restart comes back with its data and the sentinels make it a replica of the new master.
    """

    #: Redis 7 waits 5 s before a diskless full sync; the master needs this too.
    QUICK_SYNC = ["--repl-diskless-sync-delay", "0"]

    def __init__(self, run_dir: Path, master: RedisProcess) -> None:
        self.master = master
        self.replica = RedisProcess(run_dir, name="redis-replica")
        self.sentinels = [SentinelProcess(run_dir, f"redis-sentinel-{i}", master)
                          for i in (1, 2, 3)]

    @property
    def addresses(self) -> list[str]:
        return [sentinel.address for sentinel in self.sentinels]

    def clean(self) -> None:
        for process in (self.replica, *self.sentinels):
            process.clean()

    def stop(self) -> None:
        for process in (*self.sentinels, self.replica):
            process.stop()

    def start(self, seconds: float = 30) -> float:
        """Start the replica and the sentinels; seconds until they all see each other."""
        started = time.monotonic()
        self.replica.extra_args = ["--replicaof", "127.0.0.1", str(self.master.port),
                                   *self.QUICK_SYNC]
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        while time.monotonic() - started < seconds:
            if all(self._ready(sentinel) for sentinel in self.sentinels):
                return time.monotonic() - started
            time.sleep(0.2)
        raise RedisError(f"the sentinels did not see the replica and each other in {seconds} s")

    def _ready(self, sentinel: SentinelProcess) -> bool:
        try:
            reply = RedisClient(sentinel.port, timeout=1).command("SENTINEL", "MASTER",
                                                                  MASTER_NAME)
        except (OSError, RedisError):
            return False
        state = dict(zip(reply[::2], reply[1::2]))
        return (state.get(b"num-slaves") == b"1" and state.get(b"num-other-sentinels") == b"2"
                and state.get(b"flags") == b"master")

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                host, port = RedisClient(sentinel.port, timeout=1).command(
                    "SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                return int(port)
            except (OSError, RedisError, TypeError, ValueError):
                continue
        raise RedisError("no sentinel named the master")


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


def write_overlays(run_dir: Path, address: str,
                   sentinels: list[str] | None = None) -> dict[str, Path]:
    """
    One settings folder per store role under ``run_dir/settings`` that replaces the
    role's ``datastore`` with its own key in the Redis at ``address`` (or, given
    ``sentinels``, in the master they name :data:`MASTER_NAME`); returns
    ``{role: folder}`` for :func:`epsproxy.dev.demo.start`.
    """
    overlays = {}
    for role, (section, key) in STORE_ROLES.items():
        folder = run_dir / "settings" / role
        folder.mkdir(parents=True, exist_ok=True)
        where: dict[str, Any] = ({"sentinels": sentinels, "master_name": MASTER_NAME}
                                 if sentinels else {"addresses": [address]})
        datastore = {"type": "redis", "settings": {**where, "key": key}}
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

    def __init__(self, timeout: float = 5.0, port: int = 3322) -> None:
        from epsproxy.cli import Signing, _load_role

        self.signing = Signing(_load_role(str(demo.CONF / "roles" / "hd-1")))
        self.client = GatewayClient(port, "sd-1", client_context(demo.CERTS, "hd-1"),
                                    timeout=timeout, keepalive=False)
        self.acked: list[str] = []
        self._lock = threading.Lock()

    def submit(self, tag: str, name: str = "chaos-probe") -> str:
        """Submit one record; its hash once acknowledged (raises otherwise)."""
        with self._lock:
            tip = self.client.call("getTip", {})
            signed = self.sign(tag, tip["hash"] if tip else "", name)
            result = self.client.call("submitRecords", {"records": [signed]})
            if result != "ok":
                raise CallFailed(f"submitRecords: {result!r}")
            self.acked.append(signed["hash"])
        return str(signed["hash"])

    def sign(self, tag: str, parent: str, name: str = "chaos-probe") -> dict[str, Any]:
        """A record (operator ``name``'s ``groups`` set to ``tag``) signed as hd-1 on ``parent``."""
        from epsproxy.cli import now_rfc3339
        from epsproxy.rules import records as records_mod

        record = records_mod.normalise_record(
            {"name": name, "section": "groups", "data": [tag], "created_at": now_rfc3339()})
        return dict(records_mod.sign_record(record, parent, self.signing.key,
                                            self.signing.certificate_pem))

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
