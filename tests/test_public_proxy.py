"""
``twistd proxy --mode public``: settings, the ``requestConnection`` brokering over real
HTTPS with a fake own endpoint server, the token rendezvous at the internal endpoint,
metrics, and the real ``twistd`` as a subprocess.

The fake endpoint server stands in for the proxy's own EPS gateway: it records the
``_connectionRequest`` calls the proxy sends out and answers them as a test tells it to
(``{}``, an error, nothing at all), or plays the target B: it dials the internal endpoint
and presents the token before answering, as a real B does (SPEC §15 step 5).
"""

from __future__ import annotations

import base64
import os
import signal
from pathlib import Path
from typing import Any, Callable

from prometheus_client import generate_latest
from twisted.application.service import IServiceMaker
from twisted.internet import reactor, task, utils
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from epsproxy.net import admission
from epsproxy.net.jsonrpc.envelope import INTERNAL_ERROR, INVALID_PARAMS, JSONRPCError
from epsproxy.proxy import splice_engine
from epsproxy.proxy.public import NOT_AUTHORIZED, TOO_MANY_PENDING
from epsproxy.proxy.settings import PROXY_SETTINGS
from epsproxy.proxy.tap import Options, makeService
from epsproxy.rules.settings import SettingsError, load_settings

from .support.clienthello import openssl_hello
from .support.proxies import FakeEPS, caller_client, public_section, write_settings
from .support.twistd import TWISTD, TwistdProcess

PROXY = "public-proxy-1.ga"
ROLE = Path(__file__).parent.parent / "conf" / "dev" / "roles" / "public-proxy-1"


# ------------------------------------------------------------------------ settings


