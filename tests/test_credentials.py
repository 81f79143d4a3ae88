"""
The credential checks run before a program starts (epsproxy.rules.credentials): files
exist and parse, key matches, chain, validity, operator name; and the file sets each
program's settings name, with channels named by their name.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epsproxy.eps.settings import EPS_SETTINGS, eps_file_sets
from epsproxy.proxy.settings import PROXY_SETTINGS, proxy_file_sets
from epsproxy.rules import forms
from epsproxy.rules.credentials import (
    FileSet,
    Finding,
    certificate_expiries,
    check_file_sets,
    summary,
    tls_file_set,
)
from epsproxy.sd.settings import SD_SETTINGS, sd_file_sets
from tests.support.pki import pki
from tests.support.tls import tls_block
from tests.support.twistd import issue_certificate

NOW = datetime.now(timezone.utc)


def tls_set(name: str = "hd-1", operator: str | None = "hd-1", **changes) -> FileSet:
    crt, key = pki().tls(name)
    values = dict(where="channels[eps-server].settings.tls", certificate_file=str(crt),
                  key_file=str(key), ca_files=(str(pki().root),), operator=operator)
    values.update(changes)
    return FileSet(**values)


def signing_set(name: str = "hd-1", operator: str | None = "hd-1", **changes) -> FileSet:
    crt, key = pki().signing(name)
    values = dict(where="signing", certificate_file=str(crt), key_file=str(key),
                  ca_files=(str(pki().root),), intermediate_files=(str(pki().intermediate),),
                  operator=operator, kind="signing", ca_key="ca_certificate_file")
    values.update(changes)
    return FileSet(**values)


def only(findings: list[Finding]) -> str:
    assert len(findings) == 1, findings
    return str(findings[0])


class CredentialTests(SynchronousTestCase):
    """check_file_sets and each program's file sets."""

    def tmp_path(self) -> Path:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        return folder

    def test_good_sets_have_no_findings(self):
        assert check_file_sets([tls_set(), signing_set()], NOW) == []
        ca_only = FileSet("directory", None, None, (str(pki().root),), (str(pki().intermediate),),
                          kind="signing")
        assert check_file_sets([ca_only], NOW) == []

    def test_missing_files_are_named_by_key(self):
        tmp_path = self.tmp_path()
        text = only(check_file_sets([tls_set(certificate_file=str(tmp_path / "x.crt"))], NOW))
        assert text == f"channels[eps-server].settings.tls.certificate_file: no such file {tmp_path}/x.crt"
        text = only(check_file_sets([tls_set(key_file=str(tmp_path / "x.key"))], NOW))
        assert text == f"channels[eps-server].settings.tls.key_file: no such file {tmp_path}/x.key"
        text = only(check_file_sets([tls_set(ca_files=(str(tmp_path / "ca.crt"),))], NOW))
        assert text.startswith("channels[eps-server].settings.tls.ca_certificate_files[0]: no such file")
        text = only(check_file_sets([signing_set(intermediate_files=("/nope.crt",))], NOW))
        assert text == "signing.ca_intermediate_certificate_files[0]: no such file /nope.crt"
        text = only(check_file_sets([tls_set(key_file=None)], NOW))
        assert text == "channels[eps-server].settings.tls.key_file: is required when the other one is given"

    def test_hostile_certificate_files(self):
        tmp_path = self.tmp_path()
        for content in (b"", b"garbage\n", b"\x00\xff" * 100,
                        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
            with self.subTest(content=content):
                bad = tmp_path / "bad.crt"
                bad.write_bytes(content)
                text = only(check_file_sets([tls_set(certificate_file=str(bad))], NOW))
                assert text.startswith("channels[eps-server].settings.tls.certificate_file: ")
                assert str(bad) in text

    def test_hostile_key_file(self):
        tmp_path = self.tmp_path()
        bad = tmp_path / "bad.key"
        bad.write_bytes(Path(pki().tls("hd-1")[0]).read_bytes())  # a certificate, not a key
        text = only(check_file_sets([tls_set(key_file=str(bad))], NOW))
        assert text.startswith("channels[eps-server].settings.tls.key_file: ")
        assert "not a usable PEM private key" in text

    def test_key_of_another_certificate(self):
        other_key = str(pki().tls("hd-2")[1])
        text = only(check_file_sets([tls_set(key_file=other_key)], NOW))
        assert text.startswith("channels[eps-server].settings.tls.key_file: ")
        assert "does not belong to the certificate" in text

    def test_validity(self):
        tmp_path = self.tmp_path()
        expired = issue_certificate(tmp_path / "a", "hd-1", not_before=NOW - timedelta(days=10),
                                    not_after=NOW - timedelta(days=1))
        text = only(check_file_sets([tls_set(certificate_file=str(expired[0]),
                                             key_file=str(expired[1]))], NOW))
        assert "certificate_file: the certificate expired on " in text
        future = issue_certificate(tmp_path / "b", "hd-1", not_before=NOW + timedelta(days=1),
                                   not_after=NOW + timedelta(days=10))
        text = only(check_file_sets([tls_set(certificate_file=str(future[0]),
                                             key_file=str(future[1]))], NOW))
        assert "certificate_file: the certificate is not valid before " in text
        soon = issue_certificate(tmp_path / "c", "hd-1", not_before=NOW - timedelta(days=1),
                                 not_after=NOW + timedelta(days=12, hours=1))
        [finding] = check_file_sets([tls_set(certificate_file=str(soon[0]),
                                             key_file=str(soon[1]))], NOW)
        assert finding.severity == "warning"
        assert "the certificate expires in 12 day(s)" in str(finding)
        later = issue_certificate(tmp_path / "d", "hd-1", not_before=NOW - timedelta(days=1),
                                  not_after=NOW + timedelta(days=31))
        assert check_file_sets([tls_set(certificate_file=str(later[0]),
                                        key_file=str(later[1]))], NOW) == []

    def test_chain_to_another_ca(self):
        crt, key = pki("foreign").tls("hd-1")
        text = only(check_file_sets([tls_set(certificate_file=str(crt), key_file=str(key))], NOW))
        assert "certificate_file: the certificate does not chain to ca_certificate_files" in text
        crt, key = pki("foreign").signing("hd-1")
        text = only(check_file_sets([signing_set(certificate_file=str(crt), key_file=str(key))], NOW))
        assert "signing.certificate_file: the signing certificate does not chain" in text

    def test_chain_needs_the_intermediate(self):
        tmp_path = self.tmp_path()
        crt, key = pki().tls("hd-1")
        leaf_only = tmp_path / "leaf.crt"
        pem = Path(crt).read_text()
        leaf_only.write_text(pem[: pem.index("-----END CERTIFICATE-----") + 26])
        text = only(check_file_sets([tls_set(certificate_file=str(leaf_only))], NOW))
        assert "does not chain to ca_certificate_files" in text
        # ... which may also come from the intermediate files
        fixed = tls_set(certificate_file=str(leaf_only), intermediate_files=(str(pki().intermediate),))
        assert check_file_sets([fixed], NOW) == []

    def test_operator_names(self):
        text = only(check_file_sets([tls_set("hd-2", operator="hd-1")], NOW))
        assert text == ("channels[eps-server].settings.tls.certificate_file: the certificate names "
                        "hd-2, *.hd-2.local, not the operator hd-1")
        text = only(check_file_sets([signing_set("hd-2", operator="hd-1")], NOW))
        assert text == ("signing.certificate_file: the signing certificate names "
                        "iris-name://hd-2, not the operator hd-1")
        assert check_file_sets([tls_set("hd-2", operator=None)], NOW) == []

    def test_one_finding_per_set_in_order(self):
        tmp_path = self.tmp_path()
        findings = check_file_sets([
            tls_set(certificate_file="/a.crt", key_file="/a.key"),
            tls_set(),
            signing_set(key_file="/s.key"),
        ], NOW)
        assert [f.where for f in findings] == [
            "channels[eps-server].settings.tls.certificate_file", "signing.key_file"]

    def test_summary_and_expiries(self):
        sets = [tls_set(), tls_set(), signing_set()]
        assert summary(sets, []) == "settings OK: 2 TLS file sets, 1 signing file set checked"
        warning = Finding("x", "soon", "warning")
        error = Finding("y", "bad")
        assert summary(sets, [warning]).endswith("checked; 1 warning")
        assert summary(sets[:1], [error, error, warning]) == (
            "settings NOT OK: 1 TLS file set, 0 signing file sets checked; 2 errors, 1 warning")
        [tls, _, signing] = certificate_expiries(sets + [tls_set(certificate_file="/missing")])[:3]
        assert tls.where == "channels[eps-server].settings.tls"
        assert abs(tls.not_after - (NOW + timedelta(days=500)).timestamp()) < 86400
        assert signing.where == "signing"


    # -- each program's file sets -------------------------------------------------------------

    def test_eps_file_sets_name_channels_by_name(self):
        settings = EPS_SETTINGS.validate({
            "name": "hd-1",
            "directory": {"type": "json", "settings": {"path": "/x"}},
            "channels": [
                {"name": "peers", "type": "eps_server",
                 "settings": {"bind_address": "127.0.0.1:0", "tls": tls_block("hd-1")}},
                {"name": "gateway", "type": "jsonrpc_server",
                 "settings": {"bind_address": "127.0.0.1:0", "tls": tls_block("demo-app")}},
            ],
            "signing": {"certificate_file": "/s.crt", "key_file": "/s.key",
                        "ca_certificate_file": "/ca.crt"},
        })
        sets = eps_file_sets(settings)
        assert [(s.where, s.operator, s.kind) for s in sets] == [
            ("channels[peers].settings.tls", "hd-1", "tls"),
            ("channels[gateway].settings.tls", None, "tls"),
            ("signing", "hd-1", "signing"),
        ]

    def test_settings_errors_name_the_channel(self):
        channels = [{"name": "gateway", "type": "jsonrpc_server",
                     "settings": {"bind_address": "x:1", "tls": {"typo": 1}}}]
        error = self.assertRaises(forms.FormError, EPS_SETTINGS.validate, {
            "name": "hd-1", "directory": {"type": "json", "settings": {"path": "/x"}},
            "channels": channels})
        assert str(error).startswith("channels[gateway].settings.tls.typo: unknown key")
        # a name that cannot name it: the index
        channels[0]["name"] = "bad name!"
        error = self.assertRaises(forms.FormError, EPS_SETTINGS.validate, {
            "name": "hd-1", "directory": {"type": "json", "settings": {"path": "/x"}},
            "channels": channels})
        assert str(error).startswith("channels[0].settings.tls.typo: unknown key")

    def test_sd_and_proxy_file_sets(self):
        tmp_path = self.tmp_path()
        sd = SD_SETTINGS.validate({
            "jsonrpc_server": {"bind_address": "127.0.0.1:0", "tls": tls_block("sd-1")},
            "directory": {"datastore": {"type": "embedded", "settings": {"path": "/x"}},
                          "ca_certificate_files": [str(pki().root)]},
        })
        assert [(s.where, s.kind, s.operator) for s in sd_file_sets(sd)] == [
            ("jsonrpc_server.tls", "tls", None), ("directory", "signing", None)]
        assert check_file_sets(sd_file_sets(sd), NOW) == []
        proxy = PROXY_SETTINGS.validate({"public": {
            "name": "public-proxy-1.ga",
            "jsonrpc_server": {"bind_address": "127.0.0.1:0", "tls": tls_block("public-proxy-1.ga")},
            "jsonrpc_client": {"endpoint": "https://127.0.0.1:1/jsonrpc",
                               "tls": tls_block("hd-1")},
        }})
        sets = proxy_file_sets(proxy, "public")
        assert [(s.where, s.operator) for s in sets] == [
            ("public.jsonrpc_server.tls", None), ("public.jsonrpc_client.tls", "public-proxy-1.ga")]
        assert "not the operator public-proxy-1.ga" in only(check_file_sets(sets, NOW))

    def test_tls_file_set_without_own_certificate(self):
        file_set = tls_file_set("x.tls", {"ca_certificate_files": [str(pki().root)]})
        assert file_set.certificate_file is None
        assert check_file_sets([file_set], NOW) == []
        assert certificate_expiries([file_set]) == []
