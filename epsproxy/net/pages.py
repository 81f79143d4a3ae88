"""
The status pages' shared machinery: the read-only HTML page each program serves at the
root (``/``) of its metrics listener (:func:`epsproxy.net.metrics.metrics_service`).

A program's page is a :class:`StatusPage`: a title, the query parameters it accepts and
``sections(parameters)``, which builds its tables from in-memory state only (a page never
makes the node call out: no directory fetch, no peer call, no DNS).  :class:`PageResource`
validates the query (a bad one is a 400 naming the parameter), wraps the sections in one
layout (:class:`PageElement`: readiness, the links to ``/metrics``, ``/healthz``,
``/readyz``, an optional ``<meta http-equiv=refresh>``) and renders it with
``twisted.web.template``, which escapes every text and attribute: directory strings are
shown, never interpreted.  The answer forbids scripts, frames and outside resources
(``Content-Security-Policy``); the page needs none (no JavaScript at all).

The sparklines of the last hour come from a :class:`Sampler`: a ``LoopingCall`` that
reads a few numbers (counters become rates per second) into :class:`RingBuffer` s; it is a
service, started and stopped with the listener.  :class:`RecentEvents` keeps the last
few refusals (bounded).  The helpers :func:`table`, :func:`key_values`, :func:`section`,
:func:`sparkline` build the pieces every page uses.
"""

from __future__ import annotations

import time
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request
from prometheus_client import CollectorRegistry
from twisted.web.template import Element, Tag, TagLoader, flattenString, renderer, tags

from epsproxy.net.health import Readiness, readiness_report
from epsproxy.rules.certificates import (
    CertificateError,
    certificate_names,
    fingerprint,
    load_certificates_file,
)
from epsproxy.rules.credentials import FileSet

__all__ = [
    "CertificateShelf",
    "IntParameter",
    "PageError",
    "PageElement",
    "PageResource",
    "RecentEvents",
    "REFRESH",
    "RingBuffer",
    "Sampler",
    "Series",
    "StatusPage",
    "counter_by",
    "counter_total",
    "format_age",
    "format_time",
    "key_values",
    "parse_parameters",
    "section",
    "sparkline",
    "table",
]

log = Logger()

#: Longest text of one table cell; longer strings are cut (with "...").
MAX_CELL = 300
#: A query string longer than this is refused outright.
MAX_QUERY_BYTES = 200
#: Default seconds between two samples of the sparklines, and how long they look back.
SAMPLE_INTERVAL = 10.0
HISTORY_SECONDS = 3600.0


class PageError(ValueError):
    """A bad page parameter: answered 400 with this message."""


@dataclass(frozen=True)
class IntParameter:
    """A query parameter holding a whole number in ``[minimum, maximum]``."""

    name: str
    minimum: int
    maximum: int
    default: int
    doc: str = ""


#: ``?refresh=N``: reload the page every N seconds (0: never); every page accepts it.
REFRESH = IntParameter("refresh", 0, 3600, 0, "seconds between automatic reloads (0: off)")


_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _show(raw: bytes, limit: int = 40) -> str:
    """A client's bytes quoted for a message: anything but letters, digits, ``._-`` as \\xNN."""
    text = "".join(chr(b) if b in _SAFE else f"\\x{b:02x}" for b in raw[:limit])
    return f"'{text}{'...' if len(raw) > limit else ''}'"