class SettingsTests(unittest.SynchronousTestCase):
    """The ``PROXY_SETTINGS`` schema and the command line, without sockets."""

    def load(self, settings: dict[str, Any]) -> dict[str, Any]:
        folder = write_settings(Path(self.mktemp()), settings)
        return load_settings([folder], PROXY_SETTINGS)

    def refused(self, settings: dict[str, Any]) -> str:
        folder = write_settings(Path(self.mktemp()), settings)
        with self.assertRaises(SettingsError) as caught:
            load_settings([folder], PROXY_SETTINGS)
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        self.assertIn("proxy.yml", text)
        return text

    def test_dev_role(self) -> None:
        settings = load_settings([ROLE], PROXY_SETTINGS)
        public = settings["public"]
        self.assertEqual(public["name"], PROXY)
        self.assertEqual(public["tls_bind_address"], "localhost:4433")
        self.assertEqual(public["internal_bind_address"], "localhost:9999")
        self.assertEqual(public["internal_endpoint"], "localhost:9999")
        self.assertEqual(public["jsonrpc_server"]["bind_address"], "localhost:6655")
        self.assertTrue(public["jsonrpc_server"]["tls"]["verify_client"])
        self.assertEqual(public["jsonrpc_client"]["endpoint"], "https://localhost:5544/jsonrpc")
        self.assertEqual(public["jsonrpc_client"]["server_name"], PROXY)
        self.assertEqual(public["tcp_rate_limits"], [{"type": "minute", "limit": 1000}])
        self.assertEqual(public["datastore"]["type"], "embedded")
        self.assertTrue(public["datastore"]["settings"]["path"].endswith(
            "run/public-proxy-1/announcements.sqlite"))
        self.assertEqual(settings["metrics"], {"bind_address": "localhost:2114"})

    def test_defaults(self) -> None:
        public = self.load({"public": {
            "name": PROXY,
            "jsonrpc_server": {"bind_address": "127.0.0.1:0"},
            "jsonrpc_client": {"endpoint": "http://127.0.0.1:1/jsonrpc"},
        }})["public"]
        self.assertEqual(public["datastore"], {"type": "embedded", "settings": {}})
        self.assertEqual(public["tls_bind_address"], "localhost:443")
        self.assertEqual(public["internal_bind_address"], "localhost:9999")
        self.assertEqual(public["internal_endpoint"], "localhost:9999")
        self.assertEqual(public["tcp_rate_limits"], [])
        self.assertEqual(public["accept_timeout"], 10.0)
        self.assertEqual(public["max_pending_tokens"], 10_000)
        self.assertEqual(public["read_timeout"], 5.0)
        self.assertEqual(public["splice_buffer_bytes"], 262_144)
        self.assertEqual(public["idle_timeout"], 3600.0)

    def test_fraction_of_accept_timeout_is_kept(self) -> None:
        public = public_section(Path("/nonexistent"), 1, accept_timeout=2.5)
        self.assertEqual(self.load({"public": public})["public"]["accept_timeout"], 2.5)

    def test_missing_keys(self) -> None:
        for key in ("name", "jsonrpc_client", "jsonrpc_server"):
            public = public_section(Path("/nonexistent"), 1)
            del public[key]
            text = self.refused({"public": public})
            self.assertIn(f"public.{key}", text)
            self.assertIn("is required", text)

    def test_bad_values(self) -> None:
        cases: list[tuple[str, Any]] = [
            ("name", 7),
            ("name", ""),
            ("accept_timeout", "soon"),
            ("accept_timeout", 0),
            ("accept_timeout", 3001),
            ("max_pending_tokens", 0),
            ("max_pending_tokens", 1.5),
            ("read_timeout", -1),
            ("splice_buffer_bytes", 10),
            ("idle_timeout", True),
            ("internal_endpoint", "localhost"),
            ("internal_endpoint", ":9999"),
            ("internal_bind_address", "localhost:99999"),
            ("tls_bind_address", ["localhost:443"]),
            ("tcp_rate_limits", [{"type": "fortnight", "limit": 1}]),
            ("tcp_rate_limits", {"type": "minute", "limit": 1}),
            ("datastore", {"type": "file"}),
            ("jsonrpc_client", {"endpoint": "ftp://x/"}),
            ("jsonrpc_server", {"bind_address": "127.0.0.1:0", "tls_typo": {}}),
        ]
        for key, value in cases:
            public = public_section(Path("/nonexistent"), 1, **{key: value})
            text = self.refused({"public": public})
            self.assertIn(f"public.{key}", text, (key, value))

    def test_unknown_keys(self) -> None:
        public = public_section(Path("/nonexistent"), 1, validate_client=False)
        self.assertIn("public.validate_client", self.refused({"public": public}))
        self.assertIn("publik", self.refused({"publik": {}}))

    def test_options(self) -> None:
        folder = write_settings(Path(self.mktemp()).absolute(),
                                {"public": public_section(Path("/nonexistent"), 1)})
        options = Options()
        options.parseOptions(["--mode", "public", "--settings", str(folder)])
        self.assertEqual(options.settings["public"]["name"], PROXY)

    def set_environment(self, value: str | None) -> None:
        old = os.environ.pop("PROXY_SETTINGS", None)
        if value is not None:
            os.environ["PROXY_SETTINGS"] = value

        def restore() -> None:
            os.environ.pop("PROXY_SETTINGS", None)
            if old is not None:
                os.environ["PROXY_SETTINGS"] = old

        self.addCleanup(restore)

    def test_options_from_environment(self) -> None:
        folder = write_settings(Path(self.mktemp()).absolute(),
                                {"public": public_section(Path("/nonexistent"), 1)})
        self.set_environment(str(folder))
        options = Options()
        options.parseOptions(["--mode", "public"])
        self.assertEqual(options.settings["public"]["name"], PROXY)

    def usage_error(self, argv: list[str]) -> str:
        # command-line mistakes are usage errors; settings and file errors end the
        # process with one line (SystemExit), never with twistd's usage text
        with self.assertRaises((usage.UsageError, SystemExit)) as caught:
            Options().parseOptions(argv)
        error = caught.exception
        text = str(error.code if isinstance(error, SystemExit) else error)
        self.assertNotIn("\n", text)
        return text

    def test_option_errors(self) -> None:
        folder = write_settings(Path(self.mktemp()).absolute(), {"metrics": {
            "bind_address": "127.0.0.1:0"}})
        self.assertIn("--mode is required", self.usage_error(["--settings", str(folder)]))
        self.assertIn("public or private", self.usage_error(["--mode", "pub"]))
        self.assertIn("no 'private' section",
                      self.usage_error(["--mode", "private", "--settings", str(folder)]))
        self.assertIn("no 'public' section",
                      self.usage_error(["--mode", "public", "--settings", str(folder)]))
        self.set_environment(None)
        self.assertIn("PROXY_SETTINGS", self.usage_error(["--mode", "public"]))

    def test_unusable_tls_files_are_one_usage_error(self) -> None:
        public = public_section(Path("/nonexistent"), 1)
        public["jsonrpc_server"]["tls"]["key_file"] = "/nonexistent/key.pem"
        folder = write_settings(Path(self.mktemp()).absolute(), {"public": public})
        text = self.usage_error(["--mode", "public", "--settings", str(folder)])
        self.assertIn("public.jsonrpc_server.tls", text)
        public = public_section(Path("/nonexistent"), 1)
        public["jsonrpc_client"]["tls"]["ca_certificate_files"] = ["/nonexistent/ca.pem"]
        folder = write_settings(Path(self.mktemp()).absolute(), {"public": public})
        text = self.usage_error(["--mode", "public", "--settings", str(folder)])
        self.assertIn("public.jsonrpc_client.tls", text)


