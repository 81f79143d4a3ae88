"""
Signals of the real twistd: SIGHUP reloads (or refuses and keeps serving), SIGTERM
drains and exits 0, a second SIGTERM during the drain stops at once.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from epsproxy.net.program import STOPPED_AT_ONCE
from tests.support.proxies import FakeEPS, caller_client, public_section, write_settings
from tests.support.sd import sd_client, write_sd_settings
from tests.support.twistd import Twistd, spawn_twistd, stop_twistd

REFUSED = "reload refused, still running with the previous settings: "


class Party(Protocol):
    """One end of a spliced pair: sends its token, records what arrives."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.received = b""
        self.waiting: defer.Deferred[bytes] | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.token)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(data)

    def next_data(self) -> defer.Deferred[bytes]:
        self.waiting = defer.Deferred()
        return self.waiting

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


def connect(port: int, party: Party) -> defer.Deferred[Party]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), party)


class SighupTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_failed_reload_keeps_serving_and_a_good_one_applies(self):
        folder = write_sd_settings(Path(self.mktemp()).absolute())
        settings_file = folder / "sd.yml"
        good = yaml.safe_load(settings_file.read_text())
        process = spawn_twistd(["sd", "--settings", str(folder)])
        self.addCleanup(stop_twistd, process)
        match = yield process.wait_for(r"serving \d+ verified record\(s\) at [\d.]+:(\d+)")
        port = int(match.group(1))

        # An unknown key: refused, one line naming it, still serving.
        settings_file.write_text(yaml.safe_dump({**good, "typo": 1}))
        process.signal("HUP")
        line = yield process.wait_for(REFUSED + r".*\n")
        self.assertIn("sd.yml: typo: unknown key", line.group(0))
        # A missing certificate: refused too.
        broken = yaml.safe_load(yaml.safe_dump(good))
        broken["jsonrpc_server"]["tls"]["certificate_file"] = "/nonexistent/sd-1.crt"
        settings_file.write_text(yaml.safe_dump(broken))
        process.signal("HUP")
        line = yield process.wait_for(REFUSED + r".*\n")
        self.assertIn("jsonrpc_server.tls.certificate_file: no such file /nonexistent/sd-1.crt",
                      line.group(0))
        # Valid settings the service cannot apply live (a new listen address): refused
        # by the service itself (ReloadError).
        moved = yaml.safe_load(yaml.safe_dump(good))
        moved["jsonrpc_server"]["bind_address"] = "127.0.0.1:1"
        settings_file.write_text(yaml.safe_dump(moved))
        process.signal("HUP")
        line = yield process.wait_for(REFUSED + r".*\n")
        self.assertIn("bind_address", line.group(0))
        client = sd_client(port)
        self.addCleanup(client.close)
        yield client.call("getTip", {})  # still answering (an empty directory: no tip)

        # Good settings again, now asking for debug lines: applied, and the level with them.
        settings_file.write_text(yaml.safe_dump({**good, "log_level": "debug"}))
        process.signal("HUP")
        yield process.wait_for(r"reloaded settings from " + str(folder))
        self.assertNotIn("#debug]", process.output)
        process.signal("HUP")  # the next re-read logs its files at debug level
        yield process.wait_for(r"#debug\] read settings file ")
        yield process.wait_for(r"reloaded settings from ")
        self.assertEqual(process.output.count("Traceback"), 0)
        process.signal("TERM")
        self.assertEqual((yield process.ended), 0)


    @defer.inlineCallbacks
    def test_a_proxy_refuses_a_changed_metrics_listener(self):
        # A proxy's service sees only its section: the program refuses the top-level
        # metrics change itself rather than pretend it applied it.
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        section = public_section(folder, eps_port)
        write_settings(folder, {"public": section,
                                "metrics": {"bind_address": "127.0.0.1:0"}})
        process = spawn_twistd(["proxy", "--mode", "public", "--settings", str(folder)])
        self.addCleanup(stop_twistd, process)
        yield process.wait_for(r"internal endpoint on 127\.0\.0\.1:(\d+)")
        write_settings(folder, {"public": section,
                                "metrics": {"bind_address": "127.0.0.1:1"}})
        process.signal("HUP")
        line = yield process.wait_for(REFUSED + r".*\n")
        self.assertIn("metrics.bind_address: changing it needs a restart", line.group(0))
        write_settings(folder, {"public": section,
                                "metrics": {"bind_address": "127.0.0.1:0"}})
        process.signal("HUP")
        yield process.wait_for(r"reloaded settings from " + str(folder))
        process.signal("TERM")
        self.assertEqual((yield process.ended), 0)


