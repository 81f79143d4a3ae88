"""
What the three programs (``twistd sd``, ``twistd eps``, ``twistd proxy``) share as
processes: their command line (:class:`ProgramOptions`: ``--settings``, ``--check``,
``--log-level``, ``--log-format``), the checks before anything opens, the exit status,
and the signals (:class:`ProgramService`).

**Failing to start.** Everything that can be checked without opening a port is checked
in ``postOptions``: the settings (schema, YAML) and every certificate and key file they
name (:mod:`epsproxy.rules.credentials`).  A failure there raises ``SystemExit`` with the
finding lines, which Python prints to stderr before exiting with status 1: one line per
problem, no usage text (``usage.UsageError`` is kept for real command-line mistakes).
What fails later, while starting (a port in use, a store that cannot open), is logged as
one line by the service (:class:`~epsproxy.net.lifecycle.AsyncStartService`, or the
metrics guard here) and stops the reactor.

**The exit status.** twistd ends with status 0 after ``reactor.stop()`` whatever
happened, and offers no hook to change that.  :class:`ProcessExit` records the status in
one place (a failed start sets 1) and, registered with :mod:`atexit` when the process is
twistd's (``manage_process``), ends the process with it once twistd has returned: by
then twistd has removed its pid file, logged "Server Shut Down." and stopped logging, so
flushing stdio and calling ``os._exit(status)`` loses nothing.  ``os._exit`` skips the
:mod:`atexit` handlers registered before this one (they would run after it); the
handler is registered when the service tree is built, before the reactor runs, so
handlers that the running program registers are not skipped.  A status of 0 exits
normally.

**Signals**, installed once the reactor runs (after its own handlers, which they
replace):

- SIGHUP re-reads the settings from the same paths, checks them (schema and
  credentials) and hands the program's part to the service's ``reload``; it logs
  ``reloaded settings from <paths>`` or ``reload refused, still running with the
  previous settings: <reason>``.  The log level (``log_level``) is reloaded too, unless
  ``--log-level`` was given.
- SIGUSR1 rotates the log file (``--logfile``), as twistd does.
- SIGTERM and SIGINT stop the reactor: services drain (the proxies give live
  connections ``shutdown_grace`` seconds), and the process exits 0.  A second SIGTERM or
  SIGINT during the drain stops at once with status :data:`STOPPED_AT_ONCE`.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, Callable, ClassVar, Sequence

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.gc_collector import GCCollector
from twisted.application.service import IService, MultiService, Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from epsproxy.rules import forms
from epsproxy.rules.credentials import (
    FileSet,
    Finding,
    certificate_expiries,
    check_file_sets,
    summary,
    tls_file_set,
)
from epsproxy.rules.settings import SettingsError, load_settings, settings_paths
from epsproxy.net import admission, allocator
from epsproxy.net.lifecycle import AsyncStartService, ReloadError, stop_reactor_soon
from epsproxy.net.reloading import refuse_restart_changes
from epsproxy.net.logs import LOG_FORMATS, LOG_LEVELS, LogOutput
from epsproxy.net.reactor import IReactor, install_default

__all__ = [
    "STOPPED_AT_ONCE",
    "ProcessExit",
    "ProgramOptions",
    "ProgramService",
    "SettingsCheck",
    "StartupReport",
    "check_program_settings",
]

log = Logger()

#: The exit status after a second SIGTERM/SIGINT cut the drain short.
STOPPED_AT_ONCE = 1

#: Top-level settings of every program that only a restart applies (patterns of
#: :mod:`epsproxy.net.reloading`): the metrics listener is opened by the program.
PROGRAM_RESTART_KEYS = ("metrics",)


class SettingsCheck:
    """The outcome of loading and checking one program's settings."""

    def __init__(
        self, settings: dict[str, Any], file_sets: list[FileSet], findings: list[Finding]
    ) -> None:
        self.settings = settings
        self.file_sets = file_sets
        self.findings = findings

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def summary(self) -> str:
        """``settings OK: 3 TLS file sets, 1 signing file set checked; 1 warning``."""
        return summary(self.file_sets, self.findings)


def metrics_file_sets(settings: dict[str, Any]) -> list[FileSet]:
    """The metrics listener's TLS files (``metrics.tls``), the same for every program."""
    tls = (settings.get("metrics") or {}).get("tls")
    return [] if tls is None else [tls_file_set("metrics.tls", tls)]


