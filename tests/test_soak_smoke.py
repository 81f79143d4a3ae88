"""
The soak harness's checkers and report (no dev network): payload round trips, the
``_ping`` echo check, the HTTP response reader, the connection pacer, error classes,
percentiles, process samples from a fake ``/proc``, the fd-baseline check (with the pool's
idle connections) and the TLS clients' source addresses (one test over a real socket).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
from pathlib import Path

from twisted.trial import unittest

from soak.load import (
    MAX_SOURCES,
    Pacer,
    check_ping,
    encode_payload,
    ping_request,
    read_response,
    source_address,
)
from soak.report import (
    EXPLAINED,
    HTTPStatus,
    ProcessSeries,
    StreamStats,
    classify,
    digest,
    fds_back,
    percentile,
    process_table,
    read_process,
    stream_table,
    unexplained,
)


def _read(data: bytes, **kwargs: object) -> tuple[int, bytes, bool]:
    async def go() -> tuple[int, bytes, bool]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_response(reader, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


class PayloadTests(unittest.TestCase):
    def test_echo_round_trip_is_byte_identical(self) -> None:
        """The internal server re-encodes compactly: the bytes (and digest) must survive."""
        for size in (1, 1024, 64 * 1024):
            payload = encode_payload(7, 3, size)
            echoed = json.dumps(json.loads(payload), separators=(",", ":")).encode()
            self.assertEqual(digest(echoed), digest(payload))
            self.assertLessEqual(abs(len(payload) - size), 64)

    def test_payloads_differ(self) -> None:
        self.assertNotEqual(encode_payload(1, 1, 100), encode_payload(1, 1, 100))

    def test_digest_sees_one_flipped_byte(self) -> None:
        payload = bytearray(encode_payload(1, 1, 1000))
        before = digest(bytes(payload))
        payload[500] ^= 1
        self.assertNotEqual(digest(bytes(payload)), before)


class PingCheckTests(unittest.TestCase):
    params = {"caller": 1, "n": 2, "data": "abc"}

    def reply(self, **changes: object) -> dict:
        value = {"jsonrpc": "2.0", "id": "1-2",
                 "result": {"serverInfo": {"name": "hd-2"},
                            "params": dict(self.params, _client={"name": "hd-1"})}}
        value.update(changes)
        return value

    def test_good_reply(self) -> None:
        self.assertIsNone(check_ping(self.reply(), "1-2", self.params))

    def test_request_body(self) -> None:
        body = json.loads(ping_request("1-2", self.params))
        self.assertEqual((body["method"], body["id"], body["params"]),
                         ("hd-2._ping", "1-2", self.params))

    def test_wrong_id(self) -> None:
        self.assertIn("id", check_ping(self.reply(id="1-3"), "1-2", self.params) or "")

    def test_changed_payload(self) -> None:
        reply = self.reply()
        reply["result"]["params"]["data"] = "abd"
        self.assertEqual(check_ping(reply, "1-2", self.params), "params differ")

    def test_missing_key(self) -> None:
        reply = self.reply()
        del reply["result"]["params"]["n"]
        self.assertEqual(check_ping(reply, "1-2", self.params), "params differ")

    def test_error_and_garbage(self) -> None:
        self.assertTrue((check_ping(self.reply(error={"code": -1}), "1-2", self.params)
                         or "").startswith("error"))
        self.assertIsNotNone(check_ping(None, "1-2", self.params))
        self.assertIsNotNone(check_ping({"id": "1-2", "result": 5}, "1-2", self.params))

    def test_wrong_server(self) -> None:
        reply = self.reply()
        reply["result"]["serverInfo"]["name"] = "hd-1"
        self.assertIn("hd-1", check_ping(reply, "1-2", self.params) or "")


class ReadResponseTests(unittest.TestCase):
    def test_content_length(self) -> None:
        self.assertEqual(_read(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcXX"),
                         (200, b"abc", False))

    def test_chunked_and_close(self) -> None:
        data = (b"HTTP/1.1 502 Bad\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n")
        self.assertEqual(_read(data), (502, b"abcde", True))

    def test_eof_before_status(self) -> None:
        self.assertRaises(EOFError, _read, b"")

    def test_truncated_body(self) -> None:
        self.assertRaises(asyncio.IncompleteReadError, _read,
                          b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    def test_bad_status_and_oversized(self) -> None:
        self.assertRaises(ValueError, _read, b"SSH-2.0-x\r\n\r\n")
        self.assertRaises(ValueError, _read, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
                          max_body=10)
        self.assertRaises(ValueError, _read, b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200)


class PacerTests(unittest.TestCase):
    def test_per_second_and_per_minute(self) -> None:
        now = [120.0]
        pacer = Pacer(per_minute=5, per_second=2, clock=lambda: now[0])
        self.assertEqual([pacer.try_acquire() for _ in range(3)][:2], [0.0, 0.0])
        self.assertAlmostEqual(pacer.try_acquire(), 1.0)
        now[0] = 121.5
        self.assertEqual(pacer.try_acquire(), 0.0)
        self.assertEqual(pacer.try_acquire(), 0.0)
        now[0] = 122.0
        self.assertEqual(pacer.try_acquire(), 0.0)
        # five in this minute: wait for the next one
        self.assertAlmostEqual(pacer.try_acquire(), 58.0)
        now[0] = 180.0
        self.assertEqual(pacer.try_acquire(), 0.0)


class SourceAddressTests(unittest.TestCase):
    """The TLS clients' own loopback addresses (the private proxy caps each address)."""

    def test_addresses_are_distinct_and_skip_zero_and_broadcast(self) -> None:
        self.assertEqual(source_address(0), "127.20.0.1")
        self.assertEqual(source_address(253), "127.20.0.254")
        self.assertEqual(source_address(254), "127.20.1.1")
        self.assertEqual(source_address(MAX_SOURCES - 1), "127.20.255.254")
        self.assertEqual(len({source_address(n) for n in range(1000)}), 1000)
        for bad in (-1, MAX_SOURCES):
            self.assertRaises(ValueError, source_address, bad)

    def test_a_connection_comes_from_its_source_address(self) -> None:
        import socket

        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname(), timeout=5,
                                          source_address=(source_address(300), 0))
        self.addCleanup(client.close)
        accepted, peer = listener.accept()
        accepted.close()
        self.assertEqual(peer[0], "127.20.1.47")

    def test_the_load_refuses_a_source_count_out_of_range(self) -> None:
        from soak import load

        for bad in ("-1", str(MAX_SOURCES + 1)):
            with self.assertRaises(SystemExit):
                load.main(["tls", "--sources", bad, "--out", "/nonexistent/x.json"])


