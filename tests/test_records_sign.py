"""
Tests for signatures, signing certificates, chain validation, pins and record
verification in ``epsproxy.rules.records`` (SPEC §5, §22.2).
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.rules.certificate_profile import key_usage as profile_key_usage
from epsproxy.rules.certificates import fingerprint, load_certificates_file, load_private_key_file, to_pem
from epsproxy.rules.records import (
    InvalidRecord,
    NotAllowed,
    Pins,
    RecordError,
    SigningError,
    TrustStore,
    load_signer,
    loads,
    record_hash,
    sign_data,
    sign_record,
    signature_digest,
    verify_data,
    verify_record,
)
from tests.support.pki import pki

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
GROUPS_RECORD = {
    "name": "hd-1",
    "section": "groups",
    "data": ["health-departments"],
    "created_at": "2021-05-17T10:00:00Z",
}


def clock_at(moment: datetime) -> Clock:
    clock = Clock()
    clock.advance(moment.timestamp())
    return clock


def make_cert(
    name: str,
    issuer: tuple[x509.Certificate, object] | None = None,
    *,
    key=None,
    ca: bool = False,
    path_length: int | None = None,
    basic_constraints: bool = True,
    key_usage: bool | None = True,
    eku: Iterable[ObjectIdentifier] | None = None,
    uris: Iterable[str] = (),
    dns: Iterable[str] = (),
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=30),
    extra: Iterable[tuple[x509.ExtensionType, bool]] = (),
):
    """An ad-hoc certificate (and its key) for refusal tests."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), True)
    if key_usage is not None:
        builder = builder.add_extension(
            profile_key_usage(digital_signature=key_usage, ca=ca), False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256()), key


class AdHocPKI:
    """root -> intermediate (pathlen 0) -> signing leaves, valid around NOW."""

    def __init__(self) -> None:
        self.root = make_cert("Ad-hoc Root", ca=True)
        self.intermediate = make_cert("Ad-hoc Intermediate", self.root, ca=True, path_length=0)

    def trust(self, moment: datetime = NOW, **kwargs) -> TrustStore:
        return TrustStore(
            [self.root[0]], [self.intermediate[0]], clock=clock_at(moment).seconds, **kwargs
        )

    def signer(self, name: str = "hd-1", groups: Iterable[str] = ("sd-admin",), **kwargs):
        uris = [f"iris-name://{name}"] + [f"iris-group://{g}" for g in groups]
        return make_cert(name, self.intermediate, uris=uris, dns=[name], **kwargs)


def pem_of(certificate: x509.Certificate) -> str:
    return to_pem(certificate)


def real_trust() -> TrustStore:
    return TrustStore.from_files([pki().root], [pki().intermediate])


def real_signing(name: str, alt: bool = False, label: str = "main"):
    # pki() and pki("main") are different cache keys of tests.support: use the former.
    crt, key = (pki() if label == "main" else pki(label)).signing(name, alt)
    return load_private_key_file(key), crt.read_text()


def signed_chain(records: list[dict], key, pem: str, parent: str = "") -> list[dict]:
    out = []
    for record in records:
        signed = sign_record(record, parent, key, pem)
        parent = signed["hash"]
        out.append(signed)
    return out


def certificates_record(name: str, signing_fp: str, encryption_fp: str = "ee" * 32) -> dict:
    return {
        "name": name,
        "section": "certificates",
        "data": [
            {"fingerprint": signing_fp, "key_usage": "signing"},
            {"fingerprint": encryption_fp, "key_usage": "encryption"},
        ],
        "created_at": "2021-05-17T10:00:00Z",
    }


# ----------------------------------------------------------------------------- tests


