"""
The ``eps`` command: certificates, signing, example settings and service-directory
administration.

    eps csr --name NAME --kind tls|signing      a key (0600) and a CSR for a real CA
    eps fingerprint [--name NAME] CERT...       what goes in a ``certificates`` record
    eps example-settings PROGRAM DIR            annotated settings of sd, eps, proxy-*
    eps certs DIR [--names a,b] [--directory D] a development PKI (SPEC §21.1; never production)
    eps sign FILE                               sign a JSON value with the role's signing key
    eps verify FILE NAME                        exit 0 only if FILE is validly signed by NAME
    eps sd submit-records [--reset] FILE...     sign records, chain them onto the tip, submit
    eps sd get-entries [--name NAME]            print directory entries from the SD
    eps sd verify-evidence FILE                 exit 0 only if FILE proves a split view
    eps check [--settings DIR]                  check a role's settings and credential files
    eps --version

Commands that need a role read its settings from ``--settings`` (before or after the
command) or ``EPS_SETTINGS``.
``eps check`` works for every program: it tells from the settings which one they are for
(a file named ``sd.yml``, ``eps.yml`` or ``proxy.yml``, else the top-level keys) and checks
what ``twistd <program> --check`` checks (for a proxy, each mode whose section is there).
Every failure ends with one line on stderr and exit status 1 (never a traceback, never
the reference's exit status 0).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from epsproxy import __version__
from epsproxy.net.reactor import IReactor

from epsproxy.rules import forms
from epsproxy.rules import records as records_mod
from epsproxy.rules.certificates import CertificateError, load_certificates_file, load_private_key_file, to_pem

if TYPE_CHECKING:
    from epsproxy.net.jsonrpc.client import JSONRPCClient

__all__ = ["main", "CommandError"]

T = TypeVar("T")


class CommandError(Exception):
    """A command failed for a reason the user can act on; printed as one line."""


def _load_role(settings_option: str | None) -> dict:
    from .eps.settings import EPS_SETTINGS
    from epsproxy.rules.settings import SettingsError, load_settings, settings_paths

    try:
        return load_settings(settings_paths(settings_option, "EPS_SETTINGS"), EPS_SETTINGS)
    except SettingsError as e:
        raise CommandError(str(e)) from None


def _read_json(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CommandError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return records_mod.loads(text)
    except ValueError as e:
        raise CommandError(f"{path}: not valid JSON ({e})") from None


class Signing:
    """The role's signing identity: key, certificate and the trust it must chain to."""

    def __init__(self, role: dict) -> None:
        signing = role.get("signing")
        if not signing:
            raise CommandError("the role's settings have no 'signing' section")
        try:
            chain = load_certificates_file(signing["certificate_file"])
            self.key = load_private_key_file(signing["key_file"])
            self.trust = records_mod.TrustStore.from_files(
                [signing["ca_certificate_file"]], signing["ca_intermediate_certificate_files"]
            )
        except CertificateError as e:
            raise CommandError(str(e)) from None
        self.certificate_pem = to_pem(chain[0])
        self.name = role["name"]
        try:
            self.signer = records_mod.load_signer(self.certificate_pem)
        except records_mod.RecordError as e:
            raise CommandError(f"signing certificate unusable: {e.reason}") from None
        if not self.trust.verify_chain(chain[0], dns_name=self.name):
            raise CommandError(
                f"signing certificate {signing['certificate_file']} does not chain to "
                f"{signing['ca_certificate_file']} for the name {self.name!r}"
            )


def _names_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise CommandError("--names: a comma-separated list of names, none empty")
    return names