def check_program_settings(
    paths: Sequence[Path],
    schema: forms.Map,
    file_sets: Callable[[dict[str, Any]], list[FileSet]],
    check: Callable[[dict[str, Any]], None] | None = None,
    now: datetime | None = None,
) -> SettingsCheck:
    """
    Read the settings at ``paths`` with ``schema``, run ``check`` (what the schema
    cannot say), and check every file set ``file_sets`` finds in them.  Raises
    :class:`SettingsError` for settings that cannot be read or validated; problems with
    the files are the findings of the result.
    """
    settings = load_settings(paths, schema)
    if check is not None:
        check(settings)
    sets = file_sets(settings) + metrics_file_sets(settings)
    return SettingsCheck(settings, sets, check_file_sets(sets, now or datetime.now(timezone.utc)))


class ProgramOptions(usage.Options):
    """
    The command line every program shares.  A subclass sets :attr:`env_var` and
    :attr:`schema`, declares its own ``settings`` parameter (its help names the
    environment variable) and implements :meth:`file_sets`; it may override
    :meth:`check_command_line`, :meth:`check_settings` and :meth:`service_settings`.
    """

    env_var: ClassVar[str]
    schema: ClassVar[forms.Map]

    optFlags = [
        ["check", None,
         "Check the settings and every certificate and key file they name, print what "
         "was found and exit (0: usable, 1: not) without starting anything."],
    ]
    optParameters = [
        ["log-level", None, None,
         "Lowest level logged: debug, info, warn, error or critical (default: the "
         "log_level setting, else info)."],
        ["log-format", None, "text", "text, or json (one JSON object per line)."],
    ]

    settings: dict[str, Any]
    paths: list[Path]
    checked: SettingsCheck
    log_output: LogOutput

    # -- what subclasses provide ----------------------------------------------------

    def check_command_line(self) -> None:
        """Raise ``usage.UsageError`` for a command-line mistake (``--mode`` missing)."""

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Raise :class:`SettingsError` for what the schema cannot say."""

    def file_sets(self, settings: dict[str, Any]) -> list[FileSet]:
        """The certificate and key files the program will use."""
        raise NotImplementedError

    def service_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The part of the settings the program's service takes (and reloads)."""
        return settings

    # -- shared -----------------------------------------------------------------------

    def postOptions(self) -> None:
        self.check_command_line()
        if self["log-level"] is not None and self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {self['log-level']!r}"
            )
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        try:
            self.paths = settings_paths(self["settings"], self.env_var)
            self.checked = self.load()
        except SettingsError as e:
            if self["check"]:
                print(f"settings NOT OK: {e}")
                raise SystemExit(1) from None
            raise SystemExit(str(e)) from None
        if self["check"]:
            print(self.checked.summary())
            for finding in self.checked.findings:
                print(f"{finding.severity}: {finding}")
            raise SystemExit(1 if self.checked.errors else 0)
        if self.checked.errors:
            raise SystemExit("\n".join(str(f) for f in self.checked.errors))
        self.settings = self.checked.settings
        self.log_output = self._log_output()
        if getattr(self, "parent", None) is not None:
            # Run by twistd: our reactor, unless it was given --reactor (installed while
            # its own options were parsed, before ours).
            install_default()

    def load(self, now: datetime | None = None) -> SettingsCheck:
        """
        Read the settings from :attr:`paths` and check them and their files.  Raises
        :class:`SettingsError` for settings that cannot be read or validated; problems
        with the files are the findings of the result.
        """
        return check_program_settings(self.paths, self.schema, self.file_sets, self.check_settings, now)

    def reread(self) -> SettingsCheck:
        """:meth:`load` again, with any credential error raised as :class:`SettingsError`."""
        checked = self.load()
        if checked.errors:
            raise SettingsError("; ".join(str(f) for f in checked.errors))
        return checked

    def log_level(self, settings: dict[str, Any]) -> str:
        """``--log-level`` if given, else the settings' ``log_level``."""
        return str(self["log-level"] or settings.get("log_level") or "info")

    def _log_output(self) -> LogOutput:
        # twistd's own options (--logfile, --nodaemon, --syslog), when run by twistd
        twistd = getattr(self, "parent", None) or {}
        return LogOutput(
            self.log_level(self.settings),
            self["log-format"],
            logfile=twistd.get("logfile"),
            nodaemon=bool(twistd.get("nodaemon", True)),
            syslog=bool(twistd.get("syslog", False)),
            syslog_prefix=twistd.get("prefix") or "",
        )


class ProcessExit:
    """The status the process ends with, applied after twistd returns (module docstring)."""

    def __init__(self) -> None:
        self.status = 0

    def fail(self, status: int = 1) -> None:
        """Record a failure: the process will end with ``status``."""
        if not self.status:
            self.status = status

    def install(self) -> None:
        """Apply the status when the interpreter exits (only in twistd's own process)."""
        atexit.register(self._exit)

    def _exit(self) -> None:
        if self.status:
            end_now(self.status)


