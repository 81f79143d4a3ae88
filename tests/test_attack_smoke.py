"""
The attack harness's own parts (no dev network): the ClientHello it trickles is a real
one, the slowloris client measures when a server closes it (and notices when it does
not), and the report keeps only refusal counters that moved.
"""

from __future__ import annotations

import socket
import threading

from twisted.trial import unittest

from attack.__main__ import deltas
from attack.clients import SlowResult, client_hello, slow_connection
from attack.scenarios import _closing
from epsproxy.proxy.clienthello import parse_client_hello


class _Server:
    """A listening socket on 127.0.0.1 that closes each connection after ``close_after`` bytes."""

    def __init__(self, close_after: int | None, answer: bytes = b"") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_after = close_after
        self.answer = answer
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            while True:
                data = connection.recv(100)
                if not data:
                    return
                self.received += data
                if self.close_after is not None and len(self.received) >= self.close_after:
                    connection.sendall(self.answer)
                    return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


class ClientHelloTests(unittest.TestCase):
    def test_the_trickled_hello_is_a_real_client_hello(self) -> None:
        hello = parse_client_hello(client_hello("slow.example"))
        self.assertEqual(hello.server_name, "slow.example")


class SlowConnectionTests(unittest.TestCase):
    def test_measures_when_the_server_closes_and_keeps_its_answer(self) -> None:
        server = _Server(close_after=3, answer=b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.addCleanup(server.close)
        result = slow_connection(server.port, b"abcdef", interval=0.01, limit=10)
        self.assertIsNotNone(result.closed_after)
        self.assertLess(result.closed_after, 10)
        self.assertTrue(result.answer.startswith(b"HTTP/1.1 408"))
        self.assertEqual(server.received, b"abc")  # one byte at a time, stopped at the close

    def test_a_server_that_never_closes_is_reported_open(self) -> None:
        server = _Server(close_after=None)
        self.addCleanup(server.close)
        result = slow_connection(server.port, b"ab", interval=0.01, limit=0.3)
        self.assertIsNone(result.closed_after)

    def test_closing_judges_against_the_deadline(self) -> None:
        ok, text = _closing([SlowResult(closed_after=5.0), SlowResult(closed_after=6.0)], 5)
        self.assertTrue(ok)
        self.assertIn("2/2 closed", text)
        late, _ = _closing([SlowResult(closed_after=30.0)], 5)
        self.assertFalse(late)
        still, text = _closing([SlowResult(closed_after=None)], 5)
        self.assertFalse(still)
        self.assertIn("STILL OPEN", text)


class DeltaTests(unittest.TestCase):
    def test_only_refusal_counters_that_grew(self) -> None:
        before = {2113: {'eps_peer_refusals_total{reason="identity"}': 1.0,
                         "eps_requests_total": 5.0}}
        after = {2113: {'eps_peer_refusals_total{reason="identity"}': 3.0,
                        'eps_peer_refusals_total{reason="hello_timeout"}': 0.0,
                        "eps_requests_total": 9.0,
                        'eps_peer_refusals_created{reason="identity"}': 99.0}}
        self.assertEqual(deltas(before, after),
                         {2113: {'eps_peer_refusals_total{reason="identity"}': 2.0}})


class SwarmTests(unittest.TestCase):
    """The distributed attacker against a real capped listener (a short run)."""

    timeout = 60

    def test_many_addresses_overrun_a_capped_listener_that_holds(self):
        import json
        import sys
        from pathlib import Path

        from twisted.internet import reactor, utils
        from twisted.internet.defer import ensureDeferred

        from epsproxy.net import tls
        from epsproxy.net.admission import Admission, ProcessBudget
        from tests.support.admission import HeldFactory

        async def run() -> None:
            a = Admission("swarmed", 20, 5, budget=ProcessBudget(cap=100))
            peak = []
            admit = a.admit

            def counting(address: object) -> bool:
                allowed = admit(address)
                peak.append(a.current)
                return allowed

            a.admit = counting  # type: ignore[method-assign]  # records the peak
            factory = HeldFactory()
            port = await tls.listen_endpoint(reactor, "127.0.0.1:0", None,
                                             admission=a).listen(factory)
            self.addCleanup(port.stopListening)
            self.addCleanup(factory.abort_all)
            config = {"seconds": 2, "targets": [{
                "name": "t", "port": port.getHost().port, "payload": b"slow".hex(),
                "addresses": 30, "per_address": 2, "greedy": 10, "first": "127.20.0.1",
                "interval": 0.2}]}
            out = await utils.getProcessOutput(
                sys.executable, ["-m", "attack.swarm", json.dumps(config)],
                env=None, path=str(Path(__file__).resolve().parent.parent), reactor=reactor)
            [target] = json.loads(out.decode().strip().splitlines()[-1])["targets"]
            self.assertEqual(target["sources"], 31)
            self.assertGreaterEqual(target["max_open"], 60)  # 20 served, the rest waiting
            self.assertGreaterEqual(target["attempts"], 70)
            self.assertLessEqual(max(peak), 20)
            self.assertGreaterEqual(a.reached, 1)
            self.assertLessEqual(a.by_address.get("127.20.0.31", 0), 5)  # the greedy one

        return ensureDeferred(run())
