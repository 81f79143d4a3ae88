"""
Tests for epsproxy.directory.chain: VerifiedChain (the directory client's chain) and
RecordLog (the service directory's model of its store), with records signed by the test
PKI (hd-1 is the only sd-admin).
"""

from __future__ import annotations

import copy
import functools
import random
import time
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.rules import records
from epsproxy.rules.certificates import load_private_key_file
from epsproxy.directory import chain as C
from epsproxy.directory.chain import ChainError, RecordLog, StaleAppend, VerifiedChain

from .support.pki import pki

BASE_TIME = datetime(2024, 1, 1, tzinfo=timezone.utc)


@functools.lru_cache(maxsize=None)
def identity(name: str = "hd-1", alt: bool = False, label: str = "main"):
    """(private key, certificate PEM) of a signing identity of a test PKI."""
    cert, key = pki(label).signing(name, alt)
    return load_private_key_file(key), cert.read_text()


@functools.lru_cache(maxsize=None)
def trust(label: str = "main") -> records.TrustStore:
    p = pki(label)
    return records.TrustStore.from_files([p.root], [p.intermediate])


def when(step: float) -> str:
    return (BASE_TIME + timedelta(seconds=step)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make(parent: str = "", name: str = "op-1", section: str = "groups", data=None,
         at: float = 0, signer: str = "hd-1", alt: bool = False, label: str = "main") -> dict:
    key, pem = identity(signer, alt, label)
    record = {"name": name, "section": section, "data": data if data is not None else [f"g{at}"],
              "created_at": when(at)}
    return records.sign_record(record, parent, key, pem)


def pin(key_name: str = "hd-1", alt: bool = False) -> list[dict]:
    """``certificates`` data pinning a signing certificate of hd-1."""
    pem = identity(key_name, alt)[1]
    return [{"fingerprint": records.load_signer(pem).fingerprint, "key_usage": "signing"}]


def chain_of(n: int, parent: str = "", start: float = 0, name: str = "op-1") -> list[dict]:
    result = []
    for i in range(n):
        signed = make(parent, name=name, at=start + i)
        result.append(signed)
        parent = signed["hash"]
    return result


@functools.lru_cache(maxsize=None)
def linear_chain() -> tuple[dict, ...]:
    return tuple(chain_of(6, start=100))


def unhashable_records() -> list[dict]:
    """Well-formed records whose data has no structured hash (possible in JSON)."""
    nan = make(section="channels", data=[{"type": "x", "settings": {"a": 1}}], at=7)
    nan["record"]["data"][0]["settings"]["a"] = float("nan")
    deep = copy.deepcopy(nan)
    nested: dict = {}
    deep["record"]["data"][0]["settings"] = nested
    for _ in range(300):
        nested["a"] = {}
        nested = nested["a"]
    return [nan, deep]


def hashes(chain) -> list[str]:
    return [r["hash"] for r in chain.records]


class CreatedAtKeyTests(SynchronousTestCase):
    def test_instants_compare_across_zones_and_nanoseconds(self) -> None:
        k = C.created_at_key
        self.assertEqual(k("2021-05-17T10:00:00Z"), k("2021-05-17T12:00:00+02:00"))
        self.assertLess(k("2021-05-17T10:00:00.000000001Z"), k("2021-05-17T10:00:00.000000002Z"))
        self.assertLess(k("2021-05-17T10:00:00+01:00"), k("2021-05-17T10:00:00Z"))

    def test_garbage_sorts_earliest(self) -> None:
        for bad in ("", "yesterday", None, 5, "2021-13-01T00:00:00Z"):
            self.assertLess(C.created_at_key(bad), C.created_at_key("0000-01-01T00:00:00Z"))


class VerifiedChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.chain = VerifiedChain(trust())

    def assertUnchanged(self, length: int = 0) -> None:
        self.assertEqual(len(self.chain), length)
        self.assertEqual(len(self.chain._index), length)

    def test_empty(self) -> None:
        self.assertIsNone(self.chain.tip)
        self.assertEqual(self.chain.tip_hash, "")
        self.assertIsNone(self.chain.root_created_at)
        self.assertEqual(self.chain.records_after(""), [])
        self.assertEqual(self.chain.entries, {})

    def test_good_chain_builds_entries(self) -> None:
        r0 = make(name="hd-2", section="groups", data=["health-departments"], at=1)
        r1 = make(r0["hash"], name="hd-2", section="channels",
                  data=[{"type": "grpc_server", "settings": {"address": "localhost:1"}}], at=2)
        r2 = make(r1["hash"], name="ls-1", section="groups", data=["locations"], at=3)
        self.chain.extend([r0, r1])
        self.chain.extend([r2])
        self.assertEqual(hashes(self.chain), [r0["hash"], r1["hash"], r2["hash"]])
        self.assertEqual(self.chain.tip, r2)
        self.assertEqual(self.chain.tip_hash, r2["hash"])
        self.assertEqual(self.chain.root_created_at, r0["record"]["created_at"])
        self.assertEqual(self.chain.entries["hd-2"]["groups"], ["health-departments"])
        self.assertEqual(self.chain.entries["hd-2"]["channels"][0]["settings"],
                         {"address": "localhost:1"})
        self.assertEqual(len(self.chain.entries["hd-2"]["records"]), 2)
        self.assertEqual(self.chain.entries["ls-1"]["groups"], ["locations"])

    def test_records_after_and_index(self) -> None:
        rs = list(linear_chain())
        self.chain.extend(rs)
        self.assertEqual(self.chain.index_of(rs[2]["hash"]), 2)
        self.assertIsNone(self.chain.index_of("0" * 64))
        self.assertEqual(self.chain.records_after(rs[2]["hash"]), rs[3:])
        self.assertEqual(self.chain.records_after(rs[-1]["hash"]), [])
        self.assertEqual(self.chain.records_after(""), rs)
        self.assertEqual(self.chain.records_after("f" * 64), rs)
        # a copy: changing it does not change the chain
        self.chain.records_after("").clear()
        self.assertEqual(len(self.chain), len(rs))

    def test_first_record_must_be_a_root(self) -> None:
        rs = linear_chain()
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([rs[1]])
        self.assertEqual(caught.exception.index, 0)
        self.assertIn("link", caught.exception.reason)
        self.assertUnchanged()

    def test_bad_link_refused(self) -> None:
        rs = linear_chain()
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([rs[0], rs[2]])
        self.assertEqual(caught.exception.index, 1)
        self.assertUnchanged()
        # a valid signed record pointing at an unrelated parent
        self.chain.extend(rs[:2])
        stray = make("ab" * 32, at=50)
        with self.assertRaises(ChainError):
            self.chain.extend([stray])
        self.assertUnchanged(2)

    def test_reordering_refused(self) -> None:
        rs = linear_chain()
        self.chain.extend(rs[:2])
        with self.assertRaises(ChainError):
            self.chain.extend([rs[3], rs[2]])
        self.assertUnchanged(2)

    def test_bad_signature_refused(self) -> None:
        r0 = copy.deepcopy(linear_chain()[0])
        r0["signature"]["r"] = str(int(r0["signature"]["r"]) + 1)
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([r0])
        self.assertIsInstance(caught.exception.cause, records.InvalidRecord)
        self.assertIsInstance(caught.exception, records.RecordError)
        self.assertUnchanged()

    def test_tampered_data_refused(self) -> None:
        r0 = copy.deepcopy(linear_chain()[0])
        r0["record"]["data"] = ["admins"]
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([r0])
        self.assertIn("hash", caught.exception.reason)
        self.assertUnchanged()

    def test_non_admin_refused(self) -> None:
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([make(signer="hd-2")])
        self.assertIsInstance(caught.exception.cause, records.NotAllowed)
        self.assertUnchanged()

    def test_foreign_ca_refused(self) -> None:
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([make(label="foreign")])
        self.assertIsInstance(caught.exception.cause, records.NotAllowed)
        self.assertUnchanged()

    def test_malformed_records_refused(self) -> None:
        r0 = linear_chain()[0]
        for bad in (None, "x", [], {}, {**r0, "signature": None}, {**r0, "hash": "xyz"},
                    {**r0, "record": {**r0["record"], "section": "properties"}}):
            with self.assertRaises(ChainError, msg=repr(bad)):
                self.chain.extend([bad])
            self.assertUnchanged()

    def test_unhashable_values_refused(self) -> None:
        for bad in unhashable_records():
            with self.assertRaises(ChainError) as caught:
                self.chain.extend([bad])
            self.assertIsInstance(caught.exception.cause, records.InvalidRecord)
            self.assertUnchanged()

    def test_all_or_nothing(self) -> None:
        rs = list(linear_chain())
        bad = copy.deepcopy(rs[3])
        bad["signature"]["s"] = "1234567890"
        with self.assertRaises(ChainError) as caught:
            self.chain.extend(rs[:3] + [bad] + rs[4:])
        self.assertEqual(caught.exception.index, 3)
        self.assertUnchanged()
        self.assertEqual(self.chain.entries, {})
        self.chain.extend(rs)
        self.assertEqual(hashes(self.chain), [r["hash"] for r in rs])

    def test_duplicate_record_refused(self) -> None:
        r0 = linear_chain()[0]
        again = records.sign_record(r0["record"], r0["hash"], *identity())
        self.assertEqual(again["hash"], r0["hash"])
        self.chain.extend([r0])
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([again])
        self.assertIn("already", caught.exception.reason)
        self.assertUnchanged(1)

    def test_pin_rotation(self) -> None:
        # Pin hd-1's key; the alt key is then refused until the pin is moved to it by a
        # record signed with the old key.
        r0 = make(name="hd-1", section="certificates", data=pin(), at=1)
        self.chain.extend([r0])
        self.assertEqual(self.chain.pins.pinned("hd-1"), pin()[0]["fingerprint"])
        early = make(r0["hash"], at=2, alt=True)
        with self.assertRaises(ChainError) as caught:
            self.chain.extend([early])
        self.assertIsInstance(caught.exception.cause, records.NotAllowed)
        rotate = make(r0["hash"], name="hd-1", section="certificates", data=pin(alt=True), at=3)
        after = make(rotate["hash"], at=4, alt=True)
        self.chain.extend([rotate, after])
        self.assertEqual(self.chain.tip_hash, after["hash"])
        # now the old key is refused
        with self.assertRaises(ChainError):
            self.chain.extend([make(after["hash"], at=5)])
        self.assertUnchanged(3)

    def test_rotation_in_a_failed_batch_does_not_stick(self) -> None:
        r0 = make(name="hd-1", section="certificates", data=pin(), at=1)
        self.chain.extend([r0])
        rotate = make(r0["hash"], name="hd-1", section="certificates", data=pin(alt=True), at=2)
        broken = make(rotate["hash"], at=3, signer="hd-2")
        with self.assertRaises(ChainError):
            self.chain.extend([rotate, broken])
        self.assertEqual(self.chain.pins.pinned("hd-1"), pin()[0]["fingerprint"])
        with self.assertRaises(ChainError):
            self.chain.extend([make(r0["hash"], at=4, alt=True)])


class RecordLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = RecordLog(trust())
        self.verified: list[str] = []
        original = records.verify_record

        def counting(signed, preceding, trust_store, **kwargs):
            self.verified.append(signed["hash"])
            return original(signed, preceding, trust_store, **kwargs)

        self.patch(records, "verify_record", counting)

    def selected(self) -> list[str]:
        return hashes(self.log.selected)

    def test_empty(self) -> None:
        self.assertFalse(self.log.add([]))
        self.assertEqual(self.selected(), [])
        self.assertIsNone(self.log.selected.tip)

    def test_linear_chain_incrementally_without_reverification(self) -> None:
        rs = list(linear_chain())
        self.assertTrue(self.log.add(rs[:3]))
        chain = self.log.selected
        self.assertTrue(self.log.add(rs[3:]))
        self.assertIs(self.log.selected, chain)  # extended in place, not rebuilt
        self.assertEqual(self.selected(), [r["hash"] for r in rs])
        self.assertEqual(sorted(self.verified), sorted(r["hash"] for r in rs))
        self.assertEqual(self.log.records_after(rs[3]["hash"]), rs[4:])
        self.assertTrue(self.log.is_selected(rs[0]["hash"]))
        self.assertEqual(self.log.selected.entries["op-1"]["groups"], rs[-1]["record"]["data"])

    def test_duplicates_ignored(self) -> None:
        rs = list(linear_chain())
        self.log.add(rs + rs[:2])
        self.assertFalse(self.log.add(rs))
        self.assertEqual(self.selected(), [r["hash"] for r in rs])
        self.assertEqual(len(self.verified), len(rs))
        self.assertEqual(self.log.verified_count, len(rs))

    def test_malformed_stored_records_skipped(self) -> None:
        rs = list(linear_chain())
        junk = [None, 1, "text", [], {}, {"record": "x"}, {**rs[1], "hash": "nothex"},
                {**rs[1], "signature": {"r": "1", "s": "2", "c": ""}}]
        self.log.add(rs[:1] + junk + rs[1:])
        self.assertEqual(self.selected(), [r["hash"] for r in rs])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_unhashable_stored_records_skipped(self) -> None:
        rs = list(linear_chain())
        self.log.add(rs[:2] + unhashable_records() + rs[2:])
        self.assertEqual(self.selected(), [r["hash"] for r in rs])
        for bad in unhashable_records():
            with self.assertRaises(records.InvalidRecord):
                self.log.check_append(bad)

    @settings(deadline=None, max_examples=60)
    @given(st.data())
    def test_hostile_store_never_raises(self, data) -> None:
        values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=6), inner, max_size=3),
            max_leaves=8)
        stored = []
        for original in linear_chain():
            mutated = copy.deepcopy(original)
            target = mutated
            path = data.draw(st.lists(st.sampled_from(
                ["record", "signature", "data", "hash", "parent_hash", "name", "section",
                 "created_at", "r", "s", "c", 0]), min_size=1, max_size=3))
            for key in path[:-1]:
                if isinstance(target, dict) and key in target:
                    target = target[key]
            if isinstance(target, dict):
                target[path[-1]] = data.draw(values)
            stored.append(mutated)
        log = RecordLog(trust())
        log.add(stored)
        # Whatever survived is a linked, verified prefix of the genuine chain.
        genuine = [r["hash"] for r in linear_chain()]
        self.assertEqual(hashes(log.selected), genuine[: len(log.selected)])
        for got, want in zip(log.selected.records, linear_chain()):
            self.assertEqual(records.normalise_signed_record(got)["record"],
                             records.normalise_signed_record(want)["record"])

    def test_tampered_record_in_store(self) -> None:
        rs = list(linear_chain())
        tampered = copy.deepcopy(rs[2])
        tampered["record"]["data"] = ["evil"]
        # The tampered copy comes first and claims rs[2]'s hash: it must not shadow it.
        self.log.add(rs[:2] + [tampered])
        self.assertEqual(self.selected(), [r["hash"] for r in rs[:2]])
        self.assertEqual(self.log.pending_count, 0)
        self.log.add(rs[2:])
        self.assertEqual(self.selected(), [r["hash"] for r in rs])
        self.assertNotIn(["evil"], [r["record"]["data"] for r in self.log.selected.records])

    def test_bad_signature_in_store_cuts_subtree(self) -> None:
        rs = list(linear_chain())
        forged = copy.deepcopy(rs[2])
        forged["signature"]["r"] = "1234567890"
        self.log.add(rs[:2] + [forged] + rs[3:])
        self.assertEqual(self.selected(), [r["hash"] for r in rs[:2]])
        # the genuine record arrives later: its subtree links
        self.log.add([rs[2]])
        self.assertEqual(self.selected(), [r["hash"] for r in rs])

    def test_invalid_record_cuts_its_subtree(self) -> None:
        root = make(at=1)
        good = make(root["hash"], at=2)
        bad = make(root["hash"], at=3, signer="hd-2")  # not an sd-admin
        below_bad = chain_of(3, parent=bad["hash"], start=4)  # validly signed, longer
        self.log.add([root, good, bad, *below_bad])
        self.assertEqual(self.selected(), [root["hash"], good["hash"]])
        self.assertFalse(set(self.verified) & {r["hash"] for r in below_bad})
        self.assertFalse(self.log.is_selected(below_bad[0]["hash"]))

    def test_orphan_relinked_later(self) -> None:
        rs = list(linear_chain())
        self.log.add([rs[0], rs[3], rs[4]])
        self.assertEqual(self.selected(), [rs[0]["hash"]])
        self.assertEqual(self.log.pending_count, 2)
        self.log.add([rs[2]])
        self.assertEqual(self.log.pending_count, 3)
        self.log.add([rs[5], rs[1]])
        self.assertEqual(self.log.pending_count, 0)
        self.assertEqual(self.selected(), [r["hash"] for r in rs])
        self.assertEqual(len(self.verified), len(rs))

    def test_orphan_is_not_a_root(self) -> None:
        rs = list(linear_chain())
        self.log.add(rs[2:])
        self.assertEqual(self.selected(), [])

    def test_fork_longest_wins(self) -> None:
        root = make(at=1)
        a = chain_of(2, parent=root["hash"], start=10)
        b = chain_of(3, parent=root["hash"], start=20)
        self.log.add([root, *a, *b])
        self.assertEqual(self.selected(), [root["hash"]] + [r["hash"] for r in b])
        # branch a catches up and overtakes
        a += chain_of(2, parent=a[-1]["hash"], start=30)
        self.assertTrue(self.log.add(a[2:]))
        self.assertEqual(self.selected(), [root["hash"]] + [r["hash"] for r in a])
        self.assertEqual(self.log.selected.entries["op-1"]["groups"], a[-1]["record"]["data"])

    def test_fork_tie_goes_to_earlier_in_store(self) -> None:
        root = make(at=1)
        a = chain_of(2, parent=root["hash"], start=10)
        b = chain_of(2, parent=root["hash"], start=20)
        self.log.add([root, b[0], a[0], a[1], b[1]])
        self.assertEqual(self.selected(), [root["hash"]] + [r["hash"] for r in a])
        self.assertFalse(self.log.add([b[1]]))

    def test_fork_tie_goes_to_chain_complete_first(self) -> None:
        # a[1] is stored before b's records but a is only complete when a[0] arrives,
        # after b: the equally long b keeps the selection.
        root = make(at=1)
        a = chain_of(2, parent=root["hash"], start=10)
        b = chain_of(2, parent=root["hash"], start=20)
        self.log.add([root, a[1], b[0], b[1]])
        self.assertEqual(self.selected(), [root["hash"]] + [r["hash"] for r in b])
        self.assertFalse(self.log.add([a[0]]))
        self.assertEqual(self.selected(), [root["hash"]] + [r["hash"] for r in b])
        # one more record on a makes it the longest
        self.assertTrue(self.log.add(chain_of(1, parent=a[1]["hash"], start=30)))
        self.assertEqual(self.selected()[1:3], [r["hash"] for r in a])

    def test_branches_have_their_own_pins(self) -> None:
        root = make(name="hd-1", section="certificates", data=pin(), at=1)
        rotate = make(root["hash"], name="hd-1", section="certificates", data=pin(alt=True),
                      at=2)
        on_rotated = make(rotate["hash"], at=3, alt=True)
        plain = make(root["hash"], at=4)
        alt_on_plain = make(plain["hash"], at=5, alt=True)  # refused: alt not pinned here
        self.log.add([root, rotate, plain, on_rotated, alt_on_plain])
        self.assertEqual(self.selected(), [root["hash"], rotate["hash"], on_rotated["hash"]])
        self.assertEqual(self.log.selected.pins.pinned("hd-1"), pin(alt=True)[0]["fingerprint"])

    def test_reset_newer_root_wins(self) -> None:
        old = chain_of(4, start=100)
        new = chain_of(2, start=200, name="op-2")
        self.log.add(old)
        before = self.log.selected
        self.assertTrue(self.log.add(new))
        self.assertIsNot(self.log.selected, before)
        self.assertEqual(self.selected(), [r["hash"] for r in new])
        self.assertFalse(self.log.is_selected(old[-1]["hash"]))
        self.assertEqual(set(self.log.selected.entries), {"op-2"})
        # directory clients asking after the old tip get the whole new chain
        self.assertEqual(self.log.records_after(old[-1]["hash"]), new)
        # the old chain growing further does not bring it back
        self.assertFalse(self.log.add(chain_of(3, parent=old[-1]["hash"], start=300)))
        self.assertEqual(self.selected(), [r["hash"] for r in new])

    def test_reset_with_an_older_root_loses(self) -> None:
        current = chain_of(2, start=100)
        older = chain_of(5, start=50, name="op-2")
        self.log.add(current + older)
        self.assertEqual(self.selected(), [r["hash"] for r in current])
        # equal time stamps: the earlier root in the store keeps the selection
        same_time = chain_of(3, start=100, name="op-3")
        self.assertFalse(self.log.add(same_time))

    def test_rebuild_does_not_reverify(self) -> None:
        old = chain_of(3, start=100)
        new = chain_of(2, start=200)
        self.log.add(old + new)
        self.log.add(chain_of(1, parent=old[-1]["hash"], start=300))
        self.assertEqual(len(self.verified), 6)
        self.assertEqual(len(set(self.verified)), 6)

    def test_check_append_ok_and_stale(self) -> None:
        rs = list(linear_chain())
        self.log.add(rs[:3])
        signer = self.log.check_append(rs[3])
        self.assertEqual(signer.name, "hd-1")
        with self.assertRaises(StaleAppend) as caught:
            self.log.check_append(rs[4])
        self.assertEqual(str(caught.exception), "stale append, please try again")
        self.assertIsInstance(caught.exception, records.RecordError)
        with self.assertRaises(StaleAppend):
            self.log.check_append(make(rs[1]["hash"], at=999))

    def test_check_append_on_empty_log(self) -> None:
        rs = linear_chain()
        with self.assertRaises(StaleAppend):
            self.log.check_append(rs[1])
        self.log.check_append(rs[0])

    def test_check_append_refusals(self) -> None:
        rs = list(linear_chain())
        self.log.add(rs[:3])
        tip = rs[2]["hash"]
        with self.assertRaises(records.NotAllowed):
            self.log.check_append(make(tip, at=500, signer="hd-2"))
        forged = make(tip, at=501)
        forged["signature"]["r"] = "1234567890"
        with self.assertRaises(records.InvalidRecord):
            self.log.check_append(forged)
        with self.assertRaises(records.InvalidRecord):
            self.log.check_append({"hash": "x"})
        again = records.sign_record(rs[0]["record"], tip, *identity())
        with self.assertRaises(records.InvalidRecord):
            self.log.check_append(again)

    def test_check_append_reset_uses_old_pins(self) -> None:
        root = make(name="hd-1", section="certificates", data=pin(), at=1)
        self.log.add([root])
        with self.assertRaises(records.NotAllowed):
            self.log.check_append(make(at=100, alt=True))
        reset = make(at=100)
        self.log.check_append(reset)
        self.log.add([reset])
        self.assertEqual(self.selected(), [reset["hash"]])
        # the new chain has no pins of its own yet
        self.assertIsNone(self.log.selected.pins.pinned("hd-1"))


