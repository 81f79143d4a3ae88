"""
Smoke test of the SNI benchmark (``python -m bench sni``), so it cannot rot: a tiny run
(one round, a fraction of a second per connection-rate run, 10 MB streams, 20 idle
connections) of every path -- nginx directly, our public + private proxies (raw forward
and terminating, real ``twistd`` processes), the HAProxy chain and the terminating HAProxy
chain -- through the real load client, and the report's table, goal and like-for-like
lines.  nginx is Debian's (``make bench``
installs it); without it the test is skipped with a message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import sni
from bench.common import haproxy_binary
from bench.sni_network import Network, missing_tools

STREAM = 10_000_000
IDLE = 20
CLIENTS = (1, 4)
PATHS = ("direct", "ours-raw", "ours-term", "haproxy", "haproxy-term", "floor")


def skip_without_tools(case: SynchronousTestCase, what: str, *, haproxy: bool = False) -> None:
    """Skip ``case`` with a message naming what ``what`` needs and this machine lacks."""
    missing = missing_tools() + ([] if not haproxy or haproxy_binary() else ["haproxy"])
    if missing:
        case.skipTest(f"{what} needs {', '.join(missing)} (apt-get install nginx haproxy; "
                      "make certs)")


class BenchSniSmokeTests(SynchronousTestCase):
    def setUp(self) -> None:
        skip_without_tools(self, "the SNI benchmark")

    def test_tiny_run_of_every_path(self) -> None:
        folder = Path(self.mktemp()).absolute()
        results = sni.run(rounds=1, seconds=0.3, stream_bytes=STREAM, idle_count=IDLE,
                          only=PATHS, clients=CLIENTS, folder=folder)
        paths = list(results["settings"]["paths"])
        self.assertIn("direct", paths)
        self.assertIn("ours-raw", paths)
        self.assertIn("ours-term", paths)
        for n in CLIENTS:
            for key in paths:
                [one] = results["rate"][str(n)][key]
                self.assertGreater(one["connections"], 0, (key, n))
                self.assertEqual(one["errors"], 0, (key, n, one["error"]))
                self.assertGreater(one["p99_ms"], 0, (key, n))
                self.assertGreaterEqual(one["p99_ms"], one["p50_ms"], (key, n))
                self.assertGreaterEqual(one["completed"], one["connections"], (key, n))
                if key != "direct":
                    # /proc counts in 10 ms ticks: a short run may show none.
                    self.assertGreaterEqual(one["proxy_cpu"], 0, (key, n))
                if key.startswith("ours"):
                    self.assertGreaterEqual(one["broker_cpu"], 0, (key, n))
        for key in paths:
            [stream] = results["stream"][key]
            self.assertEqual(stream["bytes"], STREAM, key)
            self.assertGreater(stream["seconds"], 0, key)
        for key in paths:
            if key == "direct":
                self.assertNotIn(key, results["idle"])
                continue
            idle = results["idle"][key]
            self.assertEqual(idle["count"], IDLE, key)
            self.assertGreater(idle["held"], 0, key)
        # The rate limits were set for the run and refused nothing.
        self.assertEqual(results["rate_limited"], 0)

        text = sni.report(results)
        lines = text.splitlines()
        for key in paths:
            [row] = [line for line in lines
                     if line.startswith("|") and line.split("|")[1].strip() == sni.BY_KEY[key].label]
            self.assertEqual(len(row.strip("|").split("|")), 1 + 3 * len(CLIENTS) + 5, row)
        goals = [line for line in lines if line.startswith(("| raw:", "| terminating:"))]
        if "haproxy" in paths:
            self.assertEqual(len(goals), 2 * (2 * len(CLIENTS) + 2))
            for row in goals:
                if "RSS per idle connection" in row:
                    # 20 connections may grow HAProxy by less than a page: no ratio then.
                    self.assertRegex(row, r"\| (met|not met) +\|$|n/a")
                else:
                    self.assertRegex(row, r"\| (met|not met) +\|$")
        if "haproxy-term" in paths:
            # Our terminating path against HAProxy terminating TLS too: every ratio there.
            [alike] = [line for line in lines
                       if line.startswith(f"| {sni.BY_KEY['ours-term'].label} / ")]
            cells = [c.strip() for c in alike.strip("|").split("|")][1:]
            self.assertEqual(len(cells), 2 * len(CLIENTS) + 2, alike)
            for c in cells[:-1]:
                self.assertRegex(c, r"^\d+\.\d\dx$")
        self.assertIn("tcp_rate_limits for this run", text)
        self.assertIn("load client's own ceiling", text)
        # The same tables again from the results kept with the run.
        again = subprocess.run([sys.executable, "-m", "bench.sni", "--report",
                                str(folder / "results.json")], capture_output=True, text=True,
                               timeout=60)
        self.assertEqual(again.stdout.strip(), text.strip(), again.stderr)

    def nginx(self, stream_bytes: int = 1_000_000) -> Network:
        net = Network(stream_bytes, stream_bytes, Path(self.mktemp()).absolute())
        self.addCleanup(net.stop)
        net.start(["direct"])
        return net

    def test_a_certificate_for_another_name_counts_as_errors(self) -> None:
        # The client verifies the name it asks for: nginx's certificate does not cover it.
        net = self.nginx()
        hostile = sni.SniPath("direct", "direct", "evil.example.org")
        with self.assertRaises(RuntimeError) as e:
            sni.rate(net, hostile, 2, 0.2, 0.05)
        self.assertIn("no connection completed", str(e.exception))
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(e.exception))

    def test_a_truncated_stream_is_an_error(self) -> None:
        net = self.nginx(stream_bytes=1_000_000)
        with self.assertRaises(RuntimeError) as e:
            sni.stream(net, sni.BY_KEY["direct"], 2_000_000)
        self.assertIn("received 1000000 bytes, not 2000000", str(e.exception))


class BenchSniABTests(SynchronousTestCase):
    """``python -m bench.sni_ab``: two copies of one of our paths, one from another checkout."""

    def setUp(self) -> None:
        skip_without_tools(self, "the SNI benchmark")

    def test_a_tiny_paired_run_against_this_same_tree(self) -> None:
        from bench import sni_ab

        root = Path(sni_ab.__file__).resolve().parent.parent
        for key in sni_ab.PATHS:
            results = sni_ab.compare(root, rounds=2, seconds=0.3, clients=[1],
                                     folder=Path(self.mktemp()).absolute(), key=key)
            pairs = results["rounds"][1]
            self.assertEqual(len(pairs), 2)
            for this, other in pairs:
                for run in (this, other):
                    self.assertGreater(run["connections"], 0, key)
                    self.assertEqual(run["errors"], 0, (key, run["error"]))
                    # Each served from the pool of its own path's private proxy.
                    self.assertGreater(run["pool_hits"], 0, key)
            text = sni_ab.report(results)
            self.assertRegex(text, r"@1 this: \d+ conn/s")
            self.assertRegex(text, r"@1 other: \d+ conn/s")
            self.assertRegex(text, r"@1 this / other: rate \d+\.\d{3} \(")

    def test_a_tiny_paired_stream_run_against_this_same_tree(self) -> None:
        from bench import sni_ab

        root = Path(sni_ab.__file__).resolve().parent.parent
        results = sni_ab.compare_streams(root, rounds=2, size=3_000_000,
                                         folder=Path(self.mktemp()).absolute(), key="ours-term")
        pairs = results["streams"]
        self.assertEqual(len(pairs), 2)
        for this, other in pairs:
            for run in (this, other):
                self.assertGreater(run["mb_per_s"], 0)
                self.assertGreaterEqual(run["cpu_s_per_gb"], 0)
        text = sni_ab.report_streams(results)
        self.assertRegex(text, r"this: \d+ MB/s, proxies \d+\.\d\d s/GB")
        self.assertRegex(text, r"this / other: MB/s \d+\.\d{3} \(")

    def test_a_stream_size_out_of_range_is_refused(self) -> None:
        from bench import sni_ab

        for size in ("0", "-5", "1e12", "many"):
            with self.assertRaises(SystemExit) as e:
                sni_ab.main([".", "--stream", size])
            self.assertEqual(e.exception.code, 2, size)

    def test_a_checkout_whose_proxies_do_not_start_leaves_nothing_running(self) -> None:
        from bench import sni_ab

        broken = Path(self.mktemp()).absolute()
        (broken / "epsproxy").mkdir(parents=True)
        (broken / "epsproxy" / "__init__.py").write_text('raise ImportError("broken")\n')
        folder = Path(self.mktemp()).absolute()
        with self.assertRaises(RuntimeError) as e:
            sni_ab.compare(broken, rounds=1, seconds=0.1, clients=[1], folder=folder)
        self.assertIn("did not start", str(e.exception))
        left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
        self.assertEqual(left.stdout, "", "processes of the run are still running")

    def test_a_folder_that_is_not_a_checkout_is_refused(self) -> None:
        from bench import sni_ab

        with self.assertRaises(SystemExit) as e:
            sni_ab.compare(Path(self.mktemp()), rounds=1, seconds=0.1, clients=[1])
        self.assertIn("not a checkout of this project", str(e.exception))


class BenchSniTailTests(SynchronousTestCase):
    """``python -m bench.sni_tail``: one client's latencies through ours and the chain."""

    def setUp(self) -> None:
        skip_without_tools(self, "the SNI tail", haproxy=True)

    def test_a_tiny_run_prints_both_paths_and_ours_slowest(self) -> None:
        from bench import sni_tail

        results = sni_tail.measure(rounds=2, seconds=0.3, folder=Path(self.mktemp()).absolute())
        for key in (sni_tail.OURS, sni_tail.CHAIN):
            self.assertEqual(len(results["rounds"][key]), 2)
            self.assertTrue(all(results["rounds"][key]), key)  # connections each round
        text = sni_tail.report(results)
        self.assertRegex(text, r"\| ours-raw \| \d+ \| \d+\.\d\d \|")
        self.assertRegex(text, r"\| haproxy-1m \| \d+ \|")
        self.assertRegex(text, r"\| ours / chain \| \| \d+\.\d\dx \|")
        self.assertRegex(text, r"ours: \d+ of \d+ connections \(\d+\.\d%\) slower than our "
                               r"p98")

    def test_our_terminating_path_against_the_terminating_chain(self) -> None:
        from bench import sni_tail

        results = sni_tail.measure(rounds=1, seconds=0.3, folder=Path(self.mktemp()).absolute(),
                                   ours="ours-term", chain="haproxy-term")
        self.assertEqual((results["ours"], results["chain"]), ("ours-term", "haproxy-term"))
        text = sni_tail.report(results)
        self.assertRegex(text, r"\| ours-term \| \d+ \| \d+\.\d\d \|")
        self.assertRegex(text, r"\| haproxy-term \| \d+ \|")
        self.assertNotIn("ours-raw", text)

    def test_the_report_finds_periodic_slow_connections(self) -> None:
        from bench import sni_tail

        chain = [0.003] * 1000
        ours = [0.0035] * 1000
        for i in range(0, 1000, 190):  # two slow ones every 190 connections
            ours[i] = ours[i + 1] = 0.008
        text = sni_tail.report({"rounds": {sni_tail.OURS: [ours], sni_tail.CHAIN: [chain]}})
        self.assertIn("ours: 12 of 1000 connections (1.2%) slower than our p98 (3.50 ms)",
                      text)
        self.assertIn("in connections: 1 (6x), 189 (5x)", text)
        self.assertEqual(sni_tail.report({"rounds": {sni_tail.OURS: [], sni_tail.CHAIN: []}}),
                         "no connection measured")


