"""
The internal endpoint's token rendezvous (epsproxy.proxy.rendezvous_server): timing rules with a
Clock and fake transports, then real loopback sockets — fragmented tokens, bytes right
after the token, wrong/reused tokens, a late second party, a party stalling inside the
token, floods over the cap, park() with replayed first bytes, close_all, and a mutual-TLS
EPS link through the splice in which the proxy only ever relays TLS records.
"""

from __future__ import annotations

import secrets

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from epsproxy.net.token import TOKEN_BYTES, dial_with_token, token_tag
from epsproxy.proxy import rendezvous_server as rendezvous_module
from epsproxy.proxy.rendezvous_server import Rendezvous, RendezvousFull
from tests.support.splice import Peer, connect, fake_connection, listen, spliced_pair
from tests.support.tls import tls_block


def party(rv: Rendezvous, host: str = "203.0.113.77"):
    """A connection accepted by ``rv``'s factory, on a fake transport."""
    p = rv.factory().buildProtocol(None)
    return p, fake_connection(p, host)


class WithClock(TestCase):
    """The rules, driven by a Clock (no sockets)."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.rv = Rendezvous(self.clock, accept_timeout=10, read_timeout=5, max_pending=3,
                             buffer_bytes=100, idle_timeout=60)

    def test_token_in_one_byte_chunks_and_bytes_after_it(self):
        token = self.rv.new_token()
        a, at = party(self.rv)
        for i in range(TOKEN_BYTES):
            a.dataReceived(token[i:i + 1])
        b, bt = party(self.rv)
        b.dataReceived(token + b"hello")  # the rest of this read is stream data
        self.assertEqual(at.value(), b"hello")
        self.assertEqual((self.rv.pairings, self.rv.pending, self.rv.active_splices), (1, 0, 1))
        bt.protocol.dataReceived(b"more")
        at.protocol.dataReceived(b"back")
        self.assertEqual((at.value(), bt.value()), (b"hellomore", b"back"))

    def test_31_bytes_then_silence_is_closed_at_read_timeout(self):
        token = self.rv.new_token()
        a, at = party(self.rv)
        a.dataReceived(token[:31])
        self.clock.advance(4.9)
        self.assertFalse(at.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(at.disconnecting)
        self.assertEqual(self.rv.timeouts, 1)
        self.assertEqual(self.rv.pending, 1)  # the token itself is still valid
        self.clock.advance(10)
        self.assertEqual(self.rv.pending, 0)

    def test_end_of_stream_inside_the_token_is_refused(self):
        a, at = party(self.rv)
        a.dataReceived(b"x" * 31)
        a.readConnectionLost()
        self.assertTrue(at.disconnecting)
        self.assertEqual(self.rv.refused, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_party_alone_is_closed_after_accept_timeout(self):
        token = self.rv.new_token()
        self.clock.advance(9)
        a, at = party(self.rv)
        a.dataReceived(token)
        self.clock.advance(9.9)  # the partner gets a whole accept_timeout from a's arrival
        self.assertFalse(at.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(at.disconnecting)
        self.assertEqual((self.rv.timeouts, self.rv.pending), (1, 0))
        late, lt = party(self.rv)
        late.dataReceived(token)  # the late second party finds nothing
        self.assertTrue(lt.disconnecting)
        self.assertEqual(self.rv.refused, 1)

    def test_no_read_deadline_once_spliced(self):
        token = self.rv.new_token()
        (a, at), (b, bt) = party(self.rv), party(self.rv)
        a.dataReceived(token)
        b.dataReceived(token)
        for _ in range(50):  # far beyond read_timeout and accept_timeout
            self.clock.advance(30)
            at.protocol.dataReceived(b".")
        self.assertFalse(at.disconnecting or bt.disconnecting)
        self.clock.advance(60)  # only the idle timeout ends it
        self.assertTrue(at.aborted and bt.aborted)
        self.assertEqual(self.rv.active_splices, 0)
        self.assertEqual(self.rv.bytes_spliced, 50)

    def test_cap_and_expiry(self):
        tokens = [self.rv.new_token() for _ in range(3)]
        self.assertEqual(len(set(tokens)), 3)
        with self.assertRaises(RendezvousFull):
            self.rv.new_token()
        with self.assertRaises(RendezvousFull):
            self.rv.park(secrets.token_bytes(32), Protocol(), b"")
        self.clock.advance(10)
        self.assertEqual((self.rv.pending, self.rv.timeouts), (0, 3))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.rv.new_token()

    def test_early_bytes_of_a_waiting_party_are_bounded(self):
        token = self.rv.new_token()
        a, at = party(self.rv)
        a.dataReceived(token + b"x" * 60)
        self.assertEqual(at.producerState, "producing")
        a.dataReceived(b"y" * 60)
        self.assertEqual(at.producerState, "paused")  # over buffer_bytes: paused
        b, bt = party(self.rv)
        b.dataReceived(token)
        self.assertEqual(bt.value(), b"x" * 60 + b"y" * 60)
        self.assertEqual(at.producerState, "producing")

    def test_waiting_party_leaving_spends_the_token(self):
        token = self.rv.new_token()
        a, at = party(self.rv)
        a.dataReceived(token)
        at.loseConnection()
        self.assertEqual(self.rv.pending, 0)
        b, bt = party(self.rv)
        b.dataReceived(token)
        self.assertTrue(bt.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_park_replays_first_bytes_to_the_partner(self):
        token = self.rv.new_token()
        client = Protocol()
        ct = fake_connection(client, "198.51.100.9")
        ct.pauseProducing()  # as the TLS listener leaves it
        self.rv.park(token, client, b"CLIENTHELLO")
        with self.assertRaises(ValueError):
            self.rv.park(token, Protocol(), b"")
        b, bt = party(self.rv)
        b.dataReceived(token + b"SERVERHELLO")
        self.assertEqual(bt.value(), b"CLIENTHELLO")
        self.assertEqual(ct.value(), b"SERVERHELLO")
        self.assertEqual(ct.producerState, "producing")
        self.assertEqual((self.rv.pairings, self.rv.pending), (1, 0))

    def test_park_with_a_token_of_its_own_expires_too(self):
        client = Protocol()
        ct = fake_connection(client)
        self.rv.park(secrets.token_bytes(32), client, b"hello")
        self.assertEqual(self.rv.pending, 1)
        self.clock.advance(10)
        self.assertTrue(ct.aborted)
        self.assertEqual((self.rv.pending, self.rv.timeouts), (0, 1))

    def test_cancel_closes_the_waiting_party(self):
        token = self.rv.new_token()
        a, at = party(self.rv)
        a.dataReceived(token)
        self.rv.cancel(token)
        self.rv.cancel(token)  # twice is harmless
        self.assertTrue(at.aborted)
        self.assertEqual(self.rv.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_all(self):
        token = self.rv.new_token()
        (a, at), (b, bt), (c, ct), (d, dt) = (party(self.rv) for _ in range(4))
        a.dataReceived(token[:5])  # reading its token
        other = self.rv.new_token()
        b.dataReceived(other)  # waiting
        c.dataReceived(token)
        d.dataReceived(token)  # spliced with c
        done = self.rv.close_all()
        self.assertTrue(done.called)
        self.assertTrue(all(t.disconnecting for t in (at, bt, ct, dt)))
        self.assertEqual((self.rv.pending, self.rv.active_splices), (0, 0))
        self.assertIsNone(self.rv.factory().buildProtocol(None))
        with self.assertRaises(RendezvousFull):
            self.rv.new_token()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_tokens_never_reach_the_logs(self):
        from twisted.logger import globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        token = self.rv.new_token()
        (a, _), (b, _), (c, _) = party(self.rv), party(self.rv), party(self.rv)
        a.dataReceived(token)
        b.dataReceived(token)
        c.dataReceived(token)  # refused: used
        text = repr(events)
        self.assertIn(token_tag(token), text)
        self.assertIn("203.0.x.x", text)
        self.assertNotIn("203.0.113.77", text)
        import base64

        for form in (repr(token), token.hex(), base64.b64encode(token).decode()):
            self.assertNotIn(form, text)


class RealSockets(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.rv = Rendezvous(reactor, accept_timeout=0.5, read_timeout=0.2)
        self.port = listen(self, self.rv)

    @defer.inlineCallbacks
    def test_fragmented_token_and_data_right_behind_it(self):
        token = self.rv.new_token()
        b = yield connect(self, self.port, Peer(token))
        a = yield connect(self, self.port, Peer())
        for i in range(TOKEN_BYTES):  # one byte per reactor turn
            a.transport.write(token[i:i + 1])
            yield task.deferLater(reactor, 0, lambda: None)
        a.transport.write(b"first words")
        yield b.wait_for(11)
        self.assertEqual(bytes(b.received), b"first words")
        self.assertEqual(self.rv.pairings, 1)

    @defer.inlineCallbacks
    def test_wrong_and_reused_tokens_are_closed(self):
        a, b = yield spliced_pair(self, self.rv, self.port)
        used = next(iter(self.rv.splices)).tag
        self.assertEqual(len(used), 4)
        for token in (secrets.token_bytes(32), None):
            if token is None:
                # reuse: the pair's token (recover it from a's first write)
                token = a.prefix
            late = yield connect(self, self.port, Peer(token + b"data"))
            yield late.closed
            self.assertEqual(bytes(late.received), b"")
        self.assertEqual(self.rv.refused, 2)
        self.assertEqual(self.rv.pairings, 1)

    @defer.inlineCallbacks
    def test_late_second_party(self):
        token = self.rv.new_token()
        first = yield connect(self, self.port, Peer(token))
        yield first.closed  # closed by accept_timeout (0.5 s)
        self.assertEqual((self.rv.timeouts, self.rv.pending), (1, 0))
        late = yield connect(self, self.port, Peer(token))
        yield late.closed
        self.assertEqual(self.rv.refused, 1)

    @defer.inlineCallbacks
    def test_31_bytes_and_a_stall_is_closed_at_read_timeout(self):
        token = self.rv.new_token()
        stalling = yield connect(self, self.port, Peer(token[:31]))
        started = reactor.seconds()
        yield stalling.closed
        self.assertGreaterEqual(reactor.seconds() - started, 0.15)
        self.assertEqual(self.rv.timeouts, 1)
        self.rv.cancel(token)
        self.assertEqual(self.rv.pending, 0)

    @defer.inlineCallbacks
    def test_flood_over_the_cap_then_everything_expires(self):
        rv = Rendezvous(reactor, accept_timeout=0.3, max_pending=50)
        port = listen(self, rv)
        tokens = [rv.new_token() for _ in range(50)]
        with self.assertRaises(RendezvousFull) as e:
            rv.new_token()
        self.assertIn("50", str(e.exception))
        waiting = []
        for token in tokens[:10]:
            waiting.append((yield connect(self, port, Peer(token))))
        # The parties restarted their tokens' timers, so once they are closed every
        # token without a party (made earlier) has expired too.
        yield defer.gatherResults([p.closed for p in waiting])
        self.assertEqual((rv.pending, rv.timeouts, rv.active_splices), (0, 50, 0))
        rv.new_token()

    @defer.inlineCallbacks
    def test_close_all_closes_every_connection(self):
        a, b = yield spliced_pair(self, self.rv, self.port)
        waiting = yield connect(self, self.port, Peer(self.rv.new_token()))
        reading = yield connect(self, self.port, Peer(b"abc"))
        yield self.rv.close_all()
        yield defer.gatherResults([p.closed for p in (a, b, waiting, reading)])
        self.assertEqual((self.rv.pending, self.rv.active_splices), (0, 0))

    @defer.inlineCallbacks
    def test_mutual_tls_link_through_the_splice_is_opaque_to_the_proxy(self):
        relayed: list[bytes] = []
        real_splice = rendezvous_module.splice

        def recording_splice(clock, first, second, **kw):
            relayed.append(kw.get("to_left", b"") + kw.get("to_right", b""))
            s = real_splice(clock, first, second, **kw)
            for end in (s.left, s.right):
                original = end.dataReceived

                def record(data, original=original):
                    relayed.append(data)
                    original(data)

                end.dataReceived = record
            return s

        self.patch(rendezvous_module, "splice", recording_splice)
        self.rv.accept_timeout = 10
        address = f"127.0.0.1:{self.port}"
        token = self.rv.new_token()
        server_side: list = []
        got = defer.Deferred()

        class Server(Protocol):
            def connectionMade(self):
                server_side.append(self)

            def dataReceived(self, data):
                self.transport.write(b"pong:" + data)

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"secret plaintext")

            def dataReceived(self, data):
                got.callback(data)

        # hd-2 dials first and serves TLS; hd-1 meets it as TLS client, as in SPEC §15.
        server = yield dial_with_token(reactor, address, token, tls_block("hd-2"),
                                       Factory.forProtocol(Server), tls_client_for=None)
        client = yield dial_with_token(reactor, address, token, tls_block("hd-1"),
                                       Factory.forProtocol(Client), tls_client_for="hd-2")
        self.addCleanup(lambda: client.transport.abortConnection())
        self.addCleanup(lambda: server.transport.abortConnection())
        answer = yield got
        self.assertEqual(answer, b"pong:secret plaintext")
        peer_cert = server_side[0].transport.getPeerCertificate()
        self.assertIn("hd-1", peer_cert.to_cryptography().subject.rfc4514_string())
        self.assertEqual(self.rv.pairings, 1)
        stream = b"".join(relayed)
        self.assertEqual(stream[:2], b"\x16\x03")  # starts with a TLS handshake record
        self.assertNotIn(b"secret plaintext", stream)
        self.assertNotIn(b"pong:", stream)