@functools.lru_cache(maxsize=None)
def small_tree() -> tuple[dict, ...]:
    """A root with a chain of 4 and a fork of 2 after the second record."""
    main = chain_of(5, start=1000)
    fork = chain_of(2, parent=main[1]["hash"], start=2000)
    return tuple(main + fork)


class RecordLogPropertyTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=30)
    @given(st.randoms(use_true_random=False), st.lists(st.integers(0, 7), max_size=4))
    def test_store_order_and_batching_do_not_matter(self, rnd: random.Random, cuts) -> None:
        tree = list(small_tree())
        expected = [r["hash"] for r in tree[:5]]
        stored = tree[:]
        rnd.shuffle(stored)
        log = RecordLog(trust())
        points = sorted(set(cuts))
        for start, end in zip([0, *points], [*points, len(stored)]):
            log.add(stored[start:end])
        self.assertEqual(hashes(log.selected), expected)
        self.assertEqual(log.pending_count, 0)
        self.assertEqual(log.verified_count, len(tree))


class ScaleTests(SynchronousTestCase):
    def test_long_chain_is_linear(self) -> None:
        # Loose sanity check only (the benchmarks measure): 400 records, one at a time
        # and in one go, both far below a quadratic cost.
        rs = chain_of(400, start=10_000)
        log = RecordLog(trust())
        started = time.process_time()
        for r in rs:
            log.add([r])
        one_by_one = time.process_time() - started
        log2 = RecordLog(trust())
        started = time.process_time()
        log2.add(list(reversed(rs)))
        reversed_batch = time.process_time() - started
        self.assertEqual(len(log.selected), 400)
        self.assertEqual(len(log2.selected), 400)
        self.assertLess(one_by_one, 10)
        self.assertLess(reversed_batch, 10)