def parse_parameters(
    args: Mapping[bytes, Sequence[bytes]], accepted: Sequence[IntParameter]
) -> dict[str, int]:
    """
    The values of ``accepted`` parameters in a parsed query (``request.args``), defaults
    filled in.  Raises :class:`PageError` for an unknown or repeated parameter, or a value
    that is not a whole number within its bounds.
    """
    known = {p.name.encode("ascii"): p for p in accepted}
    values = {p.name: p.default for p in accepted}
    for raw_name, raw_values in args.items():
        parameter = known.get(raw_name)
        if parameter is None:
            names = ", ".join(sorted(p.name for p in accepted)) or "none"
            raise PageError(f"unknown parameter {_show(raw_name)} (accepted: {names})")
        if len(raw_values) != 1:
            raise PageError(f"parameter {parameter.name!r} given {len(raw_values)} times")
        raw = raw_values[0]
        if not (0 < len(raw) <= 9 and raw.isdigit()):
            raise PageError(f"parameter {parameter.name!r} must be a whole number from "
                            f"{parameter.minimum} to {parameter.maximum}, not {_show(raw)}")
        value = int(raw)
        if not parameter.minimum <= value <= parameter.maximum:
            raise PageError(f"parameter {parameter.name!r} must be from {parameter.minimum} "
                            f"to {parameter.maximum}, not {value}")
        values[parameter.name] = value
    return values


# -- sampled history ---------------------------------------------------------------------


class RingBuffer:
    """The last ``size`` values appended, oldest first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a ring buffer holds at least one value")
        self._values: deque[float] = deque(maxlen=size)

    def append(self, value: float) -> None:
        self._values.append(value)

    def values(self) -> list[float]:
        return list(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True)
class Series:
    """
    One sampled number: ``read()`` gives its value now; with ``counter`` the value only
    grows and the series keeps its rate per second between two samples.
    """

    name: str
    read: Callable[[], float]
    counter: bool = False
    unit: str = ""


class Sampler(Service):
    """
    Reads every :class:`Series` each ``interval`` seconds (a ``LoopingCall`` on
    ``clock``) into a :class:`RingBuffer` holding ``history`` seconds.  A series whose
    ``read`` fails is sampled as 0 and the error logged once.  Started and stopped as a
    service (with the metrics listener).
    """

    def __init__(
        self, clock: IReactorTime, series: Iterable[Series], *,
        interval: float = SAMPLE_INTERVAL, history: float = HISTORY_SECONDS,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.series = {s.name: s for s in series}
        size = max(2, int(history / interval))
        self.buffers = {name: RingBuffer(size) for name in self.series}
        self._last: dict[str, tuple[float, float]] = {}
        self._failing: set[str] = set()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = self._loop = LoopingCall(self.sample)
        loop.clock = self.clock
        loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def sample(self) -> None:
        """Read every series once now."""
        now = self.clock.seconds()
        for name, series in self.series.items():
            try:
                value = float(series.read())
                self._failing.discard(name)
            except Exception as e:
                if name not in self._failing:
                    log.warn("status page: cannot sample {series}: {error}", series=name,
                             error=f"{type(e).__name__}: {e}")
                self._failing.add(name)
                value = 0.0
            if series.counter:
                previous = self._last.get(name)
                self._last[name] = (now, value)
                if previous is None:
                    continue
                elapsed = now - previous[0]
                value = max(0.0, value - previous[1]) / elapsed if elapsed > 0 else 0.0
            self.buffers[name].append(value)

    def values(self, name: str) -> list[float]:
        """The samples of series ``name``, oldest first (empty for an unknown name)."""
        buffer = self.buffers.get(name)
        return [] if buffer is None else buffer.values()

    def sparklines(self) -> Tag:
        """One captioned sparkline per series, for a page's "last hour" section."""
        figures = []
        for name, series in self.series.items():
            values = self.values(name)
            last = (f"{values[-1]:.3g} (peak {max(values):.3g})" if values
                    else "no sample yet")
            unit = f" {series.unit}" if series.unit and values else ""
            figures.append(tags.figure(
                sparkline(values, label=name),
                tags.figcaption(f"{name}: {last}{unit}"),
                class_="spark"))
        return tags.div(*figures, class_="sparks")


@dataclass(frozen=True)
class Event:
    """One remembered event of :class:`RecentEvents`."""

    at: float
    what: str
    detail: str


