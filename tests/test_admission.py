"""
Connection caps (epsproxy.net.admission): the sans-IO counter with a recording gate, then
real loopback listeners that stop accepting at their cap and resume below it, the
per-address concurrency cap, the descriptor headroom that keeps a peer link working while
a public listener is full, the metrics, and the descriptor limit raised by twistd.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from epsproxy.net import admission, tls
from epsproxy.net.admission import Admission, AdmissionCollector, ProcessBudget
from tests.support.admission import (
    Client,
    HeldFactory,
    IdleTLS,
    connect_from,
    lower_descriptor_limit,
    spawn_attacker,
)
from tests.support.metrics import request, samples
from tests.support.proxies import FakeEPS, public_section, write_settings
from tests.support.sd import write_sd_settings
from tests.support.tls import ClientProtocol, ServerFactory, tls_block
from tests.support.twistd import TWISTD, Twistd, spawn_twistd, stop_twistd


class Gate:
    """Records what an admission does to its listener."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stopReading(self) -> None:
        self.calls.append("stop")

    def startReading(self) -> None:
        self.calls.append("start")


class Addr:
    def __init__(self, host: str) -> None:
        self.host = host


class Peer(Addr):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(host)
        self.port = port


class AdmissionRules(unittest.SynchronousTestCase):
    """The counter without sockets."""

    def test_stops_at_the_cap_and_starts_below_it(self):
        budget = ProcessBudget(cap=100)
        a = Admission("l", 2, 10, budget=budget)
        gate = Gate()
        a.attach(gate)
        self.assertTrue(a.admit(Addr("10.0.0.1")))
        self.assertEqual(gate.calls, [])
        self.assertTrue(a.admit(Addr("10.0.0.2")))
        self.assertEqual(gate.calls, ["stop"])
        self.assertTrue(a.paused)
        self.assertEqual((a.current, a.reached, budget.current), (2, 1, 2))
        a.release(Addr("10.0.0.1"))
        self.assertEqual(gate.calls, ["stop", "start"])
        self.assertFalse(a.paused)
        self.assertEqual(a.room(), 1)

    def test_per_address_cap_counts_ipv6_per_64_and_spares_exempt_sources(self):
        a = Admission("l", 100, 2, budget=ProcessBudget(cap=100),
                      exempt=admission.parse_networks(["10.0.0.0/8"]))
        self.assertTrue(a.admit(Addr("2001:db8::1")))
        self.assertTrue(a.admit(Addr("2001:db8::2")))
        self.assertFalse(a.admit(Addr("2001:db8::ffff:3")))  # the same /64
        self.assertTrue(a.admit(Addr("2001:db8:0:1::1")))  # another /64
        self.assertEqual(a.refused_per_address, 1)
        for _ in range(5):
            self.assertTrue(a.admit(Addr("10.1.2.3")))  # a trusted load balancer
        self.assertTrue(a.admit(Addr("192.0.2.1")))
        self.assertTrue(a.admit(Addr("::ffff:192.0.2.1")))  # the same IPv4 client
        self.assertFalse(a.admit(Addr("192.0.2.1")))
        a.release(Addr("2001:db8::1"))
        self.assertTrue(a.admit(Addr("2001:db8::3")))
        self.assertEqual(a.current, 10)

    def test_a_forgiven_connection_no_longer_counts_against_its_address(self):
        a = Admission("l", 100, 1, budget=ProcessBudget(cap=100))
        first, second = Peer("10.0.0.1", 1000), Peer("10.0.0.1", 1001)
        self.assertTrue(a.admit(first))
        self.assertFalse(a.admit(second))
        a.forgive(first)
        a.forgive(first)  # once is all it takes (and all it gives)
        self.assertTrue(a.admit(second))
        self.assertFalse(a.admit(Peer("10.0.0.1", 1002)))
        a.release(first)  # forgiven: the address keeps its one counted connection
        self.assertEqual(a.by_address, {"10.0.0.1": 1})
        a.release(second)
        self.assertEqual((a.by_address, a.current), ({}, 0))
        a.forgive(Peer("10.0.0.9", 1))  # nothing open from it: nothing to forgive
        self.assertTrue(a.admit(Peer("10.0.0.9", 2)))

    def test_the_process_cap_stops_every_listener(self):
        budget = ProcessBudget(cap=3)
        one, two = Admission("one", 10, 10, budget=budget), Admission("two", 10, 10, budget=budget)
        g1, g2 = Gate(), Gate()
        one.attach(g1)
        two.attach(g2)
        one.admit(Addr("10.0.0.1"))
        one.admit(Addr("10.0.0.2"))
        two.admit(Addr("10.0.0.3"))
        self.assertEqual((g1.calls, g2.calls), (["stop"], ["stop"]))
        self.assertEqual(budget.reached, 1)
        one.release(Addr("10.0.0.1"))
        self.assertEqual((g1.calls, g2.calls), (["stop", "start"], ["stop", "start"]))

    def test_reconfigure_applies_to_the_next_connections(self):
        a = Admission("l", 3, 10, budget=ProcessBudget(cap=100))
        gate = Gate()
        a.attach(gate)
        a.admit(Addr("10.0.0.1"))
        a.admit(Addr("10.0.0.2"))
        a.reconfigure(2, 1)
        self.assertEqual(gate.calls, ["stop"])
        a.reconfigure(5, 1)
        self.assertEqual(gate.calls, ["stop", "start"])
        self.assertFalse(a.admit(Addr("10.0.0.1")))

    def test_defaults_follow_the_descriptor_limit(self):
        budget = ProcessBudget()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(budget.limit, limit)
        self.assertEqual(budget.reserved, max(admission.MIN_RESERVED, limit // 10))
        self.assertEqual(budget.cap, limit - budget.reserved)
        a = Admission("l", budget=budget)
        self.assertEqual(a.cap, budget.cap // 4)
        self.assertEqual(a.per_address, max(8, a.cap // 4))

    def test_the_descriptor_limit_is_read_again_at_most_every_second(self):
        now = [100.0]
        budget = ProcessBudget(clock=lambda: now[0])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget.take()
        before = budget.cap
        lower = (4096 if soft == resource.RLIM_INFINITY else soft) - 100
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        now[0] += admission.LIMIT_CHECK_SECONDS / 2
        budget.take()
        self.assertEqual(budget.cap, before)  # not read again yet
        now[0] += admission.LIMIT_CHECK_SECONDS
        budget.take()
        self.assertEqual(budget.cap, lower - admission.reserved_for(lower))
        self.assertLess(budget.cap, before)

    def test_networks_are_checked(self):
        self.assertEqual(len(admission.parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])), 3)
        for bad in ["10.0.0.0/33", "example.org", "", "1.2.3.4/8/8", "x" * 10_000]:
            with self.assertRaises(ValueError):
                admission.parse_networks([bad])
        self.assertFalse(admission.address_in(Addr("not an ip"), admission.parse_networks(["0.0.0.0/0"])))
        self.assertFalse(admission.address_in(object(), admission.parse_networks(["0.0.0.0/0"])))

    def test_metrics(self):
        budget = ProcessBudget(cap=10)
        a = Admission("public.tls", 1, 1, budget=budget)
        a.attach(Gate())
        a.admit(Addr("10.0.0.1"))
        budget.accept_failed("ENFILE")
        registry = CollectorRegistry()
        registry.register(AdmissionCollector("proxy", budget))
        text = generate_latest(registry).decode()
        for line in [
            'proxy_listener_connections{listener="public.tls"} 1.0',
            'proxy_listener_max_connections{listener="public.tls"} 1.0',
            'proxy_listener_cap_reached_total{listener="public.tls"} 1.0',
            'proxy_listener_per_address_refused_total{listener="public.tls"} 0.0',
            "proxy_connections 1.0", "proxy_max_connections 10.0",
            'proxy_accept_errors_total{error="EMFILE"} 0.0',
            'proxy_accept_errors_total{error="ENFILE"} 1.0',
        ]:
            self.assertIn(line, text)


class ProcessCapRules(unittest.SynchronousTestCase):
    def test_the_setting_lowers_the_derived_cap_but_never_raises_it(self):
        budget = ProcessBudget(reserved=10)
        derived = budget.limit - 10
        budget.apply_setting(5)
        self.assertEqual(budget.cap, 5)
        budget.apply_setting(derived + 1000)  # would eat into the reserve
        self.assertEqual(budget.cap, derived)
        budget.apply_setting(None)
        self.assertEqual(budget.cap, derived)


class CappedListener(unittest.TestCase):
    """Real loopback listeners behind an admission."""

    @inlineCallbacks
    def listen(self, a: Admission, tls_block_: dict[str, Any] | None = None) -> Any:
        factory = HeldFactory()
        port = yield tls.listen_endpoint(reactor, "127.0.0.1:0", tls_block_,
                                         admission=a).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.abort_all)
        return factory, port

    def client(self, c: Client) -> Client:
        self.addCleanup(lambda: c.transport.abortConnection())
        return c

    @inlineCallbacks
    def test_stops_accepting_at_the_cap_and_resumes_below_it(self):
        a = Admission("capped", 3, 10, budget=ProcessBudget(cap=100))
        factory, port = yield self.listen(a)
        number = port.getHost().port
        clients = yield gatherResults([connect_from(f"127.0.0.{i + 1}", number) for i in range(5)])
        for c in clients:
            self.client(c)
        for _ in range(3):
            yield factory.accepted.get()
        # A round trip on an accepted connection: the reactor went round several times.
        first = factory.open[0]
        echoer = next(c for c in clients if c.transport.getHost().port == first.transport.getPeer().port)
        self.assertEqual((yield echoer.echo(b"ping")), b"ping")
        self.assertEqual(factory.built, 3)
        self.assertTrue(a.paused)
        self.assertNotIn(port, reactor.getReaders())
        self.assertEqual((a.current, a.reached), (3, 1))
        # The two others wait in the backlog, still connected.
        self.assertEqual(sum(1 for c in clients if c.lost.called), 0)

        echoer.transport.loseConnection()
        yield factory.accepted.get()
        self.assertEqual(factory.built, 4)
        self.assertEqual((a.current, a.reached), (3, 2))
        second = factory.open[0]
        second.transport.loseConnection()
        yield factory.accepted.get()
        self.assertEqual(factory.built, 5)
        self.assertEqual((a.current, a.reached), (3, 3))
        del factory.closed.pending[:]  # the two closed above
        factory.open[0].transport.loseConnection()
        yield factory.closed.get()
        self.assertFalse(a.paused)  # 2 open, nobody waiting: reading again
        self.assertIn(port, reactor.getReaders())

    @inlineCallbacks
    def test_an_accepted_connection_has_one_peer_address(self):
        a = Admission("capped", 3, 10, budget=ProcessBudget(cap=100))
        factory, port = yield self.listen(a)
        c = self.client((yield connect_from("127.0.0.7", port.getHost().port)))
        yield factory.accepted.get()
        transport = factory.open[0].transport
        peer = transport.getPeer()
        self.assertIs(transport.getPeer(), peer)  # built once, asked many times
        self.assertEqual((peer.host, peer.port), ("127.0.0.7", c.transport.getHost().port))
        # Twisted's log prefix and repr, made when asked rather than at every accept.
        name = type(factory.open[0]).__name__
        self.assertEqual(transport.logPrefix(), f"{name},{transport.sessionno},127.0.0.7")
        self.assertEqual(repr(transport),
                         f"<{name} #{transport.sessionno} on {port.getHost().port}>")

    def failing_accepts(self, port: Any, errors: list[int]) -> None:
        """Make ``port``'s next accept() calls fail with ``errors``, in order."""
        real = port.socket

        class Failing:
            def _accept(self) -> Any:
                if errors:
                    code = errors.pop(0)
                    raise OSError(code, os.strerror(code))
                return real._accept()

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        port.socket = Failing()
        self.addCleanup(setattr, port, "socket", real)

    @inlineCallbacks
    def test_accept_errors_are_counted_and_the_connection_is_still_served(self):
        budget = ProcessBudget(cap=100)
        a = Admission("capped", 10, 10, budget=budget)
        factory, port = yield self.listen(a)
        # EPERM (netfilter) is skipped at once; ECONNABORTED is logged and counted, and
        # the connection waiting in the backlog is accepted on the next event.
        self.failing_accepts(port, [errno.EPERM, errno.ECONNABORTED])
        c = self.client((yield connect_from("127.0.0.8", port.getHost().port)))
        yield factory.accepted.get()
        self.assertEqual((yield c.echo(b"served")), b"served")
        self.assertEqual(budget.accept_errors, {"ECONNABORTED": 1})
        self.assertEqual((a.current, a.admitted), (1, 1))

    def test_refusals_do_not_keep_the_accept_loop_going(self):
        # An accept() that keeps failing with EPERM (netfilter) is tried at most as many
        # times as the port accepts per event, as Twisted does, then the event ends.
        a = Admission("capped", 10, 10, budget=ProcessBudget(cap=100))
        factory = HeldFactory()
        port = admission._AdmittedPort(0, factory, 50, "127.0.0.1", reactor, a)
        port.startListening()
        self.addCleanup(port.stopListening)
        tries = []
        real = port.socket

        class Refusing:
            def _accept(self) -> Any:
                tries.append(1)
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        port.socket = Refusing()
        self.addCleanup(setattr, port, "socket", real)
        port.numberAccepts = 7
        port.doRead()
        self.assertEqual(len(tries), 7)
        self.assertEqual(factory.built, 0)

    @inlineCallbacks
    def test_emfile_is_left_to_twisteds_recovery(self):
        budget = ProcessBudget(cap=100)
        a = Admission("capped", 10, 10, budget=budget)
        factory, port = yield self.listen(a)
        self.failing_accepts(port, [errno.EMFILE])
        c = self.client((yield connect_from("127.0.0.9", port.getHost().port)))
        yield factory.accepted.get()
        # Twisted's doRead took over and accepted it, still through the admission.
        self.assertEqual((yield c.echo(b"recovered")), b"recovered")
        transport = factory.open[0].transport
        self.assertEqual(transport.getPeer().host, "127.0.0.9")
        self.assertEqual((a.current, a.admitted), (1, 1))

    @inlineCallbacks
    def test_the_factory_and_the_connection_share_one_address(self):
        a = Admission("capped", 3, 10, budget=ProcessBudget(cap=100))
        seen: list[Any] = []
        factory = HeldFactory()
        build = factory.buildProtocol

        def recording(addr: Any) -> Any:
            seen.append(addr)
            return build(addr)

        factory.buildProtocol = recording  # type: ignore[method-assign]
        port = yield tls.listen_endpoint(reactor, "127.0.0.1:0", None,
                                         admission=a).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.abort_all)
        self.client((yield connect_from("127.0.0.10", port.getHost().port)))
        yield factory.accepted.get()
        self.assertIs(factory.open[0].transport.getPeer(), seen[0])

    @inlineCallbacks
    def test_per_address_concurrency_cap_holds(self):
        a = Admission("capped", 50, 2, budget=ProcessBudget(cap=100))
        factory, port = yield self.listen(a)
        number = port.getHost().port
        c1 = self.client((yield connect_from("127.0.0.2", number)))
        c2 = self.client((yield connect_from("127.0.0.2", number)))
        yield factory.accepted.get()
        yield factory.accepted.get()
        c3 = self.client((yield connect_from("127.0.0.2", number)))
        yield c3.lost  # closed at once, nothing served
        self.assertEqual(factory.built, 2)
        self.assertEqual(a.refused_per_address, 1)
        other = self.client((yield connect_from("127.0.0.3", number)))
        yield factory.accepted.get()
        self.assertEqual((yield other.echo(b"hi")), b"hi")
        c1.transport.loseConnection()
        yield factory.closed.get()
        self.assertEqual(a.by_address["127.0.0.2"], 1)
        c4 = self.client((yield connect_from("127.0.0.2", number)))
        yield factory.accepted.get()
        self.assertEqual((yield c4.echo(b"ok")), b"ok")
        self.assertEqual((yield c2.echo(b"ok")), b"ok")
        self.assertEqual(a.refused_per_address, 1)

    @inlineCallbacks
    def test_an_ipv6_listener_counts_per_64(self):
        import socket

        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6")
        a = Admission("v6", 10, 1, budget=ProcessBudget(cap=100))
        factory = HeldFactory()
        try:
            port = yield tls.listen_endpoint(reactor, "[::1]:0", None,
                                             admission=a).listen(factory)
        except Exception as e:  # a host without ::1
            raise unittest.SkipTest(f"cannot listen on ::1: {e}")
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.abort_all)
        from twisted.internet.endpoints import TCP6ClientEndpoint, connectProtocol

        endpoint = TCP6ClientEndpoint(reactor, "::1", port.getHost().port)
        first = self.client((yield connectProtocol(endpoint, Client())))
        yield factory.accepted.get()
        second = self.client((yield connectProtocol(endpoint, Client())))
        yield second.lost  # the same /64: over its cap of 1
        self.assertEqual((a.by_address, a.refused_per_address), ({"::/64": 1}, 1))
        self.assertEqual((yield first.echo(b"v6")), b"v6")

    @inlineCallbacks
    def test_a_tls_listener_is_capped_before_tls(self):
        a = Admission("tls", 1, 10, budget=ProcessBudget(cap=100))
        factory = ServerFactory()
        port = yield tls.listen_endpoint(
            reactor, "127.0.0.1:0", tls_block("hd-2"), admission=a).listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        endpoint = tls.client_endpoint(reactor, address, tls_block("hd-1"), "hd-2")
        idle = yield endpoint.connect(Factory.forProtocol(IdleTLS))
        yield idle.handshaken
        first = yield endpoint.connect(Factory.forProtocol(ClientProtocol))
        # Waits in the backlog while the idle one holds the only slot...
        self.assertTrue(a.paused)
        idle.transport.loseConnection()
        # ...and is served as soon as it leaves.
        yield first.lost
        self.assertEqual(first.received, b"welcome")
        self.assertEqual(a.admitted, 2)


