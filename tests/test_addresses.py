"""
Tests for epsproxy.eps.addresses: the SPEC §9.2 vectors, equivalence with the
reference's regular expressions, round trips and hostile input.
"""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.eps.addresses import (
    MAX_ADDRESS_LENGTH,
    Address,
    AddressError,
    make_address,
    parse_address,
    split_method,
)

#: The reference's expressions (Go RE2: "." excludes only "\n", "$" is end of text).
REFERENCE_ADDRESS = re.compile(r"(.*)\.([^(.]+)\(([^)]+)\)", re.IGNORECASE)
REFERENCE_METHOD = re.compile(r"(.*)\.(.*)", re.IGNORECASE)

SMALL = st.text(alphabet="ab.()-:\n", max_size=24)


def reference_address(text: str) -> tuple[str, str, str] | None:
    m = REFERENCE_ADDRESS.fullmatch(text)
    return None if m is None else m.groups()


class SplitMethodTests(SynchronousTestCase):
    def test_vectors(self) -> None:
        self.assertEqual(
            split_method("public-proxy-1.ga.requestConnection"),
            ("public-proxy-1.ga", "requestConnection"),
        )
        self.assertEqual(split_method("hd-2._ping"), ("hd-2", "_ping"))
        self.assertEqual(split_method("a.b(c.d"), ("a.b(c", "d"))

    def test_refused(self) -> None:
        for text in ["", "nodot", ".method", "operator.", ".", "a\n.b", "a.b\n"]:
            with self.assertRaises(AddressError, msg=repr(text)):
                split_method(text)

    def test_not_a_string(self) -> None:
        for value in [None, 1, b"a.b", ["a.b"]]:
            self.assertRaises(AddressError, split_method, value)

    def test_messages(self) -> None:
        e = self.assertRaises(AddressError, split_method, "nodot")
        self.assertIn("operator.method", str(e))
        e = self.assertRaises(AddressError, split_method, "a.")
        self.assertIn("empty method", str(e))

    def test_too_long(self) -> None:
        split_method("a" * (MAX_ADDRESS_LENGTH - 2) + ".b")
        self.assertRaises(AddressError, split_method, "a" * MAX_ADDRESS_LENGTH + ".b")

    @settings(deadline=None, max_examples=300)
    @given(SMALL)
    def test_matches_reference(self, text: str) -> None:
        m = REFERENCE_METHOD.fullmatch(text)
        if m is None or not m.group(1) or not m.group(2):
            self.assertRaises(AddressError, split_method, text)
        else:
            self.assertEqual(split_method(text), m.groups())