# ------------------------------------------------------------------- network helpers


class Party(Protocol):
    """One side of a P2P pairing: presents a token, then collects what it receives."""

    def __init__(self, token: bytes, send: bytes = b"") -> None:
        self.token = token
        self.send = send
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.token + self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for item in list(self._waiting):
            if len(self.received) >= item[0]:
                self._waiting.remove(item)
                item[1].callback(self.received)

    def connectionLost(self, reason: Any) -> None:
        for _, d in self._waiting:
            d.errback(reason)
        self._waiting = []
        self.lost.callback(None)

    def wait_for(self, size: int) -> Deferred[bytes]:
        if len(self.received) >= size:
            return succeed(self.received)
        d: Deferred[bytes] = Deferred()
        self._waiting.append((size, d))
        return d


def connect_party(port: int, party: Party) -> Deferred[Party]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), party)


def connect_party_from(source: str, port: int, party: Party) -> Deferred[Party]:
    """``party`` connected from loopback address ``source``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return connectProtocol(endpoint, party)


def client_info(name: str = "hd-1") -> dict[str, Any]:
    return {"name": name, "entry": {"name": name, "channels": []}}


class ServiceTests(unittest.TestCase):
    """The public proxy built as twistd does, over real loopback TLS and TCP."""

    @inlineCallbacks
    def start_proxy(self, **changes: Any):
        """Start a fake EPS and the proxy; returns (proxy service, fake, caller client)."""
        self.fake = FakeEPS()
        eps_port = yield self.fake.start(self)
        folder = Path(self.mktemp()).absolute()
        settings = {"public": public_section(folder, eps_port, **changes)}
        options = Options()
        options.parseOptions(["--mode", "public", "--settings",
                              str(write_settings(folder, settings))])
        self.top = makeService(options, reactor, exit_on_failure=False)
        self.proxy = self.top.services[0]
        self.top.startService()
        self.addCleanup(self.top.stopService)
        ports = yield self.proxy.when_ready()
        self.internal_port = ports.internal.getHost().port
        # The endpoint the parties are told: known only now that the port is bound.
        self.proxy.proxy.internal_endpoint = f"127.0.0.1:{self.internal_port}"
        self.jsonrpc_port = ports.jsonrpc.getHost().port
        self.client = caller_client(self.jsonrpc_port)
        self.addCleanup(self.client.close)
        return self.proxy

    def request(self, **params: Any) -> Deferred[Any]:
        params.setdefault("to", "hd-2")
        params.setdefault("channel", "eps_server")
        params.setdefault("_client", client_info())
        return self.client.call("requestConnection", params)

    @inlineCallbacks
    def assertRPCError(self, d: Deferred[Any], code: int) -> Any:
        try:
            yield d
        except JSONRPCError as e:
            self.assertEqual(e.code, code, e)
            return e
        self.fail(f"expected JSON-RPC error {code}")

    def play_b(self, send: bytes = b"") -> list[Party]:
        """Make the fake EPS act as B: dial the internal endpoint with the token, then {}."""
        parties: list[Party] = []

        def answer(params: dict[str, Any]) -> Deferred[Any]:
            party = Party(base64.b64decode(params["token"]), send)
            parties.append(party)
            self.addCleanup(lambda: party.transport and party.transport.abortConnection())
            host, port = params["endpoint"].rsplit(":", 1)
            return connect_party(int(port), party).addCallback(lambda _: {})

        self.fake.answer = answer
        return parties

    @inlineCallbacks
    def test_brokers_and_splices(self):
        yield self.start_proxy()
        b_side = self.play_b(send=b"hello from B")
        answer = yield self.request(to="hd-2", channel="grpc_server")
        self.assertEqual(set(answer), {"token", "endpoint"})
        self.assertEqual(answer["endpoint"], f"127.0.0.1:{self.internal_port}")
        token = base64.b64decode(answer["token"], validate=True)
        self.assertEqual(len(token), 32)
        self.assertEqual(len(answer["token"]), 44)

        [(method, params, context)] = self.fake.calls
        self.assertEqual(method, "hd-2._connectionRequest")
        self.assertEqual(params, {"endpoint": answer["endpoint"], "client": client_info(),
                                  "channel": "grpc_server", "token": answer["token"]})
        self.assertRegex(context.request_id, r"^[0-9a-f]{32}$")

        a = Party(token, b"hello from A")
        self.addCleanup(lambda: a.transport and a.transport.abortConnection())
        yield connect_party(self.internal_port, a)
        [b] = b_side
        self.assertEqual((yield a.wait_for(12)), b"hello from B")
        self.assertEqual((yield b.wait_for(12)), b"hello from A")
        self.assertEqual(self.proxy.rendezvous.pairings, 1)
        self.assertEqual(self.proxy.rendezvous.pending, 0)
        self.assertEqual(self.proxy.rendezvous.active_splices, 1)

        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn("proxy_pairings_total 1.0", metrics)
        self.assertIn("proxy_pending_tokens 0.0", metrics)
        self.assertIn("proxy_active_splices 1.0", metrics)
        self.assertIn('proxy_jsonrpc_requests_total{method="requestConnection",outcome="ok"} 1.0',
                      metrics)

        # A used token pairs nobody else.
        late = Party(token)
        yield connect_party(self.internal_port, late)
        yield late.lost
        self.assertEqual(late.received, b"")

        # Close propagates; the service stops with nothing left.
        a.transport.loseConnection()
        yield b.lost
        yield self.top.stopService()
        self.assertEqual(self.proxy.rendezvous.active_splices, 0)

    @inlineCallbacks
    def test_errors_of_the_target_pass_through(self):
        yield self.start_proxy()

        def refuse(params: dict[str, Any]) -> Any:
            raise JSONRPCError(1, "permission denied", {"method": "_connectionRequest"})

        self.fake.answer = refuse
        error = yield self.assertRPCError(self.request(), 1)
        self.assertEqual(error.message, "permission denied")
        self.assertEqual(error.data, {"method": "_connectionRequest"})
        self.assertEqual(self.proxy.rendezvous.pending, 0)

    @inlineCallbacks
    def test_no_answer_is_an_internal_error(self):
        yield self.start_proxy(accept_timeout=0.5)
        self.fake.answer = lambda params: Deferred()  # never answers
        error = yield self.assertRPCError(self.request(), INTERNAL_ERROR)
        self.assertIn("hd-2", error.message)
        self.assertEqual(self.proxy.rendezvous.pending, 0)
        self.assertEqual(len(self.fake.calls), 1)

    @inlineCallbacks
    def test_unreachable_own_eps_is_an_internal_error(self):
        yield self.start_proxy()
        yield self.fake.port.stopListening()
        yield self.assertRPCError(self.request(), INTERNAL_ERROR)
        self.assertEqual(self.proxy.rendezvous.pending, 0)

    @inlineCallbacks
    def test_full_token_table_refuses_clearly(self):
        yield self.start_proxy(max_pending_tokens=2)
        # The fake answers {} without anyone dialling: the tokens stay pending.
        yield self.request(to="hd-2")
        yield self.request(to="hd-3")
        error = yield self.assertRPCError(self.request(to="hd-4"), TOO_MANY_PENDING)
        self.assertIn("too many pending connections", error.message)
        self.assertEqual([c[0] for c in self.fake.calls],
                         ["hd-2._connectionRequest", "hd-3._connectionRequest"])
        self.assertEqual(self.proxy.rendezvous.pending, 2)
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn('outcome="error 503"', metrics)

    @inlineCallbacks
    def test_flood_ends_with_nothing_pending(self):
        # Long enough that no token expires while the 20 calls are still being answered
        # on a busy machine (then more than 5 would get one).
        yield self.start_proxy(max_pending_tokens=5, accept_timeout=2)
        results = yield Deferred.fromCoroutine(self._flood(20))
        self.assertEqual(results.count("ok"), 5)
        self.assertEqual(results.count(TOO_MANY_PENDING), 15)
        # Nobody presents the tokens: they expire (after 2 s) and the table empties.
        yield until(lambda: self.proxy.rendezvous.pending == 0, within=5)
        self.assertEqual(self.proxy.rendezvous.timeouts, 5)
        yield self.request()

    async def _flood(self, count: int) -> list[Any]:
        outcomes = await DeferredList([self.request(to=f"hd-{i}") for i in range(count)],
                                      consumeErrors=True)
        return ["ok" if ok else value.value.code for ok, value in outcomes]

    @inlineCallbacks
    def test_refused_params(self):
        yield self.start_proxy()
        for params, code in [
            ({"channel": "jsonrpc_server"}, INVALID_PARAMS),
            ({"channel": "eps_client"}, INVALID_PARAMS),
            ({"channel": 5}, INVALID_PARAMS),
            ({"to": ""}, INVALID_PARAMS),
            ({"to": "hd-2._ping(1)"}, INVALID_PARAMS),
            ({"to": "a b"}, INVALID_PARAMS),
            ({"to": "x" * 300}, INVALID_PARAMS),
            ({"to": PROXY}, INVALID_PARAMS),
            ({"_client": {"name": "hd-1"}}, INVALID_PARAMS),
            ({"_client": None}, NOT_AUTHORIZED),
        ]:
            yield self.assertRPCError(self.request(**params), code)
        self.assertEqual(self.fake.calls, [])
        self.assertEqual(self.proxy.rendezvous.pending, 0)

    @inlineCallbacks
    def test_only_the_own_eps_may_call(self):
        yield self.start_proxy()
        other = caller_client(self.jsonrpc_port, name="hd-1")
        self.addCleanup(other.close)
        error = yield self.assertRPCError(
            other.call("requestConnection", {"to": "hd-2", "channel": "eps_server",
                                             "_client": client_info()}),
            NOT_AUTHORIZED)
        self.assertIn("own endpoint server", error.message)
        self.assertEqual(self.fake.calls, [])

    @inlineCallbacks
    def test_unknown_token_is_closed(self):
        yield self.start_proxy()
        stranger = Party(os.urandom(32), b"data")
        yield connect_party(self.internal_port, stranger)
        yield stranger.lost
        self.assertEqual(stranger.received, b"")

    @inlineCallbacks
    def test_internal_listener_is_rate_limited(self):
        yield self.start_proxy(tcp_rate_limits=[{"type": "minute", "limit": 2}])
        for _ in range(2):
            stranger = Party(os.urandom(32))
            yield connect_party(self.internal_port, stranger)
            yield stranger.lost
        self.assertEqual(self.proxy.rendezvous.refused, 2)
        limited = Party(os.urandom(32))
        yield connect_party(self.internal_port, limited)
        yield limited.lost
        # Closed by the limiter before the rendezvous saw it.
        self.assertEqual(self.proxy.rendezvous.refused, 2)
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn("proxy_internal_rate_limited_connections_total 1.0", metrics)
        self.assertIn("proxy_refusals_total 2.0", metrics)

    @inlineCallbacks
    def test_brokered_connections_do_not_use_up_the_rate_limit(self):
        """
        A private proxy or EPS sends every brokered connection from one address: those
        presenting a live token are not counted, failing ones still are.
        """
        yield self.start_proxy(tcp_rate_limits=[{"type": "minute", "limit": 2}])
        for n in range(4):  # four pairings: eight connections from 127.0.0.1
            token = self.proxy.rendezvous.new_token()
            left, right = Party(token, b"ping %d" % n), Party(token)
            yield connect_party(self.internal_port, left)
            yield connect_party(self.internal_port, right)
            self.assertEqual((yield right.wait_for(6)), b"ping %d" % n)
            left.transport.loseConnection()
            yield right.lost
        for _ in range(2):  # two failures are within the limit ...
            stranger = Party(os.urandom(32))
            yield connect_party(self.internal_port, stranger)
            yield stranger.lost
        limited = Party(os.urandom(32))  # ... the third is closed at accept
        yield connect_party(self.internal_port, limited)
        yield limited.lost
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn("proxy_internal_rate_limited_connections_total 1.0", metrics)
        self.assertIn("proxy_pairings_total 4.0", metrics)
        self.assertIn("proxy_refusals_total 2.0", metrics)

    @inlineCallbacks
    def test_tls_listener_rate_limit_is_counted(self):
        """Refused by the listener's limiter before the SNI front saw them: still counted."""
        yield self.start_proxy(tcp_rate_limits=[{"type": "minute", "limit": 1}])
        tls_port = (yield self.proxy.when_ready()).tls.getHost().port
        for _ in range(3):
            client = Party(b"\x16\x03\x01\x00\x05hello")  # not a hello: closed either way
            yield connect_party(tls_port, client)
            yield client.lost
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn('proxy_tls_connections_total{outcome="rate_limited"} 2.0', metrics)
        self.assertIn('proxy_tls_connections_total{outcome="accepted"} 1.0', metrics)

    @inlineCallbacks
    def test_untrusted_proxy_headers_are_refused_and_counted_trusted_ones_read(self):
        yield self.start_proxy(proxy_protocol=True, proxy_protocol_trusted=["127.0.0.2/32"])
        tls_port = (yield self.proxy.when_ready()).tls.getHost().port
        front = self.proxy.front
        header = b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\n"
        hello = openssl_hello(b"nobody.example")
        stranger = Party(header + hello)  # claims another client's address
        yield connect_party_from("127.0.0.3", tls_port, stranger)
        yield stranger.lost
        self.assertEqual((front.untrusted_proxy_source, front.no_route), (1, 0))
        balancer = Party(header + hello)
        yield connect_party_from("127.0.0.2", tls_port, balancer)
        yield balancer.lost  # header read, hello read, no announcement for the name
        self.assertEqual((front.untrusted_proxy_source, front.no_route), (1, 1))
        self.assertEqual(front.bad_proxy_header, 0)
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn('proxy_tls_connections_total{outcome="untrusted_proxy_source"} 1.0',
                      metrics)

        # "data": the untrusted connection is read as a plain client (no header).
        changed = dict(self.proxy.settings, proxy_protocol_untrusted="data")
        self.proxy.reload(PROXY_SETTINGS.validate({"public": changed})["public"])
        direct = Party(hello)
        yield connect_party_from("127.0.0.3", tls_port, direct)
        yield direct.lost
        self.assertEqual((front.untrusted_proxy_source, front.no_route), (2, 2))
        claimed = Party(header + hello)  # a header from it is just bad data now
        yield connect_party_from("127.0.0.3", tls_port, claimed)
        yield claimed.lost
        self.assertEqual((front.untrusted_proxy_source, front.malformed), (3, 1))

    @inlineCallbacks
    def test_brokered_connections_do_not_count_against_their_address(self):
        """One connection per address at the internal endpoint, yet both parties from
        127.0.0.1 pair: a live token forgives its connection."""
        yield self.start_proxy(internal_max_connections_per_address=1)
        yield self._brokered_pair()  # both parties from 127.0.0.1, and they pair
        cap = self.proxy.internal_admission
        self.assertEqual((cap.current, cap.refused_per_address), (2, 0))
        stranger = Party(b"")  # silent, not forgiven: one is all 127.0.0.1 may hold
        holder = Party(b"")
        yield connect_party(self.internal_port, holder)
        yield connect_party(self.internal_port, stranger)
        yield DeferredList([holder.lost, stranger.lost], fireOnOneCallback=True)
        self.assertEqual(cap.refused_per_address, 1)

    @inlineCallbacks
    def _brokered_pair(self) -> Any:
        """A and B paired through the internal endpoint by a brokered token, each having
        read the other's first bytes; returns the proxy's splice of them."""
        b_side = self.play_b(send=b"from B")
        answer = yield self.request(to="hd-2", channel="grpc_server")
        a = Party(base64.b64decode(answer["token"]), b"from A")
        self.addCleanup(lambda: a.transport and a.transport.abortConnection())
        yield connect_party(self.internal_port, a)
        self.assertEqual((yield a.wait_for(6)), b"from B")
        [b] = b_side
        self.assertEqual((yield b.wait_for(6)), b"from A")
        (pair,) = self.proxy.rendezvous.splices
        return pair

    @inlineCallbacks
    def test_the_splice_engine_relays_brokered_pairs(self):
        self.assertTrue(splice_engine.available(), "the splice engine's C part is not built")
        yield self.start_proxy()
        pair = yield self._brokered_pair()
        self.assertIsNotNone(pair.engine_handle)  # relayed in C, not by the reactor
        self.assertEqual(pair.bytes_relayed, 12)
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn("proxy_engine_splices 1.0", metrics)
        # A restart setting: a reload that changes it is refused, naming it.
        changed = dict(self.proxy.settings, splice_engine=False)
        with self.assertRaises(Exception) as caught:
            self.proxy.reload(PROXY_SETTINGS.validate({"public": changed})["public"])
        self.assertIn("splice_engine: changing it needs a restart", str(caught.exception))

    @inlineCallbacks
    def test_splice_engine_false_relays_in_python(self):
        yield self.start_proxy(splice_engine=False)
        self.assertIsNone(self.proxy.rendezvous.engine)
        pair = yield self._brokered_pair()
        self.assertIsNone(pair.engine_handle)
        self.assertTrue(pair.own_reader)  # the Python splice's own reader
        self.assertEqual(pair.bytes_relayed, 12)

    def test_bad_trusted_sources_are_refused(self):
        folder = Path(self.mktemp()).absolute()
        for bad in (["10.0.0.0/33"], ["example.org"], "10.0.0.0/8", [""]):
            with self.assertRaises(Exception) as caught:
                PROXY_SETTINGS.validate({"public": public_section(
                    folder, 1, proxy_protocol_trusted=bad)})
            self.assertIn("proxy_protocol_trusted", str(caught.exception))
        with self.assertRaises(Exception):
            PROXY_SETTINGS.validate({"public": public_section(
                folder, 1, proxy_protocol_untrusted="ignore")})

    @inlineCallbacks
    def test_connection_caps_from_settings_reload_and_metrics(self):
        yield self.start_proxy(tls_max_connections=5, tls_max_connections_per_address=1,
                               internal_max_connections=7)
        tls_port = (yield self.proxy.when_ready()).tls.getHost().port
        tls_cap, internal = self.proxy.tls_admission, self.proxy.internal_admission
        self.assertEqual((tls_cap.cap, tls_cap.per_address, internal.cap), (5, 1, 7))
        # One address holds one connection at a time on the TLS listener.
        first, second = Party(b""), Party(b"")
        yield connect_party_from("127.0.0.4", tls_port, first)
        yield connect_party_from("127.0.0.4", tls_port, second)
        yield DeferredList([first.lost, second.lost], fireOnOneCallback=True)
        self.assertEqual(tls_cap.refused_per_address, 1)
        self.assertEqual(int(first.lost.called) + int(second.lost.called), 1)
        metrics = generate_latest(self.proxy.registry).decode()
        self.assertIn('proxy_listener_max_connections{listener="public.tls"} 5.0', metrics)
        self.assertIn('proxy_listener_per_address_refused_total{listener="public.tls"} 1.0',
                      metrics)
        for party in (first, second):
            if party.transport is not None and not party.lost.called:
                party.transport.loseConnection()
                yield party.lost
        changed = dict(self.proxy.settings, tls_max_connections=9,
                       tls_max_connections_per_address=3)
        del changed["internal_max_connections"]  # back to the default
        self.proxy.reload(PROXY_SETTINGS.validate({"public": changed})["public"])
        self.assertEqual((tls_cap.cap, tls_cap.per_address), (9, 3))
        self.assertEqual(internal.cap, admission.default_listener_cap(internal.budget.cap))

    @inlineCallbacks
    def test_a_port_in_use_fails_the_start(self):
        self.fake = FakeEPS()
        eps_port = yield self.fake.start(self)
        folder = Path(self.mktemp()).absolute()
        public = public_section(folder, eps_port)
        public["jsonrpc_server"]["bind_address"] = f"127.0.0.1:{eps_port}"
        options = Options()
        options.parseOptions(["--mode", "public", "--settings",
                              str(write_settings(folder, {"public": public}))])
        top = makeService(options, reactor, exit_on_failure=False)
        top.startService()
        self.addCleanup(top.stopService)
        with self.assertRaises(Exception) as caught:
            yield top.services[0].when_ready()
        self.assertIn(str(eps_port), str(caught.exception))
        self.assertEqual(top.services[0].ports, [])