class StopTests(unittest.TestCase):
    """SIGTERM on a public proxy carrying a spliced pair (its drain takes a while)."""

    timeout = 60

    @defer.inlineCallbacks
    def start_with_a_splice(self):
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        write_settings(folder, {"public": public_section(folder, eps_port, shutdown_grace=60)})
        process = spawn_twistd(["proxy", "--mode", "public", "--settings", str(folder)])
        self.addCleanup(stop_twistd, process)
        match = yield process.wait_for(
            r"internal endpoint on 127\.0\.0\.1:(\d+) .*JSON-RPC on 127\.0\.0\.1:(\d+)")
        internal, jsonrpc = int(match.group(1)), int(match.group(2))
        parties: list[Party] = []

        def answer(params):  # the fake EPS plays B: it dials with the token
            party = Party(base64.b64decode(params["token"]))
            parties.append(party)
            return connect(internal, party).addCallback(lambda _: {})

        fake.answer = answer
        client = caller_client(jsonrpc)
        self.addCleanup(client.close)
        reply = yield client.call("requestConnection", {
            "to": "hd-2", "channel": "eps_server",
            "_client": {"name": "hd-1", "entry": {"name": "hd-1", "channels": []}}})
        a = Party(base64.b64decode(reply["token"]))
        yield connect(internal, a)
        [b] = parties
        for party in (a, b):
            self.addCleanup(lambda p=party: p.transport.abortConnection())
        arrived = b.next_data()
        a.transport.write(b"across")
        self.assertEqual((yield arrived), b"across")
        return process, a, b

    @defer.inlineCallbacks
    def drain(self, process: Twistd, a: Party, b: Party):
        process.signal("TERM")
        yield process.wait_for(r"stopping on SIGTERM: draining \(a second SIGTERM stops at once\)")
        yield process.wait_for(r"draining 1 spliced connection\(s\)")
        # Still relaying during the drain.
        arrived = a.next_data()
        b.transport.write(b"still here")
        self.assertEqual((yield arrived), b"still here")

    @defer.inlineCallbacks
    def test_sigterm_drains_then_exits_0(self):
        process, a, b = yield self.start_with_a_splice()
        yield self.drain(process, a, b)
        self.assertFalse(process.ended.called)
        a.transport.loseConnection()
        self.assertEqual((yield process.ended), 0, process.output)
        self.assertNotIn("Traceback", process.output)

    @defer.inlineCallbacks
    def test_second_sigterm_stops_at_once(self):
        process, a, b = yield self.start_with_a_splice()
        yield self.drain(process, a, b)
        process.signal("TERM")
        status = yield process.ended
        self.assertEqual(status, STOPPED_AT_ONCE, process.output)
        self.assertIn("stopping at once on a second SIGTERM", process.output)
        yield b.closed

    @defer.inlineCallbacks
    def test_sigint_then_sigterm_stops_at_once(self):
        process, a, b = yield self.start_with_a_splice()
        process.signal("INT")
        yield process.wait_for(r"stopping on SIGINT: draining")
        yield process.wait_for(r"draining 1 spliced connection\(s\)")
        process.signal("TERM")
        self.assertEqual((yield process.ended), STOPPED_AT_ONCE, process.output)


class LifecycleDefaults(unittest.TestCase):
    """What every service answers before B's overrides: readiness by phase, no reload."""

    def test_readiness_follows_start_and_stop(self):
        from epsproxy.net.lifecycle import AsyncStartService, ReloadError

        started: defer.Deferred[str] = defer.Deferred()

        class Service(AsyncStartService[str]):
            reactor = reactor

            async def _start(self) -> str:
                return await started

        service = Service()
        self.assertEqual(service.readiness(), {"start": "starting"})
        service.startService()
        self.assertEqual(service.readiness(), {"start": "starting"})
        started.callback("up")
        self.assertEqual(service.readiness(), {})
        with self.assertRaises(ReloadError) as caught:
            service.reload({})
        self.assertEqual(str(caught.exception), "Service does not reload its settings")
        service.stopService()
        self.assertEqual(service.readiness(), {"stop": "stopping"})

    def test_readiness_after_a_failed_start(self):
        from epsproxy.net.lifecycle import AsyncStartService

        class Service(AsyncStartService[str]):
            reactor = reactor

            async def _start(self) -> str:
                raise OSError("the store cannot open")

        service = Service()
        service.startService()
        self.assertEqual(service.readiness(), {"start": "the store cannot open"})
        self.failureResultOf(service.when_ready(), OSError)
