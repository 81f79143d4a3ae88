"""
The service directory over real mutual TLS on loopback: every method, every refusal,
both stores, restarts.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial import unittest

from epsproxy.net.jsonrpc.envelope import JSONRPCError, TransportError

from .support.redis import RedisServer
from .support.sd import base_changes, change, sd_client, sign_chain, start_sd, write_sd_settings


class _SDTestMixin:
    """Starts an SD on port 0 per test; subclasses choose the datastore."""

    def datastore(self, folder: Path) -> dict | None:
        return None

    @inlineCallbacks
    def setUp(self):
        self.folder = Path(self.mktemp())
        yield self.prepare()
        write_sd_settings(self.folder, datastore=self.datastore(self.folder))
        self.sd = yield start_sd(self.folder)
        self.addCleanup(lambda: self.sd.stop())
        self.client = sd_client(self.sd.port_number)
        self.addCleanup(lambda: self.client.close())

    def prepare(self):
        return None

    @inlineCallbacks
    def restart(self):
        yield self.client.close()
        yield self.sd.stop()
        self.sd = yield start_sd(self.folder)
        self.client = sd_client(self.sd.port_number)

    @inlineCallbacks
    def assertRefused(self, code: int, method: str, params: dict):
        try:
            yield self.client.call(method, params)
        except JSONRPCError as e:
            self.assertEqual(e.code, code, e.message)
            return e
        self.fail(f"{method} was not refused")

    @inlineCallbacks
    def test_empty_directory(self):
        self.assertIsNone((yield self.client.call("getTip", {})))
        self.assertEqual((yield self.client.call("getRecords", {})), [])
        self.assertEqual((yield self.client.call("getEntries", {})), [])
        yield self.assertRefused(404, "getEntry", {"name": "hd-1"})

    @inlineCallbacks
    def test_submit_and_read_back(self):
        chain = sign_chain(base_changes())
        self.assertEqual((yield self.client.call("submitRecords", {"records": chain})), "ok")
        tip = yield self.client.call("getTip", {})
        self.assertEqual(tip["hash"], chain[-1]["hash"])
        self.assertEqual(tip, (yield self.client.call("tip", {})))
        everything = yield self.client.call("getRecords", {"after": ""})
        self.assertEqual([r["hash"] for r in everything], [r["hash"] for r in chain])
        after_first = yield self.client.call("getRecords", {"after": chain[0]["hash"]})
        self.assertEqual([r["hash"] for r in after_first], [r["hash"] for r in chain[1:]])
        since = yield self.client.call("getRecords", {"since": chain[1]["hash"]})
        self.assertEqual([r["hash"] for r in since], [r["hash"] for r in chain[2:]])
        unknown = yield self.client.call("getRecords", {"after": "ab" * 32})
        self.assertEqual(len(unknown), len(chain))
        entries = yield self.client.call("getEntries", {})
        self.assertEqual([e["name"] for e in entries], ["hd-1", "hd-2"])
        hd2 = yield self.client.call("getEntry", {"name": "hd-2"})
        self.assertEqual(hd2["groups"], ["health-departments"])
        self.assertEqual(hd2["channels"][0]["settings"]["address"], "localhost:8889")
        self.assertEqual(len(hd2["records"]), 2)

    @inlineCallbacks
    def test_append_onto_tip_and_stale_append(self):
        chain = sign_chain(base_changes())
        yield self.client.call("submitRecords", {"records": chain})
        more = sign_chain([change("hd-2", "groups", ["x"])], parent_hash=chain[-1]["hash"])
        yield self.client.call("submitRecords", {"records": more})
        stale = sign_chain([change("hd-2", "groups", ["y"])], parent_hash=chain[-1]["hash"])
        error = yield self.assertRefused(409, "submitRecords", {"records": stale})
        self.assertIn("stale", error.message)
        self.assertEqual(error.data["tip"], more[-1]["hash"])
        self.assertEqual((yield self.client.call("getEntry", {"name": "hd-2"}))["groups"], ["x"])

    @inlineCallbacks
    def _refused_batch_changes_nothing(self, batch: list[dict], code: int):
        chain = sign_chain(base_changes())
        yield self.client.call("submitRecords", {"records": chain})
        error = yield self.assertRefused(code, "submitRecords", {"records": batch(chain)})
        self.assertEqual((yield self.client.call("getTip", {}))["hash"], chain[-1]["hash"])
        self.assertEqual(len((yield self.client.call("getRecords", {}))), len(chain))
        return error

    def test_non_admin_signer_refused(self):
        return self._refused_batch_changes_nothing(
            lambda chain: sign_chain([change("hd-2", "groups", ["x"])],
                                     parent_hash=chain[-1]["hash"], name="hd-2"),
            403,
        )

    def test_foreign_ca_signer_refused(self):
        return self._refused_batch_changes_nothing(
            lambda chain: sign_chain([change("hd-2", "groups", ["x"])],
                                     parent_hash=chain[-1]["hash"], foreign=True),
            403,
        )

    def test_unpinned_signing_key_refused(self):
        return self._refused_batch_changes_nothing(
            lambda chain: sign_chain([change("hd-2", "groups", ["x"])],
                                     parent_hash=chain[-1]["hash"], alt=True),
            403,
        )

    def test_bad_signature_refused(self):
        def tampered(chain):
            batch = sign_chain([change("hd-2", "groups", ["x"])], parent_hash=chain[-1]["hash"])
            batch[0]["signature"]["s"] = str(int(batch[0]["signature"]["s"]) ^ 1)
            return batch

        return self._refused_batch_changes_nothing(tampered, 400)

    def test_tampered_data_refused(self):
        def tampered(chain):
            batch = sign_chain([change("hd-2", "groups", ["x"])], parent_hash=chain[-1]["hash"])
            batch[0]["record"]["data"] = ["sd-admin"]
            return batch

        return self._refused_batch_changes_nothing(tampered, 400)

    def test_half_bad_batch_writes_nothing(self):
        def half_bad(chain):
            batch = sign_chain(
                [change("hd-2", "groups", ["x"]), change("hd-2", "groups", ["y"])],
                parent_hash=chain[-1]["hash"],
            )
            batch[1]["signature"]["r"] = "1234567890123"
            return batch

        return self._refused_batch_changes_nothing(half_bad, 400)

    def test_unlinked_batch_refused(self):
        def unlinked(chain):
            first = sign_chain([change("hd-2", "groups", ["x"])], parent_hash=chain[-1]["hash"])
            second = sign_chain([change("hd-2", "groups", ["y"])], parent_hash=chain[-1]["hash"])
            return first + second

        return self._refused_batch_changes_nothing(unlinked, 400)

    @inlineCallbacks
    def test_reset_starts_a_new_chain(self):
        old = sign_chain(base_changes("2025-01-01T10:00:00Z"))
        yield self.client.call("submitRecords", {"records": old})
        new = sign_chain(base_changes("2025-02-01T10:00:00Z")[:2])
        yield self.client.call("submitRecords", {"records": new})
        self.assertEqual((yield self.client.call("getTip", {}))["hash"], new[-1]["hash"])
        after_old_tip = yield self.client.call("getRecords", {"after": old[-1]["hash"]})
        self.assertEqual([r["hash"] for r in after_old_tip], [r["hash"] for r in new])
        names = [e["name"] for e in (yield self.client.call("getEntries", {}))]
        self.assertEqual(names, ["hd-1"])

    @inlineCallbacks
    def test_reset_by_non_admin_refused(self):
        old = sign_chain(base_changes())
        yield self.client.call("submitRecords", {"records": old})
        reset = sign_chain(base_changes("2026-01-01T00:00:00Z")[1:2], name="hd-2")
        yield self.assertRefused(403, "submitRecords", {"records": reset})
        self.assertEqual((yield self.client.call("getTip", {}))["hash"], old[-1]["hash"])

    @inlineCallbacks
    def test_invalid_params(self):
        yield self.assertRefused(-32602, "submitRecords", {"records": []})
        yield self.assertRefused(-32602, "submitRecords", {"records": [{"hash": "zz"}]})
        yield self.assertRefused(-32602, "getRecords", {"after": "not-a-hash"})
        yield self.assertRefused(-32602, "getEntry", {})
        yield self.assertRefused(-32601, "dropEverything", {})

    @inlineCallbacks
    def test_restart_keeps_everything(self):
        chain = sign_chain(base_changes())
        yield self.client.call("submitRecords", {"records": chain})
        entries_before = yield self.client.call("getEntries", {})
        yield self.restart()
        self.assertEqual((yield self.client.call("getTip", {}))["hash"], chain[-1]["hash"])
        self.assertEqual((yield self.client.call("getEntries", {})), entries_before)
        more = sign_chain([change("hd-2", "groups", ["z"])], parent_hash=chain[-1]["hash"])
        self.assertEqual((yield self.client.call("submitRecords", {"records": more})), "ok")


class EmbeddedStoreSDTests(_SDTestMixin, unittest.TestCase):
    """The SD on its default embedded (SQLite) store."""


class RedisStoreSDTests(_SDTestMixin, unittest.TestCase):
    """The SD on a real redis-server."""

    @inlineCallbacks
    def prepare(self):
        self.redis = RedisServer(reactor)
        yield self.redis.start()
        self.addCleanup(self.redis.stop)

    def datastore(self, folder: Path) -> dict:
        return {
            "type": "redis",
            "settings": {"addresses": [self.redis.address], "key": "sd-entries"},
        }


class _Closed(Protocol):
    def __init__(self) -> None:
        self.closed: Deferred[bytes] = Deferred()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


class ListenerLimitsTests(unittest.TestCase):
    """Body size and connection-rate limits of the SD's listener, and client certificates."""

    @inlineCallbacks
    def start(self, **server):
        folder = write_sd_settings(Path(self.mktemp()), jsonrpc_server=server)
        sd = yield start_sd(folder)
        self.addCleanup(sd.stop)
        return sd

    @inlineCallbacks
    def test_oversized_body_refused(self):
        sd = yield self.start(max_body_bytes=2048)
        client = sd_client(sd.port_number)
        self.addCleanup(client.close)
        huge = sign_chain([change("hd-1", "groups", ["g" * 4000])])
        with self.assertRaises((JSONRPCError, TransportError)):
            yield client.call("submitRecords", {"records": huge})
        self.assertIsNone((yield client.call("getTip", {})))

    @inlineCallbacks
    def test_rate_limit_per_listener(self):
        sd = yield self.start(tcp_rate_limits=[{"type": "hour", "limit": 2}])
        endpoint_port = sd.port_number
        results = []
        for _ in range(3):
            factory = ClientFactory.forProtocol(_Closed)
            protocol = yield _connect(endpoint_port, factory)
            results.append(protocol)
        # The third connection is closed by the SD without a TLS handshake.
        received = yield results[2].closed
        self.assertEqual(received, b"")
        for protocol in results[:2]:
            protocol.transport.loseConnection()
            yield protocol.closed

    @inlineCallbacks
    def test_client_without_pinned_ca_refused(self):
        sd = yield self.start()
        client = sd_client(sd.port_number, foreign=True)
        self.addCleanup(client.close)
        with self.assertRaises(TransportError):
            yield client.call("getTip", {})