class RefusalCountTests(unittest.TestCase):
    def test_refusals_at_the_private_proxys_caps_are_counted_from_its_logs(self) -> None:
        from soak.__main__ import busy_refusals

        run = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: __import__("shutil").rmtree(run))
        earlier, later = "2026-12-03T15:22:38+0000 [x] ", "2026-12-03T15:43:01+0000 [x] "
        (run / "private-proxy-1.log").write_text(
            later + "[epsproxy.net.jsonrpc.server#info] JSON-RPC incomingConnection from -:"
            " error 503 in 0.000s\n"
            + later + "JSON-RPC incomingConnection from -: ok in 0.001s\n"
            + later + "closed pooled connection 1a from public-proxy-1.ga: "
            "max_connections_per_client are being forwarded for its client\n"
            + later + "some other line\n")
        (run / "private-proxy-1.log.1").write_text(
            earlier + "closed pooled connection 2b from public-proxy-1.ga: max_connections"
            " are being forwarded\n"
            + later + "closed pooled connection 3c from public-proxy-1.ga: max_connections"
            " are being forwarded\n"
            + later + "closed pooled connection 4d from public-proxy-1.ga: the header names"
            " no server\n")
        (run / "private-proxy-1.log.2").write_text(
            later + "JSON-RPC incomingConnection: error 503 in 0.0s\n")  # without a caller
        (run / "public-proxy-1.log").write_text(later + "incomingConnection: error 503\n")
        self.assertEqual(busy_refusals(run), 5)
        # only this run's: the run directory keeps the logs of earlier runs
        self.assertEqual(busy_refusals(run, "2026-12-03T15:43:00"), 4)
        self.assertEqual(busy_refusals(run, "2026-12-03T15:44:00"), 0)


