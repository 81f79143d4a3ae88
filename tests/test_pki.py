"""
Tests for the dev certificate authority (``epsproxy.dev.pki``, SPEC §21.1): the files and their
modes, the certificate contents, the directory file, overwrite protection, an independent
``openssl verify`` of every chain and a real mutual-TLS handshake between two leaves.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import stat
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, protocol, reactor, ssl
from twisted.trial import unittest

from epsproxy.dev import pki as pki_module
from epsproxy.rules.certificates import certificate_names, fingerprint, load_certificates_file, load_private_key_file
from epsproxy.dev.pki import DEV_GROUPS, DEV_NAMES, DevPKI, PKIError, create_pki, open_pki

NOW = datetime(2024, 3, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)
STEMS = ("{}", "{}-alt", "{}-sign", "{}-sign-alt")


def _expected_files(cert_dir: Path, names=DEV_NAMES) -> set[Path]:
    files = {cert_dir / f for f in ("root.crt", "root.key", "intermediate.crt", "intermediate.key")}
    for name in names:
        for stem in STEMS:
            files.add(cert_dir / (stem.format(name) + ".crt"))
            files.add(cert_dir / (stem.format(name) + ".key"))
    return files


def _snapshot(*folders: Path) -> dict[Path, bytes]:
    return {
        path: path.read_bytes()
        for folder in folders
        if folder.exists()
        for path in sorted(folder.iterdir())
    }


def _san(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@functools.lru_cache(maxsize=None)
def _shared(label: str, fixed_time: bool = True) -> DevPKI:
    """
    A PKI made once per process for read-only tests (trial has no setUpClass); with
    ``fixed_time`` its validity starts at ``NOW`` (long expired), otherwise at present.
    """
    base = Path(tempfile.mkdtemp(prefix="epsproxy-test-pki-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    now = NOW if fixed_time else None
    return create_pki(base / "certs", directory_dir=base / "directory", now=now)


class _TempDirMixin:
    def make_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="epsproxy-test-pki-"))
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path


class CreatePKIFilesTests(_TempDirMixin, unittest.SynchronousTestCase):
    """The files a PKI consists of, their modes and their formats."""

    def setUp(self):
        self.pki = _shared("content")
        self.base = self.pki.cert_dir.parent

    def test_returned_paths(self):
        self.assertEqual(self.pki.cert_dir, self.base / "certs")
        self.assertEqual(self.pki.root, self.base / "certs" / "root.crt")
        self.assertEqual(self.pki.intermediate, self.base / "certs" / "intermediate.crt")
        self.assertEqual(
            self.pki.directory_file, self.base / "directory" / "002_certificates.json"
        )
        self.assertEqual(self.pki.tls("op-1"), (self.base / "certs/op-1.crt", self.base / "certs/op-1.key"))
        self.assertEqual(
            self.pki.tls("op-1", alt=True),
            (self.base / "certs/op-1-alt.crt", self.base / "certs/op-1-alt.key"),
        )
        self.assertEqual(
            self.pki.signing("sd-1"),
            (self.base / "certs/sd-1-sign.crt", self.base / "certs/sd-1-sign.key"),
        )
        self.assertEqual(
            self.pki.signing("sd-1", alt=True),
            (self.base / "certs/sd-1-sign-alt.crt", self.base / "certs/sd-1-sign-alt.key"),
        )

    def test_exactly_the_expected_files(self):
        """Every file is there, and nothing else (no temporary files left behind)."""
        self.assertEqual(set((self.base / "certs").iterdir()), _expected_files(self.base / "certs"))
        self.assertEqual(
            list((self.base / "directory").iterdir()),
            [self.base / "directory" / "002_certificates.json"],
        )

    def test_key_files_are_private(self):
        for path in _expected_files(self.base / "certs"):
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.suffix == ".key":
                self.assertEqual(mode, 0o600, path)
            else:
                self.assertFalse(mode & 0o022, path)

    def test_key_formats(self):
        """Signing keys are SEC 1 ``EC PRIVATE KEY``; every key is P-256 and fits its cert."""
        for name in DEV_NAMES:
            for alt in (False, True):
                for crt, key in (self.pki.tls(name, alt), self.pki.signing(name, alt)):
                    text = key.read_text()
                    if "-sign" in key.name:
                        self.assertTrue(text.startswith("-----BEGIN EC PRIVATE KEY-----"), key)
                    else:
                        self.assertTrue(text.startswith("-----BEGIN PRIVATE KEY-----"), key)
                    private = load_private_key_file(key)
                    self.assertIsInstance(private, ec.EllipticCurvePrivateKey)
                    self.assertIsInstance(private.curve, ec.SECP256R1)
                    leaf = load_certificates_file(crt)[0]
                    self.assertEqual(
                        leaf.public_key().public_numbers(), private.public_key().public_numbers()
                    )
        for ca in ("root", "intermediate"):
            private = load_private_key_file(self.pki.cert_dir / f"{ca}.key")
            certificate = load_certificates_file(self.pki.cert_dir / f"{ca}.crt")[0]
            self.assertEqual(
                certificate.public_key().public_numbers(), private.public_key().public_numbers()
            )

    def test_leaf_files_carry_the_intermediate(self):
        intermediate = load_certificates_file(self.pki.intermediate)
        self.assertEqual(len(intermediate), 1)
        self.assertEqual(len(load_certificates_file(self.pki.root)), 1)
        for name in DEV_NAMES:
            for alt in (False, True):
                for crt in (self.pki.tls(name, alt)[0], self.pki.signing(name, alt)[0]):
                    chain = load_certificates_file(crt)
                    self.assertEqual(len(chain), 2, crt)
                    self.assertEqual(chain[1], intermediate[0], crt)

    def test_unknown_name(self):
        self.assertRaises(PKIError, self.pki.tls, "nobody")
        self.assertRaises(PKIError, self.pki.signing, "nobody", True)
        self.assertRaises(PKIError, self.pki.fingerprints, "nobody")


class CertificateContentTests(unittest.SynchronousTestCase):
    """Names, extensions, validity and chains of the certificates."""

    def setUp(self):
        self.pki = _shared("content")
        self.root = load_certificates_file(self.pki.root)[0]
        self.intermediate = load_certificates_file(self.pki.intermediate)[0]

    def leaves(self):
        for name in DEV_NAMES:
            for alt in (False, True):
                yield name, "tls", load_certificates_file(self.pki.tls(name, alt)[0])[0]
                yield name, "signing", load_certificates_file(self.pki.signing(name, alt)[0])[0]

    def assertSubject(self, certificate, common_name):
        attributes = [(a.oid, a.value) for a in certificate.subject]
        self.assertEqual(
            attributes,
            [
                (NameOID.COUNTRY_NAME, "DE"),
                (NameOID.STATE_OR_PROVINCE_NAME, "Berlin"),
                (NameOID.LOCALITY_NAME, "Berlin"),
                (NameOID.ORGANIZATION_NAME, "IRIS"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "IT"),
                (NameOID.COMMON_NAME, common_name),
            ],
        )

    def assertValidity(self, certificate, days):
        self.assertEqual(
            certificate.not_valid_before_utc, NOW.replace(microsecond=0) - timedelta(hours=1)
        )
        self.assertEqual(
            certificate.not_valid_after_utc, NOW.replace(microsecond=0) + timedelta(days=days)
        )

    def test_root(self):
        self.assertSubject(self.root, "Testing-Development")
        self.assertEqual(self.root.issuer, self.root.subject)
        self.assertValidity(self.root, 1024)
        self.root.verify_directly_issued_by(self.root)
        constraints = self.root.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        self.assertIsNone(constraints.value.path_length)
        usage = self.root.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign and usage.crl_sign)
        self.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    def test_intermediate(self):
        self.assertSubject(self.intermediate, "intermediate")
        self.assertEqual(self.intermediate.issuer, self.root.subject)
        self.assertValidity(self.intermediate, 300)
        self.intermediate.verify_directly_issued_by(self.root)
        constraints = self.intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        self.assertEqual(constraints.value.path_length, 0)
        usage = self.intermediate.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(
            usage.value.digital_signature and usage.value.key_cert_sign and usage.value.crl_sign
        )
        ski = self.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        aki = self.intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        root_ski = self.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.assertEqual(aki.value.key_identifier, root_ski.value.digest)
        self.assertEqual(
            ski.value.digest,
            x509.SubjectKeyIdentifier.from_public_key(self.intermediate.public_key()).digest,
        )

    def test_leaves_are_issued_by_the_intermediate(self):
        serials = {self.root.serial_number, self.intermediate.serial_number}
        for name, kind, leaf in self.leaves():
            self.assertSubject(leaf, name)
            self.assertEqual(leaf.issuer, self.intermediate.subject)
            self.assertValidity(leaf, 500)
            leaf.verify_directly_issued_by(self.intermediate)
            self.assertRaises(ValueError, leaf.verify_directly_issued_by, self.root)
            serials.add(leaf.serial_number)
        self.assertEqual(len(serials), 2 + 4 * len(DEV_NAMES))

    def test_tls_leaf_extensions(self):
        for name, kind, leaf in self.leaves():
            if kind != "tls":
                continue
            san = _san(leaf)
            self.assertEqual(san.get_values_for_type(x509.DNSName), [name, f"*.{name}.local"])
            self.assertEqual(san.get_values_for_type(x509.UniformResourceIdentifier), [])
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
            self.assertTrue(usage.critical)
            self.assertTrue(usage.value.digital_signature)
            self.assertFalse(usage.value.key_cert_sign)
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            self.assertEqual(
                list(eku), [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            )
            self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)

    def test_signing_leaf_extensions(self):
        for name, kind, leaf in self.leaves():
            if kind != "signing":
                continue
            san = _san(leaf)
            groups = [f"iris-group://{g}" for g in DEV_GROUPS.get(name, ())]
            self.assertEqual(
                san.get_values_for_type(x509.UniformResourceIdentifier),
                [f"iris-name://{name}"] + groups,
            )
            self.assertEqual(san.get_values_for_type(x509.DNSName), [name])
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
            self.assertFalse(usage.critical)
            self.assertTrue(usage.value.digital_signature)
            self.assertRaises(
                x509.ExtensionNotFound, leaf.extensions.get_extension_for_class, x509.ExtendedKeyUsage
            )

    def test_hd1_is_sd_admin(self):
        for alt in (False, True):
            leaf = load_certificates_file(self.pki.signing("hd-1", alt)[0])[0]
            self.assertIn(
                "iris-group://sd-admin", _san(leaf).get_values_for_type(x509.UniformResourceIdentifier)
            )
        leaf = load_certificates_file(self.pki.signing("hd-2")[0])[0]
        uris = _san(leaf).get_values_for_type(x509.UniformResourceIdentifier)
        self.assertFalse([u for u in uris if u.startswith("iris-group:")])

    def test_signer_identity(self):
        """The records module reads the intended name and groups from the signing leaves."""
        try:
            from epsproxy.rules.records import load_signer
        except ImportError:
            raise unittest.SkipTest("epsproxy.rules.records is not there yet")
        signer = load_signer(self.pki.signing("hd-1")[0].read_text())
        self.assertEqual((signer.name, tuple(signer.groups)), ("hd-1", ("sd-admin",)))
        signer = load_signer(self.pki.signing("op-2", alt=True)[0].read_text())
        self.assertEqual((signer.name, tuple(signer.groups)), ("op-2", ()))

    def test_alt_twins_differ(self):
        for name in DEV_NAMES:
            for pick in (self.pki.tls, self.pki.signing):
                main = load_certificates_file(pick(name)[0])[0]
                alt = load_certificates_file(pick(name, alt=True)[0])[0]
                self.assertNotEqual(fingerprint(main), fingerprint(alt))
                self.assertNotEqual(
                    main.public_key().public_numbers(), alt.public_key().public_numbers()
                )
                self.assertEqual(_san(main), _san(alt))
                self.assertEqual(main.subject, alt.subject)

    def test_openssl_verifies_every_chain(self):
        """An independent check: OpenSSL builds every chain to the root."""
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("no openssl command")
        files = sorted(str(p) for p in self.pki.cert_dir.glob("*.crt") if p.stem not in ("root", "intermediate"))
        self.assertEqual(len(files), 4 * len(DEV_NAMES))
        attime = str(int((NOW + timedelta(days=1)).timestamp()))
        base = ["openssl", "verify", "-x509_strict", "-attime", attime, "-CAfile", str(self.pki.root)]
        result = subprocess.run(
            base + ["-untrusted", str(self.pki.intermediate)] + files,
            capture_output=True, text=True, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stdout.count(": OK"), len(files), result.stdout)
        tls = [f for f in files if "-sign" not in f]
        for purpose in ("sslserver", "sslclient"):
            result = subprocess.run(
                base + ["-purpose", purpose, "-untrusted", str(self.pki.intermediate)] + tls,
                capture_output=True, text=True, check=False,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # The check can fail: without the intermediate no chain can be built.
        result = subprocess.run(base + files[:1], capture_output=True, text=True, check=False)
        self.assertNotEqual(result.returncode, 0)


class DirectoryFileTests(_TempDirMixin, unittest.SynchronousTestCase):
    """``002_certificates.json`` and ``DevPKI.certificates_records``."""

    def test_records(self):
        base = self.make_dir()
        made = create_pki(base / "certs", directory_dir=base / "directory", now=NOW)
        text = made.directory_file.read_text("utf-8")
        self.assertTrue(text.startswith('{\n  "records": [\n    {\n      "section"'), text[:60])
        records = json.loads(text)["records"]
        self.assertEqual([r["name"] for r in records], list(DEV_NAMES))
        local = NOW.astimezone().replace(microsecond=0).isoformat()
        alt_fingerprints = set()
        for record, name in zip(records, DEV_NAMES):
            self.assertEqual(list(record), ["section", "created_at", "name", "data"])
            self.assertEqual(record["section"], "certificates")
            self.assertEqual(record["created_at"], local)
            self.assertRegex(
                record["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$"
            )
            self.assertEqual(
                datetime.fromisoformat(record["created_at"]), NOW.replace(microsecond=0)
            )
            signing = fingerprint(load_certificates_file(made.signing(name)[0])[0])
            encryption = fingerprint(load_certificates_file(made.tls(name)[0])[0])
            self.assertEqual(
                record["data"],
                [
                    {"fingerprint": signing, "key_usage": "signing"},
                    {"fingerprint": encryption, "key_usage": "encryption"},
                ],
            )
            self.assertEqual(made.fingerprints(name), {"signing": signing, "encryption": encryption})
            for pick in (made.tls, made.signing):
                alt_fingerprints.add(fingerprint(load_certificates_file(pick(name, True)[0])[0]))
            self.assertRegex(signing, r"^[0-9a-f]{64}$")
        self.assertEqual(made.certificates_records(), records)
        self.assertFalse([fp for fp in alt_fingerprints if fp in text])
        self.assertEqual(len(alt_fingerprints), 2 * len(DEV_NAMES))

    def test_records_normalise(self):
        """The records are valid change records for the records module."""
        try:
            from epsproxy.rules.records import normalise_record
        except ImportError:
            raise unittest.SkipTest("epsproxy.rules.records is not there yet")
        base = self.make_dir()
        made = create_pki(base / "certs", directory_dir=base / "directory", now=NOW)
        for record in made.certificates_records():
            normalised = normalise_record(record)
            self.assertEqual(normalised["name"], record["name"])
            self.assertEqual(len(normalised["data"]), 2)

    def test_without_directory(self):
        base = self.make_dir()
        made = create_pki(base / "certs", now=NOW)
        self.assertIsNone(made.directory_file)
        self.assertEqual(list(base.iterdir()), [base / "certs"])
        records = made.certificates_records()
        self.assertEqual([r["name"] for r in records], list(DEV_NAMES))
        hd1 = records[DEV_NAMES.index("hd-1")]
        fps = made.fingerprints("hd-1")
        self.assertEqual([d["fingerprint"] for d in hd1["data"]], [fps["signing"], fps["encryption"]])

    def test_unreadable_directory_file(self):
        base = self.make_dir()
        made = create_pki(base / "certs", directory_dir=base / "directory", now=NOW)
        for content in ("", "{", "[]", '{"records": 5}', '{"other": []}', "\x00" * 10):
            made.directory_file.write_text(content)
            self.assertRaises(PKIError, made.certificates_records)


class OverwriteTests(_TempDirMixin, unittest.SynchronousTestCase):
    """Nothing is overwritten without ``force``; ``force`` regenerates everything."""

    def test_refuses_without_force(self):
        base = self.make_dir()
        create_pki(base / "certs", directory_dir=base / "directory")
        before = _snapshot(base / "certs", base / "directory")
        error = self.assertRaises(
            PKIError, create_pki, base / "certs", directory_dir=base / "directory"
        )
        self.assertIn(str(base / "certs"), str(error))
        self.assertEqual(_snapshot(base / "certs", base / "directory"), before)

    def test_any_single_existing_file_refuses(self):
        """One stray target (here only the directory file) is enough; nothing is written."""
        base = self.make_dir()
        (base / "directory").mkdir()
        existing = base / "directory" / "002_certificates.json"
        existing.write_text("mine")
        error = self.assertRaises(
            PKIError, create_pki, base / "certs", directory_dir=base / "directory"
        )
        self.assertIn(str(existing), str(error))
        self.assertEqual(existing.read_text(), "mine")
        self.assertFalse((base / "certs").exists())

        (base / "certs").mkdir()
        os.symlink(base / "nowhere", base / "certs" / "op-2-sign-alt.key")
        error = self.assertRaises(PKIError, create_pki, base / "certs")
        self.assertIn("op-2-sign-alt.key", str(error))
        self.assertEqual(os.listdir(base / "certs"), ["op-2-sign-alt.key"])

    def test_unrelated_files_are_fine(self):
        base = self.make_dir()
        (base / "certs").mkdir()
        (base / "certs" / ".gitignore").write_text("*\n")
        create_pki(base / "certs")
        self.assertEqual((base / "certs" / ".gitignore").read_text(), "*\n")

    def test_force_regenerates(self):
        base = self.make_dir()
        first = create_pki(base / "certs", directory_dir=base / "directory")
        old = {name: first.fingerprints(name) for name in DEV_NAMES}
        old_root = first.root.read_bytes()
        second = create_pki(base / "certs", directory_dir=base / "directory", force=True)
        self.assertNotEqual(second.root.read_bytes(), old_root)
        for name in DEV_NAMES:
            new = second.fingerprints(name)
            self.assertNotEqual(new["signing"], old[name]["signing"])
            self.assertNotEqual(new["encryption"], old[name]["encryption"])
        records = second.certificates_records()
        self.assertEqual(
            records[0]["data"][0]["fingerprint"], second.fingerprints(DEV_NAMES[0])["signing"]
        )
        self.assertEqual(set((base / "certs").iterdir()), _expected_files(base / "certs"))
        root = load_certificates_file(second.root)[0]
        load_certificates_file(second.intermediate)[0].verify_directly_issued_by(root)

    def test_keys_private_whatever_the_umask(self):
        base = self.make_dir()
        previous = os.umask(0)
        try:
            made = create_pki(base / "certs")
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(made.tls("op-1")[1].stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE((base / "certs" / "root.key").stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(made.root.stat().st_mode), 0o644)

    def test_root_certificate_written_last(self):
        base = self.make_dir()
        written: list[Path] = []
        original = pki_module._write_atomically

        def recording(target):
            original(target)
            written.append(target.path)

        self.patch(pki_module, "_write_atomically", recording)
        create_pki(base / "certs", directory_dir=base / "directory")
        self.assertEqual(written[-1], base / "certs" / "root.crt")
        self.assertEqual(len(written), len(_expected_files(base / "certs")) + 1)

    def test_interrupted_regeneration_leaves_no_marker(self):
        """A failure half-way through a forced run leaves no root.crt behind."""
        base = self.make_dir()
        create_pki(base / "certs")
        original = pki_module._write_atomically
        calls = []

        def failing(target):
            calls.append(target)
            if len(calls) == 5:
                raise OSError(28, "No space left on device", str(target.path))
            original(target)

        self.patch(pki_module, "_write_atomically", failing)
        error = self.assertRaises(PKIError, create_pki, base / "certs", force=True)
        self.assertIn("No space left", str(error))
        self.assertFalse((base / "certs" / "root.crt").exists())
        self.assertRaises(PKIError, open_pki, base / "certs")

    def test_unwritable_target(self):
        base = self.make_dir()
        (base / "file").write_text("not a folder")
        self.assertRaises(PKIError, create_pki, base / "file" / "certs")

    def test_bad_names(self):
        base = self.make_dir()
        for names in ([], ["a", "a"], [""], ["../x"], [".hidden"]):
            self.assertRaises(PKIError, create_pki, base / "certs", names=names)
        self.assertFalse((base / "certs").exists())


class OpenPKITests(_TempDirMixin, unittest.SynchronousTestCase):
    """``open_pki`` wraps an existing folder."""

    def test_open_existing(self):
        base = self.make_dir()
        made = create_pki(base / "certs", directory_dir=base / "directory", now=NOW)
        opened = open_pki(base / "certs", base / "directory")
        self.assertIsInstance(opened, DevPKI)
        self.assertEqual(opened, made)
        self.assertEqual(opened.certificates_records(), made.certificates_records())
        self.assertEqual(open_pki(str(base / "certs")).names, DEV_NAMES)

    def test_custom_names_and_groups(self):
        base = self.make_dir()
        create_pki(base / "certs", names=["zz", "b-1", "hd-2"], groups={"b-1": ["g1", "g2"]})
        opened = open_pki(base / "certs")
        self.assertEqual(opened.names, ("hd-2", "b-1", "zz"))
        leaf = load_certificates_file(opened.signing("b-1")[0])[0]
        self.assertEqual(
            _san(leaf).get_values_for_type(x509.UniformResourceIdentifier),
            ["iris-name://b-1", "iris-group://g1", "iris-group://g2"],
        )
        self.assertRaises(PKIError, opened.tls, "op-1")

    def test_missing(self):
        base = self.make_dir()
        self.assertRaises(PKIError, open_pki, base)
        self.assertRaises(PKIError, open_pki, base / "absent")


class NamePropertyTests(_TempDirMixin, unittest.SynchronousTestCase):
    """Any DNS-like name gets matching certificates."""

    @settings(deadline=None, max_examples=8)
    @given(
        name=st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?\Z"),
        groups=st.lists(st.from_regex(r"\A[a-z][a-z-]{0,10}\Z"), max_size=3),
    )
    def test_any_name(self, name, groups):
        base = self.make_dir()
        made = create_pki(base, names=[name], groups={name: groups})
        leaf = load_certificates_file(made.signing(name)[0])[0]
        self.assertEqual(
            _san(leaf).get_values_for_type(x509.UniformResourceIdentifier),
            [f"iris-name://{name}"] + [f"iris-group://{g}" for g in groups],
        )
        tls = load_certificates_file(made.tls(name)[0])[0]
        self.assertEqual(_san(tls).get_values_for_type(x509.DNSName), [name, f"*.{name}.local"])
        self.assertEqual(tls.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, name)


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        certificate = self.transport.getPeerCertificate().to_cryptography()
        self.factory.peers.append(certificate_names(certificate)[0])
        self.transport.write(data)


class _Client(protocol.Protocol):
    def connectionMade(self):
        self.received = b""
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self.received += data
        if self.received == b"ping":
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.done.callback(self.received)


def _private_certificate(paths) -> tuple[ssl.PrivateCertificate, list[ssl.Certificate]]:
    crt, key = paths
    chain = [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
             for c in load_certificates_file(crt)]
    private = ssl.PrivateCertificate.loadPEM(key.read_text() + chain[0].dumpPEM().decode())
    return private, chain[1:]


class MutualTLSTests(unittest.TestCase):
    """Two leaves of one PKI complete a mutual-TLS handshake on loopback; a foreign one fails."""

    def setUp(self):
        self.pki = _shared("current", fixed_time=False)
        self.foreign = _shared("foreign", fixed_time=False)

    def listen(self, server_pki=None):
        server_pki = server_pki or self.pki
        private, extra = _private_certificate(server_pki.tls("hd-1"))
        root = ssl.Certificate.loadPEM(server_pki.root.read_bytes())
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            extraCertChain=[c.original for c in extra],
            trustRoot=root,  # implies requireCertificate
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        factory = protocol.Factory.forProtocol(_Echo)
        factory.peers = []
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    def connect(self, port, client_pki, name="hd-2", alt=False, trusted=None):
        trusted = trusted or self.pki
        extra_options = {}
        private = None
        if client_pki is not None:
            private, extra = _private_certificate(client_pki.tls(name, alt))
            extra_options["extraCertChain"] = [c.original for c in extra]
        options = ssl.optionsForClientTLS(
            "hd-1",
            trustRoot=ssl.Certificate.loadPEM(trusted.root.read_bytes()),
            clientCertificate=private,
            extraCertificateOptions=extra_options,
        )
        factory = protocol.ClientFactory.forProtocol(_Client)
        factory.done = defer.Deferred()
        reactor.connectSSL("127.0.0.1", port, factory, options)
        return factory.done

    @defer.inlineCallbacks
    def test_handshake(self):
        port, server = self.listen()
        received = yield self.connect(port, self.pki)
        self.assertEqual(received, b"ping")
        self.assertEqual(server.peers, ["hd-2"])

    @defer.inlineCallbacks
    def test_alt_twin(self):
        """The -alt twin is just as usable for TLS."""
        port, server = self.listen()
        received = yield self.connect(port, self.pki, name="op-1", alt=True)
        self.assertEqual(received, b"ping")
        self.assertEqual(server.peers, ["op-1"])

    @defer.inlineCallbacks
    def test_expired_pki_refused(self):
        """Validity matters: the same handshake with a PKI made in 2024 (now expired) fails."""
        expired = _shared("content")
        port, server = self.listen(expired)
        received = yield self.connect(port, expired, trusted=expired)
        self.assertEqual(received, b"")
        self.assertEqual(server.peers, [])

    @defer.inlineCallbacks
    def test_client_without_certificate_refused(self):
        port, server = self.listen()
        received = yield self.connect(port, None)
        self.assertEqual(received, b"")
        self.assertEqual(server.peers, [])

    @defer.inlineCallbacks
    def test_foreign_client_refused(self):
        port, server = self.listen()
        received = yield self.connect(port, self.foreign)
        self.assertEqual(received, b"")
        self.assertEqual(server.peers, [])


class CertificateProfileTests(unittest.SynchronousTestCase):
    """
    The production profile (``epsproxy.rules.certificate_profile``) is the one place the
    leaves' extensions are defined: the dev PKI's leaves carry exactly them, and a
    certificate made from an ``eps csr`` request passes the checks the programs apply.
    """

    def _without_key_ids(self, certificate: x509.Certificate) -> list:
        ids = (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)
        return [(e.value, e.critical) for e in certificate.extensions
                if not isinstance(e.value, ids)]

    def test_dev_leaves_carry_the_profile(self):
        from epsproxy.rules.certificate_profile import signing_extensions, tls_extensions

        made = _shared("main")
        leaf = load_certificates_file(made.tls("hd-2")[0])[0]
        self.assertEqual(self._without_key_ids(leaf),
                         tls_extensions("hd-2", ["*.hd-2.local"]))
        leaf = load_certificates_file(made.signing("hd-1")[0])[0]
        self.assertEqual(self._without_key_ids(leaf), signing_extensions("hd-1", ["sd-admin"]))

    def test_requests_issued_pass_the_credential_checks(self):
        """A CA that copies the requested extensions issues certificates the checks accept."""
        from cryptography.hazmat.primitives import hashes

        from epsproxy.rules.certificate_profile import make_request, write_request
        from epsproxy.rules.credentials import FileSet, check_file_sets

        made = create_pki(Path(self.mktemp()) / "ca", names=["unused"])
        issuer = load_certificates_file(made.intermediate)[0]
        issuer_key = load_private_key_file(made.cert_dir / "intermediate.key")
        folder = Path(self.mktemp())
        now = datetime.now(timezone.utc)
        sets = []
        for kind, groups in (("tls", ()), ("signing", ("sd-admin",))):
            request = make_request("clinic-a", kind, groups)
            key_path, _ = write_request(request, folder)
            builder = (x509.CertificateBuilder().subject_name(request.csr.subject)
                       .issuer_name(issuer.subject).public_key(request.csr.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(now - timedelta(minutes=5))
                       .not_valid_after(now + timedelta(days=90))
                       .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                           request.csr.public_key()), False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                           issuer_key.public_key()), False))
            for extension in request.csr.extensions:
                builder = builder.add_extension(extension.value, extension.critical)
            leaf = builder.sign(issuer_key, hashes.SHA256())
            crt = folder / f"{kind}.crt"
            crt.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                            + made.intermediate.read_bytes())
            sets.append(FileSet(where=kind, certificate_file=str(crt), key_file=str(key_path),
                                ca_files=(str(made.root),), operator="clinic-a",
                                kind=kind))
        self.assertEqual(check_file_sets(sets, now), [])

    def test_request_validation(self):
        from epsproxy.rules.certificate_profile import ProfileError, check_name, make_request

        for name in ("", "a/b", "a b", "x" * 254, "-a", "a.", ".a", "a..b", "iris-name://a",
                     "a@b", "a:1", "a?b", "a#b", "é", "*.a"):
            self.assertRaises(ProfileError, check_name, name)
        for name in ("a", "hd-1", "public-proxy-1.ga", "A_b.c-d", "x" * 63):
            self.assertEqual(check_name(name), name)
        self.assertEqual(check_name("*.a.b", wildcard=True), "*.a.b")
        self.assertRaises(ProfileError, make_request, "a", "rsa")
        self.assertRaises(ProfileError, make_request, "a", "tls", groups=("g",))
        self.assertRaises(ProfileError, make_request, "a", "signing", extra_dns=("a.b",))
        self.assertRaises(ProfileError, make_request, "a", "signing", groups=("g", "g"))

    def test_write_request_keeps_existing_files(self):
        from epsproxy.rules.certificate_profile import ProfileError, make_request, write_request

        folder = Path(self.mktemp())
        key_path, csr_path = write_request(make_request("a", "tls"), folder)
        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        before = key_path.read_bytes()
        self.assertRaises(ProfileError, write_request, make_request("a", "tls"), folder)
        self.assertEqual(key_path.read_bytes(), before)
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["tls.csr", "tls.key"])
        for stem in ("../x", ".hidden", "a/b"):
            self.assertRaises(ProfileError, write_request, make_request("a", "tls"), folder,
                              stem)

    def test_certificate_kind_and_pins(self):
        from epsproxy.rules.certificate_profile import ProfileError, certificate_kind, pins_of

        made = _shared("main")
        tls = load_certificates_file(made.tls("op-1")[0])[0]
        signing = load_certificates_file(made.signing("op-1")[0])[0]
        root = load_certificates_file(made.root)[0]
        self.assertEqual(certificate_kind(tls), "encryption")
        self.assertEqual(certificate_kind(signing), "signing")
        self.assertEqual(certificate_kind(root), "encryption")
        self.assertEqual(pins_of([tls, signing]), [
            {"fingerprint": fingerprint(signing), "key_usage": "signing"},
            {"fingerprint": fingerprint(tls), "key_usage": "encryption"},
        ])
        self.assertRaises(ProfileError, pins_of, [tls, tls])
