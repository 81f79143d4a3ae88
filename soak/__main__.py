"""
``python -m soak [--run-dir DIR] [--seconds N] [--tls-clients N] [--eps-calls N]``
(``make soak``): start the dev network, load it for ``--seconds`` with checked traffic,
sample every process's resident memory and open file descriptors every 5 s, wait for
the descriptors to come back to their baseline, and print the report.

Streams (two load processes, :mod:`soak.load`):

- ``sni-echo``: ``--tls-clients`` (default 1000) concurrent HTTPS clients through the
  public proxy's port 4433 (SNI ``test.internal-server.local``; public proxy → private
  proxy, which terminates TLS → example internal server), each POSTing random 1-64 KiB
  JSON that must come back byte for byte (SHA-256), keep-alive with random reconnects;
- ``p2p-ping``: ``--eps-calls`` (default 200) calls in flight to ``hd-2._ping`` at hd-1's
  gateway (through the public proxy's splice), each with a random payload in ``params``
  that must come back identical, once, with the call's id.

The network's logs, pid files, the load processes' output and the report
(``soak-report.md``) are in ``--run-dir`` (default ``run/soak``).  Exit status 0 only if
no answer was corrupted or lost, every error is an explained one, every process is still
alive and every process's fds came back to the baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from epsproxy.dev import demo

from .report import (
    EXPLAINED,
    ProcessSeries,
    StreamStats,
    fds_back,
    process_table,
    stream_table,
    unexplained,
)

SAMPLE_SECONDS = 5.0


def accept_queues() -> dict[int, tuple[int, int]]:
    """Listening TCP ports on this machine: port -> (connections waiting in the accept
    queue, backlog), from ``ss -ltn``; empty if ``ss`` is missing."""
    try:
        text = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True,
                              timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    queues = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1].isdigit() and fields[2].isdigit():
            port = fields[3].rsplit(":", 1)[-1]
            if port.isdigit():
                queues[int(port)] = (int(fields[1]), int(fields[2]))
    return queues


class Sampler:
    """Samples every process of the network every :data:`SAMPLE_SECONDS` in a thread
    (and, every second, the accept queues of the network's listening ports)."""

    def __init__(self, series: list[ProcessSeries]) -> None:
        self.series = series
        #: port -> (largest accept queue seen, backlog)
        self.queues: dict[int, tuple[int, int]] = {}
        self.t0 = time.monotonic()
        self.count = 0
        self._stop = threading.Event()
        self._sampled = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-sampler")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic() - self.t0
            for s in self.series:
                if not s.gone:
                    s.add(t)
            with self._sampled:
                self.count += 1
                self._sampled.notify_all()
            for _ in range(int(SAMPLE_SECONDS)):
                for port, (queued, backlog) in accept_queues().items():
                    seen = self.queues.get(port, (0, backlog))[0]
                    self.queues[port] = (max(seen, queued), backlog)
                if self._stop.wait(1):
                    return

    def wait_samples(self, n: int) -> None:
        """Return after ``n`` more samples were taken."""
        with self._sampled:
            target = self.count + n
            self._sampled.wait_for(lambda: self.count >= target, timeout=n * SAMPLE_SECONDS + 30)


def _series(run_dir: Path) -> list[ProcessSeries]:
    series = []
    for role in demo.ROLES:
        pid_file = run_dir / f"{role.name}.pid"
        if pid_file.exists():
            series.append(ProcessSeries(role.name, int(pid_file.read_text().strip())))
    return series


def _load(run_dir: Path, stream: str, clients: int, seconds: float,
          extra: list[str]) -> tuple[subprocess.Popen, Path]:
    out = run_dir / f"load-{stream}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "soak.load", stream, "--clients", str(clients),
               "--seconds", str(seconds), "--out", str(out), *extra]
    process = subprocess.Popen(command, cwd=demo.ROOT, stdin=subprocess.DEVNULL,
                               stdout=open(run_dir / f"load-{stream}.out", "wb"),
                               stderr=subprocess.STDOUT)
    return process, out