@inlineCallbacks
def until(condition: Callable[[], bool], within: float):
    """Wait (polling the reactor's clock) until ``condition()``; fail after ``within`` s."""
    deadline = reactor.seconds() + within
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        yield task.deferLater(reactor, 0.02, lambda: None)


# ------------------------------------------------------------------------- twistd


class TwistdTests(unittest.TestCase):
    def test_plugin_is_found(self):
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertEqual(makers["proxy"].module, "epsproxy.proxy.tap")

    @inlineCallbacks
    def test_serve_and_stop(self):
        fake = FakeEPS()
        eps_port = yield fake.start(self)
        folder = Path(self.mktemp()).absolute()
        write_settings(folder, {"public": public_section(folder, eps_port)})
        protocol = TwistdProcess(
            r"internal endpoint on [\d.]+:(\d+) .*JSON-RPC on [\d.]+:(\d+)/jsonrpc"
        )
        env = dict(os.environ, PROXY_SETTINGS=str(folder))
        reactor.spawnProcess(protocol, TWISTD,
                             [TWISTD, "-n", "--pidfile=", "proxy", "--mode", "public"],
                             env=env, path="/")
        ended = []
        self.addCleanup(lambda: ended or protocol.transport.signalProcess(signal.SIGKILL))
        match = yield protocol.matched
        client = caller_client(int(match.group(2)))
        self.addCleanup(client.close)
        error = yield self.assertFailure(
            client.call("requestConnection", {"to": "hd-2", "channel": "eps_client",
                                              "_client": client_info()}),
            JSONRPCError)
        self.assertEqual(error.code, INVALID_PARAMS)
        yield client.close()
        protocol.transport.signalProcess(signal.SIGTERM)
        yield protocol.ended
        ended.append(True)
        output = protocol.output.decode()
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
        self.assertIn("TLS passthrough on 127.0.0.1:", output)

    @inlineCallbacks
    def test_bad_settings_stop_with_one_clear_message(self):
        folder = Path(self.mktemp()).absolute()
        write_settings(folder, {"public": {"name": PROXY, "accept_timeout": "soon"}})
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "proxy", "--mode", "public", "--settings", str(folder)],
            env=dict(os.environ), path="/", reactor=reactor,
        )
        self.assertNotEqual(code, 0)
        text = (out + err).decode()
        self.assertNotIn("Traceback", text)
        self.assertIn("proxy.yml", text)
        self.assertIn("public.", text)