def cmd_certs(args: argparse.Namespace) -> int:
    from epsproxy.dev.pki import DEV_GROUPS, DEV_NAMES, PKIError, create_pki
    from epsproxy.rules.certificate_profile import ProfileError, check_name

    names: tuple[str, ...] = DEV_NAMES
    groups: dict[str, tuple[str, ...]] = dict(DEV_GROUPS)
    if args.names is not None:
        names = tuple(_names_list(args.names))
        admin = args.sd_admin or names[0]
        if admin not in names:
            raise CommandError(f"--sd-admin {admin!r} is not one of --names")
        groups = {admin: ("sd-admin",)}
    elif args.sd_admin is not None:
        raise CommandError("--sd-admin needs --names (the dev set's sd-admin is hd-1)")
    try:
        for name in names:
            check_name(name)
        pki = create_pki(Path(args.dir), directory_dir=args.directory, names=names,
                         groups=groups, force=args.force)
    except (PKIError, ProfileError) as e:
        raise CommandError(str(e)) from None
    print(f"development PKI (not for production) written to {pki.cert_dir}", file=sys.stderr)
    if pki.directory_file is not None:
        print(f"directory record file written to {pki.directory_file}", file=sys.stderr)
    return 0


def cmd_csr(args: argparse.Namespace) -> int:
    """``eps csr``: a new key and a CSR with the extensions of the production profile."""
    from epsproxy.rules.certificate_profile import ProfileError, make_request, write_request

    try:
        request = make_request(args.name, args.kind, tuple(args.group), tuple(args.dns),
                               organization=args.organization)
        key_path, csr_path = write_request(request, args.out, args.stem, force=args.force)
    except ProfileError as e:
        raise CommandError(str(e)) from None
    print(f"key written to {key_path} (keep it here, mode 0600)", file=sys.stderr)
    print(f"certificate signing request written to {csr_path}: send it to your CA",
          file=sys.stderr)
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """``eps fingerprint``: the pins of leaf certificates, or a whole certificates record."""
    from epsproxy.rules.certificate_profile import ProfileError, check_name, pins_of

    leaves = []
    for path in args.certificates:
        try:
            leaves.append(load_certificates_file(path)[0])
        except CertificateError as e:
            raise CommandError(str(e)) from None
    try:
        pins = pins_of(leaves)
        if args.name is None:
            print(json.dumps(pins, indent=2))
            return 0
        check_name(args.name)
    except ProfileError as e:
        raise CommandError(str(e)) from None
    record = {"section": "certificates", "name": args.name, "data": pins}
    print(json.dumps({"records": [record]}, indent=2))
    return 0


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def cmd_example_settings(args: argparse.Namespace) -> int:
    """``eps example-settings``: write a program's annotated example settings."""
    from epsproxy.examples import (
        ExampleError,
        example_text,
        example_values,
        render,
        write_example,
    )

    values = dict(args.set)
    try:
        if args.dir is None:
            print(render(example_text(args.program), values), end="")
            return 0
        written = write_example(args.program, args.dir, values, force=args.force)
        shown = example_values(written.read_text("utf-8"))
    except ExampleError as e:
        raise CommandError(str(e)) from None
    print(f"example settings written to {written}", file=sys.stderr)
    for name, value in shown.items():
        print(f"  {name} = {value}", file=sys.stderr)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    signing = Signing(_load_role(args.settings))
    data = _read_json(args.file)
    signed = records_mod.sign_data(data, signing.key, signing.certificate_pem)
    records_mod.verify_data(signed, signing.trust, signing.name)
    print(json.dumps(signed, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    role = _load_role(args.settings)
    signing = role.get("signing") or {}
    if not signing:
        raise CommandError("the role's settings have no 'signing' section (for the CA files)")
    try:
        trust = records_mod.TrustStore.from_files(
            [signing["ca_certificate_file"]], signing["ca_intermediate_certificate_files"]
        )
    except CertificateError as e:
        raise CommandError(str(e)) from None
    signed = _read_json(args.file)
    try:
        signer = records_mod.verify_data(signed, trust, args.name)
    except records_mod.RecordError as e:
        raise CommandError(f"signature is NOT valid: {e.reason}") from None
    except forms.FormError as e:
        raise CommandError(f"not a signed data file: {e}") from None
    if signer.name != args.name:
        raise CommandError(f"signature is NOT valid: signed by {signer.name!r}, not {args.name!r}")
    print(f"signature is ok: signed by {signer.name}", file=sys.stderr)
    return 0


def sd_client(reactor: IReactor, role: dict) -> JSONRPCClient:
    """A JSON-RPC client for the first SD endpoint of the role's ``api`` directory."""
    from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient

    directory = role["directory"]
    if directory["type"] != "api":
        raise CommandError("this command needs a role with an 'api' directory")
    settings = directory["settings"]
    client_settings = {
        "endpoint": settings["endpoints"][0],
        "tls": settings["jsonrpc_client"]["tls"],
        "timeout": settings["jsonrpc_client"]["timeout"],
    }
    if settings["server_names"]:
        client_settings["server_name"] = settings["server_names"][0]
    return JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(client_settings))


def now_rfc3339() -> str:
    """The current UTC time with nanoseconds, in canonical RFC 3339 form."""
    ns = time.time_ns()
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return records_mod.canonical_time(f"{stamp}.{nanos:09d}Z")


def prepare_records(
    files: Sequence[str], signing: Signing, parent_hash: str
) -> list[dict]:
    """Read, normalise, time-stamp, sign and chain the records of ``files``."""
    signed_records = []
    for path in files:
        content = _read_json(path)
        if not isinstance(content, dict) or not isinstance(content.get("records"), list):
            raise CommandError(f'{path}: expected {{"records": [...]}}')
        for index, record in enumerate(content["records"]):
            if not isinstance(record, dict):
                raise CommandError(f"{path}: records[{index}]: expected an object")
            record = dict(record, created_at=now_rfc3339())
            try:
                normalised = records_mod.normalise_record(record)
            except forms.FormError as e:
                raise CommandError(f"{path}: records[{index}].{e}") from None
            signed = records_mod.sign_record(
                normalised, parent_hash, signing.key, signing.certificate_pem
            )
            signed_records.append(signed)
            parent_hash = signed["hash"]
    return signed_records


async def _call_sd(client: JSONRPCClient, calls: Awaitable[T]) -> T:
    """Await ``calls`` (a coroutine using ``client``), turning SD failures into one line."""
    from epsproxy.net.jsonrpc.envelope import JSONRPCError, TransportError

    try:
        return await calls
    except TransportError as e:
        raise CommandError(f"cannot reach the service directory: {e}") from None
    except JSONRPCError as e:
        raise CommandError(f"the service directory refused: {e.message} (code {e.code})") from None
    finally:
        await client.close()


async def _reset_root(client: JSONRPCClient, signing: Signing) -> list[dict]:
    """The signed root record of a reset naming the SD's current checkpoint ([] if none)."""
    from epsproxy.net.jsonrpc.envelope import JSONRPCError
    from epsproxy.rules import checkpoint

    try:
        served = await client.call("getCheckpoint", {})
    except JSONRPCError as e:
        if e.code not in (404, -32601):  # 404/-32601: an SD that signs no checkpoints
            raise
        return []
    try:
        root = checkpoint.reset_root(served, signing.name, now_rfc3339())
    except checkpoint.CheckpointError as e:
        raise CommandError(f"the service directory's checkpoint: {e}") from None
    if root is None:
        return []
    return [records_mod.sign_record(root, "", signing.key, signing.certificate_pem)]


def cmd_verify_evidence(args: argparse.Namespace) -> int:
    """``eps sd verify-evidence FILE``: exit 0 only if FILE proves a split view."""
    from epsproxy.eps.evidence import verify_evidence

    ok, message = verify_evidence(args.file)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


async def _submit(reactor: IReactor, args: argparse.Namespace) -> int:
    role = _load_role(args.settings)
    signing = Signing(role)
    client = sd_client(reactor, role)

    async def calls() -> list[dict]:
        parent = ""
        first: list[dict] = []
        if not args.reset:
            tip = await client.call("getTip", {})
            parent = tip["hash"] if tip else ""
        else:
            # A reset names the checkpoint it replaces, or endpoint servers refuse it.
            first = await _reset_root(client, signing)
            parent = first[0]["hash"] if first else ""
        batch = first + prepare_records(args.files, signing, parent)
        if not batch:
            raise CommandError("no records to submit")
        await client.call("submitRecords", {"records": batch})
        return batch

    batch = await _call_sd(client, calls())
    print(
        f"submitted {len(batch)} record(s){' as a reset' if args.reset else ''}; "
        f"tip is now {batch[-1]['hash']}",
        file=sys.stderr,
    )
    return 0


async def _get_entries(reactor: IReactor, args: argparse.Namespace) -> int:
    client = sd_client(reactor, _load_role(args.settings))

    async def calls() -> list[dict]:
        if args.name:
            return [await client.call("getEntry", {"name": args.name})]
        return await client.call("getEntries", {})

    entries = await _call_sd(client, calls())
    print(json.dumps(entries, indent=2))
    return 0


def _run_async(
    function: Callable[[IReactor, argparse.Namespace], Coroutine[Any, Any, int]],
    args: argparse.Namespace,
) -> int:
    from twisted.internet import task

    result: list[int] = []

    def failed(failure: Failure) -> None:
        if failure.check(BrokenPipeError):
            result.append(_stdout_closed())
            return
        failure.trap(CommandError)
        print(f"eps: error: {failure.value}", file=sys.stderr)
        result.append(1)

    def run(reactor: IReactor) -> Deferred[None]:
        return ensureDeferred(function(reactor, args)).addCallbacks(result.append, failed)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return result[0] if result else 1


PROGRAMS = ("sd", "eps", "proxy")
#: Top-level keys only one program's settings have.
_PROGRAM_KEYS = {"sd": {"jsonrpc_server"}, "eps": {"name", "channels", "signing"},
                 "proxy": {"public", "private"}}


class _TopLevel(forms.Map):
    """Any mapping, kept as it is: the merged settings before a program is chosen."""

    def __init__(self) -> None:
        super().__init__({})

    def validate(self, value: Any, path: Sequence[Any] = ()) -> dict[str, Any]:
        return dict(value) if isinstance(value, dict) else {}


def detect_program(paths: Sequence[Path]) -> str:
    """Which program settings at ``paths`` are for (raises :class:`CommandError`)."""
    from epsproxy.rules.settings import SETTINGS_SUFFIXES, SettingsError, load_settings

    stems: set[str] = set()
    for path in paths:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        stems |= {f.stem for f in files if f.suffix in SETTINGS_SUFFIXES}
    named = stems & set(PROGRAMS)
    if len(named) == 1:
        return named.pop()
    try:
        keys = set(load_settings(paths, _TopLevel()))
    except SettingsError as e:
        raise CommandError(str(e)) from None
    matches = [program for program in PROGRAMS if keys & _PROGRAM_KEYS[program]]
    if len(matches) != 1:
        where = ":".join(str(p) for p in paths)
        raise CommandError(
            f"{where}: cannot tell whether these settings are for sd, eps or proxy "
            "(name a file sd.yml, eps.yml or proxy.yml)"
        )
    return matches[0]


def _mode_file_sets(
    file_sets: Callable[[dict, str], list], mode: str, settings: dict
) -> list:
    return file_sets(settings, mode)


def cmd_check(args: argparse.Namespace) -> int:
    """``eps check``: what ``twistd <program> --check`` does, for the program found."""
    from epsproxy.eps.settings import EPS_SETTINGS, eps_file_sets
    from epsproxy.net.program import check_program_settings
    from epsproxy.proxy.settings import PROXY_SETTINGS, proxy_file_sets
    from epsproxy.rules.settings import SettingsError, load_settings, settings_paths
    from epsproxy.sd.settings import SD_SETTINGS, sd_file_sets

    try:
        paths = settings_paths(args.settings, "EPS_SETTINGS")
    except SettingsError as e:
        raise CommandError(str(e)) from None
    program = detect_program(paths)
    checks: list[tuple[str, forms.Map, Callable[[dict], list]]] = []
    if program == "sd":
        checks.append(("sd", SD_SETTINGS, sd_file_sets))
    elif program == "eps":
        checks.append(("eps", EPS_SETTINGS, eps_file_sets))
    else:
        try:
            sections = load_settings(paths, PROXY_SETTINGS)
        except SettingsError as e:
            print(f"proxy: settings NOT OK: {e}")
            return 1
        modes = [mode for mode in ("public", "private") if sections.get(mode)]
        if not modes:
            print("proxy: settings NOT OK: no 'public' or 'private' section")
            return 1
        for mode in modes:
            checks.append((f"proxy --mode {mode}", PROXY_SETTINGS,
                           functools.partial(_mode_file_sets, proxy_file_sets, mode)))
    status = 0
    for label, schema, file_sets in checks:
        try:
            checked = check_program_settings(paths, schema, file_sets)
        except SettingsError as e:
            print(f"{label}: settings NOT OK: {e}")
            status = 1
            continue
        print(f"{label}: {checked.summary()}")
        for finding in checked.findings:
            print(f"{finding.severity}: {finding}")
        if checked.errors:
            status = 1
    return status


def _settings_option(parser: argparse.ArgumentParser) -> None:
    """``--settings`` after the command too (``eps sd get-entries --settings X``)."""
    parser.add_argument(
        "--settings", default=argparse.SUPPRESS,
        help="colon-separated settings folders of the role (default: $EPS_SETTINGS)",
    )


def _add_sign_commands(group: Any) -> None:
    sign = group.add_parser(
        "sign", help="sign a JSON file with the role's signing key; prints {signature, data}",
        description="Sign the JSON value of FILE with the role's signing key and "
        "certificate (settings 'signing'); print the signed form on stdout.",
    )
    sign.add_argument("file", help="JSON file to sign")
    _settings_option(sign)
    sign.set_defaults(run=cmd_sign)
    verify = group.add_parser(
        "verify", help="verify a signed JSON file; exit 0 only if NAME signed it",
        description="Verify that FILE (as printed by 'eps sign') is validly signed by "
        "operator NAME, with a certificate chaining to the role's signing CA files.",
    )
    verify.add_argument("file", help="signed JSON file ({signature, data})")
    verify.add_argument("name", help="the operator the signature must come from")
    _settings_option(verify)
    verify.set_defaults(run=cmd_verify)


def add_sd_commands(sd_commands: Any) -> None:
    """The ``eps sd`` subcommands; add new ones here, each with a help line."""
    submit = sd_commands.add_parser(
        "submit-records", help="sign records from FILE(s), chain them onto the tip, submit",
        description="Sign the records of each FILE ({\"records\": [...]}) with the role's "
        "signing key, stamp them with the current time, chain them onto the directory's "
        "tip (or start a new chain with --reset) and submit them in one call.",
    )
    submit.add_argument("--reset", action="store_true",
                        help="start a new chain (a new root record) instead of appending")
    submit.add_argument("files", nargs="+", metavar="FILE", help='{"records": [...]} file')
    _settings_option(submit)
    submit.set_defaults(run=lambda args: _run_async(_submit, args))
    entries = sd_commands.add_parser(
        "get-entries", help="print directory entries as JSON",
        description="Print the directory's entries (or one operator's) as JSON.",
    )
    entries.add_argument("--name", help="only this operator's entry")
    _settings_option(entries)
    entries.set_defaults(run=lambda args: _run_async(_get_entries, args))
    evidence = sd_commands.add_parser(
        "verify-evidence", help="check a split-view evidence file offline",
        description="Check an evidence file saved by checkpoint gossip (docs/checkpoints.md) "
        "with nothing but the file; exit 0 and say what it proves, or 1 and why not.",
    )
    evidence.add_argument("file", metavar="FILE", help="evidence-*.json")
    evidence.set_defaults(run=cmd_verify_evidence)
    _add_sign_commands(sd_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eps",
        description="epsproxy tools: certificates for a real CA, example settings, "
        "signing, service-directory administration, and a development PKI.",
    )
    parser.add_argument("--version", action="version", version=f"eps {__version__}")
    parser.add_argument(
        "--settings",
        help="colon-separated settings folders of the role (default: $EPS_SETTINGS)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    csr = commands.add_parser(
        "csr", help="write a new key (0600) and a certificate signing request for your CA",
        description="Write NAME's new ECDSA P-256 key and a CSR asking for exactly the "
        "extensions a production certificate needs (docs/operators.md): --kind tls for "
        "mutual TLS, --kind signing for signing directory records.",
    )
    csr.add_argument("--name", required=True, help="the operator name the certificate names")
    csr.add_argument("--kind", required=True, choices=("tls", "signing"),
                     help="tls (TLS links, gateway, SD) or signing (directory records)")
    csr.add_argument("--group", action="append", default=[], metavar="GROUP",
                     help="signing only: an iris-group:// the certificate carries "
                     "(repeat; sd-admin may write to the directory)")
    csr.add_argument("--dns", action="append", default=[], metavar="DNS_NAME",
                     help="tls only: another DNS subjectAltName, e.g. the host name (repeat)")
    csr.add_argument("--organization", help="O= of the subject (CN= is the name)")
    csr.add_argument("--out", default=".", help="folder for the files (default: .)")
    csr.add_argument("--stem", help="file names STEM.key and STEM.csr (default: the kind, "
                     "the names the example settings expect)")
    csr.add_argument("--force", action="store_true", help="replace existing files")
    csr.set_defaults(run=cmd_csr)

    fingerprint = commands.add_parser(
        "fingerprint", help="print the SHA-256 pins of certificates for a certificates record",
        description="Print what a 'certificates' directory record pins for these leaf "
        "certificates (a signing one, a TLS one): with --name the whole record file for "
        "'eps sd submit-records', else the data items.",
    )
    fingerprint.add_argument("certificates", nargs="+", metavar="CERT",
                             help="PEM file whose first certificate is the leaf")
    fingerprint.add_argument("--name", help="print a records file for this operator")
    fingerprint.set_defaults(run=cmd_fingerprint)

    example = commands.add_parser(
        "example-settings", help="write a program's annotated example settings into DIR",
        description="Write the annotated example settings of PROGRAM into DIR (paths are "
        "relative to DIR, certificates expected in DIR/certs); without DIR print them.",
    )
    from epsproxy.examples import PROGRAMS as EXAMPLES

    example.add_argument("program", choices=tuple(EXAMPLES), help="which program")
    example.add_argument("dir", nargs="?", help="settings folder to write (made if missing)")
    example.add_argument("--set", action="append", default=[], type=_setting,
                         metavar="NAME=VALUE", help="a value of the example's vars (repeat)")
    example.add_argument("--force", action="store_true", help="replace an existing file")
    example.set_defaults(run=cmd_example_settings)

    certs = commands.add_parser(
        "certs", help="create a DEVELOPMENT PKI (test CA and keys; never for production)",
        description="Create a development PKI: a root and an intermediate CA whose keys "
        "sit beside the certificates, and TLS and signing identities for each name. For "
        "development and tests only; for production use 'eps csr' and your CA.",
    )
    certs.add_argument("dir", help="folder for certificates and keys")
    certs.add_argument("--names", help="comma-separated names instead of the dev set")
    certs.add_argument("--sd-admin", help="with --names: the name in group sd-admin "
                       "(default: the first)")
    certs.add_argument("--directory", help="also write 002_certificates.json into this folder")
    certs.add_argument("--force", action="store_true", help="replace an existing PKI")
    certs.set_defaults(run=cmd_certs)

    _add_sign_commands(commands)

    sd = commands.add_parser("sd", help="service-directory administration",
                             description="Service-directory administration.")
    sd_commands = sd.add_subparsers(dest="sd_command", metavar="SUBCOMMAND", required=True)
    add_sd_commands(sd_commands)

    check = commands.add_parser(
        "check",
        help="check settings (sd, eps or proxy: told from the files) and every certificate "
        "and key file they name; exit 0 if usable, 1 if not",
    )
    check.add_argument("--settings", default=argparse.SUPPRESS,
                       help="colon-separated settings folders or files (default: $EPS_SETTINGS)")
    check.set_defaults(run=cmd_check)

    version = commands.add_parser("version", help="print the version (also: eps --version)")
    version.set_defaults(run=lambda args: print(__version__) or 0)
    return parser


#: The exit status of a command whose reader closed its output (128 + SIGPIPE, as a
#: shell reports a program ended by that signal).
BROKEN_PIPE_STATUS = 141


def _stdout_closed() -> int:
    """
    The reader of our output went away (``eps sd get-entries | head``): stop quietly, as
    other command-line tools do, with :data:`BROKEN_PIPE_STATUS`.  Standard output is
    pointed at /dev/null so that Python's flush at exit raises nothing more.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eps`` console script."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
        sys.stdout.flush()  # here, where a reader gone away is handled
        return status
    except CommandError as e:
        print(f"eps: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _stdout_closed()


if __name__ == "__main__":
    sys.exit(main())
