"""
The service directory's browser: the SD's status page (``/`` of its metrics listener,
see :mod:`epsproxy.net.pages`), built from the selected chain in memory.

- every operator with its groups, channels and services;
- who may call what: rows are groups and operators, columns each operator's services and
  their methods (:func:`epsproxy.directory.entries.can_call` decides each cell);
- every pinned certificate fingerprint with its operator and kind (TLS or signing);
- who signed the records (the signing certificates' names and groups: the sd-admins);
- the record chain (time, signer, operator, section, hash), :data:`RECORDS_PER_PAGE` a
  page, newest first (``?page=N``, validated);
- the current checkpoint, if this SD signs them.

Every string comes from signed records written by operators: the templates escape it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.web.template import Tag, tags

from epsproxy.directory import entries as _entries
from epsproxy.net.pages import (
    CertificateShelf,
    IntParameter,
    Sampler,
    Series,
    counter_total,
    section,
    table,
)
from epsproxy.net.reactor import IReactor
from epsproxy.rules.records.trust import load_signer
from epsproxy.sd.settings import sd_file_sets

__all__ = ["DirectoryBrowser", "RECORDS_PER_PAGE", "MAX_MATRIX", "permission_matrix",
           "record_rows", "signer_of"]

#: Records shown on one page of the chain.
RECORDS_PER_PAGE = 50
#: At most this many rows and columns in the permission table (the rest is counted).
MAX_MATRIX = 80
#: ``?page=N`` (1 is the newest records).
PAGE = IntParameter("page", 1, 10**7, 1, "page of the record chain, 1 = newest")

#: Key usages of a pinned certificate, as the page names them.
KINDS = {"encryption": "TLS", "signing": "signing"}


def signer_of(signed: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str]:
    """(name, groups, fingerprint) of the certificate that signed a verified record."""
    try:
        signer = load_signer(signed["signature"]["c"])
        return signer.name or "(unnamed)", tuple(signer.groups), signer.fingerprint
    except Exception as e:
        return f"(unreadable: {type(e).__name__})", (), "-"


def _channel_text(channel: Any) -> str:
    if not isinstance(channel, Mapping):
        return str(channel)
    raw = channel.get("settings")
    settings: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    extra = [f"{k} {settings[k]}" for k in ("address", "proxy") if settings.get(k)]
    return f"{channel.get('type')}" + (f" ({', '.join(extra)})" if extra else "")


def _services(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [s for s in entry.get("services") or () if isinstance(s, Mapping)]


def _methods(service: Mapping[str, Any]) -> list[str]:
    return [str(m.get("name")) for m in service.get("methods") or () if isinstance(m, Mapping)]


def _granted(permissions: Any) -> set[str]:
    """The groups named by a permissions list (``*``, anyone, left out)."""
    if not isinstance(permissions, (list, tuple)):
        return set()
    return {str(p.get("group")) for p in permissions
            if isinstance(p, Mapping) and p.get("group") not in (None, "*")}


def _allowed(caller: dict[str, Any], callee: Mapping[str, Any], method: str) -> bool:
    try:
        return _entries.can_call(caller, dict(callee), method)
    except (AttributeError, TypeError):  # a malformed entry grants nothing
        return False


def permission_matrix(
    entries: Mapping[str, Mapping[str, Any]], limit: int = MAX_MATRIX,
) -> tuple[list[str], list[tuple[str, list[str]]], int, int]:
    """
    ``(columns, rows, columns_left_out, rows_left_out)``: a column per service
    (``operator service``, granting when a call of any of its methods is allowed) and per
    method (``operator service.method``); a row per group (a caller of that group only)
    and per operator (its own groups), each cell "call" or "".
    """
    columns: list[tuple[str, Mapping[str, Any], str | None, list[str]]] = []
    for name in sorted(entries):
        for service in _services(entries[name]):
            methods = _methods(service)
            label = f"{name} {service.get('name')}"
            columns.append((label, entries[name], None, methods))
            columns.extend((f"{label}.{m}", entries[name], m, [m]) for m in methods)
    groups: set[str] = set()
    for entry in entries.values():
        groups.update(str(g) for g in entry.get("groups") or ())
        for service in _services(entry):
            groups.update(_granted(service.get("permissions")))
            for method in service.get("methods") or ():
                if isinstance(method, Mapping):
                    groups.update(_granted(method.get("permissions")))
    callers = [(f"group {g}", {"name": "", "groups": [g]}) for g in sorted(groups)]
    callers += [(f"operator {n}", dict(entries[n])) for n in sorted(entries)]
    shown_columns, shown_callers = columns[:limit], callers[:limit]
    rows = []
    for label, caller in shown_callers:
        cells = []
        for _, callee, _, methods in shown_columns:
            allowed = any(_allowed(caller, callee, m) for m in methods)
            cells.append("call" if allowed else "")
        rows.append((label, cells))
    return ([c[0] for c in shown_columns], rows,
            len(columns) - len(shown_columns), len(callers) - len(shown_callers))


def record_rows(records: Sequence[Mapping[str, Any]], page: int,
                per_page: int = RECORDS_PER_PAGE) -> tuple[list[tuple[Any, ...]], int]:
    """The rows of page ``page`` (1: the newest records) and the number of pages."""
    pages = max(1, -(-len(records) // per_page))
    end = len(records) - (page - 1) * per_page
    start = max(0, end - per_page)
    rows = []
    for index in range(end - 1, start - 1, -1):
        signed = records[index]
        record = signed.get("record") or {}
        name, _, _ = signer_of(signed)
        rows.append((index + 1, record.get("created_at"), name, record.get("name"),
                     record.get("section"), tags.code(str(signed.get("hash"))[:16] + "...")))
    return rows, pages


class DirectoryBrowser:
    """The :class:`~epsproxy.net.pages.StatusPage` of a service directory."""

    parameters: Sequence[IntParameter] = (PAGE,)

    def __init__(self, service: Any, reactor: IReactor) -> None:
        self.service = service
        self.reactor = reactor
        self.title = "Service directory"
        self.certificates = CertificateShelf(reactor)
        registry = service.registry
        self.sampler: Sampler | None = Sampler(reactor, [
            Series("calls/s", lambda: counter_total(registry, "sd_jsonrpc_requests_total"),
                   counter=True),
            Series("errors/s", lambda: counter_total(
                registry, "sd_jsonrpc_requests_total",
                lambda labels: labels.get("outcome") != "ok"), counter=True),
            Series("records", self._records),
        ])

    def _records(self) -> float:
        directory = self.service.directory
        return 0.0 if directory is None else float(len(directory.record_log.selected.records))

    def sections(self, parameters: Mapping[str, int]) -> list[Tag]:
        directory = self.service.directory
        if directory is None:
            return [section("Directory", tags.p("not started", class_="bad"))]
        chain = directory.record_log.selected
        entries: Mapping[str, Mapping[str, Any]] = chain.entries
        return [
            self._operators(entries),
            self._signers(chain.records),
            self._permissions(entries),
            self._fingerprints(entries),
            self._chain(chain.records, parameters["page"]),
            self._checkpoint(directory),
            section("Last hour", self.sampler.sparklines()) if self.sampler else tags.p(),
            self.certificates.section(sd_file_sets(self.service.settings)),
        ]

    def _operators(self, entries: Mapping[str, Mapping[str, Any]]) -> Tag:
        rows = []
        for name in sorted(entries):
            entry = entries[name]
            services = [
                f"{s.get('name')} ({', '.join(_methods(s)) or 'no methods'})"
                for s in _services(entry)
            ]
            rows.append((name, ", ".join(str(g) for g in entry.get("groups") or ()) or "-",
                         "; ".join(_channel_text(c) for c in entry.get("channels") or ()) or "-",
                         "; ".join(services) or "-"))
        return section(f"Operators ({len(entries)})", table(
            ("operator", "groups", "channels", "services (methods)"), rows,
            empty="the directory is empty"))

    def _permissions(self, entries: Mapping[str, Mapping[str, Any]]) -> Tag:
        grants = []
        for name in sorted(entries):
            for service in _services(entries[name]):
                for p in service.get("permissions") or ():
                    if isinstance(p, Mapping):
                        grants.append((f"{name} {service.get('name')}", p.get("group"),
                                       ", ".join(str(r) for r in p.get("rights") or ())))
                for m in service.get("methods") or ():
                    for p in (m.get("permissions") or ()) if isinstance(m, Mapping) else ():
                        if isinstance(p, Mapping):
                            grants.append((f"{name} {service.get('name')}.{m.get('name')}",
                                           p.get("group"),
                                           ", ".join(str(r) for r in p.get("rights") or ())))
        columns, rows, more_columns, more_rows = permission_matrix(entries)
        matrix = table(("caller", *columns), ((label, *cells) for label, cells in rows),
                       empty="no service in the directory")
        notes = []
        if more_columns or more_rows:
            notes.append(tags.p(f"{more_columns} more columns and {more_rows} more rows "
                                "not shown", class_="empty"))
        return section("Who may call what", table(
            ("service or method", "group", "rights"), grants, empty="no permission granted"),
            tags.p("A caller in a row may call the service or method of a column "
                   "(group * is anyone):"), matrix, *notes)

    def _fingerprints(self, entries: Mapping[str, Mapping[str, Any]]) -> Tag:
        rows = []
        for name in sorted(entries):
            for pin in entries[name].get("certificates") or ():
                if isinstance(pin, Mapping):
                    usage = str(pin.get("key_usage"))
                    rows.append((tags.code(str(pin.get("fingerprint"))), name,
                                 KINDS.get(usage, usage)))
        return section("Certificate fingerprints", table(
            ("SHA-256 fingerprint", "operator", "kind"), rows, empty="no certificate pinned"))

    def _signers(self, records: Sequence[Mapping[str, Any]]) -> Tag:
        found: dict[tuple[str, str], list[Any]] = {}
        for signed in records:
            name, groups, fp = signer_of(signed)
            row = found.setdefault((name, fp), [name, ", ".join(groups), tags.code(fp), 0])
            row[3] += 1
        return section("Record signers", table(
            ("signer", "groups (certificate)", "signing certificate fingerprint", "records"),
            [tuple(row) for _, row in sorted(found.items(), key=lambda kv: kv[0])],
            empty="no record yet"))

    def _chain(self, records: Sequence[Mapping[str, Any]], page: int) -> Tag:
        rows, pages = record_rows(records, page)
        links: list[Any] = [f"page {page} of {pages}"]
        if page > 1:
            links += [" · ", tags.a("newer", href=f"?page={page - 1}")]
        if page < pages:
            links += [" · ", tags.a("older", href=f"?page={page + 1}")]
        return section(f"Record chain ({len(records)} records, newest first)",
                       tags.p(*links), table(
                           ("#", "created at", "signer", "operator", "section", "hash"), rows,
                           empty="no record on this page"))

    def _checkpoint(self, directory: Any) -> Tag:
        current = getattr(directory, "checkpoint", None)
        try:
            served = current() if callable(current) else current
        except Exception as e:
            return section("Checkpoint", tags.p(f"cannot make one: {e}", class_="bad"))
        if not served:
            return section("Checkpoint", tags.p("none", class_="empty"))
        note = served.get("checkpoint") if isinstance(served, Mapping) else served
        return section("Checkpoint", tags.pre(str(note)[:2000], class_="mono"))

