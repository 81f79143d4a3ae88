"""
The real ``twistd`` of this virtualenv, run as a subprocess whose output a test watches;
busy ports and certificates with a chosen validity for the tests of failing starts.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol

TWISTD = str(Path(sys.executable).parent / "twistd")


class TwistdProcess(ProcessProtocol):
    """A twistd process whose output is watched for a line matching ``pattern``."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.output = b""
        self.matched: Deferred[re.Match] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = self.pattern.search(self.output.decode("utf-8", "replace"))
        if match and not self.matched.called:
            self.matched.callback(match)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.matched.called:
            self.matched.errback(RuntimeError(self.output.decode("utf-8", "replace")))
        self.ended.callback(reason.value.exitCode)


class Twistd(ProcessProtocol):
    """
    A running ``twistd`` whose combined output can be waited on line by line:
    :meth:`wait_for` fires with the first match of a pattern in the output after what
    earlier waits consumed.  ``ended`` fires with the exit status.
    """

    def __init__(self) -> None:
        self.output = ""
        self._position = 0
        self._waiting: list[tuple[re.Pattern[str], Deferred[re.Match[str]]]] = []
        self.ended: Deferred[int | None] = Deferred()
        self.status: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        self._match()

    errReceived = outReceived

    def _match(self) -> None:
        while self._waiting:
            pattern, waiter = self._waiting[0]
            match = pattern.search(self.output, self._position)
            if match is None:
                return
            self._waiting.pop(0)
            self._position = match.end()
            waiter.callback(match)

    def wait_for(self, pattern: str) -> Deferred[re.Match[str]]:
        """The next match of ``pattern``; fails with the output if the process ends first."""
        waiter: Deferred[re.Match[str]] = Deferred()
        if self.ended.called:
            match = re.compile(pattern).search(self.output, self._position)
            if match is None:
                return fail(RuntimeError(f"twistd ended without {pattern!r}:\n{self.output}"))
            self._position = match.end()
            return succeed(match)
        self._waiting.append((re.compile(pattern), waiter))
        self._match()
        return waiter

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    def processEnded(self, reason) -> None:
        self.status = reason.value.exitCode
        waiting, self._waiting = self._waiting, []
        for pattern, waiter in waiting:
            waiter.errback(RuntimeError(f"twistd ended without {pattern.pattern!r}:\n{self.output}"))
        self.ended.callback(self.status)


def spawn_twistd(args: list[str], env: dict[str, str] | None = None) -> Twistd:
    """Start ``twistd -n --pidfile= ARGS`` (in ``/``, so relative paths cannot help)."""
    process = Twistd()
    reactor.spawnProcess(
        process, TWISTD, [TWISTD, "-n", "--pidfile=", *args],
        env=dict(os.environ, **(env or {})), path="/",
    )
    return process


def run_daemon_twistd(
    args: list[str], run_dir: Path, env: dict[str, str] | None = None,
) -> Deferred[tuple[int | None, str]]:
    """
    Run ``twistd --pidfile=RUN/twistd.pid --logfile=RUN/twistd.log ARGS`` (daemonizing):
    fires with the parent's exit status and output once the parent has exited.
    """
    process = Twistd()
    reactor.spawnProcess(
        process, TWISTD,
        [TWISTD, f"--pidfile={run_dir / 'twistd.pid'}", f"--logfile={run_dir / 'twistd.log'}",
         *args],
        env=dict(os.environ, **(env or {})), path="/",
    )
    return process.ended.addCallback(lambda status: (status, process.output))


def stop_twistd(process: Twistd) -> Deferred[int | None]:
    """Cleanup: SIGKILL the process if it still runs, and wait for it."""
    if not process.ended.called:
        process.transport.signalProcess("KILL")
    return process.ended


def run_twistd(args: list[str], env: dict[str, str] | None = None) -> Deferred[tuple[int | None, str]]:
    """Run ``twistd -n --pidfile= ARGS`` to its end: (exit status, stdout + stderr)."""
    process = spawn_twistd(args, env)
    return process.ended.addCallback(lambda status: (status, process.output))


def issue_certificate(
    folder: Path,
    name: str,
    *,
    not_before: datetime,
    not_after: datetime,
    signing: bool = False,
) -> tuple[Path, Path]:
    """
    A leaf for ``name`` issued by the test PKI's intermediate with the given validity
    (``signing``: an ``iris-name`` signing certificate), written with its intermediate
    to ``folder/<name>.crt`` and its key to ``folder/<name>.key``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from epsproxy.rules.certificates import load_certificate_file, load_private_key_file
    from tests.support.pki import pki

    issuer = load_certificate_file(pki().intermediate)
    issuer_key = load_private_key_file(pki().cert_dir / "intermediate.key")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    if signing:
        names.insert(0, x509.UniformResourceIdentifier(f"iris-name://{name}"))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                     False), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), False)  # type: ignore[arg-type]
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    folder.mkdir(parents=True, exist_ok=True)
    crt, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    crt.write_bytes(certificate.public_bytes(serialization.Encoding.PEM)
                    + issuer.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return crt, key_file


def busy_port(test: Any) -> int:
    """A loopback port held busy (listening) until the test ends."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    test.addCleanup(holder.close)
    return holder.getsockname()[1]
