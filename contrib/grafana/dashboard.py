"""
Writes the Grafana dashboard of epsproxy, contrib/grafana/epsproxy.json, from the panel
list below (edit here, then run ``python contrib/grafana/dashboard.py > contrib/grafana/epsproxy.json``;
tests/test_contrib.py checks that the JSON is this script's output and that every metric
a query names exists in the programs' ``/metrics``).

One row per program (and one for the processes and certificates of all of them); the
datasource is the ``datasource`` variable, picked when the dashboard is imported, and
``instance`` narrows every panel to some targets.  The jobs scraping epsproxy are those
whose name starts with ``epsproxy`` (docs/monitoring.md has the scrape configuration).
"""

from __future__ import annotations

import json
import sys
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job=~"epsproxy.*"'
SEL = 'instance=~"$instance"'
WIDTH = 24


class Layout:
    """Places panels left to right, rows of height ``height``, in Grafana's 24 columns."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.ids = 0

    def _id(self) -> int:
        self.ids += 1
        return self.ids

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "type": "row", "title": title, "id": self._id(), "collapsed": False,
            "gridPos": {"x": 0, "y": self.y, "w": WIDTH, "h": 1}, "panels": [],
        })
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def panel(
        self, kind: str, title: str, targets: list[tuple[str, str]], *, unit: str = "short",
        width: int = 8, height: int = 8, description: str = "",
        thresholds: list[tuple[str, float | None]] | None = None,
        options: dict[str, Any] | None = None, instant: bool = False,
    ) -> None:
        if self.x + width > WIDTH:
            self._newline()
        steps = [{"color": color, "value": value}
                 for color, value in (thresholds or [("green", None)])]
        panel: dict[str, Any] = {
            "type": kind, "title": title, "id": self._id(), "datasource": DATASOURCE,
            "description": description,
            "gridPos": {"x": self.x, "y": self.y, "w": width, "h": height},
            "fieldConfig": {
                "defaults": {"unit": unit,
                             "thresholds": {"mode": "absolute", "steps": steps}},
                "overrides": [],
            },
            "options": options or {},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                 "legendFormat": legend, "instant": instant, "range": not instant}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    p = Layout()
    ts, stat, table = "timeseries", "stat", "table"

    p.row("Processes (every program)")
    p.panel(stat, "Targets up", [(f"up{{{JOB}, {SEL}}}", "{{job}} {{instance}}")],
            width=8, height=5, description="1: the metrics listener answered the last scrape.",
            thresholds=[("red", None), ("green", 1)])
    p.panel(table, "Versions", [
        (f"sd_build_info{{{SEL}}}", "sd {{instance}} {{version}}"),
        (f"eps_build_info{{{SEL}}}", "eps {{instance}} {{version}}"),
        (f"proxy_build_info{{{SEL}}}", "proxy {{instance}} {{version}}"),
    ], width=8, height=5, instant=True)
    p.panel(ts, "Uptime", [(f"time() - process_start_time_seconds{{{JOB}, {SEL}}}",
                            "{{job}} {{instance}}")], unit="s", width=8, height=5)
    p.panel(ts, "Resident memory", [(f"process_resident_memory_bytes{{{JOB}, {SEL}}}",
                                     "{{job}} {{instance}}")], unit="bytes")
    p.panel(ts, "CPU", [(f"rate(process_cpu_seconds_total{{{JOB}, {SEL}}}[5m])",
                         "{{job}} {{instance}}")], unit="percentunit")
    p.panel(ts, "Open file descriptors (share of the limit)", [
        (f"process_open_fds{{{JOB}, {SEL}}} / process_max_fds{{{JOB}, {SEL}}}",
         "{{job}} {{instance}}")], unit="percentunit",
        thresholds=[("green", None), ("orange", 0.8)])
    p.panel(ts, "Metrics listener refusals", [
        (f"sum by (instance, reason) (rate(metrics_http_refusals_total{{{SEL}}}[5m]))",
         "{{instance}} {{reason}}")], unit="cps", width=12)

    p.row("Certificates")
    p.panel(table, "Days until each certificate expires", [
        (f"(sd_certificate_expiry_seconds{{{SEL}}} - time()) / 86400", "sd {{instance}} {{where}}"),
        (f"(eps_certificate_expiry_seconds{{{SEL}}} - time()) / 86400", "eps {{instance}} {{where}}"),
        (f"(proxy_certificate_expiry_seconds{{{SEL}}} - time()) / 86400",
         "proxy {{instance}} {{where}}"),
    ], unit="d", width=24, height=8, instant=True,
        description="Alerts: under 14 days (warning), under 3 days (critical).",
        thresholds=[("red", None), ("orange", 3), ("green", 14)])

    p.row("Service directory (twistd sd)")
    p.panel(stat, "Records in the chain", [(f"sd_records{{{SEL}}}", "{{instance}}")],
            width=6, height=5)
    p.panel(stat, "Operators", [(f"sd_entries{{{SEL}}}", "{{instance}}")], width=6, height=5)
    p.panel(stat, "Newest record age", [(f"sd_newest_record_age_seconds{{{SEL}}}",
                                         "{{instance}}")], unit="s", width=6, height=5)
    p.panel(ts, "Listener refusals", [
        (f"sum by (instance, reason) (rate(sd_http_refusals_total{{{SEL}}}[5m]))",
         "{{instance}} {{reason}}")], unit="cps", width=6, height=5)
    p.panel(ts, "JSON-RPC requests by method and outcome", [
        (f"sum by (method, outcome) (rate(sd_jsonrpc_requests_total{{{SEL}}}[5m]))",
         "{{method}} {{outcome}}")], unit="reqps", width=12)
    p.panel(ts, "JSON-RPC latency (95th percentile)", [
        ("histogram_quantile(0.95, sum by (le, method) "
         f"(rate(sd_jsonrpc_request_seconds_bucket{{{SEL}}}[5m])))", "{{method}}")],
        unit="s", width=12)

    p.row("Endpoint server (twistd eps)")
    p.panel(ts, "Calls by outcome", [
        (f"sum by (instance, outcome) (rate(eps_requests_total{{{SEL}}}[5m]))",
         "{{instance}} {{outcome}}")], unit="reqps")
    p.panel(ts, "Calls by method", [
        (f"sum by (method) (rate(eps_requests_total{{{SEL}}}[5m]))", "{{method}}")],
        unit="reqps")
    p.panel(ts, "Call latency", [
        ("histogram_quantile(0.5, sum by (le) "
         f"(rate(eps_request_seconds_bucket{{{SEL}}}[5m])))", "median"),
        ("histogram_quantile(0.95, sum by (le) "
         f"(rate(eps_request_seconds_bucket{{{SEL}}}[5m])))", "95th percentile"),
        (f"sum(rate(eps_request_seconds_sum{{{SEL}}}[5m])) / "
         f"sum(rate(eps_request_seconds_count{{{SEL}}}[5m]))", "mean"),
    ], unit="s")
    p.panel(ts, "Directory age", [(f"eps_directory_age_seconds{{{SEL}}}", "{{instance}}")],
            unit="s", description="Seconds since the last update from the SD (-1: never; "
            "0 for a json directory). Alert: over 300 s.",
            thresholds=[("green", None), ("orange", 300)])
    p.panel(ts, "Directory entries", [(f"eps_directory_entries{{{SEL}}}", "{{instance}}")])
    p.panel(ts, "Open links", [
        (f"sum by (instance, direction) (eps_peer_links{{{SEL}}})", "{{instance}} {{direction}}")])
    p.panel("state-timeline", "Links per peer", [
        (f"max by (instance, peer) (eps_peer_link_up{{{SEL}}})", "{{instance}} → {{peer}}")],
        width=12, description="1 while a link to the peer is open (either side opened it).",
        thresholds=[("red", None), ("green", 1)])
    p.panel(ts, "Seconds since each peer was last heard", [
        (f"time() - eps_peer_last_seen_seconds{{{SEL}}}", "{{instance}} ← {{peer}}")],
        unit="s", width=12)
    p.panel(ts, "Peer connections refused", [
        (f"sum by (instance, reason) (rate(eps_peer_refusals_total{{{SEL}}}[5m]))",
         "{{instance}} {{reason}}")], unit="cps")
    p.panel(ts, "Gateway connections refused", [
        (f"sum by (instance, reason) (rate(eps_http_refusals_total{{{SEL}}}[5m]))",
         "{{instance}} {{reason}}")], unit="cps")
    p.panel(ts, "Asynchronous calls", [
        (f"eps_async_pending{{{SEL}}}", "{{instance}} pending ({{side}})"),
        (f"delta(eps_async_calls{{{SEL}}}[5m])", "{{instance}} {{event}} / 5 min"),
    ])

    p.row("Public proxy (twistd proxy --mode public)")
    p.panel(ts, "Spliced pairs and waiting tokens", [
        (f"proxy_active_splices{{{SEL}}}", "{{instance}} spliced now"),
        (f"proxy_pending_tokens{{{SEL}}}", "{{instance}} tokens waiting"),
    ])
    p.panel(ts, "Pairings and time-outs", [
        (f"rate(proxy_pairings_total{{{SEL}}}[5m])", "{{instance}} paired"),
        (f"rate(proxy_timeouts_total{{{SEL}}}[5m])", "{{instance}} timed out"),
    ], unit="cps", description="Alert: over 20% time-outs.")
    p.panel(ts, "Spliced traffic", [
        (f"rate(proxy_spliced_bytes_total{{{SEL}}}[5m])", "{{instance}}")], unit="Bps")
    p.panel(ts, "TLS listener connections by outcome", [
        (f"sum by (instance, outcome) (rate(proxy_tls_connections_total{{{SEL}}}[5m]))",
         "{{instance}} {{outcome}}"),
        (f"proxy_tls_reading_hello{{{SEL}}}", "{{instance}} reading ClientHello"),
    ], unit="cps", width=12)
    p.panel(ts, "Refusals", [
        (f"rate(proxy_refusals_total{{{SEL}}}[5m])", "{{instance}} bad token"),
        (f"rate(proxy_internal_rate_limited_connections_total{{{SEL}}}[5m])",
         "{{instance}} rate limited"),
        (f"sum by (instance, reason) (rate(proxy_http_refusals_total{{{SEL}}}[5m]))",
         "{{instance}} JSON-RPC {{reason}}"),
    ], unit="cps", width=12)
    p.panel(ts, "JSON-RPC requests by method and outcome", [
        (f"sum by (method, outcome) (rate(proxy_jsonrpc_requests_total{{{SEL}}}[5m]))",
         "{{method}} {{outcome}}")], unit="reqps", width=12)
    p.panel(ts, "JSON-RPC latency (95th percentile)", [
        ("histogram_quantile(0.95, sum by (le, method) "
         f"(rate(proxy_jsonrpc_request_seconds_bucket{{{SEL}}}[5m])))", "{{method}}")],
        unit="s", width=12)

    p.row("Private proxy (twistd proxy --mode private)")
    p.panel(ts, "Announcements and forwarded connections", [
        (f"private_proxy_announcements{{{SEL}}}", "{{instance}} announcements"),
        (f"private_proxy_active_connections{{{SEL}}}", "{{instance}} connections now"),
    ])
    p.panel(ts, "Forwarded and failed connections", [
        (f"rate(private_proxy_forwarded_connections_total{{{SEL}}}[5m])", "{{instance}} forwarded"),
        (f"rate(private_proxy_failed_connections_total{{{SEL}}}[5m])", "{{instance}} failed"),
        (f"rate(private_proxy_reannounce_failures_total{{{SEL}}}[5m])",
         "{{instance}} re-announcement failed"),
    ], unit="cps")
    p.panel(ts, "Listener refusals", [
        (f"sum by (instance, reason) (rate(private_proxy_http_refusals_total{{{SEL}}}[5m]))",
         "{{instance}} {{reason}}")], unit="cps")
    p.panel(ts, "JSON-RPC requests by method and outcome", [
        (f"sum by (method, outcome) (rate(private_proxy_jsonrpc_requests_total{{{SEL}}}[5m]))",
         "{{method}} {{outcome}}")], unit="reqps", width=12)
    p.panel(ts, "JSON-RPC latency (95th percentile)", [
        ("histogram_quantile(0.95, sum by (le, method) "
         f"(rate(private_proxy_jsonrpc_request_seconds_bucket{{{SEL}}}[5m])))", "{{method}}")],
        unit="s", width=12)

    return {
        "title": "epsproxy",
        "uid": "epsproxy",
        "description": "Service directory, endpoint servers, public and private proxies "
                       "(docs/monitoring.md)",
        "tags": ["epsproxy"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            {"name": "instance", "label": "Instance", "type": "query",
             "datasource": DATASOURCE,
             "definition": f"label_values(process_start_time_seconds{{{JOB}}}, instance)",
             "query": {"query": f"label_values(process_start_time_seconds{{{JOB}}}, instance)",
                       "refId": "instance"},
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1},
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": p.panels,
    }


def main() -> None:
    json.dump(build(), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