class RecentEvents:
    """The last ``size`` events (time, what, detail), each text cut to :data:`MAX_CELL`."""

    def __init__(self, clock: IReactorTime, size: int = 20) -> None:
        self.clock = clock
        self._events: deque[Event] = deque(maxlen=size)

    def add(self, what: str, detail: str = "") -> None:
        self._events.append(Event(self.clock.seconds(), _cut(what), _cut(detail)))

    def newest_first(self) -> list[Event]:
        return list(reversed(self._events))


# -- building blocks ---------------------------------------------------------------------


def _cut(text: Any) -> str:
    text = str(text)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL] + "..."


def _cell(value: Any) -> Any:
    if isinstance(value, Tag):
        return value
    if value is None:
        return "-"
    return _cut(value)


def format_time(seconds: float | None) -> str:
    """A Unix time as ``2026-12-03 04:09:46 UTC`` ("-" for None)."""
    if seconds is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return "-"


def format_age(seconds: float | None) -> str:
    """A duration as ``3 s``, ``4 min``, ``2 h``, ``5 d`` ("-" for None)."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return f"in {format_age(-seconds)}"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "none",
    caption: str | None = None,
) -> Tag:
    """A table (scrolling sideways on a narrow screen); ``empty`` when there are no rows."""
    body = [tags.tr(*(tags.td(_cell(v)) for v in row)) for row in rows]
    if not body:
        return tags.p(empty, class_="empty")
    return tags.div(tags.table(
        *([tags.caption(caption)] if caption else []),
        tags.thead(tags.tr(*(tags.th(h, scope="col") for h in headers))),
        tags.tbody(*body),
    ), class_="scroll")


def key_values(pairs: Iterable[tuple[str, Any]]) -> Tag:
    """A two-column table of facts."""
    return tags.table(tags.tbody(*(
        tags.tr(tags.th(key, scope="row"), tags.td(_cell(value))) for key, value in pairs
    )), class_="facts")


def section(title: str, *content: Any) -> Tag:
    """A titled section of a page."""
    return tags.section(tags.h2(title), *content)


def sparkline(values: Sequence[float], *, width: int = 240, height: int = 40,
              label: str = "") -> Tag:
    """An inline SVG line of ``values`` (scaled to the largest), empty axis without data."""
    svg = Tag("svg", attributes={
        "xmlns": "http://www.w3.org/2000/svg", "width": str(width), "height": str(height),
        "viewBox": f"0 0 {width} {height}", "role": "img",
        "aria-label": label or "sparkline",
    })
    baseline = Tag("line", attributes={
        "x1": "0", "y1": str(height - 1), "x2": str(width), "y2": str(height - 1),
        "class": "axis"})
    if len(values) < 2:
        return svg(baseline)
    top = max(max(values), 1e-9)
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}"
        for i, v in enumerate(values)
    )
    return svg(baseline, Tag("polyline", attributes={"points": points, "class": "line"}))


# -- numbers of the process's own registry -----------------------------------------------


def _samples(registry: CollectorRegistry, family: str) -> Iterable[Any]:
    for metric in registry.restricted_registry([family]).collect():
        if metric.name == family.removesuffix("_total"):
            yield from (s for s in metric.samples if s.name == family)


def counter_total(
    registry: CollectorRegistry, family: str,
    where: Callable[[Mapping[str, str]], bool] = lambda labels: True,
) -> float:
    """The sum of the samples named ``family`` (``eps_requests_total``) whose labels fit."""
    return sum(s.value for s in _samples(registry, family) if where(s.labels))


def counter_by(registry: CollectorRegistry, family: str, label: str) -> dict[str, float]:
    """The samples named ``family`` summed by the value of ``label``."""
    found: dict[str, float] = {}
    for sample in _samples(registry, family):
        key = sample.labels.get(label, "")
        found[key] = found.get(key, 0.0) + sample.value
    return found


# -- the process's own certificates -------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    stamp: tuple[int, int]
    rows: tuple[tuple[str, str, str, float | None], ...]
    error: str | None


class CertificateShelf:
    """
    The certificates a program's settings name (its credential file sets), read again
    only when a file changes (size or time), for the "Certificates" section.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._read: dict[str, _Read] = {}

    def _load(self, path: str) -> _Read:
        try:
            info = os.stat(path)
        except OSError as e:
            return _Read((0, 0), (), f"cannot read: {e.strerror}")
        stamp = (info.st_mtime_ns, info.st_size)
        cached = self._read.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            leaf = load_certificates_file(path)[0]
            names = ", ".join(certificate_names(leaf)) or leaf.subject.rfc4514_string()
            read = _Read(stamp, ((leaf.subject.rfc4514_string(), names, fingerprint(leaf),
                                  leaf.not_valid_after_utc.timestamp()),), None)
        except (CertificateError, OSError, ValueError) as e:
            read = _Read(stamp, (), str(e))
        self._read[path] = read
        return read

    def section(self, file_sets: Iterable[FileSet]) -> Tag:
        """Every own certificate: where, subject, names, SHA-256 fingerprint, expiry."""
        now = self.clock.seconds()
        # One row per certificate file, naming every settings block that uses it.
        by_file: dict[tuple[str, str], list[str]] = {}
        for file_set in file_sets:
            if file_set.certificate_file:
                by_file.setdefault((file_set.certificate_file, file_set.kind), []).append(
                    file_set.where)
        rows: list[Sequence[Any]] = []
        for (path, kind), where in by_file.items():
            read = self._load(path)
            blocks = ", ".join(where)
            if read.error is not None:
                rows.append((blocks, kind, read.error, "-", "-"))
            for subject, names, fp, expires in read.rows:
                left = None if expires is None else expires - now
                when = "expired" if left is not None and left < 0 else f"{format_age(left)} left"
                rows.append((blocks, kind, f"{subject} ({names})",
                             tags.code(fp), f"{format_time(expires)} ({when})"))
        return section("Certificates", table(
            ("settings", "kind", "subject (names)", "SHA-256 fingerprint", "expires"), rows,
            empty="no certificate files in the settings"))


