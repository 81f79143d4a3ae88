"""
The process's log output: a level filter and a format (``text`` or ``json``), written
where twistd would write (``--logfile``, ``-`` for stdout, stdout with ``--nodaemon``,
``twistd.log`` for a daemon, ``--syslog``).

:class:`LogOutput` is built from the command line in ``postOptions`` and becomes the
twistd application's :class:`~twisted.logger.ILogObserver` (see
:mod:`epsproxy.net.program`); its level can change while running
(:meth:`LogOutput.set_level`, on SIGHUP).

The ``json`` format writes one object per line with these fields:

``time``
    ISO-8601 UTC with microseconds (``2026-12-02T22:37:48.123456Z``).
``level``
    ``debug``, ``info``, ``warn``, ``error`` or ``critical``.
``namespace``
    the logger's namespace (the module, e.g. ``epsproxy.sd.service``).
``message``
    the formatted text, as the ``text`` format shows it.
``traceback``
    present when the event carries a failure.
``system``
    present when twisted names one (e.g. the protocol a line comes from).

plus every structured field of the event (``log.info("... {name}", name=...)`` gives
``"name": ...``) whose value JSON can hold; Twisted's own ``log_*`` keys are left out.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from epsproxy.rules import forms

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LOG_LEVEL_SETTING",
    "LogOutput",
    "debug_enabled",
    "json_line",
    "log_level",
]

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")

LOG_LEVEL_SETTING = forms.Optional(
    forms.String(choices=LOG_LEVELS),
    default="info",
    doc="lowest level logged (--log-level wins); reloaded on SIGHUP",
)
"""The ``log_level`` key every program's settings have."""

_SCALARS = (str, int, float, bool, type(None))

# Whether debug events reach the log: False once the process's LogOutput logs from a
# higher level (True without one: tests and library use see every event).
_debug = True


def debug_enabled() -> bool:
    """
    Whether debug events are written.  A path run for every connection asks this before
    ``log.debug``: Twisted builds and routes an event for every call (some 10 µs), and
    only the level filter at the end drops it.
    """
    return _debug


def _set_debug(level: str) -> None:
    global _debug
    _debug = level == "debug"


def log_level(name: str) -> LogLevel:
    """The :class:`LogLevel` called ``name`` (one of :data:`LOG_LEVELS`)."""
    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {name!r}")
    return LogLevel.levelWithName(name)


def _jsonable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _SCALARS):
        return not (isinstance(value, float) and value != value)
    if depth > 8:
        return False
    if isinstance(value, (list, tuple)):
        return all(_jsonable(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and _jsonable(v, depth + 1) for k, v in value.items()
        )
    return False


def json_line(event: LogEvent) -> str:
    """One event as one line of JSON (the fields of this module's docstring)."""
    when = datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot even render itself
            record["traceback"] = repr(failure)
    system = event.get("log_system")
    if isinstance(system, str) and system != "-":
        record["system"] = system
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "isError",
                                                             "message", "system", "time"):
            continue
        if _jsonable(value):
            record[key] = value
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _output_file(logfile: str | None, nodaemon: bool) -> IO[str] | LogFile:
    """Where twistd's own logger would write (``UnixAppLogger._getLogObserver``)."""
    if logfile == "-":
        if not nodaemon:
            raise SystemExit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not logfile:
        return sys.stdout
    return LogFile.fromFullPath(logfile or "twistd.log")


class LogOutput:
    """
    The level filter and format of the process's log, written where twistd's options
    say.  :meth:`observer` opens the output (twistd calls it once, when logging begins).
    """

    def __init__(
        self,
        level: str,
        format: str = "text",
        *,
        logfile: str | None = None,
        nodaemon: bool = True,
        syslog: bool = False,
        syslog_prefix: str = "",
    ) -> None:
        if format not in LOG_FORMATS:
            raise ValueError(f"log format must be text or json, not {format!r}")
        self.format = format
        self.level = level
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=log_level(level))
        _set_debug(level)
        self.logfile = logfile
        self.nodaemon = nodaemon
        self.syslog = syslog
        self.syslog_prefix = syslog_prefix
        self._file: IO[str] | LogFile | None = None

    def set_level(self, level: str) -> None:
        """Log from ``level`` on (one of :data:`LOG_LEVELS`) from now on."""
        self.predicate.setLogLevelForNamespace("", log_level(level))
        _set_debug(level)
        self.level = level

    def rotate(self) -> None:
        """Rotate the log file (SIGUSR1, as twistd does), if the log goes to one."""
        if isinstance(self._file, LogFile):
            self._file.rotate()

    def observer(self) -> ILogObserver:
        """The filtered observer writing in this format to this output."""
        target: ILogObserver
        if self.syslog:
            from twisted.python import syslog

            legacy = syslog.SyslogObserver(self.syslog_prefix).emit
            target = LegacyLogObserverWrapper(legacy)  # type: ignore[arg-type]  # a legacy observer is what it wraps
        else:
            out = self._file = _output_file(self.logfile, self.nodaemon)
            if self.format == "json":
                target = FileLogObserver(out, json_line)  # type: ignore[arg-type]  # LogFile is file-like
            else:
                target = textFileLogObserver(out)  # type: ignore[arg-type]  # LogFile is file-like
        return FilteringLogObserver(target, [self.predicate])
