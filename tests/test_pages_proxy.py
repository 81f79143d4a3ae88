"""
The proxies' status pages (issue 16), loaded in real headless Chromium: the public
proxy brokering hd-1 <-> hd-2 (a splice, an announcement by an operator whose name holds
markup, a refused server name), and a private proxy that announced a domain.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial.unittest import TestCase

from epsproxy.proxy.status_page import PrivateProxyPage, PublicProxyPage, pool_rows
from epsproxy.proxy.tap import Options, makeService
from tests.support.clienthello import stdlib_hello
from tests.support.p2p import start_p2p_network
from tests.support.pages import AnsweringEPS, dump_dom, serve_page
from tests.support.proxies import (
    PUBLIC_PROXY,
    caller_client,
    client,
    private_section,
    write_settings,
)

HOSTILE = "<script>document.title='owned'</script>"


class _Hello(Protocol):
    """Sends a ClientHello and fires ``closed`` when the proxy closes the connection."""

    def __init__(self, hello: bytes, closed: defer.Deferred) -> None:
        self.hello, self.closed = hello, closed

    def connectionMade(self) -> None:
        self.transport.write(self.hello)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


class PublicProxyPageInBrowser(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.p2p = yield start_p2p_network(self, Path(self.mktemp()).absolute())
        self.page = PublicProxyPage(self.p2p.proxy, reactor)
        self.port = yield serve_page(self, self.p2p.proxy.registry, self.page,
                                     self.p2p.proxy.readiness, program="proxy")

    @defer.inlineCallbacks
    def refuse_a_name(self, name: str):
        closed: defer.Deferred = defer.Deferred()
        factory = ClientFactory.forProtocol(lambda: _Hello(stdlib_hello(name), closed))
        reactor.connectTCP("127.0.0.1", self.p2p.proxy_ports.tls.getHost().port, factory)
        yield closed

    @defer.inlineCallbacks
    def test_splices_announcements_and_refused_names(self):
        yield self.p2p.hd1.call("hd-2._ping", {}, id="1")
        rpc = caller_client(self.p2p.proxy_ports.jsonrpc.getHost().port)
        self.addCleanup(rpc.close)
        result = yield rpc.call("announceConnections", {
            "connections": [{"domain": "app.internal-server.local"}],
            "_client": client(HOSTILE)})
        self.assertEqual(result, [None])
        yield self.refuse_a_name("nobody-announced.example")
        dom = yield dump_dom(self, f"http://127.0.0.1:{self.port}/")
        self.assertIn(f"<h1>Public proxy {PUBLIC_PROXY}</h1>", dom)
        # The operator's name is shown as text: the script never ran, nor became an element.
        self.assertIn("&lt;script&gt;document.title='owned'&lt;/script&gt;", dom)
        self.assertNotIn("<script>", dom)
        self.assertIn(f"<title>Public proxy {PUBLIC_PROXY}</title>", dom)
        self.assertIn("app.internal-server.local", dom)
        self.assertIn("<h2>Connection pools</h2><p class=\"empty\">none</p>", dom)  # issue 14
        self.assertRegex(dom, r"active splices</th><td>1</td>")
        self.assertRegex(dom, r"pairings since start</th><td>1</td>")
        self.assertIn("nobody-announced.example", dom)
        # ... with the client's address blurred, as in the logs.
        self.assertRegex(dom, r"nobody-announced\.example</td><td>127\.0\.x\.x</td>")
        self.assertIn("no announcement for the name", dom)
        self.assertIn("pairings/s", dom)


class PrivateProxyPageInBrowser(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_announcements_and_their_last_reannouncement(self):
        eps = AnsweringEPS()
        eps_port = yield eps.start(self)
        folder = Path(self.mktemp()).absolute()
        options = Options()
        options.parseOptions(["--mode", "private", "--settings", str(write_settings(
            folder, {"private": private_section(folder, eps_port, pool_size=0)}))])
        top = makeService(options, reactor, exit_on_failure=False)
        service = top.services[0]
        top.startService()
        self.addCleanup(top.stopService)
        yield service.when_ready()
        yield service.proxy.announcements.upsert(
            "app.internal-server.local", PUBLIC_PROXY, None, None)
        self.assertIsNotNone(service.reannounced_at)  # the round at start (nothing to send)
        yield service._reannounce()
        self.assertEqual(eps.calls, 1)
        page = PrivateProxyPage(service, reactor)
        port = yield serve_page(self, service.registry, page, service.readiness,
                                program="proxy")
        dom = yield dump_dom(self, f"http://127.0.0.1:{port}/")
        self.assertIn("<h1>Private proxy private-proxy-1.ga</h1>", dom)
        self.assertIn("app.internal-server.local", dom)
        self.assertIn(PUBLIC_PROXY, dom)
        self.assertRegex(dom, r"last re-announced</th><td>\d{4}-\d\d-\d\d ")
        self.assertRegex(dom, r"re-announcement calls</th><td>1</td>")
        self.assertRegex(dom, r"incoming connections forwarded</th><td>0</td>")
        self.assertIn("forwarded/s", dom)


class PoolHook(TestCase):
    def test_pool_rows(self):
        self.assertIsNone(pool_rows(None))
        self.assertEqual(pool_rows({"b": {"idle": 2, "busy": 1}, "a": "warming"}),
                         [("a", "state: warming"), ("b", "busy: 1, idle: 2")])