class BenchSniArgumentTests(SynchronousTestCase):
    """Bad knobs and bad load-client arguments stop with a message naming them."""

    def run_module(self, module: str, *args: str, **env: str) -> str:
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)
        self.assertNotEqual(done.returncode, 0, done.stdout)
        return done.stderr.strip().splitlines()[-1]

    def test_unknown_path_is_refused(self) -> None:
        self.assertIn("unknown path(s) ['nonsense']",
                      self.run_module("bench.sni", BENCH_SNI_ONLY="direct,nonsense"))

    def test_bad_knob_values_are_refused(self) -> None:
        for name, value in (("BENCH_SNI_IDLE", "abc"), ("BENCH_SNI_SECONDS", "-1"),
                            ("BENCH_ROUNDS", "1e400"), ("BENCH_SNI_BYTES", "nan"),
                            ("BENCH_SNI_IDLE", "99999"), ("BENCH_SNI_SECONDS", "9" * 5000)):
            line = self.run_module("bench.sni", **{name: value})
            self.assertTrue(line.startswith(f"{name}: "), line)
            self.assertIn("is not a number from", line)
            self.assertLess(len(line), 200, "the value is shortened in the message")

    def test_bad_client_arguments_are_refused(self) -> None:
        cases = (
            (("rate",), "usage:"),
            (("bogus", "{}"), "usage:"),
            (("rate", '{"port":'), "CONFIG_JSON is not JSON"),
            (("rate", "[]"), "CONFIG_JSON lacks cafile"),
            (("idle", '{"port": 1}'), "CONFIG_JSON lacks cafile, sni, count"),
        )
        for args, expected in cases:
            self.assertIn(expected, self.run_module("bench.sni_client", *args), args)

    def test_bad_tls_memory_arguments_are_refused(self) -> None:
        for value in ("0", "20001", "many"):
            line = self.run_module("bench.tls_memory", "--connections", value)
            self.assertIn("--connections", line, value)