def _connect(port: int, factory: ClientFactory):
    from twisted.internet.endpoints import TCP4ClientEndpoint

    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)



class OperationsTests(unittest.TestCase):
    """Metrics, access logs and start-up failures of the SD."""

    @inlineCallbacks
    def test_metrics_count_calls_and_records(self):
        import treq

        folder = Path(self.mktemp())
        write_sd_settings(folder)
        settings = folder / "sd.yml"
        settings.write_text(settings.read_text() + "metrics:\n  bind_address: 127.0.0.1:0\n")
        sd = yield start_sd(folder)
        self.addCleanup(sd.stop)
        client = sd_client(sd.port_number)
        self.addCleanup(client.close)
        yield client.call("submitRecords", {"records": sign_chain(base_changes())})
        yield client.call("getTip", {})
        with self.assertRaises(JSONRPCError):
            yield client.call("noSuchMethod-" + "x" * 50, {})
        metrics_port = sd.service.services[1]._waitingForPort.result.getHost().port
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{metrics_port}/metrics", pool=pool)
        text = (yield response.text())
        self.assertIn("sd_records 4.0", text)
        self.assertIn('sd_jsonrpc_requests_total{method="getTip",outcome="ok"} 1.0', text)
        self.assertIn('method="other",outcome="error -32601"', text)
        self.assertNotIn("noSuchMethod", text)

    @inlineCallbacks
    def test_port_in_use_fails_start_up(self):
        first = yield start_sd(write_sd_settings(Path(self.mktemp())))
        self.addCleanup(first.stop)
        folder = write_sd_settings(
            Path(self.mktemp()), jsonrpc_server={"bind_address": f"127.0.0.1:{first.port_number}"}
        )
        with self.assertRaises(Exception):
            yield start_sd(folder)
        self.flushLoggedErrors()