class Headroom(unittest.TestCase):
    """Descriptors left out of the caps keep what matters working."""

    @inlineCallbacks
    def test_a_peer_link_keeps_working_while_a_public_listener_is_full(self):
        cap = 20
        budget = ProcessBudget(cap=cap)  # explicit: this test process holds many descriptors
        public = Admission("public", cap, cap, budget=budget)
        held = HeldFactory()
        public_port = yield tls.listen_endpoint(
            reactor, "127.0.0.1:0", None, admission=public).listen(held)
        self.addCleanup(public_port.stopListening)
        self.addCleanup(held.abort_all)
        # The peer (another node, so not counted here) and an established link to it.
        peer = HeldFactory()
        peer_port = yield tls.listen_endpoint(
            reactor, "127.0.0.1:0", tls_block("hd-2")).listen(peer)
        self.addCleanup(peer_port.stopListening)
        self.addCleanup(peer.abort_all)
        endpoint = tls.client_endpoint(
            reactor, f"127.0.0.1:{peer_port.getHost().port}", tls_block("hd-1"), "hd-2")
        link = yield endpoint.connect(Factory.forProtocol(Client))
        self.addCleanup(lambda: link.transport.abortConnection())
        self.assertEqual((yield link.echo(b"before")), b"before")

        attacker = spawn_attacker(public_port.getHost().port, 3 * cap)
        self.addCleanup(attacker.stop)
        # Room for the public cap and a few more: the reserve of this test.  Without the
        # cap the listener would accept the whole flood and the dial below would fail
        # with EMFILE.
        lower_descriptor_limit(self, cap + 6)
        attacker.go()
        yield attacker.ready  # 60 connections made: 20 served, 40 in the backlog
        while held.built < cap:
            yield held.accepted.get()
        self.assertTrue(public.paused)
        self.assertEqual(public.current, cap)

        self.assertEqual((yield link.echo(b"during")), b"beforeduring")
        dialed = yield endpoint.connect(Factory.forProtocol(Client))
        self.addCleanup(lambda: dialed.transport.abortConnection())
        self.assertEqual((yield dialed.echo(b"a new link")), b"a new link")
        self.assertEqual(held.built, cap)
        self.assertEqual(budget.accept_errors, {})


