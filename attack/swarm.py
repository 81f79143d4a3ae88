"""
The distributed attacker of ``make attack``: one process, one selector loop, holding slow
connections from many loopback source addresses at once.

``python -m attack.swarm CONFIG_JSON`` reads a list of targets::

    {"seconds": 45, "targets": [{"name": "...", "port": 4433, "payload": "<hex>",
      "addresses": 250, "per_address": 4, "first": "127.1.0.1", "greedy": 100,
      "interval": 2.0}]}

For every target it keeps ``per_address`` connections open from each of ``addresses``
source addresses (counted up from ``first``, bound explicitly), plus ``greedy``
connections from one more address (to meet the per-address cap).  A connection sends its
``payload`` one byte every ``interval`` seconds, then nothing; when the server closes it,
it is opened again at once.  At the end it prints one JSON object of counts per target:
what the attacker managed (attempts per second: its own ceiling on this machine), the
most connections it had open at once, and how the server ended them.

Pacing here (``interval``) is the attack itself, not synchronisation.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import json
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT = 10.0


@dataclass
class Target:
    name: str
    port: int
    payload: bytes
    sources: list[str]
    interval: float
    attempts: int = 0
    connected: int = 0
    open_now: int = 0
    max_open: int = 0
    closed_by_server: int = 0
    connect_timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    held: list[float] = field(default_factory=list)

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def summary(self, seconds: float) -> dict[str, Any]:
        held = sorted(self.held)
        return {
            "name": self.name, "port": self.port, "sources": len(set(self.sources)),
            "attempts": self.attempts, "attempts_per_second": round(self.attempts / seconds, 1),
            "connected": self.connected, "max_open": self.max_open,
            "closed_by_server": self.closed_by_server, "connect_timeouts": self.connect_timeouts,
            "errors": self.errors,
            "held_median": held[len(held) // 2] if held else None,
            "held_max": held[-1] if held else None,
        }


class Connection:
    __slots__ = ("target", "source", "sock", "state", "since", "sent", "due")

    def __init__(self, target: Target, source: str) -> None:
        self.target = target
        self.source = source
        self.sock: socket.socket | None = None
        self.state = "idle"
        self.since = 0.0
        self.sent = 0
        self.due = 0.0


class Swarm:
    def __init__(self, targets: list[Target]) -> None:
        self.selector = selectors.DefaultSelector()
        self.targets = targets
        self.timers: list[tuple[float, int, Connection]] = []
        self._sequence = 0
        self.connections = [Connection(t, source) for t in targets for source in t.sources]

    def _later(self, when: float, connection: Connection) -> None:
        self._sequence += 1
        heapq.heappush(self.timers, (when, self._sequence, connection))

    def open(self, c: Connection, now: float) -> None:
        t = c.target
        t.attempts += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((c.source, 0))
            code = sock.connect_ex(("127.0.0.1", t.port))
        except OSError as e:
            sock.close()
            t.error(errno.errorcode.get(e.errno or 0, str(e.errno)))
            c.state = "idle"
            self._later(now + 1.0, c)  # out of ports or descriptors here: back off
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            t.error(errno.errorcode.get(code, str(code)))
            self._later(now + 0.5, c)
            return
        c.sock, c.state, c.since, c.sent = sock, "connecting", now, 0
        self.selector.register(sock, selectors.EVENT_WRITE, c)
        c.due = now + CONNECT_TIMEOUT
        self._later(c.due, c)

    def close(self, c: Connection) -> None:
        if c.sock is not None:
            try:
                self.selector.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.sock = None
        if c.state == "open":
            c.target.open_now -= 1
        c.state = "idle"

    def writable(self, c: Connection, now: float) -> None:
        assert c.sock is not None
        code = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        t = c.target
        if code:
            t.error(errno.errorcode.get(code, str(code)))
            self.close(c)
            self._later(now + 0.5, c)
            return
        t.connected += 1
        t.open_now += 1
        t.max_open = max(t.max_open, t.open_now)
        c.state, c.since = "open", now
        self.selector.modify(c.sock, selectors.EVENT_READ, c)
        self.trickle(c, now)

    def trickle(self, c: Connection, now: float) -> None:
        payload = c.target.payload
        if c.sock is None or c.sent >= len(payload):
            return
        try:
            c.sock.send(payload[c.sent:c.sent + 1])
            c.sent += 1
        except OSError:
            return  # the read side sees the close
        c.due = now + c.target.interval
        self._later(c.due, c)

    def readable(self, c: Connection, now: float) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(65536)
        except OSError:
            data = b""
        if data:
            return  # whatever the server says: keep holding
        t = c.target
        t.closed_by_server += 1
        t.held.append(round(now - c.since, 2))
        self.close(c)
        self.open(c, now)

    def timer(self, c: Connection, now: float) -> None:
        if c.state == "idle":
            self.open(c, now)
        elif c.state == "connecting" and now >= c.due:
            c.target.connect_timeouts += 1
            self.close(c)
            self.open(c, now)
        elif c.state == "open" and now >= c.due:
            self.trickle(c, now)

    def run(self, seconds: float) -> float:
        started = time.monotonic()
        for c in self.connections:
            self.open(c, started)
        stop_at = started + seconds
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            wait = min(1.0, stop_at - now)
            if self.timers:
                wait = max(0.0, min(wait, self.timers[0][0] - now))
            for key, events in self.selector.select(wait):
                c = key.data
                now = time.monotonic()
                if events & selectors.EVENT_WRITE and c.state == "connecting":
                    self.writable(c, now)
                elif events & selectors.EVENT_READ and c.state == "open":
                    self.readable(c, now)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, c = heapq.heappop(self.timers)
                self.timer(c, now)
        elapsed = time.monotonic() - started
        for c in self.connections:
            self.close(c)
        return elapsed


def sources(first: str, count: int) -> list[str]:
    start = ipaddress.IPv4Address(first)
    return [str(start + i) for i in range(count)]


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    targets = []
    for spec in config["targets"]:
        addresses = sources(spec["first"], spec["addresses"] + 1)
        spread = [a for a in addresses[:-1] for _ in range(spec["per_address"])]
        greedy = [addresses[-1]] * spec.get("greedy", 0)
        targets.append(Target(spec["name"], spec["port"], bytes.fromhex(spec["payload"]),
                              spread + greedy, spec.get("interval", 2.0)))
    elapsed = Swarm(targets).run(config["seconds"])
    print(json.dumps({"seconds": round(elapsed, 1),
                      "targets": [t.summary(elapsed) for t in targets]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
