"""
The SD's record log follows its store: what is appended is added; what a store read
again from its start (a Redis list replaced by a failover) replaces the log.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.trial.unittest import TestCase

from epsproxy.rules.certificates import load_certificates_file
from epsproxy.rules.records import TrustStore
from epsproxy.sd.directory import RECORD_ENTRY_TYPE, ServiceDirectory
from epsproxy.store import StoredEntry
from tests.support.pki import pki
from tests.support.sd import base_changes, sign_chain


class ReplacedStore:
    """A store in memory whose data can be replaced behind its readers' backs."""

    def __init__(self) -> None:
        self.entries: list[StoredEntry] = []
        self.read = 0
        self.resets = 0

    def append(self, entry: StoredEntry) -> Deferred[None]:
        self.entries.append(entry)
        return succeed(None)

    def replace(self, entries: list[StoredEntry]) -> None:
        self.entries, self.read = list(entries), -1

    def read_new(self) -> Deferred[list[StoredEntry]]:
        if self.read < 0:  # replaced: everything, from the start (as the Redis store does)
            self.resets += 1
            self.read = 0
        new, self.read = self.entries[self.read:], len(self.entries)
        return succeed(new)

    def close(self) -> Deferred[None]:
        return succeed(None)


def entries(chain: list[dict[str, Any]]) -> list[StoredEntry]:
    return [StoredEntry(RECORD_ENTRY_TYPE, os.urandom(16), json.dumps(r).encode())
            for r in chain]


class RecordLogFollowsTheStore(TestCase):
    """A store read again from its start (``resets``) gives the whole log anew."""
    def setUp(self) -> None:
        trust = TrustStore(load_certificates_file(str(pki().root)),
                           load_certificates_file(str(pki().intermediate)))
        self.store = ReplacedStore()
        self.directory = ServiceDirectory(self.store, trust)

    @inlineCallbacks
    def test_a_record_the_new_master_lost_is_no_longer_served(self):
        # A failover to a replica that had not seen the last append: the list read again
        # is the old one without its last record, which the SD must stop serving.
        chain = sign_chain(base_changes())
        self.store.entries = entries(chain)
        yield self.directory.refresh()
        self.assertEqual(self.directory.tip()["hash"], chain[-1]["hash"])
        self.store.replace(self.store.entries[:-1])
        yield self.directory.refresh()
        self.assertEqual(self.directory.tip()["hash"], chain[-2]["hash"])
        self.assertEqual(len(self.directory.record_log.selected.records), len(chain) - 1)

    @inlineCallbacks
    def test_a_store_read_again_from_its_start_replaces_the_log(self):
        first = sign_chain(base_changes("2025-01-01T10:00:00Z"))
        self.store.entries = entries(first)
        self.assertEqual((yield self.directory.refresh()), len(first))
        self.assertEqual(self.directory.tip()["hash"], first[-1]["hash"])
        # Another history (one record shorter, other times) replaces the list.
        other = sign_chain(base_changes("2025-02-01T10:00:00Z")[:-1])
        self.store.replace(entries(other))
        self.assertEqual((yield self.directory.refresh()), len(other))
        self.assertEqual(self.directory.tip()["hash"], other[-1]["hash"])
        self.assertEqual(len(self.directory.record_log.selected.records), len(other))
        # Appends after that are added as usual.
        more = sign_chain(base_changes("2025-03-01T10:00:00Z")[:1], other[-1]["hash"])
        self.store.entries += entries(more)
        self.assertEqual((yield self.directory.refresh()), 1)
        self.assertEqual(self.directory.tip()["hash"], more[-1]["hash"])