WRAPPER = (
    "import os, resource, sys\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class RaisedLimit(unittest.TestCase):
    @inlineCallbacks
    def test_twistd_raises_the_soft_descriptor_limit(self):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard <= 256:
            raise unittest.SkipTest("the hard descriptor limit is too low to raise anything")
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        write_settings(folder, {"public": public_section(folder, eps_port)})
        process = Twistd()
        reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-c", WRAPPER, TWISTD, "-n", "--pidfile=", "proxy",
             "--mode", "public"],
            env=dict(os.environ, PROXY_SETTINGS=str(folder)), path="/")
        self.addCleanup(stop_twistd, process)
        match = yield process.wait_for(
            r"descriptor limit \(RLIMIT_NOFILE\): (\d+) before, (\d+) after")
        expected = min(hard, admission.MAX_RAISED_LIMIT) if hard != resource.RLIM_INFINITY \
            else admission.MAX_RAISED_LIMIT
        self.assertEqual((int(match.group(1)), int(match.group(2))), (256, expected))
        yield process.wait_for(r"public proxy \S+ serving")
        limits = Path(f"/proc/{process.transport.pid}/limits").read_text()
        [line] = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
        self.assertEqual(int(line.split()[3]), expected)
        process.signal("TERM")
        self.assertEqual((yield process.ended), 0)