# ------------------------------------------------------------- with real endpoint servers


class BrokeredByRealEndpointServers(unittest.TestCase):
    """
    A smoke test of SPEC §15 with real endpoint servers on loopback: hd-1 calls
    ``hd-2._ping``; hd-2's server is behind the proxy, so hd-1 asks the proxy (through its
    endpoint server PE) for a connection and the two meet at the internal endpoint.
    """

    timeout = 30

    @inlineCallbacks
    def test_ping_through_the_proxy(self):
        from .support.eps import (
            Network,
            client_channel,
            gateway_channel,
            gateway_client,
            server_channel,
            service,
        )
        from .support.p2p import answer_through, proxy_channels, start_public_proxy

        hd = ("health-departments",)
        net = Network(self)
        net.operator(PROXY, ["proxy-providers"], [service("hd-proxy", hd, "requestConnection")])
        net.operator("hd-1", ["health-departments"], [service("internals", hd, "_ping")])
        net.operator("hd-2", ["health-departments"], [
            service("internals", hd, "_ping"),
            service("connection-requests", ("proxy-providers",), "_connectionRequest"),
        ])

        # The proxy first (its JSON-RPC port is what PE's jsonrpc_client calls), then its
        # endpoint server PE, and the proxy's client to PE's gateway.
        proxy, ports = yield start_public_proxy(self, Path(self.mktemp()).absolute())
        yield net.start(PROXY, proxy_channels(ports))
        net.channels(PROXY, {"type": "eps_server",
                             "settings": {"address": net.server_address(PROXY)}})
        yield answer_through(self, proxy, net.gateway_url(PROXY))

        # hd-2 behind the proxy keeps a link to PE; hd-1 only dials.
        net.channels("hd-2", {"type": "eps_server",
                              "settings": {"address": "127.0.0.1:1", "proxy": PROXY}},
                     {"type": "eps_client"})
        yield net.start("hd-2", [server_channel("hd-2"), client_channel(
            "hd-2", reconnect_initial_delay=0.05, reconnect_max_delay=0.2)])
        link = yield net.channel("hd-2", "eps_client").keeper_ready(PROXY)
        yield link.when_ready()
        net.channels("hd-1", {"type": "eps_client"})
        yield net.start("hd-1", [client_channel("hd-1"), gateway_channel("hd-1")])

        hd1 = gateway_client(self, net.gateway_url("hd-1"))
        result = yield hd1.call("hd-2._ping", {}, id="1")
        self.assertEqual(result["serverInfo"]["name"], "hd-2")
        self.assertEqual(proxy.rendezvous.pairings, 1)
        self.assertEqual(proxy.rendezvous.pending, 0)
        self.assertGreater(proxy.rendezvous.bytes_spliced, 0)