class ReportTests(unittest.TestCase):
    def test_classify(self) -> None:
        self.assertEqual(classify(asyncio.TimeoutError(), "response"), "response_timeout")
        self.assertEqual(classify(ConnectionResetError(), "connect"), "connect_reset")
        self.assertEqual(classify(ConnectionRefusedError(), "connect"), "connect_refused")
        self.assertEqual(classify(asyncio.IncompleteReadError(b"", 3), "response"),
                         "response_eof")
        self.assertEqual(classify(ssl.SSLError(), "connect"), "connect_tls")
        self.assertEqual(classify(HTTPStatus(503), "response"), "http_503")
        self.assertEqual(classify(KeyError(), "response"), "response_KeyError")

    def test_percentile(self) -> None:
        values = [float(i) for i in range(1, 101)]
        self.assertEqual(percentile(values, 0.5), 50.0)
        self.assertEqual(percentile(values, 0.99), 99.0)
        self.assertEqual(percentile([], 0.5), 0.0)
        self.assertEqual(percentile([3.0], 0.99), 3.0)

    def test_stats_merge_and_unexplained(self) -> None:
        a = StreamStats("s", requests=2, ok=1, latencies=[0.1])
        a.error("keepalive_closed", "x")
        b = StreamStats("s", requests=3, ok=3, mismatches=1, latencies=[0.2])
        b.error("http_502", "bad gateway")
        merged = StreamStats.from_json(json.loads(json.dumps(a.to_json())))
        merged.merge(b.to_json())
        self.assertEqual((merged.requests, merged.ok, merged.mismatches), (5, 4, 1))
        self.assertEqual(unexplained(merged), 1)
        self.assertIn("keepalive_closed", EXPLAINED)
        table = stream_table([merged], 2.0)
        self.assertIn("http_502: 1", table)
        self.assertIn("keepalive_closed: 1 (explained)", table)

    def test_process_samples_and_fds_back(self) -> None:
        proc = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: __import__("shutil").rmtree(proc))
        (proc / "42" / "fd").mkdir(parents=True)
        (proc / "42" / "status").write_text("Name:\tx\nVmRSS:\t   2048 kB\n")
        for i in range(5):
            (proc / "42" / "fd" / str(i)).touch()
        self.assertEqual(read_process(42, proc), (2048, 5))
        self.assertIsNone(read_process(43, proc))
        series = ProcessSeries("x", 42, fd_baseline=5)
        series.add(0, proc)
        for i in range(5, 25):
            (proc / "42" / "fd" / str(i)).touch()
        series.add(5, proc)
        self.assertFalse(fds_back([series], 8))
        for i in range(8, 25):
            (proc / "42" / "fd" / str(i)).unlink()
        series.add(10, proc)
        self.assertTrue(fds_back([series], 8))
        self.assertEqual(series.fd_peak(), 25)
        self.assertEqual(series.rss(), (2048, 2048, 2048))
        # idle pooled connections the pool grew by are held on purpose, not leaked
        for i in range(8, 20):
            (proc / "42" / "fd" / str(i)).touch()
        series.add(15, proc)
        self.assertFalse(fds_back([series], 8))
        self.assertTrue(fds_back([series], 8, {"x": 12}))
        self.assertFalse(fds_back([series], 8, {"other": 12}))
        self.assertFalse(fds_back([series], 2, {"x": 3}))
        gone = ProcessSeries("y", 43, fd_baseline=1)
        gone.add(0, proc)
        self.assertTrue(gone.gone)
        self.assertFalse(fds_back([series, gone], 8))
        self.assertIn("| y | 43 |", process_table([series, gone]))