class ListenerSettings(unittest.TestCase):
    """A JSON-RPC server's caps come from its settings and change on reload."""

    @inlineCallbacks
    def test_jsonrpc_listener_caps_reload(self):
        from twisted.web.pages import notFound
        from twisted.web.server import Site

        from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, JSONRPCListener
        from epsproxy.rules import forms

        settings = JSONRPC_SERVER_SETTINGS.validate(
            {"bind_address": "127.0.0.1:0", "max_connections": 2,
             "max_connections_per_address": 1})
        listener = JSONRPCListener(reactor, Site(notFound()), settings, name="rpc")
        port = yield listener.listen()
        self.addCleanup(port.stopListening)
        self.assertEqual((listener.admission.cap, listener.admission.per_address), (2, 1))
        first = yield connect_from("127.0.2.1", port.getHost().port)
        self.addCleanup(lambda: first.transport.abortConnection())
        second = yield connect_from("127.0.2.1", port.getHost().port)
        yield second.lost  # over the per-address cap: closed at once
        self.assertEqual(listener.admission.refused_per_address, 1)
        listener.reconfigure(dict(settings, max_connections=7, max_connections_per_address=3))
        self.assertEqual((listener.admission.cap, listener.admission.per_address), (7, 3))
        third = yield connect_from("127.0.2.1", port.getHost().port)
        third.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        yield third.lost  # served (an answer, then closed), not refused
        self.assertTrue(third.received.startswith(b"HTTP/1.0 404"), third.received[:40])
        self.assertEqual(listener.admission.refused_per_address, 1)
        for bad in (0, -1, "many", 1.5):
            with self.assertRaises(forms.FormError):
                JSONRPC_SERVER_SETTINGS.validate({"bind_address": "127.0.0.1:0",
                                                  "max_connections": bad})