def end_now(status: int) -> None:
    """Flush stdio and end the process with ``status`` (no further clean-up)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class StartupReport:
    """
    The answer a daemonizing twistd's parent waits for (twistd's status pipe).

    twistd without ``-n`` forks; the parent reads one message from a pipe and exits 0 on
    ``0``, else 1 after printing the message.  twistd itself writes ``0`` as soon as the
    services' ``startService`` returned, before any listener was bound; a program takes
    the pipe over (:meth:`take`) and answers once its main service is really serving or
    could not start, so the parent's exit status is the start's outcome.
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def take(cls, options: Any) -> "StartupReport":
        """Take the status pipe from twistd's options (the parent of ``options``)."""
        parent = getattr(options, "parent", None)
        fd = parent.pop("statusPipe", None) if isinstance(parent, dict) else None
        return cls(fd if isinstance(fd, int) else None)

    def report(self, error: str | None = None) -> None:
        """Tell the parent: started (``error`` None) or not, with one line; only once."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        # twistd's parent prints what follows the first two bytes, at most 100 in all.
        message = b"0" if error is None else ("1 " + error).encode("ascii", "backslashreplace")
        try:
            os.write(fd, message[:100])
        except OSError as e:
            log.warn("could not tell the daemonizing parent: {error}", error=str(e))
        finally:
            os.close(fd)


class _GuardedStart(Service):
    """
    Starts ``inner`` (a listener that raises out of ``startService`` when it cannot
    listen) and turns that exception into one log line naming ``what`` and a failed
    exit, instead of a traceback out of twistd.
    """

    def __init__(self, inner: IService, what: str, failed: Callable[[str], None]) -> None:
        self.inner = inner
        self.what = what
        self.failed = failed

    def startService(self) -> None:
        super().startService()
        try:
            self.inner.startService()
        except Exception as e:
            log.error("{what} could not start: {reason}", what=self.what, reason=str(e))
            self.failed(f"{self.what} could not start: {e}")

    def stopService(self) -> Any:
        super().stopService()
        if self.inner.running:
            return self.inner.stopService()
        return None


class ProgramService(MultiService):
    """
    The top of a program's service tree: its main service, its metrics listener, the
    certificate-expiry gauge and, with ``manage_process`` (twistd's own process), the
    exit status, the signals and the log observer of the twistd application.
    """

    def __init__(
        self,
        reactor: IReactor,
        options: ProgramOptions,
        program: str,
        registry: CollectorRegistry,
        *,
        manage_process: bool,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.program = program
        self.registry = registry
        self.manage_process = manage_process
        self.exit = ProcessExit()
        self.main: AsyncStartService[Any] | None = None
        self._stopping_on: str | None = None
        self._allocator = "left as it is (not twistd's process)"
        self.startup = StartupReport(None)
        self.expiry = Gauge(
            f"{program}_certificate_expiry_seconds",
            "Unix time at which each configured certificate expires (notAfter)",
            ["where"], registry=registry,
        )
        self._set_expiries(options.checked.file_sets)
        if manage_process:
            self.exit.install()
            # Listeners stop at their caps well before this limit (net/admission.py).
            admission.raise_descriptor_limit()
            admission.PROCESS.apply_setting(options.settings.get("max_connections"))
            self._allocator = allocator.keep_large_buffers_on_the_heap()
        registry.register(admission.AdmissionCollector(program))
        # The collector's work (python_gc_*), and what it no longer looks at.
        GCCollector(registry=registry)
        # Set once frozen: gc.get_freeze_count walks every frozen object (5 ms in a
        # proxy), too much for each scrape.
        self._frozen = Gauge(
            f"{program}_gc_frozen_objects",
            "Objects frozen out of the garbage collector's sight once the program was "
            "ready (gc.freeze)", registry=registry)

    # -- building -----------------------------------------------------------------------

    def add_main(self, service: AsyncStartService[Any]) -> None:
        """The program's service; a failed start of it makes the process exit 1."""
        self.main = service
        service.setServiceParent(self)

    def add_listener(self, service: IService, what: str) -> None:
        """
        A listener that raises out of ``startService`` when it cannot listen (the
        metrics listener): under twistd its failure is one line and a failed exit.
        """
        if self.manage_process:
            _GuardedStart(service, what, self._failed).setServiceParent(self)
        else:
            service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd puts the tree under its Application and then starts logging with the
        # application's ILogObserver component, if any: the way in for our log output.
        super().setServiceParent(parent)
        if self.manage_process and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.options.log_output.observer())

    # -- running ----------------------------------------------------------------------

    def startService(self) -> None:
        for finding in self.options.checked.warnings:
            log.warn("{finding}", finding=str(finding))
        if self.manage_process:
            log.debug("memory allocator: {allocator}", allocator=self._allocator)
            # twistd has daemonized (unless -n) just before starting the services.
            self.startup = StartupReport.take(self.options)
            # SIGHUP and SIGUSR1 before any service starts (Twisted never sets them): a
            # service may say it is ready while it starts, and a SIGHUP sent on that line
            # must not end the process; the handlers only queue work for the reactor.
            # SIGTERM and SIGINT once the reactor runs (it installs its own for them).
            signal.signal(signal.SIGHUP, self._on_signal)
            signal.signal(signal.SIGUSR1, self._on_signal)
            self.reactor.callWhenRunning(self._install_signals)
        super().startService()
        if self.main is not None:
            self.main.when_ready().addCallbacks(self._started, self._start_failed)
        elif self.running:
            self.startup.report()

    def _started(self, result: Any) -> Any:
        if self.manage_process:
            # What stands after the start (modules, settings, directory caches: 60,000
            # objects in a proxy) lives as long as the process: frozen out of the
            # collector's sight, so that its full collections no longer walk it.  Its
            # thresholds stay Python's: a proxy's connections leave cycles behind (some
            # 20,000 objects per 20,000 allocations), and larger thresholds only made
            # fewer, longer pauses (7-42 ms at 20,000, measured for issue 14).
            gc.collect()
            gc.freeze()
            self._frozen.set(gc.get_freeze_count())
        self.startup.report()
        return result

    def _start_failed(self, failure: Any) -> None:
        self.exit.fail()
        what = self.main.describe() if self.main is not None else self.program
        self.startup.report(f"{what} could not start: {failure.getErrorMessage()}")

    def _failed(self, reason: str) -> None:
        self.exit.fail()
        self.startup.report(reason)
        stop_reactor_soon(self.reactor)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        # Signal handlers run between two bytecodes of whatever was running: hand the
        # work to the reactor's thread, which also wakes it up.
        name = signal.Signals(number).name
        if number == signal.SIGHUP:
            self.reactor.callFromThread(self.reload)
        elif number == signal.SIGUSR1:
            self.reactor.callFromThread(self.options.log_output.rotate)
        else:
            self.reactor.callFromThread(self.stop_on, name)

    def stop_on(self, name: str) -> None:
        """Stop on signal ``name``: drain the first time, at once the second time."""
        if self._stopping_on is None:
            self._stopping_on = name
            log.info("stopping on {signal}: draining (a second {signal} stops at once)",
                     signal=name)
            self.reactor.stop()
            return
        log.warn("stopping at once on a second {signal} (status {status})",
                 signal=name, status=STOPPED_AT_ONCE)
        end_now(STOPPED_AT_ONCE)

    def reload(self) -> None:
        """Re-read, check and apply the settings (SIGHUP); log the outcome in one line."""
        paths = ":".join(str(p) for p in self.options.paths)
        try:
            checked = self.options.reread()
            # The metrics listener belongs to the program, not to its service (a proxy's
            # service sees only its section): a change to it is refused here.
            refuse_restart_changes(self.options.settings, checked.settings, PROGRAM_RESTART_KEYS)
            if self.main is not None:
                self.main.reload(self.options.service_settings(checked.settings))
        except (SettingsError, ReloadError) as e:
            log.error("reload refused, still running with the previous settings: {reason}",
                      reason=str(e))
            return
        except Exception as e:  # a bug, not bad settings: still keep running
            log.debug("reload failure: {traceback}", traceback=traceback.format_exc())
            log.error("reload refused, still running with the previous settings: {reason}",
                      reason=f"{type(e).__name__}: {e}")
            return
        self.options.settings = checked.settings
        self.options.checked = checked
        self._set_expiries(checked.file_sets)
        self.options.log_output.set_level(self.options.log_level(checked.settings))
        if self.manage_process:
            admission.PROCESS.apply_setting(checked.settings.get("max_connections"))
        for finding in checked.warnings:
            log.warn("{finding}", finding=str(finding))
        log.info("reloaded settings from {paths}", paths=paths)

    def _set_expiries(self, sets: list[FileSet]) -> None:
        self.expiry.clear()
        for expiry in certificate_expiries(sets):
            self.expiry.labels(expiry.where).set(expiry.not_after)
