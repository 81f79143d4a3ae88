"""
Tests for the structured hash, canonical times and record normalisation of
``epsproxy.rules.records`` (SPEC §3, §4, §22.1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.rules import forms
from epsproxy.rules.records import (
    CHANGE_RECORD,
    MAX_DEPTH,
    SECTIONS,
    SIGNED_RECORD,
    canonical_time,
    encode,
    loads,
    normalise_record,
    normalise_signed_record,
    record_hash,
    signature_digest,
    structured_hash,
    timestamp_ns,
)


def F(x: float) -> bytes:
    return b"stringfloat" + struct.pack("<d", x) + b"\x00\x00"


def sh(value) -> str:
    return structured_hash(value).hex()


GROUPS_RECORD = {
    "name": "hd-1",
    "section": "groups",
    "data": ["health-departments"],
    "created_at": "2021-05-17T10:00:00Z",
}
GROUPS_HASH = "d3eb785faac5fafa52a51a5fc044309b450090eca330ac432de660274fac1dc2"

# SPEC §22.1, record hashes.
RECORD_VECTORS = [
    (GROUPS_RECORD, GROUPS_HASH),
    (
        {
            "name": "hd-1",
            "section": "channels",
            "data": [
                {"type": "grpc_client"},
                {
                    "type": "grpc_server",
                    "settings": {"address": "localhost:8888", "proxy": "public-proxy-1.ga"},
                },
            ],
            "created_at": "2021-05-17T10:00:00Z",
        },
        "4ba6f20d3d25dda1fcdb5ca1d5a93c7f465a73d50688bb6db3f7940b68f4e4f2",
    ),
    (
        {
            "name": "hd-1",
            "section": "services",
            "data": [
                {
                    "name": "internals",
                    "permissions": [{"group": "health-departments", "rights": ["call"]}],
                    "methods": [{"name": "_ping", "permissions": []}],
                }
            ],
            "created_at": "2021-05-17T10:00:00.123456789+02:00",
        },
        "6ceb90d29c7eb4f26265209797b24880cfae2d0db0f2a0b722b6d3fbe13b51e2",
    ),
    (
        {
            "name": "public-proxy-1.ga",
            "section": "settings",
            "data": [
                {
                    "operator": "",
                    "service": "proxy",
                    "environment": "production",
                    "settings": {"allowed_domains": [".internal-server.local"], "n": 3},
                }
            ],
            "created_at": "2021-05-17T10:00:00.5Z",
        },
        "65c4ecd2a89b6f25652a2bcaf7d2a9c42afa82042c034d52ec0812c19c9eb597",
    ),
    (
        {
            "name": "hd-1",
            "section": "certificates",
            "data": [
                {"fingerprint": "aa11", "key_usage": "signing"},
                {"fingerprint": "bb22", "key_usage": "encryption"},
            ],
            "created_at": "2021-05-17T10:00:00Z",
        },
        "5ee6a933adf1f166afa1ab1feb16cad8a9d684236ad27d3c87b55c8a80f4fcb0",
    ),
]


class StructuredHashVectorTests(SynchronousTestCase):
    """Every vector of SPEC §22.1, byte stream and digest."""

    def test_string(self) -> None:
        self.assertEqual(encode("abc"), b"stringabc")
        self.assertEqual(
            sh("abc"), "dc62e19fceb003169ed88b2a93ff5d9c2918565bf3eb0baedf167050120df455"
        )

    def test_lists_keep_order(self) -> None:
        self.assertEqual(
            encode(["foo", "bar", "baz"]),
            b"stringliststring0stringfoostring1stringbarstring2stringbaz",
        )
        self.assertEqual(
            sh(["foo", "bar", "baz"]),
            "38a0cbaec6a2856baaacf8ee0c95bd3accfbcf5b3ad402cd651adcb3ff407609",
        )
        self.assertEqual(
            sh(["bar", "foo", "baz"]),
            "06dfda4c1a7fc5cb8afffefe2662f46d984296eb536a0424703ddad487fb95ba",
        )

    def test_integer_is_a_double(self) -> None:
        self.assertEqual(encode({"a": 1}), b"stringmap" + F(1.0) + b"stringa")
        self.assertEqual(
            encode({"a": 1}),
            b"stringmapstringfloat\x00\x00\x00\x00\x00\x00\xf0\x3f\x00\x00stringa",
        )
        self.assertEqual(
            sh(loads('{"a":1}')),
            "b8391f0720c886b6ba46bd9095d14e8475f29f46c8c02998c4b7127f6fab45e0",
        )

    def test_null_values_are_skipped(self) -> None:
        value = loads(
            '{"a":1.5,"b":true,"c":false,"d":null,"e":"","f":[],"g":{},'
            '"h":[null,"x"],"i":0,"j":-2}'
        )
        expected = (
            b"stringmap"
            + F(1.5)
            + b"stringa"
            + b"stringbool\x02"
            + b"\x00" * 9
            + b"stringb"
            + b"stringmapstringg"
            + b"stringliststring0string1stringxstringh"
            + F(-2.0)
            + b"stringj"
        )
        self.assertEqual(encode(value), expected)
        self.assertEqual(
            sh(value), "a781dbf939e31b64fd13f66122f41baf9ed03388b74759a14fb31fb48453bc74"
        )

    def test_empty_key_negative_zero(self) -> None:
        value = loads('{"":"x","k":[[],"",{}],"z":-0}')
        self.assertTrue(math.copysign(1.0, value["z"]) < 0)
        expected = (
            b"stringmapstringx"
            + b"stringliststring0string1string2stringmapstringk"
            + b"stringfloat"
            + b"\x00" * 7
            + b"\x80\x00\x00stringz"
        )
        self.assertEqual(encode(value), expected)
        self.assertEqual(
            sh(value), "74c8f4b514f73658d57d44ff218dedee8251d6f5d36b32cab1ffbc18f068aa81"
        )

    def test_big_int_float_and_unicode(self) -> None:
        value = loads('{"n":12345678901234567890,"m":0.1,"u":"ü"}')
        self.assertEqual(
            sh(value), "fe278a182e9797c5c7c33305c3f04cb3e2af52c581744dee19b30e83a9c10afe"
        )
        stream = encode(value)
        assert stream is not None
        self.assertLess(stream.index(b"stringm"), stream.index(b"stringn"))

    def test_empty_object(self) -> None:
        self.assertEqual(encode({}), b"stringmap")
        self.assertEqual(
            sh({}), "27a7e2aa5b770cf24141d0eb0b2a158bada504045a4d64188ff3620445cae00b"
        )

    def test_times(self) -> None:
        cases = [
            ("2021-05-17T10:00:00Z", "e6840f6fcab9904c25c94e2f3fbdf0d70cf294d209257365120d51729d1d54ef"),
            (
                "2021-05-17T10:00:00.123456789+02:00",
                "e4a451eb4275f8e7c12a13cf3cf83a8f5165baeab17998bb6610141b3f418f44",
            ),
            ("2021-05-17T10:00:00.500000Z", "d93639f3c3565f22417282c3147b1b40f173774f4cf0554f95b6713d5593857d"),
        ]
        for text, digest in cases:
            self.assertEqual(sh(canonical_time(text)), digest, text)
        self.assertEqual(encode(canonical_time(cases[2][0])), b"string2021-05-17T10:00:00.5Z")

    def test_raw_bytes(self) -> None:
        self.assertEqual(encode(b"\x0a\x20"), b"stringbytes\x0a\x20")
        self.assertEqual(
            sh(b"\x0a\x20"), "161e3f7892cc331e30c65fb4803220aa2d1f3085b7d44e11163d9a4c2cec86dd"
        )
        self.assertIsNone(encode(b""))

    def test_go_struct_vectors(self) -> None:
        s = {
            "foo": "bar",
            "zoo": "db",
            "bar": {"Map": {"foo": "bar"}, "List": ["a", "b", "c"], "Ptr": {"foo": "bara"}},
            "value": "another",
            "fooz": bytes.fromhex("0a206f363f"),
        }
        self.assertEqual(sh(s), "dbf143e52c047fa158191c3a051d93ee76bf938cd1791fcba802a098ea23fe50")
        s["test"] = "another"
        self.assertEqual(sh(s), "c5df0f122a227df97e64713d3b715731ec8945e0015bfa67c5ff3de948672b57")
        s["substruct"] = {"foo": "barbara", "test": "another one"}
        self.assertEqual(sh(s), "b965657ee739fbc9246772647dafa6b3f88f809f5a1b120291405883b09a9d1a")

    def test_record_hashes(self) -> None:
        for record, expected in RECORD_VECTORS:
            self.assertEqual(record_hash(record), expected, record["section"])

    def test_first_record_stream(self) -> None:
        self.assertEqual(
            encode(normalise_record(GROUPS_RECORD)),
            b"stringmapstring2021-05-17T10:00:00Zstringcreated_at"
            b"stringliststring0stringhealth-departmentsstringdata"
            b"stringhd-1stringnamestringgroupsstringsection",
        )

    def test_signature_digests(self) -> None:
        signed = {"parent_hash": "", "hash": GROUPS_HASH, "record": GROUPS_RECORD}
        self.assertEqual(
            signature_digest(signed).hex(),
            "cdec6acac6b60074e169ce41538fecaabd6e4353ae3fba12212ff29bfb091453",
        )
        signed["parent_hash"] = GROUPS_HASH
        self.assertEqual(
            signature_digest(signed).hex(),
            "4b4b4b5e3ed65e18bfaef91f260c9edfded94bb4722ac23f6f7509c846803d87",
        )

    def test_signature_digest_ignores_signature_and_extra_keys(self) -> None:
        plain = {"hash": GROUPS_HASH, "record": GROUPS_RECORD}
        noisy = dict(plain, signature={"r": "1", "s": "2", "c": "x"}, position=4)
        self.assertEqual(signature_digest(plain), signature_digest(noisy))


class EncodeRulesTests(SynchronousTestCase):
    """The individual rules of SPEC §4.2."""

    def test_null_at_top_level(self) -> None:
        for value in (None, False, "", [], 0, 0.0, b""):
            self.assertIsNone(encode(value), repr(value))
            self.assertRaises(ValueError, structured_hash, value)

    def test_negative_zero_is_not_null(self) -> None:
        self.assertEqual(encode(-0.0), F(-0.0))
        self.assertEqual(loads("-0"), 0.0)
        self.assertTrue(math.copysign(1.0, loads("-0")) < 0)
        self.assertIsNone(encode(loads("0")))

    def test_list_index_written_for_null_elements(self) -> None:
        self.assertEqual(
            encode([None, False, "", []]),
            b"stringliststring0string1string2string3",
        )

    def test_empty_key_value_written_without_key(self) -> None:
        self.assertEqual(encode({"": "v"}), b"stringmapstringv")

    def test_keys_sorted_by_utf8_bytes(self) -> None:
        value = {"\u00e9": "1", "z": "2", "\U0001f600": "3", "\uffff": "4", "A": "5"}
        keys = sorted(value, key=lambda k: k.encode())
        expected = b"stringmap" + b"".join(
            b"string" + value[k].encode() + b"string" + k.encode() for k in keys
        )
        self.assertEqual(encode(value), expected)

    def test_lone_surrogate_becomes_replacement_character(self) -> None:
        # Go's JSON decoder turns "\ud800" into U+FFFD.
        self.assertEqual(encode(loads('"\\ud800"')), "string\ufffd".encode())
        self.assertEqual(encode({"\ud800": "x"}), "stringmapstringxstring\ufffd".encode())

    def test_true_is_the_varint_of_one(self) -> None:
        self.assertEqual(encode(True), b"stringbool" + bytes([2]) + bytes(9))

    def test_huge_integers_round_like_go(self) -> None:
        self.assertEqual(encode(2**53 + 1), F(float(2**53)))
        self.assertEqual(encode(loads("12345678901234567890")), F(12345678901234567890.0))

    def test_long_list_indices(self) -> None:
        stream = encode(["x"] * 300)
        assert stream is not None
        self.assertIn(b"string299stringx", stream)
        self.assertTrue(stream.endswith(b"string299stringx"))

    def test_refused_values(self) -> None:
        for value in (
            float("nan"),
            float("inf"),
            10**400,
            {1: "x"},
            {1: "x", "a": "y"},
            object(),
            {"a": {1, 2}},
        ):
            self.assertRaises(ValueError, encode, value)

    def test_hostile_nesting(self) -> None:
        deep: list = []
        for _ in range(100_000):
            deep = [deep, "x"]
        self.assertRaises(ValueError, encode, deep)
        deep_map: dict = {"x": "y"}
        for _ in range(MAX_DEPTH + 5):
            deep_map = {"k": deep_map}
        self.assertRaises(ValueError, encode, deep_map)
        ok: dict = {"x": "y"}
        for _ in range(MAX_DEPTH - 2):
            ok = {"k": ok}
        self.assertIsNotNone(encode(ok))

    def test_loads_refuses_bad_json(self) -> None:
        for text in ("NaN", "[Infinity]", "-Infinity", "[" * 100_000, "{", "1" * 5000):
            self.assertRaises(ValueError, loads, text)

    def test_large_value_is_fast_enough(self) -> None:
        # A linear encoder: 200k small strings hash without quadratic blow-up.
        value = {"k%d" % i: ["v", i, {"x": "y"}] for i in range(50_000)}
        stream = encode(value)
        assert stream is not None
        self.assertEqual(hashlib.sha256(stream).digest(), structured_hash(value))


class CanonicalTimeTests(SynchronousTestCase):
    """SPEC §4.3."""

    def test_examples(self) -> None:
        cases = {
            "2021-05-17T10:00:00+00:00": "2021-05-17T10:00:00Z",
            "2021-05-17T10:00:00-00:00": "2021-05-17T10:00:00Z",
            "2021-05-17T10:00:00.000Z": "2021-05-17T10:00:00Z",
            "2021-05-17T10:00:00.500000Z": "2021-05-17T10:00:00.5Z",
            "2021-05-17T10:00:00.1200+01:30": "2021-05-17T10:00:00.12+01:30",
            "2021-05-17T10:00:00.1234567891Z": "2021-05-17T10:00:00.123456789Z",
            "2021-05-17T10:00:00.123456789+02:00": "2021-05-17T10:00:00.123456789+02:00",
            "2021-05-17T10:00:00.000000001-05:00": "2021-05-17T10:00:00.000000001-05:00",
            "2024-02-29T23:59:59Z": "2024-02-29T23:59:59Z",
            "0000-01-01T00:00:00Z": "0000-01-01T00:00:00Z",
        }
        for given_text, expected in cases.items():
            self.assertEqual(canonical_time(given_text), expected, given_text)

    def test_invalid(self) -> None:
        for text in (
            "",
            "2021-05-17",
            "2021-05-17 10:00:00Z",
            "2021-05-17t10:00:00Z",
            "2021-05-17T10:00:00z",
            "2021-05-17T10:00:00",
            "2021-05-17T10:00:00.Z",
            "2021-13-17T10:00:00Z",
            "2021-02-29T10:00:00Z",
            "2021-04-31T10:00:00Z",
            "2021-05-17T24:00:00Z",
            "2021-05-17T10:60:00Z",
            "2021-05-17T10:00:60Z",
            "2021-05-17T10:00:00+24:00",
            "2021-05-17T10:00:00+01:60",
            "2021-05-17T10:00:00+0100",
            "２０２１-05-17T10:00:00Z",
            "2021-05-17T10:00:00Z\n",
            "x" * 10_000,
        ):
            self.assertRaises(ValueError, canonical_time, text)
        self.assertRaises(ValueError, canonical_time, 12)  # type: ignore[arg-type]

    def test_timestamp_ns(self) -> None:
        self.assertEqual(timestamp_ns("1970-01-01T00:00:00Z"), 0)
        self.assertEqual(timestamp_ns("1970-01-01T01:00:00.000000001+01:00"), 1)
        reference = datetime(2021, 5, 17, 8, 0, tzinfo=timezone.utc).timestamp()
        self.assertEqual(
            timestamp_ns("2021-05-17T10:00:00.123456789+02:00"),
            int(reference) * 10**9 + 123456789,
        )
        self.assertLess(timestamp_ns("0000-03-01T00:00:00Z"), timestamp_ns("0001-01-01T00:00:00Z"))

    @settings(deadline=None, max_examples=200)
    @given(st.datetimes(timezones=st.timezones()))
    def test_timestamp_matches_datetime(self, moment: datetime) -> None:
        offset = moment.utcoffset()
        assert offset is not None
        if offset.seconds % 60 or abs(offset.total_seconds()) >= 24 * 3600:
            return  # not expressible in RFC 3339
        text = moment.isoformat(timespec="microseconds")
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
        self.assertEqual(timestamp_ns(text), (moment - epoch) // timedelta(microseconds=1) * 1000)
        self.assertEqual(canonical_time(canonical_time(text)), canonical_time(text))


class NormalisationTests(SynchronousTestCase):
    """The record schemas of SPEC §3.2 and the normalisation the hash depends on."""

    def test_unknown_keys_dropped_before_hashing(self) -> None:
        services = copy.deepcopy(RECORD_VECTORS[2][0])
        services["data"][0]["methods"][0]["params"] = [{"name": "x"}]
        services["data"][0]["extra"] = True
        services["extra"] = "x"
        self.assertEqual(record_hash(services), RECORD_VECTORS[2][1])
        normalised = normalise_record(services)
        self.assertNotIn("params", normalised["data"][0]["methods"][0])
        self.assertNotIn("extra", normalised)

    def test_defaults(self) -> None:
        record = {
            "name": "x",
            "section": "services",
            "data": [{"name": "s", "methods": [{"name": "m", "parameters": None}]}],
            "created_at": "2021-05-17T10:00:00+00:00",
        }
        normalised = normalise_record(record)
        self.assertEqual(
            normalised,
            {
                "name": "x",
                "section": "services",
                "data": [
                    {"name": "s", "permissions": [], "methods": [{"name": "m", "permissions": []}]}
                ],
                "created_at": "2021-05-17T10:00:00Z",
            },
        )
        settings_record = {
            "name": "x",
            "section": "settings",
            "data": [{"settings": {}, "operator": None}],
            "created_at": "2021-05-17T10:00:00Z",
        }
        self.assertEqual(
            normalise_record(settings_record)["data"],
            [{"operator": "", "service": "", "environment": "", "settings": {}}],
        )

    def test_preferences_use_inner_key_settings(self) -> None:
        record = {
            "name": "x",
            "section": "preferences",
            "data": [{"settings": {"a": 1}, "preferences": {"b": 2}}],
            "created_at": "2021-05-17T10:00:00Z",
        }
        self.assertEqual(
            normalise_record(record)["data"],
            [{"operator": "", "service": "", "environment": "", "settings": {"a": 1}}],
        )
        del record["data"][0]["settings"]
        self.assertRaises(forms.FormError, normalise_record, record)

    def test_lenient_string_lists(self) -> None:
        record = dict(GROUPS_RECORD, data={"not": "a list"})
        self.assertEqual(normalise_record(record)["data"], [])
        record = dict(GROUPS_RECORD, data=["a", 1])
        self.assertRaises(forms.FormError, normalise_record, record)

    def test_rights(self) -> None:
        def services(rights):
            return {
                "name": "x",
                "section": "services",
                "data": [{"name": "s", "permissions": [{"group": "g", "rights": rights}]}],
                "created_at": "2021-05-17T10:00:00Z",
            }

        self.assertEqual(
            normalise_record(services(["call"]))["data"][0]["permissions"][0]["rights"],
            ["call"],
        )
        self.assertEqual(
            normalise_record(services("call"))["data"][0]["permissions"][0]["rights"], []
        )
        self.assertRaises(forms.FormError, normalise_record, services(["call", "call"]))
        self.assertRaises(forms.FormError, normalise_record, services(["read"]))
        self.assertRaises(forms.FormError, normalise_record, services(["call", 1]))

    def test_refused_records(self) -> None:
        bad = [
            None,
            [],
            "record",
            {},
            dict(GROUPS_RECORD, name=None),
            dict(GROUPS_RECORD, name=7),
            dict(GROUPS_RECORD, section="properties"),
            dict(GROUPS_RECORD, section=None),
            dict(GROUPS_RECORD, created_at="yesterday"),
            dict(GROUPS_RECORD, created_at=None),
            dict(GROUPS_RECORD, created_at="2021-05-17T10:00:00Z" + "0" * 200),
            dict(GROUPS_RECORD, data=None),
            {k: v for k, v in GROUPS_RECORD.items() if k != "data"},
            dict(GROUPS_RECORD, section="channels", data=[{"settings": {}}]),
            dict(GROUPS_RECORD, section="channels", data={"type": "x"}),
            dict(GROUPS_RECORD, section="channels", data=[{"type": "x", "settings": []}]),
            dict(GROUPS_RECORD, section="certificates", data=[{"fingerprint": "x"}]),
            dict(GROUPS_RECORD, section="services", data=[{"methods": []}]),
            dict(GROUPS_RECORD, section="settings", data=[{"operator": 3, "settings": {}}]),
        ]
        for record in bad:
            self.assertRaises(forms.FormError, normalise_record, record)

    def test_error_names_the_path(self) -> None:
        record = dict(GROUPS_RECORD, section="services", data=[{"name": "s", "methods": [{}]}])
        error = self.assertRaises(forms.FormError, normalise_record, record)
        self.assertEqual(error.path, ("data", 0, "methods", 0, "name"))

    def test_signed_record_schema(self) -> None:
        signed = {
            "hash": GROUPS_HASH,
            "signature": {"r": "1" * 10, "s": "2" * 100, "c": "pem"},
            "record": GROUPS_RECORD,
            "position": 3,
        }
        normalised = normalise_signed_record(signed)
        self.assertEqual(normalised["parent_hash"], "")
        self.assertNotIn("position", normalised)
        self.assertEqual(normalise_signed_record(dict(signed, hash=GROUPS_HASH.upper()))["hash"],
                         GROUPS_HASH.upper())
        bad_variants = [
            dict(signed, hash=GROUPS_HASH[:-2]),
            dict(signed, hash=GROUPS_HASH + "00"),
            dict(signed, hash="-" + GROUPS_HASH[1:]),
            dict(signed, hash=None),
            dict(signed, parent_hash=GROUPS_HASH.upper()),
            dict(signed, parent_hash="abc"),
            dict(signed, signature=None),
            dict(signed, signature="sig"),
            dict(signed, signature={"r": "1" * 9, "s": "2" * 10, "c": "x"}),
            dict(signed, signature={"r": "1" * 101, "s": "2" * 10, "c": "x"}),
            dict(signed, signature={"r": "-" + "1" * 10, "s": "2" * 10, "c": "x"}),
            dict(signed, signature={"r": "١" * 10, "s": "2" * 10, "c": "x"}),
            dict(signed, signature={"r": "1" * 10, "s": "2" * 10}),
            dict(signed, signature={"r": "1" * 10, "s": "2" * 10, "c": "x" * 70_000}),
            dict(signed, record=None),
            dict(signed, record=dict(GROUPS_RECORD, section="nope")),
        ]
        for variant in bad_variants:
            self.assertRaises(forms.FormError, normalise_signed_record, variant)

    def test_sections(self) -> None:
        self.assertEqual(
            set(SECTIONS),
            {"channels", "certificates", "services", "preferences", "settings", "groups"},
        )
        self.assertIs(CHANGE_RECORD.validate(GROUPS_RECORD)["name"], "hd-1")
        self.assertIsInstance(SIGNED_RECORD, forms.Schema)


# ------------------------------------------------------------------ properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
any_values = st.recursive(
    json_scalars | st.floats() | st.binary(max_size=4) | st.integers(),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3)
    | st.tuples(inner),
    max_leaves=15,
)
record_strategy = st.fixed_dictionaries(
    {
        "name": st.text(max_size=6),
        "section": st.sampled_from(SECTIONS),
        "created_at": st.sampled_from(
            ["2021-05-17T10:00:00Z", "2021-05-17T10:00:00.1200+01:30", "2021-05-17T10:00:00.000Z"]
        ),
        "data": json_values,
    }
)


class PropertyTests(SynchronousTestCase):
    """Hypothesis properties of encoding and normalisation."""

    @settings(deadline=None, max_examples=200)
    @given(any_values)
    def test_encode_raises_only_value_error(self, value) -> None:
        try:
            encode(value)
        except ValueError:
            pass

    @settings(deadline=None, max_examples=200)
    @given(json_values)
    def test_hash_deterministic_and_json_round_trip(self, value) -> None:
        text = json.dumps(value)
        again = loads(text)
        self.assertEqual(encode(value), encode(again))
        self.assertEqual(encode(copy.deepcopy(value)), encode(value))

    @settings(deadline=None, max_examples=100)
    @given(st.dictionaries(st.text(max_size=5), st.text(max_size=3), max_size=6), st.randoms())
    def test_key_order_irrelevant(self, mapping, rnd) -> None:
        items = list(mapping.items())
        rnd.shuffle(items)
        self.assertEqual(encode(dict(items)), encode(mapping))

    @settings(deadline=None, max_examples=200)
    @given(record_strategy)
    def test_normalise_idempotent(self, record) -> None:
        try:
            once = normalise_record(record)
        except forms.FormError:
            return
        self.assertEqual(normalise_record(once), once)
        self.assertEqual(record_hash(once), record_hash(record))