class ProcessCapSetting(unittest.TestCase):
    """The top-level ``max_connections`` of a real twistd, set at start and on SIGHUP."""

    timeout = 60

    @inlineCallbacks
    def test_the_process_cap_follows_the_setting(self):
        folder = write_sd_settings(Path(self.mktemp()).absolute())
        settings_file = folder / "sd.yml"
        settings = yaml.safe_load(settings_file.read_text())
        settings.update(max_connections=50, metrics={"bind_address": "127.0.0.1:0"})
        settings_file.write_text(yaml.safe_dump(settings))
        process = spawn_twistd(["sd", "--settings", str(folder)])
        self.addCleanup(stop_twistd, process)
        match = yield process.wait_for(r"sd metrics listener on [\d.]+:(\d+)")
        port = int(match.group(1))
        yield process.wait_for(r"serving \d+ verified record\(s\)")

        @inlineCallbacks
        def process_cap() -> Any:
            answer = yield request(port, "/metrics")
            return samples(answer.body)[("sd_max_connections", ())]

        self.assertEqual((yield process_cap()), 50)
        settings_file.write_text(yaml.safe_dump({**settings, "max_connections": 70}))
        process.signal("HUP")
        yield process.wait_for(r"reloaded settings from ")
        self.assertEqual((yield process_cap()), 70)
        # Without the setting: derived from the descriptor limit, less the reserve.
        settings_file.write_text(yaml.safe_dump({k: v for k, v in settings.items()
                                                 if k != "max_connections"}))
        process.signal("HUP")
        yield process.wait_for(r"reloaded settings from ")
        answer = yield request(port, "/metrics")
        found = samples(answer.body)
        self.assertEqual(found[("sd_max_connections", ())],
                         found[("sd_descriptor_limit", ())]
                         - found[("sd_reserved_descriptors", ())])
        process.signal("TERM")
        self.assertEqual((yield process.ended), 0)