# -- the page ----------------------------------------------------------------------------


class StatusPage(Protocol):
    """What a program gives :class:`PageResource`: its title, parameters and sections."""

    title: str
    parameters: Sequence[IntParameter]
    sampler: Sampler | None

    def sections(self, parameters: Mapping[str, int]) -> list[Tag]: ...


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:70em;padding:.5em 1em;
color:#1b1b1b;background:#fff}
h1{font-size:1.4em;margin:.3em 0}h2{font-size:1.15em;margin:1.2em 0 .3em;
border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.3em 0}th,td{text-align:left;padding:.2em .6em;
border-bottom:1px solid #e3e3e3;vertical-align:top}thead th{background:#f2f2f2}
table.facts th{font-weight:600;white-space:nowrap}
.scroll{overflow-x:auto}code,.mono{font-family:ui-monospace,monospace;font-size:.9em;
word-break:break-all}
.ok{color:#05620f;font-weight:600}.bad{color:#a00;font-weight:600}
.empty{color:#666;font-style:italic}nav a{margin-right:1em}
.sparks{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}
svg .line{fill:none;stroke:#1f5fbf;stroke-width:1.5}svg .axis{stroke:#bbb}
footer{color:#666;font-size:.85em;margin:2em 0 1em}
@media print{nav,.noprint{display:none}body{max-width:none}a{color:inherit}}
"""

_LAYOUT = tags.html(
    tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.transparent(render="refresh"),
        tags.title(tags.transparent(render="title")),
        tags.style(_CSS),
    ),
    tags.body(
        tags.header(
            tags.h1(tags.transparent(render="title")),
            tags.nav(
                tags.a("this page", href="/"), tags.a("/metrics", href="/metrics"),
                tags.a("/healthz", href="/healthz"), tags.a("/readyz", href="/readyz"),
                tags.span(tags.transparent(render="refresh_links"), class_="noprint"),
            ),
        ),
        tags.transparent(render="readiness"),
        tags.transparent(render="sections"),
        tags.footer(tags.transparent(render="footer")),
    ),
    lang="en",
)


class PageElement(Element):
    """The layout of every status page around a page's sections."""

    loader = TagLoader(_LAYOUT)

    def __init__(
        self, title: str, sections: Sequence[Tag], *, readiness: Readiness | None,
        now: float, refresh: int = 0,
    ) -> None:
        super().__init__()
        self._title = title
        self._sections = list(sections)
        self._readiness = readiness
        self._now = now
        self._refresh = refresh

    @renderer
    def title(self, request: Any, tag: Tag) -> Any:
        return self._title

    @renderer
    def refresh(self, request: Any, tag: Tag) -> Any:
        if not self._refresh:
            return ""
        return tags.meta(**{"http-equiv": "refresh", "content": str(self._refresh)})

    @renderer
    def refresh_links(self, request: Any, tag: Tag) -> Any:
        choices = [("off", 0), ("10 s", 10), ("60 s", 60)]
        links: list[Any] = ["auto-refresh: "]
        for text, seconds in choices:
            if seconds == self._refresh:
                links.append(tags.strong(text))
            else:
                links.append(tags.a(text, href=f"?refresh={seconds}"))
            links.append(" ")
        return links

    @renderer
    def readiness(self, request: Any, tag: Tag) -> Any:
        status, body, _ = readiness_report(self._readiness)
        if status == 200:
            return section("Readiness", tags.p("ready", class_="ok"))
        return section("Readiness", tags.p("not ready", class_="bad"),
                       table(("check", "reason"), sorted(body["checks"].items())))

    @renderer
    def sections(self, request: Any, tag: Tag) -> Any:
        return self._sections

    @renderer
    def footer(self, request: Any, tag: Tag) -> Any:
        return f"Generated {format_time(self._now)}; read-only, from this process's memory."


def render_page(element: Element) -> bytes:
    """``<!DOCTYPE html>`` and ``element`` flattened (every renderer here is synchronous)."""
    out: list[Any] = []
    flattenString(None, element).addBoth(out.append)
    result = out[0] if out else None
    if isinstance(result, Failure):
        result.raiseException()
    if not isinstance(result, bytes):
        raise RuntimeError("a status page renderer did not finish synchronously")
    return b"<!DOCTYPE html>\n" + result


#: Headers of every page: no scripts, no frames, no outside resources, no referrer.
SECURITY_HEADERS = {
    b"content-security-policy": (b"default-src 'none'; style-src 'unsafe-inline'; "
                                 b"img-src 'self' data:; frame-ancestors 'none'; "
                                 b"base-uri 'none'; form-action 'none'"),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}


class PageResource(Resource):
    """
    Serves ``page`` as HTML: 400 (plain text) for a bad query (:func:`parse_parameters`),
    500 with one log line if a section fails to build.
    """

    isLeaf = True

    def __init__(self, page: StatusPage, clock: IReactorTime,
                 readiness: Readiness | None = None) -> None:
        super().__init__()
        self.page = page
        self.clock = clock
        self.readiness = readiness

    def _plain(self, request: Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (message + "\n").encode("utf-8")

    def render_GET(self, request: Request) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        query = request.uri.partition(b"?")[2]
        if len(query) > MAX_QUERY_BYTES:
            return self._plain(request, 400, f"query string longer than {MAX_QUERY_BYTES} bytes")
        try:
            values = parse_parameters(request.args or {}, [REFRESH, *self.page.parameters])
        except PageError as e:
            return self._plain(request, 400, f"bad page parameter: {e}")
        try:
            element = PageElement(
                self.page.title, self.page.sections(values), readiness=self.readiness,
                now=self.clock.seconds(), refresh=values["refresh"])
            body = render_page(element)
        except Exception:
            log.failure("status page {title} failed", title=self.page.title)
            return self._plain(request, 500, "the status page failed; see the log")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return body

    render_HEAD = render_GET
