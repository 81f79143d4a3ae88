"""
The ``eps`` command: development PKI, signing, and service-directory administration.

    eps certs DIR [--directory DIR] [--force]   make a dev PKI (SPEC §21.1)
    eps sign FILE                               sign a JSON value with the role's signing key
    eps verify FILE NAME                        exit 0 only if FILE is validly signed by NAME
    eps sd submit-records [--reset] FILE...     sign records, chain them onto the tip, submit
    eps sd get-entries [--name NAME]            print directory entries from the SD
    eps check [--settings DIR]                  check a role's settings and credential files
    eps version

Commands that need a role read its settings from ``--settings`` or ``EPS_SETTINGS``.
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


def cmd_certs(args: argparse.Namespace) -> int:
    from epsproxy.dev.pki import PKIError, create_pki

    try:
        pki = create_pki(Path(args.dir), directory_dir=args.directory, force=args.force)
    except PKIError as e:
        raise CommandError(str(e)) from None
    print(f"dev PKI written to {pki.cert_dir}", file=sys.stderr)
    if pki.directory_file is not None:
        print(f"directory record file written to {pki.directory_file}", file=sys.stderr)
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


async def _submit(reactor: IReactor, args: argparse.Namespace) -> int:
    role = _load_role(args.settings)
    signing = Signing(role)
    client = sd_client(reactor, role)

    async def calls() -> list[dict]:
        parent = ""
        if not args.reset:
            tip = await client.call("getTip", {})
            parent = tip["hash"] if tip else ""
        batch = prepare_records(args.files, signing, parent)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eps",
        description="epsproxy tools: dev PKI, signing, service-directory administration.",
    )
    parser.add_argument(
        "--settings",
        help="colon-separated settings folders of the role (default: $EPS_SETTINGS)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    certs = commands.add_parser("certs", help="create a development PKI (never for production)")
    certs.add_argument("dir", help="folder for certificates and keys")
    certs.add_argument("--directory", help="also write 002_certificates.json into this folder")
    certs.add_argument("--force", action="store_true", help="replace an existing PKI")
    certs.set_defaults(run=cmd_certs)

    def add_sign_commands(group: Any) -> None:
        sign = group.add_parser("sign", help="sign a JSON file; prints {signature, data}")
        sign.add_argument("file")
        sign.set_defaults(run=cmd_sign)
        verify = group.add_parser("verify", help="verify a signed JSON file against NAME")
        verify.add_argument("file")
        verify.add_argument("name", help="the operator the signature must come from")
        verify.set_defaults(run=cmd_verify)

    add_sign_commands(commands)

    sd = commands.add_parser("sd", help="service-directory administration")
    sd_commands = sd.add_subparsers(dest="sd_command", metavar="SUBCOMMAND", required=True)
    submit = sd_commands.add_parser(
        "submit-records", help="sign records from FILE(s), chain them onto the tip, submit"
    )
    submit.add_argument("--reset", action="store_true",
                        help="start a new chain (a new root record) instead of appending")
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.set_defaults(run=lambda args: _run_async(_submit, args))
    entries = sd_commands.add_parser("get-entries", help="print directory entries as JSON")
    entries.add_argument("--name", help="only this operator's entry")
    entries.set_defaults(run=lambda args: _run_async(_get_entries, args))
    add_sign_commands(sd_commands)

    check = commands.add_parser(
        "check",
        help="check settings (sd, eps or proxy: told from the files) and every certificate "
        "and key file they name; exit 0 if usable, 1 if not",
    )
    check.add_argument("--settings", default=argparse.SUPPRESS,
                       help="colon-separated settings folders or files (default: $EPS_SETTINGS)")
    check.set_defaults(run=cmd_check)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=lambda args: print(__version__) or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eps`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as e:
        print(f"eps: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