class ChainHeadTests(SynchronousTestCase):
    """The chain heads that checkpoints state, kept by both kinds of chain."""

    def test_heads_follow_the_records(self) -> None:
        from epsproxy.rules import checkpoint as cp

        chain = VerifiedChain(trust())
        self.assertEqual(chain.head, cp.ZERO_HEAD)
        self.assertEqual(chain.head_at(0), cp.ZERO_HEAD)
        self.assertIsNone(chain.head_at(1))
        records_ = list(linear_chain())
        chain.extend(records_[:2])
        chain.extend(records_[2:])
        expected = cp.chain_heads(r["hash"] for r in records_)
        self.assertEqual(chain.heads, expected)
        self.assertEqual(chain.head, expected[-1])
        self.assertEqual(chain.head_at(3), expected[2])
        self.assertIsNone(chain.head_at(7))
        self.assertIsNone(chain.head_at(-1))
        # A failed extension leaves the heads alone.
        with self.assertRaises(ChainError):
            chain.extend([make(records_[-1]["hash"], at=50), make("ab" * 32, at=51)])
        self.assertEqual(chain.heads, expected)

    def test_record_log_rebuilds_heads_on_reselection(self) -> None:
        from epsproxy.rules import checkpoint as cp

        log = RecordLog(trust())
        old = chain_of(3, start=0)
        log.add(old)
        self.assertEqual(log.selected.heads, cp.chain_heads(r["hash"] for r in old))
        reset = chain_of(2, start=1000)  # a newer root wins
        log.add(reset)
        self.assertEqual(log.selected.heads, cp.chain_heads(r["hash"] for r in reset))