class ParseAddressTests(SynchronousTestCase):
    VECTORS = {
        "normal-name.f(acdds)": ("normal-name", "f", "acdds"),
        "a.b.c.d.e.f(acdds)": ("a.b.c.d.e", "f", "acdds"),
        "hd-2._ping(n:1)": ("hd-2", "_ping", "n:1"),
        "hd-2._ping(a.b)": ("hd-2", "_ping", "a.b"),
        "x.y(a(b)": ("x", "y", "a(b"),
    }
    NO_MATCH = ["hd-2._ping()", "respond(abc)", "respond(hd-1.add(1))", "hd-1.add(1)(2)"]

    def test_vectors(self) -> None:
        for text, parts in self.VECTORS.items():
            self.assertEqual(parse_address(text), Address(*parts), text)
            self.assertEqual(reference_address(text), parts)

    def test_no_match(self) -> None:
        for text in self.NO_MATCH + ["", ")", "a.b(c", "a.b(c)\n", "\n.b(c)", ".(c)", "a.(c)"]:
            self.assertRaises(AddressError, parse_address, text)
            self.assertIsNone(reference_address(text))

    def test_fields(self) -> None:
        a = parse_address("hd-2._ping(n:1)")
        self.assertEqual((a.operator, a.method, a.id), ("hd-2", "_ping", "n:1"))
        self.assertRaises(AttributeError, setattr, a, "id", "x")

    def test_not_a_string(self) -> None:
        for value in [None, 1, b"a.b(c)"]:
            self.assertRaises(AddressError, parse_address, value)

    def test_too_long(self) -> None:
        ok = "a" * (MAX_ADDRESS_LENGTH - 5) + ".b(c)"
        self.assertEqual(len(ok), MAX_ADDRESS_LENGTH)
        self.assertEqual(parse_address(ok).method, "b")
        e = self.assertRaises(AddressError, parse_address, "a" + ok)
        self.assertIn(str(MAX_ADDRESS_LENGTH), str(e))

    def test_hostile_input_is_fast(self) -> None:
        n = MAX_ADDRESS_LENGTH
        hostile = [
            "(" * (n - 1) + ")",
            ".(" * (n // 2 - 1) + "x)",
            "a." * (n // 2 - 1) + "(x",
            "x.y" + "(" * (n - 4) + ")",
            "\n" * (n - 6) + "a.b(c)",
            ".a(" * (n // 3 - 1) + "b)",
            ("a.b(" * n)[: n - 1] + ")",
        ]
        start = time.perf_counter()
        for text in hostile:
            try:
                got = parse_address(text)
            except AddressError:
                got = None
            ref = reference_address(text)
            self.assertEqual(None if got is None else (got.operator, got.method, got.id), ref)
        self.assertLess(time.perf_counter() - start, 5.0)
        for text in ["a" * 10**6 + ".b(c)", "(" * 10**6]:
            start = time.perf_counter()
            self.assertRaises(AddressError, parse_address, text)
            self.assertLess(time.perf_counter() - start, 0.5)

    def test_unicode(self) -> None:
        a = parse_address("ämt-1.größe(ñ:☃)")
        self.assertEqual(a, Address("ämt-1", "größe", "ñ:☃"))
        a = parse_address("\u2028x\u0000.y\ud800(\U0001f600)")
        self.assertEqual(a, Address("\u2028x\u0000", "y\ud800", "\U0001f600"))

    @settings(deadline=None, max_examples=500)
    @given(SMALL)
    def test_matches_reference(self, text: str) -> None:
        self.check_against_reference(text)

    @settings(deadline=None, max_examples=200)
    @given(st.lists(st.sampled_from(["a", ".", "(", ")", "x.y(", "z)", "\n"]), max_size=20))
    def test_matches_reference_chunks(self, chunks: list[str]) -> None:
        self.check_against_reference("".join(chunks))

    def check_against_reference(self, text: str) -> None:
        expected = reference_address(text)
        if expected is None:
            self.assertRaises(AddressError, parse_address, text)
        else:
            a = parse_address(text)
            self.assertEqual((a.operator, a.method, a.id), expected)


class MakeAddressTests(SynchronousTestCase):
    def test_format(self) -> None:
        self.assertEqual(make_address("hd-2", "_ping", "n:1"), "hd-2._ping(n:1)")
        self.assertEqual(make_address("a.b.c", "f", "a(b"), "a.b.c.f(a(b)")

    def test_refused(self) -> None:
        for parts in [
            ("hd-1", "a.b", "1"),
            ("hd-1", "a(b", "1"),
            ("hd-1", "", "1"),
            ("hd-1", "f", ""),
            ("hd-1", "f", "a)b"),
            ("hd-1", "f", "a.g(b"),  # would parse as operator "hd-1.f(a", method "g"
            ("hd\n1", "f", "1"),
            ("hd-1", "f", "x" * MAX_ADDRESS_LENGTH),
            (None, "f", "1"),
            ("hd-1", 1, "1"),
        ]:
            with self.assertRaises(AddressError, msg=repr(parts)):
                make_address(*parts)

    @settings(deadline=None, max_examples=300)
    @given(SMALL, SMALL, SMALL)
    def test_round_trip(self, operator: str, method: str, inner: str) -> None:
        try:
            text = make_address(operator, method, inner)
        except AddressError:
            ref = reference_address(f"{operator}.{method}({inner})")
            self.assertNotEqual(ref, (operator, method, inner))
        else:
            self.assertEqual(text, f"{operator}.{method}({inner})")
            self.assertEqual(parse_address(text), Address(operator, method, inner))

    @settings(deadline=None, max_examples=200)
    @given(
        st.text(max_size=30).filter(lambda s: "\n" not in s),
        st.text(min_size=1, max_size=30).filter(lambda s: not set(s) & set(".(")),
        st.text(min_size=1, max_size=30).filter(lambda s: not set(s) & set(").")),
    )
    def test_round_trip_plain_parts(self, operator: str, method: str, inner: str) -> None:
        text = make_address(operator, method, inner)
        self.assertEqual(parse_address(text), Address(operator, method, inner))
