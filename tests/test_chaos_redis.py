"""
Redis as the store in the chaos run (``python -m chaos --store redis``), with a real
``redis-server``:

- the SD answers a submit made while its Redis is down with a clear error (it said only
  "internal error" before — found by the chaos run), and accepts the next one once Redis
  is back, with the records written before the kill intact;
- the chaos run's settings overlays give each store role its own Redis key and leave the
  rest of the dev role's settings as they are;
- the chaos run's small blocking Redis client.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from chaos.store import STORE_ROLES, RedisClient, RedisError, write_overlays
from epsproxy.dev.demo import CONF
from epsproxy.net.jsonrpc.envelope import JSONRPCError
from epsproxy.proxy.settings import PROXY_SETTINGS
from epsproxy.sd.api import STORE_UNAVAILABLE
from epsproxy.sd.settings import SD_SETTINGS
from epsproxy.rules.settings import load_settings

from .support.redis import RedisServer
from .support.sd import base_changes, change, sd_client, sign_chain, start_sd, write_sd_settings


class SubmitWhileRedisIsDown(unittest.TestCase):
    """kill -9 of the SD's Redis: a clear error while it is down, recovery after."""

    @inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(reactor, appendonly=True)
        self.addCleanup(self.redis.cleanup)
        yield self.redis.start()
        datastore = {"type": "redis",
                     "settings": {"addresses": [self.redis.address], "key": "records"}}
        folder = write_sd_settings(Path(self.mktemp()), datastore=datastore)
        self.sd = yield start_sd(folder)
        self.addCleanup(self.sd.stop)
        self.client = sd_client(self.sd.port_number)
        self.addCleanup(self.client.close)

    @inlineCallbacks
    def restart_redis(self):
        again = RedisServer(reactor, appendonly=True, directory=self.redis.directory,
                            port=self.redis.port)
        self.addCleanup(again.kill)
        yield again.start()

    @inlineCallbacks
    def test_clear_error_while_down_and_recovery(self):
        chain = sign_chain(base_changes())
        self.assertEqual((yield self.client.call("submitRecords", {"records": chain})), "ok")
        tip = chain[-1]["hash"]
        yield self.redis.kill()

        late = sign_chain([change("hd-2", "groups", ["down"])], parent_hash=tip)
        started = time.monotonic()
        with self.assertRaises(JSONRPCError) as caught:
            yield self.client.call("submitRecords", {"records": late})
        self.assertEqual(caught.exception.code, -32603)
        self.assertEqual(caught.exception.message, STORE_UNAVAILABLE)
        self.assertNotIn(self.redis.address, caught.exception.message)
        # bounded by the store's timeout (1 s per command), not a hang
        self.assertLess(time.monotonic() - started, 5)
        # what the SD serves from memory is unchanged
        self.assertEqual((yield self.client.call("getTip", {}))["hash"], tip)

        yield self.restart_redis()
        again = sign_chain([change("hd-2", "groups", ["after"])], parent_hash=tip)
        # The store reconnects with a backoff of at most 5 s: try for at most 15 s.
        for _ in range(60):
            try:
                result = yield self.client.call("submitRecords", {"records": again})
                break
            except JSONRPCError as e:
                self.assertEqual(e.message, STORE_UNAVAILABLE)
                yield task.deferLater(reactor, 0.25, lambda: None)
        else:
            self.fail("the SD did not accept a record within 15 s of the Redis restart")
        self.assertEqual(result, "ok")
        records = yield self.client.call("getRecords", {})
        self.assertEqual([r["hash"] for r in records],
                         [r["hash"] for r in chain + again])
        # and Redis holds exactly those, in order (nothing lost, nothing half-written)
        stored = RedisClient(self.redis.port).command("LRANGE", "records", 0, -1)
        self.assertEqual(len(stored), len(chain) + 1)


class Overlays(unittest.TestCase):
    def test_each_store_role_gets_its_own_key_and_keeps_the_rest(self):
        run_dir = Path(self.mktemp())
        overlays = write_overlays(run_dir, "127.0.0.1:6390")
        self.assertEqual(set(overlays), set(STORE_ROLES))
        for folder in overlays.values():
            self.assertTrue(folder.is_relative_to(run_dir))
        roles = CONF / "roles"
        sd = load_settings([roles / "sd-1", overlays["sd-1"]], SD_SETTINGS)
        public = load_settings([roles / "public-proxy-1", overlays["public-proxy-1"]],
                               PROXY_SETTINGS)
        private = load_settings([roles / "private-proxy-1", overlays["private-proxy-1"]],
                                PROXY_SETTINGS)
        stores = [sd["directory"]["datastore"], public["public"]["datastore"],
                  private["private"]["datastore"]]
        self.assertEqual({s["type"] for s in stores}, {"redis"})
        self.assertEqual({s["settings"]["addresses"][0] for s in stores}, {"127.0.0.1:6390"})
        self.assertEqual(len({s["settings"]["key"] for s in stores}), 3)
        # the embedded path is replaced, not merged into the redis settings
        self.assertNotIn("path", stores[0]["settings"])
        # everything else still comes from conf/dev
        self.assertEqual(sd["jsonrpc_server"]["bind_address"], "localhost:3322")
        self.assertEqual(public["public"]["tls_bind_address"], "localhost:4433")
        self.assertEqual(private["private"]["shutdown_grace"], 10)

    def test_overlay_is_plain_json(self):
        overlays = write_overlays(Path(self.mktemp()), "127.0.0.1:1")
        (file,) = overlays["sd-1"].iterdir()
        self.assertEqual(json.loads(file.read_text())["directory"]["datastore!"]["type"],
                         "redis")


class Client(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(reactor)
        self.addCleanup(self.redis.cleanup)
        yield self.redis.start()
        self.client = RedisClient(self.redis.port)

    def test_binary_lists_and_digest(self):
        self.assertEqual(self.client.command("RPUSH", "k", b"a\r\n\x00b", "c"), 2)
        self.assertEqual(self.client.command("LRANGE", "k", 0, -1), [b"a\r\n\x00b", b"c"])
        self.assertEqual(self.client.command("LLEN", "k"), 2)
        self.assertIsNone(self.client.command("GET", "missing"))
        one = self.client.digest("k", 1)
        self.assertEqual(self.client.digest("k", 1), one)
        self.assertNotEqual(self.client.digest("k", 2), one)
        self.client.command("LSET", "k", 0, "changed")
        self.assertNotEqual(self.client.digest("k", 1), one)
        self.assertEqual(self.client.digest("k", 0), self.client.digest("empty", 0))

    def test_error_reply_raises(self):
        self.client.command("SET", "s", "x")
        with self.assertRaises(RedisError) as caught:
            self.client.command("LLEN", "s")
        self.assertIn("WRONGTYPE", str(caught.exception))
        with self.assertRaises(RedisError):
            self.client.command("NOSUCHCOMMAND")

    def test_nothing_listening(self):
        with self.assertRaises(OSError):
            RedisClient(_closed_port(), timeout=1).command("PING")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
