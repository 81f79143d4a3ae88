"""
Helpers for the tests of the deployment files in ``contrib/``: the metric names a PromQL
expression reads, the queries of the alert rules and of the Grafana dashboard, systemd
unit files read as (section, key, value) settings, and the OS tools those checks run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
SYSTEMD = CONTRIB / "systemd"
RULES = CONTRIB / "prometheus" / "epsproxy-alerts.yml"
RULES_TESTS = CONTRIB / "prometheus" / "epsproxy-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana" / "epsproxy.json"
DASHBOARD_SCRIPT = CONTRIB / "grafana" / "dashboard.py"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"

#: Where the shipped units expect the virtualenv (their comment headers say so).
SHIPPED_TWISTD = "/opt/epsproxy/bin/twistd"

#: Series that Prometheus makes (``up``, per scrape): no program exports them.
NOT_EXPORTED = frozenset({"up"})

#: Which Debian package brings each tool (Makefile OS_TOOLS, .ci/run).
TOOL_PACKAGES = {"systemd-analyze": "systemd", "systemd-sysusers": "systemd",
                 "promtool": "prometheus"}


def tool(name: str) -> str:
    """The path of OS tool ``name``; raises (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is not installed: apt-get install {TOOL_PACKAGES.get(name, name)} "
            "(make os-deps does it)")
    return path


# -- PromQL ------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_TOKEN = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
})


def metric_names(expr: str) -> set[str]:
    """
    The metric names an expression reads: identifiers that are not functions (followed
    by ``(``), keywords, label names (in ``{...}`` or a grouping clause), strings,
    durations or numbers.  ``{__name__=~...}`` selectors are refused: their names
    cannot be checked.
    """
    if "__name__" in expr:
        raise ValueError(f"a selector by __name__ cannot be checked: {expr}")
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        name, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def rule_expressions() -> dict[str, str]:
    """Alert name -> expression of every rule in the shipped rules file."""
    found = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found[rule.get("alert") or rule["record"]] = rule["expr"]
    return found


_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.S)


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of a dashboard."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels") or [])

    for panel in panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text)
        yield f"variable {variable['name']}", match.group(1) if match else text


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: its variables replaced by what they may be."""
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$instance", ".*"))


# -- systemd units -----------------------------------------------------------------------

def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of each setting of a unit file, in order (keys may repeat)."""
    section = ""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def unit_value(settings: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``section`` (empty list when absent)."""
    return [v for s, k, v in settings if s == section and k == key]