class ECDSAVectorTests(SynchronousTestCase):
    """SPEC §22.2."""

    d = int("c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721", 16)
    x = int("60fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6", 16)
    y = int("7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299", 16)
    r = "2941674569475125725247172123757341155077316704112377827177083281522627532610"
    s = "49760667621313205814013952926478053934754930378707165134045959760860164143848"
    digest = bytes.fromhex("cdec6acac6b60074e169ce41538fecaabd6e4353ae3fba12212ff29bfb091453")

    def test_raw_verification(self) -> None:
        public = ec.EllipticCurvePublicNumbers(self.x, self.y, ec.SECP256R1()).public_key()
        signature = utils.encode_dss_signature(int(self.r), int(self.s))
        public.verify(signature, self.digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        derived = ec.derive_private_key(self.d, ec.SECP256R1()).public_key().public_numbers()
        self.assertEqual((derived.x, derived.y), (self.x, self.y))

    def test_vector_verifies_as_a_record(self) -> None:
        # A certificate for the vector's key turns the vector into a complete record.
        adhoc = AdHocPKI()
        cert, _ = adhoc.signer(key=ec.derive_private_key(self.d, ec.SECP256R1()))
        signed = {
            "parent_hash": "",
            "hash": record_hash(GROUPS_RECORD),
            "signature": {"r": self.r, "s": self.s, "c": pem_of(cert)},
            "record": GROUPS_RECORD,
        }
        self.assertEqual(signature_digest(signed), self.digest)
        signer = verify_record(signed, [], adhoc.trust())
        self.assertEqual(signer.name, "hd-1")
        tampered = copy.deepcopy(signed)
        tampered["signature"]["s"] = str(int(self.s) + 1)
        error = self.assertRaises(InvalidRecord, verify_record, tampered, [], adhoc.trust())
        self.assertEqual(error.reason, "invalid signature")


class SignVerifyTests(SynchronousTestCase):
    """Round trips and refusals with the dev PKI."""

    def setUp(self) -> None:
        self.trust = real_trust()
        self.key, self.pem = real_signing("hd-1")

    def test_round_trip(self) -> None:
        record = dict(GROUPS_RECORD, created_at="2021-05-17T10:00:00.500+00:00", junk=1)
        signed = sign_record(record, "", self.key, self.pem)
        self.assertEqual(set(signed), {"parent_hash", "hash", "signature", "record"})
        self.assertEqual(signed["record"]["created_at"], "2021-05-17T10:00:00.5Z")
        self.assertNotIn("junk", signed["record"])
        self.assertEqual(signed["hash"], record_hash(record))
        self.assertRegex(signed["signature"]["r"], r"^[1-9][0-9]*$")
        self.assertRegex(signed["signature"]["s"], r"^[1-9][0-9]*$")
        # c is the leaf only, although the file also holds the intermediate.
        leaf = load_certificates_file(pki().signing("hd-1")[0])[0]
        self.assertEqual(signed["signature"]["c"], to_pem(leaf))
        self.assertEqual(signed["signature"]["c"].count("BEGIN CERTIFICATE"), 1)
        wire = loads(json.dumps(signed))
        signer = verify_record(wire, [], self.trust)
        self.assertEqual(signer.name, "hd-1")
        self.assertIn("sd-admin", signer.groups)
        self.assertEqual(signer.fingerprint, pki().fingerprints("hd-1")["signing"])

    def test_chained_records(self) -> None:
        chain = signed_chain([GROUPS_RECORD, dict(GROUPS_RECORD, data=["x"])], self.key, self.pem)
        self.assertEqual(chain[1]["parent_hash"], chain[0]["hash"])
        for i, signed in enumerate(chain):
            verify_record(signed, chain[:i], self.trust)
        moved = dict(chain[1], parent_hash="")
        error = self.assertRaises(InvalidRecord, verify_record, moved, [], self.trust)
        self.assertEqual(error.reason, "invalid signature")

    def test_non_admin(self) -> None:
        key, pem = real_signing("hd-2")
        signed = sign_record(GROUPS_RECORD, "", key, pem)
        error = self.assertRaises(NotAllowed, verify_record, signed, [], self.trust)
        self.assertEqual(error.reason, "signer hd-2 is not in group sd-admin")

    def test_foreign_ca(self) -> None:
        key, pem = real_signing("hd-1", label="foreign")
        signed = sign_record(GROUPS_RECORD, "", key, pem)
        error = self.assertRaises(NotAllowed, verify_record, signed, [], self.trust)
        self.assertEqual(error.reason, "signing certificate does not chain to a trusted root")
        self.assertFalse(TrustStore([], []).verify_chain(load_signer(pem).certificate))

    def test_expired_signing_certificate(self) -> None:
        signed = sign_record(GROUPS_RECORD, "", self.key, self.pem)
        future = TrustStore(
            self.trust.roots, self.trust.intermediates,
            clock=clock_at(datetime.now(timezone.utc) + timedelta(days=3000)).seconds,
        )
        self.assertRaises(NotAllowed, verify_record, signed, [], future)
        past = TrustStore(
            self.trust.roots, self.trust.intermediates,
            clock=clock_at(datetime(2000, 1, 1, tzinfo=timezone.utc)).seconds,
        )
        self.assertRaises(NotAllowed, verify_record, signed, [], past)

    def test_tampering(self) -> None:
        signed = sign_record(GROUPS_RECORD, "", self.key, self.pem)

        def variant(change) -> dict:
            other = copy.deepcopy(signed)
            change(other)
            return other

        def set_data(s):
            s["record"]["data"] = ["other"]

        def rehash(s):
            s["record"]["data"] = ["other"]
            s["hash"] = record_hash(s["record"])

        def upper(s):
            s["hash"] = s["hash"].upper()

        def bump_r(s):
            s["signature"]["r"] = str(int(s["signature"]["r"]) + 1)

        def swap_rs(s):
            sig = s["signature"]
            sig["r"], sig["s"] = sig["s"], sig["r"]

        def zero_r(s):
            s["signature"]["r"] = "0" * 10

        def huge_s(s):
            s["signature"]["s"] = "9" * 100

        def parent(s):
            s["parent_hash"] = "ab" * 32

        def created(s):
            s["record"]["created_at"] = "2021-05-17T10:00:00+00:00"  # same instant, same text

        cases = {
            set_data: "invalid hash value",
            rehash: "invalid signature",
            upper: "invalid hash value",
            bump_r: "invalid signature",
            swap_rs: "invalid signature",
            zero_r: "invalid signature",
            huge_s: "invalid signature",
            parent: "invalid signature",
        }
        for change, reason in cases.items():
            error = self.assertRaises(InvalidRecord, verify_record, variant(change), [], self.trust)
            self.assertEqual(error.reason, reason, change.__name__)
        # Normalisation makes an equivalent time spelling verify.
        verify_record(variant(created), [], self.trust)

    def test_unhashable_free_form_data(self) -> None:
        record = {
            "name": "hd-1",
            "section": "channels",
            "data": [{"type": "grpc_server", "settings": {"n": float("nan")}}],
            "created_at": "2021-05-17T10:00:00Z",
        }
        error = self.assertRaises(InvalidRecord, sign_record, record, "", self.key, self.pem)
        self.assertIn("cannot be hashed", error.reason)
        signed = sign_record(dict(record, data=[{"type": "x"}]), "", self.key, self.pem)
        signed["record"]["data"][0]["settings"] = {"n": float("inf")}
        error = self.assertRaises(InvalidRecord, verify_record, signed, [], self.trust)
        self.assertIn("cannot be hashed", error.reason)

    def test_malformed_signature_fields(self) -> None:
        signed = sign_record(GROUPS_RECORD, "", self.key, self.pem)
        for field, value in (("r", "12345abcde"), ("s", "1e10000000"), ("r", 12345678901), ("c", None)):
            other = copy.deepcopy(signed)
            other["signature"][field] = value
            error = self.assertRaises(InvalidRecord, verify_record, other, [], self.trust)
            self.assertTrue(error.reason.startswith("malformed record: signature."), error.reason)
        for bad in (None, [], "x", {}, {"record": GROUPS_RECORD}):
            self.assertRaises(InvalidRecord, verify_record, bad, [], self.trust)

    def test_bad_certificates_in_c(self) -> None:
        adhoc = AdHocPKI()
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rsa_cert, _ = make_cert("hd-1", adhoc.intermediate, key=rsa_key,
                                uris=["iris-name://hd-1", "iris-group://sd-admin"])
        no_usage, _ = adhoc.signer(key_usage=None)
        no_digital, _ = adhoc.signer(key_usage=False)
        key_pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n"
        cases = {
            "not a certificate": "signing certificate is not PEM (no PEM block found)",
            "": "signing certificate is not PEM (no PEM block found)",
            "-----BEGIN CERTIFICATE-----\nAAAA": "signing certificate is not PEM (no END line)",
            "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n": "cannot be parsed",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n": "cannot be parsed",
            "-----BEGIN CERTIFICATE-----\nü\n-----END CERTIFICATE-----\n": "cannot be parsed",
            key_pem + self.pem: "first PEM block is 'EC PRIVATE KEY', not CERTIFICATE",
            "-----BEGIN " * 5_000: "no PEM block found",
            "-----BEGIN CERTIFICATE-----\n" * 2_000: "no END line",
            pem_of(rsa_cert): "does not hold an ECDSA key",
            pem_of(no_usage): "has no keyUsage extension",
            pem_of(no_digital): "lacks keyUsage digitalSignature",
        }
        signed = sign_record(GROUPS_RECORD, "", self.key, self.pem)
        for pem, reason in cases.items():
            other = copy.deepcopy(signed)
            other["signature"]["c"] = pem
            error = self.assertRaises(InvalidRecord, verify_record, other, [], self.trust)
            self.assertIn(reason, error.reason, pem[:40])
            self.assertRaises(InvalidRecord, load_signer, pem)
        self.assertRaises(InvalidRecord, load_signer, b"bytes")  # type: ignore[arg-type]
        self.assertRaises(InvalidRecord, load_signer, "x" * 70_000)

    def test_data_signature(self) -> None:
        data = loads('{"a": [1, 2, {"b": -0}], "c": "text"}')
        signed = sign_data(data, self.key, self.pem)
        self.assertIs(signed["data"], data)
        wire = loads(json.dumps(signed))
        self.assertEqual(verify_data(wire, self.trust, "hd-1").name, "hd-1")
        self.assertEqual(verify_data(wire, self.trust, "HD-1").name, "hd-1")
        self.assertEqual(verify_data(wire, self.trust, "").name, "hd-1")
        error = self.assertRaises(NotAllowed, verify_data, wire, self.trust, "hd-2")
        self.assertIn("for name hd-2", error.reason)
        wire["data"]["a"][2]["b"] = 0  # -0 and 0 hash differently
        error = self.assertRaises(InvalidRecord, verify_data, wire, self.trust, "hd-1")
        self.assertEqual(error.reason, "invalid signature")
        # Non-admins may sign data.
        key2, pem2 = real_signing("hd-2")
        self.assertEqual(verify_data(sign_data("x", key2, pem2), self.trust, "hd-2").name, "hd-2")
        for bad in (None, {"data": "x"}, {"signature": signed["signature"]},
                    {"signature": signed["signature"], "data": []},
                    {"signature": signed["signature"], "data": {"x": float("nan")}}):
            self.assertRaises(InvalidRecord, verify_data, bad, self.trust, "hd-1")
        self.assertRaises(InvalidRecord, sign_data, "", self.key, self.pem)

    def test_signing_errors(self) -> None:
        other_key, _ = real_signing("hd-2")
        self.assertRaises(SigningError, sign_record, GROUPS_RECORD, "", other_key, self.pem)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertRaises(SigningError, sign_record, GROUPS_RECORD, "", rsa_key, self.pem)
        self.assertRaises(SigningError, sign_record, GROUPS_RECORD, "", self.key, "no pem")
        tls_pem = pki().tls("hd-1")[0].read_text()  # keyUsage ok, but not our key
        self.assertRaises(SigningError, sign_record, GROUPS_RECORD, "", self.key, tls_pem)
        self.assertRaises(InvalidRecord, sign_record, {"name": "x"}, "", self.key, self.pem)
        for parent in ("abc", "AB" * 32, None):
            self.assertRaises(InvalidRecord, sign_record, GROUPS_RECORD, parent, self.key, self.pem)
        self.assertTrue(issubclass(SigningError, RecordError))


class PinningTests(SynchronousTestCase):
    """Signing-key pins set by ``certificates`` records (SPEC §5.4 step 4)."""

    def setUp(self) -> None:
        self.trust = real_trust()
        self.key, self.pem = real_signing("hd-1")
        self.alt_key, self.alt_pem = real_signing("hd-1", alt=True)
        self.main_fp = pki().fingerprints("hd-1")["signing"]
        self.alt_fp = load_signer(self.alt_pem).fingerprint

    def test_dev_directory_pins_hd1(self) -> None:
        chain = signed_chain(pki().certificates_records(), self.key, self.pem)
        pins = Pins()
        for i, signed in enumerate(chain):
            verify_record(signed, pins, self.trust)
            verify_record(signed, chain[:i], self.trust)
            pins.observe(signed)
        self.assertEqual(pins.pinned("hd-1"), self.main_fp)
        alt = sign_record(GROUPS_RECORD, chain[-1]["hash"], self.alt_key, self.alt_pem)
        for preceding in (pins, chain):
            error = self.assertRaises(NotAllowed, verify_record, alt, preceding, self.trust)
            self.assertEqual(error.reason, "signing certificate of hd-1 is not the pinned one")
        # Without a pin, the alt key (same CA, sd-admin) is fine.
        verify_record(alt, [], self.trust)
        verify_record(alt, Pins(), self.trust)

    def test_rotation(self) -> None:
        first = sign_record(certificates_record("hd-1", self.main_fp), "", self.key, self.pem)
        rotate = sign_record(
            certificates_record("hd-1", self.alt_fp), first["hash"], self.key, self.pem
        )
        pins = Pins()
        for signed in (first, rotate):
            verify_record(signed, pins, self.trust)
            pins.observe(signed)
        self.assertEqual(pins.pinned("hd-1"), self.alt_fp)
        old = sign_record(GROUPS_RECORD, rotate["hash"], self.key, self.pem)
        new = sign_record(GROUPS_RECORD, rotate["hash"], self.alt_key, self.alt_pem)
        self.assertRaises(NotAllowed, verify_record, old, pins, self.trust)
        self.assertEqual(verify_record(new, pins, self.trust).fingerprint, self.alt_fp)
        self.assertRaises(NotAllowed, verify_record, old, [first, rotate], self.trust)

    def test_pin_rules(self) -> None:
        pins = Pins()
        pins.observe({"record": certificates_record("hd-1", "aa" * 32)})
        self.assertEqual(pins.pinned("hd-1"), "aa" * 32)
        copied = pins.copy()
        # Last signing item of the last record wins; records without one keep the pin.
        two = certificates_record("hd-1", "bb" * 32)
        two["data"].append({"fingerprint": "cc" * 32, "key_usage": "signing"})
        pins.observe({"record": two})
        self.assertEqual(pins.pinned("hd-1"), "cc" * 32)
        only_enc = certificates_record("hd-1", "dd" * 32)
        only_enc["data"] = only_enc["data"][1:]
        pins.observe({"record": only_enc})
        self.assertEqual(pins.pinned("hd-1"), "cc" * 32)
        # Invalid data pins nothing; other sections and garbage are ignored.
        for junk in (
            {"record": dict(certificates_record("hd-1", "ee" * 32), data="x")},
            {"record": dict(certificates_record("hd-1", "ee" * 32), data=[{"fingerprint": 1}])},
            {"record": dict(certificates_record("hd-1", "ee" * 32), section="groups")},
            {"record": dict(certificates_record("hd-1", "ee" * 32), name=None)},
            {"record": "x"},
            {},
            None,
        ):
            pins.observe(junk)  # type: ignore[arg-type]
        self.assertEqual(pins.pinned("hd-1"), "cc" * 32)
        self.assertEqual(copied.pinned("hd-1"), "aa" * 32)
        self.assertIsNone(pins.pinned("hd-2"))
        self.assertEqual(Pins.from_records([{"record": two}]).pinned("hd-1"), "cc" * 32)

    def test_pin_for_another_name_does_not_apply(self) -> None:
        pins = Pins()
        pins.observe({"record": certificates_record("hd-2", "aa" * 32)})
        signed = sign_record(GROUPS_RECORD, "", self.key, self.pem)
        verify_record(signed, pins, self.trust)


class SignerTests(SynchronousTestCase):
    """SPEC §5.2: names and groups come from the URI SANs."""

    def test_uris(self) -> None:
        adhoc = AdHocPKI()
        cert, _ = make_cert(
            "CN-is-ignored",
            adhoc.intermediate,
            uris=[
                "iris-name://first",
                "IRIS-GROUP://Admins",
                "iris-group://user:pw@sd-admin:80/path?q",
                "iris-group://",
                "https://example.org",
                "iris-name://second",
            ],
        )
        signer = load_signer(pem_of(cert))
        self.assertEqual(signer.name, "second")
        self.assertEqual(signer.groups, ("Admins", "sd-admin:80"))
        self.assertEqual(signer.fingerprint, fingerprint(cert))
        self.assertIs(load_signer(pem_of(cert)), signer)

    def test_no_san(self) -> None:
        adhoc = AdHocPKI()
        cert, _ = make_cert("hd-1", adhoc.intermediate)
        signer = load_signer(pem_of(cert))
        self.assertEqual((signer.name, signer.groups), ("", ()))

    def test_real_signers(self) -> None:
        self.assertEqual(load_signer(real_signing("hd-1")[1]).groups, ("sd-admin",))
        self.assertEqual(load_signer(real_signing("hd-2")[1]).groups, ())
        self.assertEqual(load_signer(real_signing("ls-1")[1]).name, "ls-1")


class ChainTests(SynchronousTestCase):
    """SPEC §5.3 with ad-hoc CAs."""

    def setUp(self) -> None:
        self.adhoc = AdHocPKI()

    def test_valid_chain(self) -> None:
        cert, _ = self.adhoc.signer()
        self.assertTrue(self.adhoc.trust().verify_chain(cert))

    def test_missing_intermediate_or_root(self) -> None:
        cert, _ = self.adhoc.signer()
        self.assertFalse(TrustStore([self.adhoc.root[0]]).verify_chain(cert))
        self.assertFalse(TrustStore([], [self.adhoc.intermediate[0]]).verify_chain(cert))
        self.assertFalse(
            TrustStore([self.adhoc.intermediate[0]][:0], [self.adhoc.root[0]]).verify_chain(cert)
        )

    def test_any_of_several_roots(self) -> None:
        cert, _ = self.adhoc.signer()
        other = AdHocPKI()
        trust = TrustStore(
            [other.root[0], self.adhoc.root[0]],
            [other.intermediate[0], self.adhoc.intermediate[0]],
            clock=clock_at(NOW).seconds,
        )
        self.assertTrue(trust.verify_chain(cert))
        # An intermediate configured as a root is a trust anchor on its own.
        anchor = TrustStore([self.adhoc.intermediate[0]], clock=clock_at(NOW).seconds)
        self.assertTrue(anchor.verify_chain(cert))

    def test_same_name_other_key(self) -> None:
        impostor = make_cert("Ad-hoc Intermediate", self.adhoc.root, ca=True)
        cert, _ = make_cert("hd-1", impostor)
        self.assertFalse(self.adhoc.trust().verify_chain(cert))

    def test_issuer_must_be_ca(self) -> None:
        not_ca = make_cert("Leafy", self.adhoc.root, ca=False)
        no_bc = make_cert("NoBC", self.adhoc.root, basic_constraints=False)
        for issuer in (not_ca, no_bc):
            cert, _ = make_cert("hd-1", issuer)
            trust = TrustStore([self.adhoc.root[0]], [issuer[0]], clock=clock_at(NOW).seconds)
            self.assertFalse(trust.verify_chain(cert))

    def test_path_length(self) -> None:
        sub = make_cert("Sub", self.adhoc.intermediate, ca=True)  # below a pathlen:0 CA
        cert, _ = make_cert("hd-1", sub)
        trust = TrustStore(
            [self.adhoc.root[0]], [self.adhoc.intermediate[0], sub[0]], clock=clock_at(NOW).seconds
        )
        self.assertFalse(trust.verify_chain(cert))
        mid = make_cert("Mid", self.adhoc.root, ca=True, path_length=1)
        sub = make_cert("Sub2", mid, ca=True, path_length=0)
        cert, _ = make_cert("hd-1", sub)
        trust = TrustStore([self.adhoc.root[0]], [mid[0], sub[0]], clock=clock_at(NOW).seconds)
        self.assertTrue(trust.verify_chain(cert))

    def test_extended_key_usage(self) -> None:
        trust = self.adhoc.trust()
        cases = [
            ([ExtendedKeyUsageOID.CODE_SIGNING], True),
            ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], True),
            ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING], True),
            ([ExtendedKeyUsageOID.SERVER_AUTH], False),
            ([ExtendedKeyUsageOID.CLIENT_AUTH], False),
        ]
        for eku, expected in cases:
            cert, _ = self.adhoc.signer(eku=eku)
            self.assertEqual(trust.verify_chain(cert), expected, eku)
        restricted = make_cert(
            "Restricted", self.adhoc.root, ca=True, eku=[ExtendedKeyUsageOID.SERVER_AUTH]
        )
        cert, _ = make_cert("hd-1", restricted)
        trust = TrustStore([self.adhoc.root[0]], [restricted[0]], clock=clock_at(NOW).seconds)
        self.assertFalse(trust.verify_chain(cert))

    def test_unknown_critical_extension(self) -> None:
        odd = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
        cert, _ = self.adhoc.signer(extra=[(odd, True)])
        self.assertFalse(self.adhoc.trust().verify_chain(cert))
        cert, _ = self.adhoc.signer(extra=[(odd, False)])
        self.assertTrue(self.adhoc.trust().verify_chain(cert))

    def test_validity_times_and_cache(self) -> None:
        cert, _ = self.adhoc.signer(not_after=NOW + timedelta(days=2))
        clock = clock_at(NOW)
        trust = TrustStore([self.adhoc.root[0]], [self.adhoc.intermediate[0]], clock=clock.seconds)
        self.assertTrue(trust.verify_chain(cert))
        clock.advance(timedelta(days=3).total_seconds())
        self.assertFalse(trust.verify_chain(cert))  # cached path, but expired now
        early = TrustStore(
            [self.adhoc.root[0]], [self.adhoc.intermediate[0]],
            clock=clock_at(NOW - timedelta(days=2)).seconds,
        )
        self.assertFalse(early.verify_chain(cert))
        # An expired intermediate breaks the chain even for a valid leaf.
        old = make_cert("Old", self.adhoc.root, ca=True, not_after=NOW - timedelta(hours=1))
        leaf, _ = make_cert("hd-1", old)
        trust = TrustStore([self.adhoc.root[0]], [old[0]], clock=clock_at(NOW).seconds)
        self.assertFalse(trust.verify_chain(leaf))

    def test_dns_name(self) -> None:
        trust = self.adhoc.trust()
        cert, _ = make_cert("x", self.adhoc.intermediate, dns=["hd-1", "*.ops.example"])
        self.assertTrue(trust.verify_chain(cert, "hd-1"))
        self.assertTrue(trust.verify_chain(cert, "HD-1."))
        self.assertTrue(trust.verify_chain(cert, "a.ops.example"))
        self.assertFalse(trust.verify_chain(cert, "a.b.ops.example"))
        self.assertFalse(trust.verify_chain(cert, "ops.example"))
        self.assertFalse(trust.verify_chain(cert, "hd-2"))
        self.assertFalse(trust.verify_chain(cert, "x"))  # the CN is not used
        self.assertTrue(trust.verify_chain(cert, ""))

    def test_cache_is_used_and_bounded(self) -> None:
        calls = []

        class Counting(TrustStore):
            def _windows(self, *args):
                calls.append(args[1])
                return super()._windows(*args)

        trust = Counting(
            [self.adhoc.root[0]], [self.adhoc.intermediate[0]],
            clock=clock_at(NOW).seconds, cache_size=2,
        )
        certs = [self.adhoc.signer()[0] for _ in range(3)]
        for _ in range(3):
            self.assertTrue(trust.verify_chain(certs[0]))
        self.assertEqual(len(calls), 1)
        for cert in certs:
            trust.verify_chain(cert)
        self.assertLessEqual(len(trust._cache), 2)
        self.assertEqual(len(calls), 3)

    def test_cross_signed_loop_terminates(self) -> None:
        key_a = ec.generate_private_key(ec.SECP256R1())
        key_b = ec.generate_private_key(ec.SECP256R1())
        a_tmp = make_cert("A", key=key_a, ca=True)
        b_by_a = make_cert("B", a_tmp, key=key_b, ca=True)
        a_by_b = make_cert("A", b_by_a, key=key_a, ca=True)
        leaf, _ = make_cert("hd-1", b_by_a)
        trust = TrustStore(
            [self.adhoc.root[0]], [b_by_a[0], a_by_b[0]], clock=clock_at(NOW).seconds
        )
        self.assertFalse(trust.verify_chain(leaf))

    def test_from_files(self) -> None:
        trust = real_trust()
        self.assertEqual(len(trust.roots), 1)
        self.assertEqual(len(trust.intermediates), 1)
        _, pem = real_signing("hd-1")
        self.assertTrue(trust.verify_chain(load_signer(pem).certificate, "hd-1"))