class BenchTlsMemoryTests(SynchronousTestCase):
    """``python -m bench.tls_memory``: what one idle TLS connection costs our TLS server."""

    def setUp(self) -> None:
        skip_without_tools(self, "the TLS memory measurement")

    def test_a_tiny_run_reports_every_figure(self) -> None:
        for extra in ((), ("--http",)):
            done = subprocess.run([sys.executable, "-m", "bench.tls_memory", "--connections",
                                   "30", *extra], capture_output=True, text=True, timeout=120)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertRegex(
                done.stdout, r"^30 idle TLS connections to a Twisted TLS server \((a protocol "
                r"that does nothing|twisted\.web's HTTP channel)\) with our server options, per "
                r"connection: RSS -?\d+\.\d KB; malloc in use -?\d+\.\d KB .*; Python's objects "
                r"\(tracemalloc, a pass of its own\) \d+\.\d KB\n$")
            # OpenSSL holds kilobytes per connection however the pages fall.
            malloc = float(done.stdout.split("malloc in use ")[1].split(" KB")[0])
            self.assertGreater(malloc, 5.0, done.stdout)


class BenchStopTests(SynchronousTestCase):
    """A run ended by SIGTERM stops the processes it started (they have sessions of their own)."""

    SCRIPT = """
import sys
from pathlib import Path
from bench.common import stop_on_sigterm
from bench.sni_network import Network
if sys.argv[2] == "handled":
    stop_on_sigterm()
net = Network(1_000_000, 1_000_000, Path(sys.argv[1]))
try:
    net.start(["direct"])
    print(" ".join(str(p.pid) for p in net.processes.values()), flush=True)
    sys.stdin.readline()
finally:
    net.stop()
"""

    def setUp(self) -> None:
        skip_without_tools(self, "the SNI benchmark")

    def run_and_terminate(self, mode: str) -> tuple[int, list[int]]:
        folder = Path(self.mktemp()).absolute()
        run = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(folder), mode],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert run.stdout is not None and run.stdin is not None
        self.addCleanup(run.stdin.close)
        pids = [int(p) for p in run.stdout.readline().split()]
        for pid in pids:  # whatever a failed test leaves
            self.addCleanup(lambda pid=pid: _kill_group(pid))
        run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=60)

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

        return status, [pid for pid in pids if alive(pid)]

    def test_a_terminated_run_stops_what_it_started(self) -> None:
        status, alive = self.run_and_terminate("handled")
        self.assertEqual(status, 128 + 15)
        self.assertEqual(alive, [])

    def test_without_it_the_processes_would_outlive_the_run(self) -> None:
        # What stop_on_sigterm is for: the default SIGTERM leaves nginx running.
        status, alive = self.run_and_terminate("default")
        self.assertEqual(status, -15)
        self.assertEqual(len(alive), 1)  # nginx


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
