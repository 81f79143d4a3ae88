"""
A real ``redis-server`` for tests, started on a free loopback port and stopped afterwards.

Readiness is detected by polling with ``PING`` through the reactor (a bounded number of
tries, a short pause between them), never by a fixed sleep.  If the port chosen turns out
to be taken by the time Redis binds it, another one is tried.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class RedisServerError(Exception):
    """redis-server is missing, did not start, or did not answer PING in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exited = False

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exited = True
        self.ended.callback(None)


class _Ping(protocol.Protocol):
    def __init__(self) -> None:
        self.answer: defer.Deferred[bytes] = defer.Deferred()
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n" in self.buffer and not self.answer.called:
            self.answer.callback(self.buffer.split(b"\r\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


class RedisServer:
    """
    One ``redis-server`` process.

    ``port`` fixes the port (to restart a server where clients expect it), otherwise a
    free one is chosen.  ``extra_args`` are appended to the command line
    (``["--requirepass", "x"]``).
    ``appendonly=True`` turns on the append-only file with ``appendfsync always`` (for tests
    that restart Redis and expect the data back); pass the same ``directory`` to a second
    RedisServer to start it on the first one's data.
    """

    executable = "redis-server"
    ping_tries = 200
    ping_interval = 0.025  # seconds between PING tries: at most ~5 s in all
    port_tries = 3

    def __init__(
        self,
        reactor: Any = None,
        *,
        appendonly: bool = False,
        directory: Path | None = None,
        extra_args: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="epsproxy-redis-"))
        self.port = port
        self._fixed_port = bool(port)
        self._process: _Process | None = None
        self._transport: Any = None

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"`` for the store settings."""
        return f"127.0.0.1:{self.port}"

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start the server; fires once it answers PING."""
        path = shutil.which(self.executable)
        if path is None:
            package = self.executable
            raise RedisServerError(
                f"{self.executable} is not installed (apt-get install {package}); the store"
                " tests need a real one"
            )
        last_output = b""
        for _ in range(1 if self._fixed_port else self.port_tries):
            if not self._fixed_port:
                self.port = _free_port()
            self._process = _Process()
            args = self._command_line(path)
            self._transport = self.reactor.spawnProcess(
                self._process, path, args, env=dict(os.environ)
            )
            ready = yield self._wait_ready()
            if ready:
                return self
            last_output = self._process.output
            if b"in use" not in last_output:
                break
        yield self.kill()
        raise RedisServerError(
            f"redis-server did not start: {last_output.decode(errors='replace')[-2000:]}"
        )

    def _command_line(self, path: str) -> list[str]:
        args = [
            path,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.directory),
            "--appendonly", "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        return args + self.extra_args

    @defer.inlineCallbacks
    def _wait_ready(self) -> Any:
        assert self._process is not None
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=1)
        for _ in range(self.ping_tries):
            if self._process.exited:
                return False
            try:
                ping = _Ping()
                yield connectProtocol(endpoint, ping)
                answer = yield ping.answer
                # a server started with --requirepass answers -NOAUTH: up all the same
                if answer == b"+PONG" or answer.startswith(b"-NOAUTH"):
                    return True
            except Exception:
                pass
            yield task.deferLater(self.reactor, self.ping_interval, lambda: None)
        return False

    def _signal(self, name: str) -> defer.Deferred[None]:
        process = self._process
        if process is None or process.exited:
            return defer.succeed(None)
        try:
            self._transport.signalProcess(name)
        except Exception:
            pass  # already gone
        return process.ended

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM and wait for the process to exit (Redis flushes its AOF first)."""
        yield self._signal("TERM")

    @defer.inlineCallbacks
    def kill(self) -> Any:
        """SIGKILL and wait for the process to exit."""
        yield self._signal("KILL")

    @defer.inlineCallbacks
    def cleanup(self) -> Any:
        """Kill the server if it still runs and remove a directory this object made."""
        yield self.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class RedisSentinel(RedisServer):
    """
    One ``redis-sentinel`` process watching the master ``master_name`` at
    ``master_address`` with ``quorum``, quick to declare it down (``down_after`` ms) and
    to fail over (``failover_timeout`` ms).  Its configuration file (which Sentinel
    rewrites) lives in its own temporary directory.
    """

    executable = "redis-sentinel"

    def __init__(
        self,
        reactor: Any = None,
        *,
        master_address: str,
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after: int = 400,
        failover_timeout: int = 2000,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__(reactor)
        self.master_address = master_address
        self.master_name = master_name
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.extra_config = list(extra_config)

    def _command_line(self, path: str) -> list[str]:
        host, port = self.master_address.rsplit(":", 1)
        name = self.master_name
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join([
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"sentinel monitor {name} {host} {port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after}",
            f"sentinel failover-timeout {name} {self.failover_timeout}",
            f"sentinel parallel-syncs {name} 1",
            *self.extra_config,
        ]) + "\n")
        return [path, str(config)]


class SentinelSetup:
    """
    A master, one replica of it, and ``count`` sentinels (quorum 2) watching it as
    ``master_name``: what a Redis Sentinel deployment is in miniature.  :meth:`start`
    fires once every sentinel sees the replica and all the other sentinels, so that a
    failover can be agreed on.
    """

    ready_deadline = 15.0  # seconds for the sentinels to find each other (hello: 2 s)
    poll_interval = 0.1
    # Redis 7 waits 5 s before a diskless full sync (to serve several replicas at once).
    _quick_sync = ["--repl-diskless-sync-delay", "0"]

    def __init__(self, reactor: Any = None, *, count: int = 3,
                 master_name: str = "mymaster") -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.master_name = master_name
        self.master = RedisServer(reactor, extra_args=self._quick_sync)
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisSentinel] = []
        self.restarted: list[RedisServer] = []
        self.count = count

    @property
    def sentinel_addresses(self) -> list[str]:
        return [sentinel.address for sentinel in self.sentinels]

    def datastore(self, **settings: Any) -> dict[str, Any]:
        """The ``datastore`` settings block for a store behind these sentinels."""
        return {"type": "redis", "settings": {
            "sentinels": self.sentinel_addresses, "master_name": self.master_name,
            **settings,
        }}

    @defer.inlineCallbacks
    def start(self) -> Any:
        yield self.master.start()
        self.replica = RedisServer(
            self.reactor, extra_args=["--replicaof", "127.0.0.1", str(self.master.port),
                                      *self._quick_sync]
        )
        yield self.replica.start()
        yield self._wait_replica_online()
        for _ in range(self.count):
            sentinel = RedisSentinel(self.reactor, master_address=self.master.address,
                                     master_name=self.master_name)
            self.sentinels.append(sentinel)
            yield sentinel.start()
        yield self.wait_until(self._complete, "the sentinels to see the replica and each other")
        return self

    @defer.inlineCallbacks
    def _wait_replica_online(self) -> Any:
        """Until the master's ROLE lists the replica (synced, streaming)."""
        from epsproxy.store.redis_sentinel import ask

        limit = self.reactor.seconds() + self.ready_deadline
        while True:
            (role,) = yield ask(self.reactor, self.master.address, [("ROLE",)], timeout=1.0)
            if isinstance(role, list) and len(role) > 2 and role[2]:
                return
            if self.reactor.seconds() > limit:
                raise RedisServerError(f"the replica did not come online: {role!r:.300}")
            yield task.deferLater(self.reactor, self.poll_interval, lambda: None)

    def _complete(self, state: dict[bytes, bytes]) -> bool:
        return (state.get(b"num-slaves") == b"1"
                and state.get(b"num-other-sentinels") == str(self.count - 1).encode()
                and state.get(b"flags") == b"master")

    @defer.inlineCallbacks
    def master_state(self, sentinel: RedisSentinel) -> Any:
        """``SENTINEL MASTER <name>`` of one sentinel as a dict of bytes."""
        from epsproxy.store.redis_sentinel import ask

        (reply,) = yield ask(self.reactor, sentinel.address,
                             [("SENTINEL", "MASTER", self.master_name)], timeout=1.0)
        if not isinstance(reply, list):
            return {}
        return dict(zip(reply[::2], reply[1::2]))

    @defer.inlineCallbacks
    def wait_until(self, condition: Any, what: str, *, deadline: float | None = None) -> Any:
        """Poll every sentinel's view until ``condition(state)`` holds for all of them."""
        limit = self.reactor.seconds() + (deadline or self.ready_deadline)
        while True:
            states = []
            for sentinel in self.sentinels:
                try:
                    states.append((yield self.master_state(sentinel)))
                except Exception:
                    states.append({})
            if all(condition(state) for state in states):
                return states
            if self.reactor.seconds() > limit:
                raise RedisServerError(f"timed out waiting for {what}: {states!r:.1500}")
            yield task.deferLater(self.reactor, self.poll_interval, lambda: None)

    @defer.inlineCallbacks
    def wait_for_failover(self, *, deadline: float = 20.0) -> Any:
        """Fires with the new master's address once every sentinel names the replica."""
        assert self.replica is not None
        port = str(self.replica.port).encode()
        yield self.wait_until(
            lambda state: state.get(b"port") == port and state.get(b"flags") == b"master",
            "the failover to the replica", deadline=deadline,
        )
        return self.replica.address

    @defer.inlineCallbacks
    def restart_old_master(self) -> Any:
        """
        Start a server again (empty: no persistence) on the killed master's port, as its
        supervisor would; the sentinels turn it into a replica of the new master.  Only
        after the failover: an empty master back before it would be followed by its
        replica, emptied (the Redis documentation's warning about restarting masters
        without persistence).
        """
        again = RedisServer(self.reactor, port=self.master.port, extra_args=self._quick_sync)
        self.restarted.append(again)
        yield again.start()
        return again

    @defer.inlineCallbacks
    def cleanup(self) -> Any:
        replicas = [self.replica] if self.replica else []
        for server in [*self.sentinels, self.master, *replicas, *self.restarted]:
            yield server.cleanup()


__all__ = ["RedisServer", "RedisServerError", "RedisSentinel", "SentinelSetup"]
