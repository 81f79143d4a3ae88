"""
The faults of the chaos run and what each one measured.

Every fault follows the same steps (:func:`run_fault`): a few seconds of steady traffic,
the ``before`` check (what the part has acknowledged), the signal to the part's process
group (``kill -9``, or ``SIGTERM`` for a drain), the ``during`` check while it is down,
the restart with :func:`epsproxy.dev.demo._start_role` (the way ``make demo`` starts it) and
a wait until it answers, the ``after`` check (nothing acknowledged lost, the promised
recovery), and a wait until every stream has succeeded several times in a row.

Counted per stream: calls that *started* between the signal and the end of the fault and
failed; seconds from the restart to the end of the first call that started after the
restart and succeeded ("recover"); and the last failure after the restart (a flapping
stream shows here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from epsproxy.dev import demo

from .traffic import GatewayClient, Traffic, client_context

__all__ = ["Fault", "FaultResult", "Network", "run_fault"]

ROLES = {role.name: role for role in demo.ROLES}


class Network:
    """
    The dev network started from ``run_dir``: signal and restart its roles.

    ``overlays`` are the extra settings folders the roles were started with (see
    :func:`epsproxy.dev.demo.start`); ``extra`` are other processes that faults may hit, by
    name, each with a pid file ``run_dir/<name>.pid`` and a ``start()`` that starts it
    again and returns the seconds until it answers (the chaos run's ``redis``).
    """

    def __init__(self, run_dir: Path, overlays: Mapping[str, Path] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.overlays = dict(overlays or {})
        self.extra = dict(extra or {})

    def pid(self, role: str) -> int:
        return int((self.run_dir / f"{role}.pid").read_text().strip())

    def signal(self, role: str, number: int) -> float:
        """Send ``number`` to the role's process group; the time it was sent."""
        now = time.monotonic()
        os.killpg(self.pid(role), number)
        return now

    def wait_exit(self, role: str, seconds: float) -> float | None:
        """Seconds until the role's process is gone (reaped), or None if it is still there."""
        start = time.monotonic()
        if demo._wait_gone(self.pid(role), seconds):
            return time.monotonic() - start
        return None

    def restart(self, role: str) -> float:
        """Start the role again as ``make demo`` does; seconds until it answers."""
        start = time.monotonic()
        if role in self.extra:
            self.extra[role].start()
            return time.monotonic() - start
        process = demo._start_role(self.run_dir, ROLES[role], self.overlays)
        demo._wait_ready(self.run_dir, ROLES[role], process, seconds=60)
        return time.monotonic() - start


@dataclass
class FaultResult:
    """What one fault measured (seconds relative to the restart unless said otherwise)."""

    name: str
    signal: str
    down: float = 0.0
    exit_seconds: float | None = None
    ready: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    recover: dict[str, float | None] = field(default_factory=dict)
    last_failure: dict[str, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    lost: str = "-"
    notes: list[str] = field(default_factory=list)
    recovered: bool = True
    #: Monotonic time the signal was sent (for checks that time things from it).
    t_signal: float = 0.0

    @property
    def worst_recovery(self) -> float | None:
        affected = [v for s, v in self.recover.items() if self.failed[s]]
        if any(v is None for v in affected):
            return None
        return max(affected, default=0.0)  # type: ignore[type-var]


Check = Callable[[FaultResult], None]


@dataclass
class Fault:
    """Signal ``roles`` (in order), keep them down ``down`` seconds, restart them (in order)."""

    name: str
    roles: tuple[str, ...]
    signal: int = signal.SIGKILL
    before: Check | None = None
    during: Check | None = None
    after: Check | None = None


def _check(check: Check | None, result: FaultResult) -> None:
    """Run one of a fault's checks; an exception is a finding, not the end of the run."""
    if check is None:
        return
    try:
        check(result)
    except Exception as e:
        result.recovered = False
        result.notes.append(f"check {check.__name__} failed: {type(e).__name__}: {e}"[:300])


def _streak(traffic: Traffic, since: float, length: int) -> bool:
    """Whether every stream's last ``length`` calls started after ``since`` succeeded."""
    for stream in traffic.streams:
        done = sorted((o for o in traffic.window(since, float("inf"), stream.name)),
                      key=lambda o: o.start)
        if len(done) < length or not all(o.ok for o in done[-length:]):
            return False
    return True


def run_fault(network: Network, traffic: Traffic, fault: Fault, *, baseline: float,
              down: float, recovery_timeout: float = 60.0, settle: float = 2.0) -> FaultResult:
    """Run one fault under ``traffic``; see the module docstring."""
    result = FaultResult(fault.name, signal.Signals(fault.signal).name)
    print(f"\n== {fault.name}: {result.signal} {', '.join(fault.roles)}", flush=True)
    time.sleep(baseline)
    _check(fault.before, result)
    pids = {role: network.pid(role) for role in fault.roles}
    t_signal = result.t_signal = time.monotonic()
    for role in fault.roles:
        network.signal(role, fault.signal)
    exits = [network.wait_exit(role, 30) for role in fault.roles]
    if any(e is None for e in exits):
        result.notes.append("did not exit within 30 s of the signal (SIGKILL sent)")
        for role in fault.roles:
            network.signal(role, signal.SIGKILL)
            network.wait_exit(role, 10)
        result.recovered = False
    else:
        result.exit_seconds = max(e for e in exits if e is not None)
    _check(fault.during, result)
    remaining = t_signal + down - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    t_restart = time.monotonic()
    result.down = t_restart - t_signal
    for role in fault.roles:
        result.ready = max(result.ready, network.restart(role))
    print(f"   restarted {', '.join(f'{r} (was pid {p}, now {network.pid(r)})' for r, p in pids.items())}"
          f" in {result.ready:.1f} s", flush=True)
    _check(fault.after, result)
    deadline = time.monotonic() + recovery_timeout
    while not _streak(traffic, t_restart, 5):
        if time.monotonic() > deadline:
            result.recovered = False
            result.notes.append(f"traffic not recovered {recovery_timeout:.0f} s after restart")
            break
        time.sleep(0.2)
    time.sleep(settle)
    t_end = time.monotonic()
    for outcome in traffic.window(t_signal, t_end):
        result.calls[outcome.stream] += 1
        if not outcome.ok:
            result.failed[outcome.stream] += 1
            result.errors[f"{outcome.stream}: {outcome.error}"] += 1
            if outcome.start >= t_restart:
                result.last_failure[outcome.stream] = max(
                    result.last_failure.get(outcome.stream, 0.0), outcome.end - t_restart)
    for stream in traffic.streams:
        firsts = [o.end - t_restart for o in traffic.window(t_restart, t_end, stream.name)
                  if o.ok]
        result.recover[stream.name] = min(firsts) if firsts else None
    return result


# -- checks used by the faults --------------------------------------------------------


def sd_tip() -> str:
    reply = demo.call(3322, "sd-1", "getTip", {}, timeout=5)
    if "error" in reply:
        raise RuntimeError(f"getTip failed: {reply['error']}")
    return (reply["result"] or {}).get("hash", "")


def submit_probe(tag: str) -> None:
    """Sign and submit one record (operator ``chaos-probe`` in group ``tag``) as hd-1."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"records": [{"name": "chaos-probe", "section": "groups", "data": [tag]}]}, f)
    try:
        env = dict(os.environ, EPS_SETTINGS=str(demo.CONF / "roles" / "hd-1"))
        done = subprocess.run([str(demo.BIN / "eps"), "sd", "submit-records", f.name],
                              env=env, cwd=demo.ROOT, capture_output=True, text=True,
                              timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"submit-records failed: {done.stdout}{done.stderr}")
    finally:
        os.unlink(f.name)


def wait_until(check: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``check()`` is true (polled every 0.1 s), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # the part asked may itself be coming back
            pass
        time.sleep(0.1)
    return None


def public_announcements_full() -> list[dict]:
    """What the public proxy lists (asked with its own certificate, which it wants)."""
    client = GatewayClient(6655, "public-proxy-1.ga",
                           client_context(demo.CERTS, "public-proxy-1.ga"))
    return list(client.call("getAnnouncements", {}))


def public_announcements() -> list[str]:
    """Domains the public proxy lists."""
    return sorted(a["domain"] for a in public_announcements_full())


def private_announcements() -> list[str]:
    reply = demo.call(8877, "", "getAnnouncements", {}, timeout=5)
    if "error" in reply:
        raise RuntimeError(f"getAnnouncements failed: {reply['error']}")
    return sorted(a["domain"] for a in reply["result"])


class LongConnection:
    """
    One TLS connection through the SNI path kept open with a GET every 0.2 s (HTTP
    keep-alive), to see what a drain does to a spliced connection that is in use.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self.requests = 0
        self.ended_at: float | None = None
        self.how = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-long")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import http.client

        from .traffic import _Resolved

        connection = _Resolved(self.host, self.port, context=self.context, timeout=10)
        try:
            while not self._stop.is_set():
                connection.request("GET", "/long")
                response = connection.getresponse()
                response.read()
                if response.status != 200 or response.will_close:
                    self.how = f"status {response.status}, will_close={response.will_close}"
                    break
                self.requests += 1
                self._stop.wait(0.2)
            else:
                self.how = "still open when the check ended"
                return
        except (OSError, http.client.HTTPException, ssl.SSLError) as e:
            self.how = f"{type(e).__name__}: {e}"[:120]
        finally:
            connection.close()
        self.ended_at = time.monotonic()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
