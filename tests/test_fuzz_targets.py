"""
The fuzz targets of ``fuzz/`` (``make fuzz``) run inside ``make test``: each on its seed
corpus, on hypothesis-generated inputs, and on inputs built to hit each check.  atheris
is not needed (the targets fall back to a pure-Python data provider).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fuzz import targets
from fuzz.provider import FallbackProvider
from fuzz.targets import TARGETS, same, split_input

CORPUS = Path(targets.__file__).resolve().parent / "corpus"

_FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _seeds(name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / name).iterdir())]


class SeedCorpus(SynchronousTestCase):
    """Every target passes on its seed corpus, which stays small."""

    def test_each_target_has_seeds(self):
        for name in TARGETS:
            self.assertGreaterEqual(len(_seeds(name)), 5, name)
        total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
        self.assertLess(total, 200 * 1024)

    def test_seeds_pass(self):
        for name, target in TARGETS.items():
            for seed in _seeds(name):
                target.function(seed)

    def test_seeds_reach_a_hello(self):
        """The ClientHello seeds are real hellos the reader accepts (with and without SNI)."""
        from epsproxy.proxy.clienthello import ClientHelloError, parse_client_hello

        names = set()
        for seed in _seeds("clienthello"):
            _, _, payload = split_input(seed)
            try:
                names.add(parse_client_hello(payload).server_name)
            except ClientHelloError:
                pass
        self.assertIn("public-proxy-1.ga", names)
        self.assertIn("internal-server.example", names)
        self.assertIn(None, names)

    def test_signed_record_seeds_parse(self):
        """The records seeds hold signed records that normalise (JSON text mode)."""
        from epsproxy.rules.records import normalise_signed_record

        count = 0
        for seed in _seeds("records"):
            try:
                value = json.loads(seed[2:])
            except ValueError:
                continue
            normalise_signed_record(value)
            count += 1
        self.assertGreaterEqual(count, 3)


class Hypothesis(SynchronousTestCase):
    """A few hundred generated inputs per target."""

    @_FAST
    @given(st.binary(max_size=600))
    def test_clienthello_random(self, data):
        targets.client_hello(data)

    @_FAST
    @given(st.sampled_from(_seeds("clienthello")), st.binary(max_size=20),
           st.integers(0, 2000), st.integers(0, 255))
    def test_clienthello_mutated(self, seed, patch, at, flags):
        data = bytes([flags & 0xF0 | 0x03, 0, 6, 40]) + seed[1:]
        at = min(at, len(data))
        targets.client_hello(data[:at] + patch + data[at + len(patch):])

    @_FAST
    @given(st.binary(max_size=600))
    def test_wire_random(self, data):
        targets.wire(data)

    @settings(_FAST, max_examples=60)
    @given(st.integers(0, 255), st.lists(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                  allow_infinity=False)
            | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=10,
        ), max_size=4))
    def test_wire_json_lines(self, flags, values):
        lines = b"".join(
            json.dumps({"t": "res", "id": "i", "r": {"v": v}}, ensure_ascii=False)
            .encode("utf-8", "surrogatepass") + b"\n"
            for v in values
        )
        targets.wire(bytes([flags]) + bytes(range(1, 16)) + lines)

    @_FAST
    @given(st.binary(max_size=400))
    def test_jsonrpc_random(self, data):
        targets.jsonrpc(data)
        self.flushLoggedErrors()

    @_FAST
    @given(st.sampled_from(_seeds("jsonrpc")), st.binary(max_size=10), st.integers(0, 300))
    def test_jsonrpc_mutated(self, seed, patch, at):
        targets.jsonrpc(seed[:at] + patch + seed[at + len(patch):])
        self.flushLoggedErrors()

    @_FAST
    @given(st.binary(max_size=300))
    def test_records_random(self, data):
        targets.records(data)

    @settings(_FAST, max_examples=60)
    @given(st.sampled_from(_seeds("records")), st.binary(max_size=8), st.integers(0, 2000))
    def test_records_mutated(self, seed, patch, at):
        targets.records(seed[:at] + patch + seed[at + len(patch):])


class Checks(SynchronousTestCase):
    """The targets' own checks can fail (each is shown failing on a broken variant)."""

    def test_split_input(self):
        self.assertEqual(split_input(b""), (0, [], b""))
        flags, fragments, payload = split_input(b"\x02\x00\x01abcdef")
        self.assertEqual((flags, payload), (2, b"abcdef"))
        self.assertEqual(fragments, [b"a", b"bc", b"def"])
        self.assertEqual(split_input(b"\x0f\x09")[1], [])

    def test_same_compares_types(self):
        self.assertTrue(same({"a": [1, 2.0, None]}, {"a": [1, 2.0, None]}))
        self.assertFalse(same(1, 1.0))
        self.assertFalse(same(1, True))
        self.assertFalse(same(0.0, -0.0))
        self.assertFalse(same({"a": 1}, {"a": 1, "b": 2}))

    def test_fallback_provider(self):
        fdp = FallbackProvider(b"\x05\x01abc\x00")
        self.assertEqual(fdp.ConsumeIntInRange(0, 3), 1)
        self.assertTrue(fdp.ConsumeBool())
        self.assertEqual(fdp.ConsumeBytes(3), b"abc")
        self.assertEqual(fdp.remaining_bytes(), 1)
        self.assertEqual(fdp.ConsumeRegularFloat(), 0.0)
        self.assertEqual(fdp.ConsumeBytes(5), b"")
        self.assertEqual(fdp.ConsumeIntInRange(7, 9), 7)

    def test_targets_run_without_atheris(self):
        """The fallback provider drives every target (what make test does without atheris)."""
        original = targets.provider
        targets.provider = FallbackProvider
        self.addCleanup(setattr, targets, "provider", original)
        for name, target in TARGETS.items():
            for seed in _seeds(name):
                target.function(seed)
            for i in range(64):
                target.function(bytes([i, 255 - i, i * 3 % 256]) * (i % 7 + 1))
        self.flushLoggedErrors()

    def test_clienthello_buffer_bound_is_checked(self):
        """A reader that held more than max_bytes would fail the target."""
        from epsproxy.proxy import clienthello

        original = clienthello.ClientHelloReader.buffered
        clienthello.ClientHelloReader.buffered = property(lambda self: 10**9)
        self.addCleanup(setattr, clienthello.ClientHelloReader, "buffered", original)
        self.assertRaises(AssertionError, targets.client_hello, b"\x00\x16\x03")

    def test_wire_differential_is_checked(self):
        """A fast path that read a line differently from the strict codec would fail."""
        from epsproxy.eps.links import wire

        original = wire._decode_line

        def lossy(line: bytes):
            frame = original(line)
            if isinstance(frame, wire.Response) and isinstance(frame.result, dict):
                return wire.Response(frame.id, {"changed": True})
            return frame

        wire._decode_line = lossy
        self.addCleanup(setattr, wire, "_decode_line", original)
        self.assertRaises(AssertionError, targets.wire, b'\x00{"t":"res","id":"a","r":{}}\n')

    def test_jsonrpc_response_shape_is_checked(self):
        self.assertRaises(AssertionError, targets._check_rpc_body, b'{"jsonrpc":"2.0"}')
        self.assertRaises(AssertionError, targets._check_rpc_body,
                          b'{"jsonrpc":"2.0","id":1,"result":1,"error":{}}')
        targets._check_rpc_body(b'{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":""}}')

    def test_records_forgery_is_checked(self):
        """A verify_record that accepted a changed record would fail the target."""
        from epsproxy.rules import records

        context = targets.records_context()
        forged = copy.deepcopy(context.bases[0])
        forged["record"]["data"] = ["someone-else"]
        original = records.verify_record
        records.verify_record = lambda signed, preceding, trust, **kw: original(
            context.bases[0], preceding, trust)
        self.addCleanup(setattr, records, "verify_record", original)
        self.assertRaises(AssertionError, targets._check_record, forged, context, False)

    def test_records_bases_verify(self):
        """The bases the records target mutates are real: hd-1's verify, hd-2's does not."""
        from epsproxy.rules.records import NotAllowed, verify_record

        context = targets.records_context()
        for signed in context.bases[:-1]:
            targets._check_record(copy.deepcopy(signed), context, False)
            verify_record(signed, context.pins, context.trust)
        self.assertRaises(NotAllowed, verify_record, context.bases[-1], context.pins,
                          context.trust)
