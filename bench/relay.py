"""
Relay benchmark: our rendezvous relay (a :class:`~epsproxy.proxy.rendezvous_server.Rendezvous`
splicing by token, :mod:`bench.relay_ours`) beside HAProxy in TCP mode, socat and the
magic-wormhole transit relay, each measured in the same run (issue 4, "``make bench``
adds").

Every relay is a process of its own on loopback; the load generators
(:mod:`bench.relay_peer`) are separate processes too.  Measured:

1. **throughput**: one stream of ``BENCH_RELAY_BYTES`` (default 2,000,000,000) bytes,
   sender -> relay -> receiver, 1 MiB writes from memory and 1 MiB ``recv_into``; MB/s
   from the receiver's first byte to its end, and the relay process's CPU seconds per GB
   (``/proc/<pid>/stat``; socat's forked children included) with its user-mode part
   (what a relay adds to the kernel's copying).  ``BENCH_ROUNDS`` (default 3)
   interleaved rounds after one unrecorded warm-up each; medians, and medians of the
   per-round ratios.  The "direct" row (no relay) shows what the generator alone reaches.
2. **pairings/s** at the internal endpoint with 32 pairs in flight for
   ``BENCH_RELAY_PAIR_SECONDS`` (default 3): ours against the transit relay.  A pair is
   two connections presenting one token, one byte through, two closes.
3. **memory per idle pair**: RSS growth of a fresh relay process holding
   ``BENCH_RELAY_IDLE_PAIRS`` (default 1,000) spliced idle pairs, per pair.
4. **peak memory with slow readers**: peak RSS growth of a fresh relay process while one
   receiver reads at 200 MB/s, and while 50 receivers read at 4 MB/s each (200 MB/s in
   all), for ``BENCH_RELAY_SLOW_SECONDS`` (default 2) of data; ``BENCH_ROUNDS`` rounds.

The row "floor" (:mod:`bench.relay_floor`) is the least a Python relay does per byte: a
blocking 1 MiB read and write per step, a thread per direction, nothing else.  It is no
competitor and has no goal; it says in each run how close to the C relays Python can come
at all, so that ours is read against it too.

HAProxy (``haproxy``) and socat come from the OS (``apt-get install haproxy socat``),
the transit relay from PyPI (the ``bench`` extra); a missing competitor is skipped with a
message and its goals read "n/a".  ``BENCH_RELAY_ONLY=ours,haproxy`` limits the relays.
"ours" is the relay as the public proxy runs it (the splice engine where it was built);
"ours-python" the same with ``splice_engine: false``, in the same run.

The raw results, every round of every relay, are kept in ``run/bench-relay/results.json``;
``python -m bench.relay --report FILE`` prints the tables from such a file again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .common import (
    best_per_round,
    cell,
    free_port,
    goal,
    haproxy_binary,
    listening,
    median,
    only_from_env,
    own_scores,
    print_load_before,
    print_saved_report,
    ratios,
    rotations,
    rss_bytes,
    save_results,
    step,
    table,
    times,
)
from .relay_peer import CHUNK, TRANSIT_OK, ControlClient, transit_hello

__all__ = ["RELAYS", "Relay", "RelayProcess", "available", "run", "report", "main"]

ROOT = Path(__file__).resolve().parent.parent
#: Where a run keeps its raw results (``results.json``), for ``--report``.
RESULTS_DIR = ROOT / "run" / "bench-relay"
GB = 1e9
#: Goals of issue 4.
THROUGHPUT_GOAL = 1.0     # ours / best-tuned relay in the same run, at least
CPU_GOAL = 0.25           # ours, relay CPU s/GB, at most
CPU_RATIO_GOAL = 1.05     # ours / best-tuned relay's CPU s/GB in the same round (issue 14)
PAIRING_GOAL = 2.0        # ours / transit relay pairings per second, at least
IDLE_GOAL = 6000.0        # bytes of RSS per idle pair, at most
SLOW_RATE = 200e6         # bytes/s the slow receivers read, in all
SLOW_STREAMS = 50
IN_FLIGHT = 32


@dataclass(frozen=True)
class Relay:
    """One relay measured: its key, the label of its rows and how parties reach it."""

    key: str
    label: str
    kind: str   # "direct" (no relay), "forward" (HAProxy, socat), "ours", "transit"
    option: str = ""


RELAYS = (
    Relay("direct", "direct, no relay (generator ceiling)", "direct"),
    Relay("ours", "ours: Rendezvous + splice engine", "ours"),
    Relay("ours-python", "ours, splice_engine: false (the Python splice)", "ours", "python"),
    Relay("haproxy", "HAProxy mode tcp, default buffers", "forward"),
    Relay("haproxy-1m", "HAProxy mode tcp, tune.bufsize 1048576", "forward", "1048576"),
    Relay("socat-128k", "socat -b 131072", "forward", "131072"),
    Relay("socat-1m", "socat -b 1048576", "forward", "1048576"),
    Relay("transit", "magic-wormhole transit relay", "transit"),
    Relay("floor", "floor: Python, blocking I/O, a thread per direction, 1 MiB", "forward",
          "1048576"),
)
BY_KEY = {relay.key: relay for relay in RELAYS}
#: The best-tuned relays: ours must reach at least the better of them in each round.
BEST_TUNED = ("haproxy-1m", "socat-1m")
#: The relay that shows how close to them Python can come at all (:mod:`bench.relay_floor`).
FLOOR = "floor"


def available(relay: Relay) -> str | None:
    """``None`` when ``relay`` can run here, else what to install."""
    if relay.key.startswith("haproxy") and haproxy_binary() is None:
        return "haproxy not installed (apt-get install haproxy)"
    if relay.key.startswith("socat") and shutil.which("socat") is None:
        return "socat not installed (apt-get install socat)"
    if relay.kind == "transit" and importlib.util.find_spec("wormhole_transit_relay") is None:
        return "magic-wormhole-transit-relay not installed (pip install -e '.[bench]')"
    if relay.kind == "ours":
        impl = os.environ.get("BENCH_RELAY_IMPL", "epsproxy.proxy.rendezvous_server:x")
        module = impl.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{module} not found"
    return None


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class RelayProcess:
    """A running relay: its process, the port parties dial, and (forwarding) its target."""

    def __init__(self, relay: Relay, base: Path) -> None:
        self.relay = relay
        self.base = base
        self.process: subprocess.Popen | None = None
        self.port = self.dst = self.control = 0
        self.log = base / f"{relay.key}.log"
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        relay = self.relay
        if relay.kind == "direct":
            self.port = self.dst = free_port()
            return
        if relay.kind == "ours":
            config = [json.dumps({"splice_engine": False})] if relay.option == "python" else []
            self._spawn([sys.executable, "-m", "bench.relay_ours", *config],
                        stdout=subprocess.PIPE)
            assert self.process is not None and self.process.stdout is not None
            line = self.process.stdout.readline().split()
            if len(line) != 4:
                self._died(f"printed {line!r}")
            self.port, self.control = int(line[1]), int(line[3])
            return
        self.port = free_port()
        if relay.key.startswith("haproxy"):
            self.dst = free_port()
            config = self.base / f"{relay.key}.cfg"
            config.write_text("\n".join([
                "global",
                "    maxconn 5000",
                *([f"    tune.bufsize {relay.option}"] if relay.option else []),
                "defaults",
                "    mode tcp",
                "    timeout connect 5s",
                "    timeout client 1h",
                "    timeout server 1h",
                "frontend bench",
                f"    bind 127.0.0.1:{self.port}",
                "    default_backend target",
                "backend target",
                f"    server target 127.0.0.1:{self.dst}",
                ""]))
            self._spawn([haproxy_binary(), "-f", str(config), "-db"])
        elif relay.key == FLOOR:
            self.dst = free_port()
            self._spawn([sys.executable, "-m", "bench.relay_floor", str(self.port),
                         str(self.dst), relay.option])
        elif relay.key.startswith("socat"):
            self.dst = free_port()
            self._spawn(["socat", "-b", relay.option,
                         f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                         f"TCP:127.0.0.1:{self.dst}"])
        else:
            # The transit relay as its operators run it: twistd's transitrelay plugin.
            self._spawn([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                         "-n", "--pidfile=", "--logfile", str(self.base / "transit.twistd.log"),
                         "transitrelay",
                         f"--port=tcp:{self.port}:interface=127.0.0.1:backlog=1024"])
        deadline = time.monotonic() + 30
        while not listening(self.port):
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._died("did not listen")
            time.sleep(0.02)

    def _spawn(self, argv: list[Any], stdout: Any = subprocess.DEVNULL) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=log,
                                            stdin=subprocess.DEVNULL)

    def _died(self, what: str) -> None:
        raise RuntimeError(f"{self.relay.key} {what}:\n"
                           f"{self.log.read_text(errors='replace')[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu(self) -> float:
        """CPU seconds of the relay, its reaped children's (socat forks) and its live ones'."""
        if self.process is None:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        total = sum(int(x) for x in _stat(self.pid)[11:15])
        for child in _children(self.pid):
            try:
                total += sum(int(x) for x in _stat(child)[11:13])
            except OSError:
                pass
        return total / ticks

    def cpu_user(self) -> float:
        """The user-mode part of :meth:`cpu` (the rest is the kernel's copying and calls)."""
        if self.process is None:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        stat = _stat(self.pid)
        total = int(stat[11]) + int(stat[13])
        for child in _children(self.pid):
            try:
                total += int(_stat(child)[11])
            except OSError:
                pass
        return total / ticks

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until forked per-connection children are gone (their CPU is then reaped)."""
        deadline = time.monotonic() + timeout
        while self.process is not None and _children(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def rss(self) -> int:
        return rss_bytes(self.pid) if self.process is not None else 0

    def stats(self) -> dict[str, Any]:
        """Our relay's counters (empty for the others)."""
        if self.relay.kind != "ours":
            return {}
        control = ControlClient(self.control)
        try:
            return control.stats()
        finally:
            control.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


class PeakRSS:
    """The peak RSS of a process while a block runs: ``VmHWM`` reset, plus polling."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.base = self.peak = relay.rss()
        self._stop = threading.Event()
        self._reset = False
        try:
            Path(f"/proc/{relay.pid}/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            pass
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.relay.rss())

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        if self._reset:
            for line in Path(f"/proc/{self.relay.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
        return self.peak - self.base


def _peer(role: str, config: dict[str, Any], stdin: Any = subprocess.DEVNULL
          ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.relay_peer", role, json.dumps(config)],
                            cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen, what: str, timeout: float) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise RuntimeError(f"{what} timed out:\n{err.decode(errors='replace')[-3000:]}")
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed ({process.returncode}):\n"
                           f"{err.decode(errors='replace')[-3000:]}")
    return json.loads(out.splitlines()[-1])


def _wait_line(process: subprocess.Popen, expected: bytes, what: str) -> None:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != expected:
        process.kill()
        _out, err = process.communicate()
        raise RuntimeError(f"{what}: got {line!r}, not {expected!r}:\n"
                           f"{err.decode(errors='replace')[-3000:]}")


def _stream_configs(relay: RelayProcess, streams: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sink's and the source's configs for ``streams`` streams through ``relay``."""
    kind = relay.relay.kind
    if kind in ("direct", "forward"):
        return ({"listen": relay.dst, "count": streams},
                {"port": relay.port, "streams": [{}] * streams})
    if kind == "ours":
        control = ControlClient(relay.control)
        try:
            tokens = control.tokens(streams)
        finally:
            control.close()
        hellos = [{"hello": t.hex()} for t in tokens]
        return {"port": relay.port, "streams": hellos}, {"port": relay.port, "streams": hellos}
    tokens = [secrets.token_bytes(32) for _ in range(streams)]
    ok = TRANSIT_OK.hex()
    return ({"port": relay.port, "streams": [
                {"hello": transit_hello(t, b"sink0001").hex(), "expect": ok} for t in tokens]},
            {"port": relay.port, "streams": [
                {"hello": transit_hello(t, b"source01").hex(), "expect": ok} for t in tokens]})


def transfer(relay: RelayProcess, size: int, streams: int = 1, rate: float = 0,
             peak: bool = False) -> dict[str, Any]:
    """
    ``streams`` streams of ``size`` bytes each through ``relay``, each receiver reading at
    most ``rate`` bytes/s when given.  Returns bytes, seconds, relay CPU, generator CPU and
    (with ``peak``) the relay's peak RSS growth.
    """
    sink_config, source_config = _stream_configs(relay, streams)
    sink_config["rate"] = rate
    if rate:
        sink_config["chunk"] = 65536
    source_config["bytes"] = size
    budget = 120 + size * streams / (rate * streams if rate else 100e6)
    sink = _peer("sink", sink_config)
    source = None
    try:
        _wait_line(sink, b"ready", f"{relay.relay.key} sink")
        monitor = PeakRSS(relay) if peak and relay.process is not None else None
        cpu, user = relay.cpu(), relay.cpu_user()
        started = time.perf_counter()
        source = _peer("source", source_config)
        sent = _finish(source, f"{relay.relay.key} source", budget)
        received = _finish(sink, f"{relay.relay.key} sink", budget)
        wall = time.perf_counter() - started
        growth = monitor.growth() if monitor is not None else None
    finally:
        # After a failure, no generator may linger.
        for process in (source, sink):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
    relay.settle()
    relay_cpu = relay.cpu() - cpu
    relay_user = relay.cpu_user() - user
    if received["bytes"] != [size] * streams:
        raise RuntimeError(f"{relay.relay.key}: received {received['bytes']} bytes, "
                           f"not {size} on each of {streams} stream(s)")
    return {"bytes": size * streams, "seconds": received["seconds"], "wall": wall,
            "relay_cpu": relay_cpu, "relay_user": relay_user,
            "generator_cpu": sent["cpu"] + received["cpu"],
            "rss_growth": growth}


def pairings(relay: RelayProcess, seconds: float, warmup: float) -> dict[str, Any]:
    """The pairing rate with :data:`IN_FLIGHT` pairs in flight, and the relay's CPU."""
    config = {"kind": relay.relay.kind, "port": relay.port, "control": relay.control,
              "in_flight": IN_FLIGHT, "seconds": seconds, "warmup": warmup,
              "relay_pid": relay.pid}
    # The generator reads the relay's CPU itself, at the bounds of the counted part.
    return _finish(_peer("pairs", config), f"{relay.relay.key} pairs", 120 + seconds * 3)


def idle_pairs(relay: RelayProcess, count: int) -> dict[str, Any]:
    """RSS growth of ``relay`` holding ``count`` idle spliced pairs (after 20 as a warm-up)."""
    config = {"kind": relay.relay.kind, "port": relay.port, "control": relay.control,
              "listen": relay.dst}
    result: dict[str, Any] = {}
    for phase, pairs in (("warmup", 20), ("measured", count)):
        before = relay.rss()
        holder = _peer("idle", dict(config, pairs=pairs), stdin=subprocess.PIPE)
        _wait_line(holder, b"ready", f"{relay.relay.key} idle pairs")
        held = relay.rss()
        stats = relay.stats()
        assert holder.stdin is not None
        holder.stdin.write(b"close\n")
        holder.stdin.close()
        _wait_line(holder, b"closed", f"{relay.relay.key} idle pairs")
        holder.wait(timeout=30)
        holder.stdout.close()  # type: ignore[union-attr]
        holder.stderr.close()  # type: ignore[union-attr]
        if phase == "measured":
            result = {"before": before, "held": held, "pairs": pairs,
                      "active": stats.get("active_splices")}
    # Our relay must let go of every pair (the closes propagate asynchronously).
    deadline = time.monotonic() + 5
    while relay.relay.kind == "ours":
        stats = relay.stats()
        if not stats.get("active_splices") and not stats.get("pending"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"ours still holds pairs after they closed: {stats}")
        time.sleep(0.05)
    return result


# -- the run ---------------------------------------------------------------------------

def _settings() -> dict[str, Any]:
    env = os.environ.get
    return {
        "size": int(float(env("BENCH_RELAY_BYTES", "2e9"))),
        "rounds": int(env("BENCH_ROUNDS", "3")),
        "pair_seconds": float(env("BENCH_RELAY_PAIR_SECONDS", "3")),
        "idle_pairs": int(env("BENCH_RELAY_IDLE_PAIRS", "1000")),
        "slow_seconds": float(env("BENCH_RELAY_SLOW_SECONDS", "2")),
    }


def _relays(only: Sequence[str] | None) -> list[Relay]:
    wanted = [BY_KEY[k] for k in only] if only else list(RELAYS)
    out = []
    for relay in wanted:
        missing = available(relay)
        if missing:
            print(f"skipping {relay.key}: {missing}", flush=True)
        else:
            out.append(relay)
    return out


def run(size: int = 2_000_000_000, rounds: int = 3, pair_seconds: float = 3.0,
        idle_pairs_count: int = 1000, slow_seconds: float = 2.0,
        only: Sequence[str] | None = None, slow_streams: int = SLOW_STREAMS,
        ) -> dict[str, Any]:
    """
    Every measurement for the relays of ``only`` (default: all) that are installed.
    Returns ``{"throughput": {key: [round, ...]}, "pairings": {key: [round, ...]},
    "idle": {key: result}, "slow1": {key: [round, ...]}, "slow50": {key: [round, ...]},
    "settings": {...}}``.
    """
    relays = _relays(only)
    results: dict[str, Any] = {"settings": {
        "size": size, "rounds": rounds, "pair_seconds": pair_seconds,
        "idle_pairs": idle_pairs_count, "slow_seconds": slow_seconds,
        "slow_streams": slow_streams}, "throughput": {}, "pairings": {}, "idle": {},
        "slow1": {}, "slow50": {}}
    base = Path(tempfile.mkdtemp(prefix="epsproxy-bench-relay-"))
    try:
        def fresh(relay: Relay, body: Callable[[RelayProcess], Any]) -> Any:
            process = RelayProcess(relay, base)
            try:
                return body(process)
            finally:
                process.stop()

        # 1. Throughput: every relay, one process each for all rounds.
        running: list[RelayProcess] = []
        try:
            for relay in relays:
                running.append(RelayProcess(relay, base))
            for process in running:
                step(f"throughput warm-up: {process.relay.key}")
                transfer(process, max(size // 10, 1 << 20))
            for index, order in enumerate(rotations(running, rounds)):
                for process in order:
                    step(f"throughput round {index + 1}/{rounds}: {process.relay.key}")
                    results["throughput"].setdefault(process.relay.key, []).append(
                        transfer(process, size))
            # 2. Pairings: ours against the transit relay.
            pairing = [p for p in running if p.relay.kind in ("ours", "transit")]
            for index, order in enumerate(rotations(pairing, rounds)):
                for process in order:
                    step(f"pairings round {index + 1}/{rounds}: {process.relay.key}")
                    results["pairings"].setdefault(process.relay.key, []).append(
                        pairings(process, pair_seconds, min(0.5, pair_seconds / 4)))
        finally:
            for process in running:
                process.stop()

        # 3. Idle pairs, and 4. slow readers: fresh processes, so that no earlier test's
        # freed heap hides growth.
        for relay in relays:
            if relay.key in ("ours", "ours-python", "haproxy", "haproxy-1m", "transit"):
                step(f"{idle_pairs_count} idle pairs: {relay.key}")
                results["idle"][relay.key] = fresh(
                    relay, lambda p: idle_pairs(p, idle_pairs_count))
        slow_size = int(SLOW_RATE * slow_seconds)
        slow = [r for r in relays if r.key in ("ours", "ours-python", "haproxy", "haproxy-1m")]
        for index, order in enumerate(rotations(slow, rounds)):
            for relay in order:
                step(f"slow readers round {index + 1}/{rounds}: {relay.key}, one at 200 MB/s")
                one = fresh(relay, lambda p: transfer(p, slow_size, rate=SLOW_RATE, peak=True))
                results["slow1"].setdefault(relay.key, []).append(one)
                step(f"slow readers round {index + 1}/{rounds}: {relay.key}, {slow_streams} at "
                     f"{SLOW_RATE / slow_streams / 1e6:g} MB/s")
                many = fresh(relay, lambda p: transfer(
                    p, slow_size // slow_streams, streams=slow_streams,
                    rate=SLOW_RATE / slow_streams, peak=True))
                results["slow50"].setdefault(relay.key, []).append(many)
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the report ------------------------------------------------------------------------

def report(results: dict[str, Any]) -> str:
    """The tables (medians over rounds, min-max) and the goal lines of issue 4."""
    s = results["settings"]
    out = []
    tp = results["throughput"]
    mbps = {k: [r["bytes"] / r["seconds"] / 1e6 for r in v] for k, v in tp.items()}
    cpu_gb = {k: [r["relay_cpu"] / (r["bytes"] / GB) for r in v] for k, v in tp.items()}
    rows = []
    for relay in RELAYS:
        if relay.key not in tp:
            continue
        runs = tp[relay.key]
        vs_ours = ratios(mbps.get("ours", []), mbps[relay.key])
        rows.append([
            relay.label, cell(mbps[relay.key]),
            "-" if relay.key in ("ours", "direct") or not vs_ours
            else cell(vs_ours, ".2f"),
            "-" if relay.kind == "direct" else
            f"{cell(cpu_gb[relay.key], '.2f')}; user "
            f"{median([r.get('relay_user', 0.0) / (r['bytes'] / GB) for r in runs]):.3f}",
            "-" if relay.kind == "direct" else
            f"{median([r['relay_cpu'] / r['seconds'] for r in runs]) * 100:.0f}%",
            cell([r["generator_cpu"] / (r["bytes"] / GB) for r in runs], ".2f", False),
        ])
    out += [f"Throughput: one stream of {s['size']:,} bytes, the sender writing "
            f"{CHUNK:,} bytes at a time (the write size moves every relay's CPU per GB), "
            f"{s['rounds']} interleaved round(s); medians (min-max)\n",
            table(["relay", "MB/s", "ours / this (per round)", "relay CPU s/GB (user part)",
                   "relay CPU % wall", "generator CPU s/GB"], rows), ""]

    pr = results["pairings"]
    rows = []
    for key in ("ours", "ours-python", "transit"):
        if key not in pr:
            continue
        runs = pr[key]
        rows.append([BY_KEY[key].label,
                     cell([r["pairs"] / r["seconds"] for r in runs]),
                     f"{median([r['p50_ms'] for r in runs]):.2f} / "
                     f"{median([r['p99_ms'] for r in runs]):.2f}",
                     cell([r["relay_cpu"] / r["pairs"] * 1e6 for r in runs if r["pairs"]],
                           ",.0f", False),
                     f"{median([r['relay_cpu'] / r['seconds'] for r in runs]) * 100:.0f}%",
                     f"{median([r['cpu'] / r['seconds'] for r in runs]) * 100:.0f}%",
                     str(sum(r["errors"] for r in runs))])
    if rows:
        out += [f"Pairings at the internal endpoint, {IN_FLIGHT} in flight, "
                f"{s['pair_seconds']:g} s per round\n",
                table(["relay", "pairs/s", "latency p50 / p99 ms", "relay CPU µs/pair",
                       "relay CPU % wall", "generator CPU % wall", "errors"], rows), ""]

    rows = []
    for relay in RELAYS:
        idle = results["idle"].get(relay.key)
        slow1 = results["slow1"].get(relay.key)
        slow50 = results["slow50"].get(relay.key)
        if not (idle or slow1 or slow50):
            continue
        per_pair = (idle["held"] - idle["before"]) / idle["pairs"] if idle else None
        slow_cells = []
        for runs in (slow1, slow50):
            slow_cells += [
                cell([r["bytes"] / r["seconds"] / 1e6 for r in runs], ",.0f", False)
                if runs else "-",
                cell([r["rss_growth"] / 1e6 for r in runs], ".1f") if runs else "-"]
        rows.append([
            relay.label,
            f"{idle['before'] / 1e6:.1f} -> {idle['held'] / 1e6:.1f}" if idle else "-",
            f"{per_pair / 1e3:.1f}" if idle else "-",
            *slow_cells,
        ])
    if rows:
        out += [f"Memory (fresh relay process each): {s['idle_pairs']:,} idle spliced pairs; "
                f"one receiver at 200 MB/s; {s['slow_streams']} receivers at "
                f"{SLOW_RATE / s['slow_streams'] / 1e6:g} MB/s each "
                f"({s['slow_seconds']:g} s of data; {s['rounds']} round(s), medians)\n",
                table(["relay", "RSS MB idle -> with pairs", "KB per idle pair",
                       "1 slow: MB/s", "1 slow: peak RSS growth MB",
                       f"{s['slow_streams']} slow: MB/s", f"{s['slow_streams']} slow: "
                       "peak RSS growth MB"], rows), ""]

    # Goals.
    best = best_per_round(mbps, BEST_TUNED, max)
    through = ratios(mbps.get("ours", []), best) if best else []
    ours_cpu = cpu_gb.get("ours", [])
    best_cpu = best_per_round(cpu_gb, BEST_TUNED, min)
    cpu_ratio = ratios(ours_cpu, best_cpu) if best_cpu else []
    pair_ratio = ratios([r["pairs"] / r["seconds"] for r in pr.get("ours", [])],
                         [r["pairs"] / r["seconds"] for r in pr.get("transit", [])])
    idle = results["idle"].get("ours")
    idle_values = [(idle["held"] - idle["before"]) / idle["pairs"]] if idle else []
    slow = results["slow50"]
    slow_values = [a["rss_growth"] / 1e6 - b["rss_growth"] / 1e6
                   for a, b in zip(slow.get("ours", []), slow.get("haproxy", []))]
    out.append(table(["goal", "median (min-max over rounds)", "target", "result"], [
        goal("ours MB/s / best-tuned relay (HAProxy 1 MiB, socat -b 1 MiB) per round",
              through, f">= {THROUGHPUT_GOAL:g}x", lambda v: v >= THROUGHPUT_GOAL),
        goal("ours relay CPU s/GB", ours_cpu, f"<= {CPU_GOAL:g}", lambda v: v <= CPU_GOAL,
              unit=""),
        goal("ours CPU per GB / best-tuned relay's (per round)", cpu_ratio,
              f"<= {CPU_RATIO_GOAL:g}x", lambda v: v <= CPU_RATIO_GOAL),
        goal("ours pairings/s / transit relay's (per round)", pair_ratio,
              f">= {PAIRING_GOAL:g}x", lambda v: v >= PAIRING_GOAL),
        goal("ours RSS per idle pair", [v / 1e3 for v in idle_values],
              f"<= {IDLE_GOAL / 1e3:g} KB", lambda v: v <= IDLE_GOAL / 1e3, ".1f", " KB"),
        goal(f"ours peak RSS growth - HAProxy's, {s['slow_streams']} slow receivers",
              slow_values, "<= 0 MB", lambda v: v <= 0, ".1f", " MB"),
    ]))
    own_mbps, own_cpu = own_scores(mbps, BEST_TUNED, max), own_scores(cpu_gb, BEST_TUNED, min)
    if len(own_mbps) > 1:
        out.append(
            "\nThe same per-round statistic for the best-tuned relays themselves (each "
            "against the better of them in its round; a relay at par with them reads "
            "under 1.0x in most runs): " + "; ".join(
                f"{BY_KEY[key].label} MB/s {times(own_mbps[key])}, CPU per GB "
                f"{times(own_cpu.get(key, []))}" for key in own_mbps) + ".")
    if FLOOR in mbps and best and best_cpu:
        out.append(
            f"\nThe floor (a Python relay doing nothing but a blocking read and write of "
            f"1 MiB per step, bench/relay_floor.py), per round against the best-tuned relay: "
            f"MB/s {times(ratios(mbps[FLOOR], best))}, CPU per GB "
            f"{times(ratios(cpu_gb[FLOOR], best_cpu))}; ours against the floor: "
            f"MB/s {times(ratios(mbps.get('ours', []), mbps[FLOOR]))}, CPU per GB "
            f"{times(ratios(ours_cpu, cpu_gb[FLOOR]))}.")
    return "\n".join(out)


def main() -> None:
    settings = _settings()
    only = only_from_env("BENCH_RELAY_ONLY", list(BY_KEY), "relay(s)")
    print_load_before("CPU s/GB and rates")
    results = run(size=settings["size"], rounds=settings["rounds"],
                  pair_seconds=settings["pair_seconds"],
                  idle_pairs_count=settings["idle_pairs"],
                  slow_seconds=settings["slow_seconds"], only=only or None)
    kept = save_results(results, RESULTS_DIR)
    print(report(results))
    print(f"load average after the run: {os.getloadavg()[0]:.2f}; every round's figures "
          f"are in {kept}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"] and len(sys.argv) == 3:
        # The tables again from a run's results.json (run/bench-relay/results.json).
        sys.exit(print_saved_report(report, sys.argv[2]))
    else:
        main()