def tcp_counters() -> dict[str, int]:
    """Machine-wide TCP counters (/proc/net/netstat TcpExt) that explain refused connections."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:])))
            return {k: table.get(k, 0) for k in ("ListenOverflows", "SyncookiesSent",
                                                   "TCPAbortOnData")}
    return {}


#: What the private proxy logs when it refuses a client at one of its caps: a brokered
#: connection's ``incomingConnection`` answered 503, or a pooled connection closed (its
#: ``max_connections``, or ``max_connections_per_client`` for the client's address).
REFUSAL_LINES = re.compile(
    r"incomingConnection(?: from \S+)?: error 503"  # "... from -: error 503 in 0.000s"
    r"|max_connections are being forwarded"
    r"|max_connections_per_client are being forwarded")


def busy_refusals(run_dir: Path, since: str = "") -> int:
    """
    Clients the private proxy refused at its caps (see :data:`REFUSAL_LINES`) in the
    lines of its logs stamped ``since`` (``YYYY-MM-DDTHH:MM:SS``, the log's own clock) or
    later: the run directory keeps the logs of earlier runs.
    """
    count = 0
    for log in run_dir.glob("private-proxy-1.log*"):
        with open(log, errors="replace") as f:
            count += sum(line[:19] >= since and REFUSAL_LINES.search(line) is not None
                         for line in f)
    return count


def _rate_limited() -> float:
    return demo.metric(demo.PROXY_METRICS, "proxy_internal_rate_limited_connections") or 0.0


def run(options: argparse.Namespace) -> int:
    run_dir: Path = options.run_dir
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    demo.stop(run_dir)
    demo.check_ports_free()
    print(f"starting the dev network in {run_dir} (output in {run_dir / 'start.out'})",
          flush=True)
    try:
        with demo.output_to(run_dir / "start.out"):
            demo.start(run_dir)
    except demo.DemoError:
        print((run_dir / "start.out").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    print(f"network up in {time.monotonic() - started:.0f} s", flush=True)
    series = _series(run_dir)
    sampler = Sampler(series)
    sampler.start()
    try:
        sampler.wait_samples(3)
        for s in series:
            fds = sorted(x.fds for x in s.samples)
            s.fd_baseline = fds[len(fds) // 2] if fds else None
        limited_before = _rate_limited()
        tcp_before = tcp_counters()
        pooled_before = demo.pooled_connections()
        pooled_text = ", ".join(f"{k} {v}" for k, v in pooled_before.items())
        print(f"baseline fds: {', '.join(f'{s.name} {s.fd_baseline}' for s in series)}"
              f" (idle pooled connections: {pooled_text})", flush=True)
        t_load = time.monotonic()
        load_started = time.strftime("%Y-%m-%dT%H:%M:%S")  # the logs' clock: local time
        loads = [
            _load(run_dir, "tls", options.tls_clients, options.seconds,
                  ["--reconnect", str(options.reconnect), "--per-minute",
                   str(options.per_minute), "--sources", str(options.sources)]),
            _load(run_dir, "eps", options.eps_calls, options.seconds,
                  ["--min-bytes", "64", "--max-bytes", str(options.eps_max_bytes)]),
        ]
        print(f"load running for {options.seconds:g} s ({options.tls_clients} TLS clients "
              f"from {options.sources or 1} address(es), "
              f"{options.eps_calls} EPS calls; output in {run_dir}/load-*.out)", flush=True)
        load_failed = []
        for process, _ in loads:
            try:
                status = process.wait(options.seconds + 180)
            except subprocess.TimeoutExpired:
                process.kill()
                status = process.wait()
            if status != 0:
                load_failed.append(f"{process.args[3]} exited {status}")
        load_seconds = time.monotonic() - t_load
        limited = _rate_limited() - limited_before
        tcp_after = tcp_counters()
        print(f"load done after {load_seconds:.0f} s; waiting for fds to come back", flush=True)
        t_end = time.monotonic()
        back_after = None
        grown: dict[str, int] = {}
        while time.monotonic() - t_end < options.settle:
            sampler.wait_samples(1)
            # The pool grew under load and shrinks only as it is used (or idles out at
            # the public proxy): its idle connections are counted (from the proxies'
            # gauges), not mistaken for leaked descriptors.
            grown = {k: max(0, v - pooled_before.get(k, 0))
                     for k, v in demo.pooled_connections().items()}
            if fds_back(series, options.fd_tolerance, grown):
                back_after = time.monotonic() - t_end
                for s in series:
                    s.fds_after = s.samples[-1].fds
                break
        if back_after is not None and options.linger > 0:
            # keep looking a while: pooled connections may close later still
            sampler.wait_samples(max(1, int(options.linger / SAMPLE_SECONDS)))
    finally:
        sampler.stop()
    if back_after is None:
        for s in series:
            if s.samples and s.fd_baseline is not None and abs(
                    s.samples[-1].fds - s.fd_baseline - grown.get(s.name, 0)
            ) <= options.fd_tolerance:
                s.fds_after = s.samples[-1].fds
    streams = []
    for _, out in loads:
        if out.exists():
            streams.append(StreamStats.from_json(json.loads(out.read_text())))
        else:
            load_failed.append(f"{out.name} missing")
    gone = [s.name for s in series if s.gone]
    (run_dir / "samples.json").write_text(json.dumps(
        {s.name: [[x.t, x.rss_kib, x.fds] for x in s.samples] for s in series}))
    ports = {r.port: r.name for r in demo.ROLES}
    ports.update({demo.SNI_PORT: "public-proxy-1 TLS", 9999: "public-proxy-1 internal"})
    queues = ", ".join(f"{name} :{port} {sampler.queues[port][0]}/{sampler.queues[port][1]}"
                       for port, name in sorted(ports.items()) if port in sampler.queues)
    busy = busy_refusals(run_dir, load_started)
    for s in streams:
        # a TLS client reset right after connecting, as often as the private proxy refused
        # a client at its caps: the configured limits, not a defect
        if s.name == "sni-echo" and 0 < s.errors.get("connect_reset", 0) <= busy:
            s.errors["connect_reset (max_connections)"] = s.errors.pop("connect_reset")
            s.examples["connect_reset (max_connections)"] = s.examples.pop(
                "connect_reset", "")
    bad = sum(s.mismatches for s in streams) + sum(unexplained(s) for s in streams)
    report = "\n\n".join([
        f"Command: `python -m soak --seconds {options.seconds:g} --tls-clients "
        f"{options.tls_clients} --eps-calls {options.eps_calls}` (make soak); machine: "
        f"{demo.machine()}; load {load_seconds:.0f} s, whole run "
        f"{time.monotonic() - started:.0f} s.",
        "Streams (every answer checked by SHA-256; latency of checked answers):\n\n"
        + stream_table(streams, load_seconds),
        f"Processes (sampled every {SAMPLE_SECONDS:g} s; fds baseline = median of 3 samples "
        f"before the load; \"after\" = first sample with every process within "
        f"±{options.fd_tolerance} of its baseline, plus the idle pooled connections it "
        f"holds beyond the baseline's; \"end\" = {options.linger:g} s later):\n\n"
        + process_table(series),
        ("File descriptors back to baseline "
         + (f"{back_after:.0f} s after the load stopped." if back_after is not None
            else f"NOT within {options.settle:g} s after the load stopped.")
         + " Idle pooled connections (one descriptor at each proxy each): before the "
         + "load " + ", ".join(f"{k} {v}" for k, v in pooled_before.items())
         + "; grown by then " + (", ".join(f"{k} +{v}" for k, v in grown.items()) or "n/a")
         + " (a grown pool's surplus goes as its connections are used, or after the "
         + "public proxy's pool_idle_timeout, 300 s by default)."),
        f"Token connections refused by the public proxy's rate limit during the load: "
        f"{limited:.0f}; clients refused by the private proxy at its max_connections or "
        f"max_connections_per_client (incomingConnection 503, or a pooled connection "
        f"closed): {busy}.",
        "Largest accept queue seen per listening port (queued/backlog, `ss -ltn` every "
        "second): " + (queues or "n/a") + ".",
        "Machine-wide TCP counters during the load (/proc/net/netstat, all processes): "
        + (", ".join(f"{k} +{tcp_after.get(k, 0) - v}" for k, v in tcp_before.items())
           or "n/a") + ".",
        "Error examples:\n\n" + ("\n".join(
            f"- {s.name} {kind}: {text}" + (f" — explained: {EXPLAINED[kind]}"
                                           if kind in EXPLAINED else "")
            for s in streams for kind, text in s.examples.items()) or "- none"),
    ] + ([f"Load processes: {', '.join(load_failed)}."] if load_failed else [])
      + ([f"Processes GONE during the run: {', '.join(gone)}."] if gone else []))
    print("\n" + report)
    (run_dir / "soak-report.md").write_text(report + "\n")
    ok = bad == 0 and back_after is not None and not gone and not load_failed and all(
        s.ok > 0 for s in streams)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="run/soak", help="folder for logs, pids, report")
    parser.add_argument("--seconds", type=float, default=600, help="load duration (default 600)")
    parser.add_argument("--tls-clients", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=250,
                        help="loopback addresses the TLS clients come from (127.20.0.1 up; "
                             "0: all from 127.0.0.1, over the private proxy's "
                             "max_connections_per_client; default 250: 4 clients each)")
    parser.add_argument("--eps-calls", type=int, default=200)
    parser.add_argument("--reconnect", type=float, default=0.02,
                        help="chance a TLS client reconnects after a request (default 0.02)")
    parser.add_argument("--per-minute", type=int, default=900,
                        help="new TLS connections per UTC minute (the dev proxy allows 1000 "
                             "per peer)")
    parser.add_argument("--eps-max-bytes", type=int, default=16 * 1024,
                        help="largest _ping payload (default 16 KiB)")
    parser.add_argument("--settle", type=float, default=180,
                        help="seconds to wait for fds to come back (default 180)")
    parser.add_argument("--fd-tolerance", type=int, default=8)
    parser.add_argument("--linger", type=float, default=30,
                        help="seconds sampled after the fds came back (fds end, RSS end)")
    options = parser.parse_args(argv)
    options.run_dir = Path(options.run_dir).resolve()
    try:
        return run(options)
    except demo.DemoError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop(options.run_dir)


if __name__ == "__main__":
    sys.exit(main())
