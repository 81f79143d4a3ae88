"""
The deployment files of ``contrib/`` (issue 13, item 5): the systemd units (checked by
``systemd-analyze verify``, their commands run for real: ``--check``, start, the reload
signal, the drain), the Prometheus alert rules (``promtool check rules`` and ``promtool
test rules``), the Grafana dashboard (the generator's output, importable, valid PromQL),
and that every metric the rules and the dashboard name exists in the ``/metrics`` of
running programs (an SD, an endpoint server, a public and a private proxy), each of them
described in docs/monitoring.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.eps import tap as eps_tap
from epsproxy.proxy import tap as proxy_tap
from epsproxy.sd import tap as sd_tap
from tests.support.contrib import (
    DASHBOARD,
    DASHBOARD_SCRIPT,
    MONITORING_DOC,
    NOT_EXPORTED,
    RULES,
    RULES_TESTS,
    SHIPPED_TWISTD,
    SYSTEMD,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
    rule_expressions,
    tool,
    unit_settings,
    unit_value,
)
from tests.support.eps import write_eps_settings
from tests.support.programs import (
    families,
    series_names,
    start_eps_program,
    start_proxy_program,
    start_sd_program,
)
from tests.support.proxies import private_section, public_section, write_settings
from tests.support.sd import write_sd_settings
from tests.support.twistd import TWISTD, Twistd, stop_twistd

#: unit file -> (the tap whose Options name the settings variable, twistd arguments,
#: the log line of a started program, the system user)
UNITS: dict[str, tuple[Any, str, str, str]] = {
    "epsproxy-sd@.service": (sd_tap, "sd", r"service directory serving", "epsproxy-sd"),
    "epsproxy-eps@.service": (eps_tap, "eps", r"endpoint server hd-1 ready", "epsproxy-eps"),
    "epsproxy-proxy-public@.service": (
        proxy_tap, "proxy --mode public", r"public proxy \S+ serving", "epsproxy-proxy"),
    "epsproxy-proxy-private@.service": (
        proxy_tap, "proxy --mode private", r"private proxy \S+ serving", "epsproxy-proxy"),
}


def run(*argv: str, env: dict[str, str] | None = None, cwd: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def temp_dir(test: TestCase) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="epsproxy-contrib-"))
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


def settings_folder(unit: str, folder: Path) -> Path:
    """A role folder of the test PKI (loopback, port 0) for the program of ``unit``."""
    if "-sd@" in unit:
        return write_sd_settings(folder)
    if "-eps@" in unit:
        folder.mkdir(parents=True, exist_ok=True)
        return write_eps_settings(folder)
    mode = "public" if "public" in unit else "private"
    section = (public_section if mode == "public" else private_section)(folder, 9)
    return write_settings(folder, {mode: section, "metrics": {"bind_address": "127.0.0.1:0"}})


def command(line: str, pid: int | None = None) -> list[str]:
    """A unit's command line as argv, with this virtualenv's twistd (and ``$MAINPID``)."""
    argv = shlex.split(line.replace("$MAINPID", str(pid)) if pid else line)
    return [TWISTD if arg == SHIPPED_TWISTD else arg for arg in argv]


class SystemdUnits(TestCase):
    timeout = 120

    def settings(self, unit: str) -> list[tuple[str, str, str]]:
        return unit_settings((SYSTEMD / unit).read_text())

    def test_one_unit_per_program_and_no_other(self):
        self.assertEqual(sorted(p.name for p in SYSTEMD.glob("*.service")), sorted(UNITS))

    def test_each_unit_has_the_lifecycle_and_the_hardening(self):
        for unit, (tap, arguments, _, user) in UNITS.items():
            settings = self.settings(unit)

            def one(key: str, section: str = "Service") -> str:
                values = unit_value(settings, section, key)
                self.assertEqual(len(values), 1, (unit, key, values))
                return values[0]

            self.assertEqual(one("Type"), "simple", unit)
            self.assertEqual(one("User"), user, unit)
            self.assertEqual(one("ExecStart"),
                             f"{SHIPPED_TWISTD} -n --pidfile= {arguments}", unit)
            self.assertEqual(one("ExecStartPre"), f"{SHIPPED_TWISTD} {arguments} --check", unit)
            self.assertEqual(one("ExecReload"), "/bin/kill -HUP $MAINPID", unit)
            self.assertEqual(one("Restart"), "on-failure", unit)
            self.assertEqual(one("ProtectSystem"), "strict", unit)
            self.assertEqual(one("NoNewPrivileges"), "yes", unit)
            self.assertEqual(one("StateDirectory"), "epsproxy/%i", unit)
            # the variable the program really reads (its Options say which)
            self.assertEqual(one("Environment"), f"{tap.Options.env_var}=/etc/epsproxy/%i",
                             unit)
            self.assertEqual(one("WantedBy", "Install"), "multi-user.target", unit)
            # the header says how to install it
            text = (SYSTEMD / unit).read_text()
            self.assertIn(f"install -m 0644 contrib/systemd/{unit} /etc/systemd/system/", text)
            self.assertIn("systemctl daemon-reload", text)

    def verified(self, folder: Path, unit: str, text: str) -> subprocess.CompletedProcess[str]:
        (folder / unit).write_text(text.replace(SHIPPED_TWISTD, TWISTD))
        instance = unit.replace("@.service", "@test-1.service")
        return run(tool("systemd-analyze"), "verify", "--man=no", "--recursive-errors=no",
                   str(folder / instance), cwd=str(folder))

    def test_systemd_analyze_verify_accepts_every_unit(self):
        folder = temp_dir(self)
        for unit in UNITS:
            result = self.verified(folder, unit, (SYSTEMD / unit).read_text())
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), unit)

    def test_systemd_analyze_verify_catches_a_broken_unit(self):
        # (the check above can fail: each of these mistakes is reported)
        folder = temp_dir(self)
        text = (SYSTEMD / "epsproxy-eps@.service").read_text()
        mistakes = {
            "Restart=on-failure": ("Restrat=on-failure", "Unknown key"),
            "ProtectSystem=strict": ("ProtectSystem=strickt", "protect system"),
            f"ExecStart={SHIPPED_TWISTD}": ("ExecStart=/nonexistent/twistd", "not executable"),
        }
        for right, (wrong, message) in mistakes.items():
            self.assertIn(right, text)
            result = self.verified(folder, "epsproxy-eps@.service", text.replace(right, wrong))
            self.assertNotEqual(result.returncode, 0, wrong)
            self.assertIn(message, result.stdout + result.stderr, wrong)

    def test_sysusers_file_creates_the_users_of_the_units(self):
        folder = temp_dir(self)
        result = run(tool("systemd-sysusers"), f"--root={folder}", "--dry-run",
                     str(SYSTEMD / "epsproxy.sysusers.conf"))
        self.assertEqual(result.returncode, 0, result.stderr)
        for _, _, _, user in UNITS.values():
            self.assertIn(f"Creating user '{user}'", result.stdout + result.stderr)

    def test_the_check_of_each_unit_passes_on_good_settings_and_fails_without(self):
        folder = temp_dir(self)
        for unit, (tap, _, _, _) in UNITS.items():
            check = command(unit_value(self.settings(unit), "Service", "ExecStartPre")[0])
            role = settings_folder(unit, folder / unit)
            env = dict(os.environ, **{tap.Options.env_var: str(role)})
            result = run(*check, env=env, cwd="/")
            self.assertEqual(result.returncode, 0, (unit, result.stdout, result.stderr))
            self.assertIn("settings OK", result.stdout, unit)
            env[tap.Options.env_var] = str(folder / "nothing-here")
            result = run(*check, env=env, cwd="/")
            self.assertEqual(result.returncode, 1, (unit, result.stdout, result.stderr))

    @defer.inlineCallbacks
    def test_each_unit_starts_reloads_and_drains_its_program(self):
        """ExecStart in the foreground, ExecReload's kill -HUP, systemd's SIGTERM: exit 0."""
        folder = temp_dir(self)
        for unit, (tap, _, ready, _) in UNITS.items():
            settings = self.settings(unit)
            role = settings_folder(unit, folder / unit)
            argv = command(unit_value(settings, "Service", "ExecStart")[0])
            self.assertEqual(argv[0], TWISTD)
            process = Twistd()
            self.addCleanup(stop_twistd, process)
            transport = reactor.spawnProcess(
                process, argv[0], argv, path=str(role),
                env=dict(os.environ, **{tap.Options.env_var: str(role)}))
            yield process.wait_for(ready)
            reload = command(unit_value(settings, "Service", "ExecReload")[0], transport.pid)
            self.assertEqual(run(*reload).returncode, 0, unit)
            yield process.wait_for(r"reloaded settings from ")
            process.signal("TERM")
            status = yield process.ended
            self.assertEqual(status, 0, (unit, process.output))


class AlertRules(TestCase):
    timeout = 120

    def test_promtool_check_rules(self):
        result = run(tool("promtool"), "check", "rules", str(RULES))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(rule_expressions())} rules found", result.stdout)

    def test_promtool_test_rules(self):
        result = run(tool("promtool"), "test", "rules", str(RULES_TESTS))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_every_alert_has_a_case_where_it_fires(self):
        tests = yaml.safe_load(RULES_TESTS.read_text())
        fired = {case["alertname"] for group in tests["tests"]
                 for case in group.get("alert_rule_test", []) if case.get("exp_alerts")}
        self.assertEqual(set(rule_expressions()) - fired, set())

    def test_the_alerts_the_issue_asks_for(self):
        rules = rule_expressions()
        self.assertIn("14 * 86400", rules["EpsproxyCertificateExpiringSoon"])
        for program in ("sd", "eps", "proxy"):
            self.assertIn(f"{program}_certificate_expiry_seconds",
                          metric_names(rules["EpsproxyCertificateExpiringSoon"]))
        wanted = {
            "directory stale": "EpsDirectoryStale", "peer links down": "EpsPeerLinkDown",
            "refusals rising": "EpsPeerRefusalsRising", "splices failing": "ProxySplicesFailing",
            "readiness lost": "EpsproxyNotReady", "down": "EpsproxyDown",
        }
        for what, alert in wanted.items():
            self.assertIn(alert, rules, what)

    def test_a_changed_rule_fails_its_unit_test(self):
        # (promtool test rules can fail: the stale-directory threshold raised tenfold)
        folder = temp_dir(self)
        text = RULES.read_text()
        self.assertIn("eps_directory_age_seconds > 300", text)
        (folder / RULES.name).write_text(text.replace("eps_directory_age_seconds > 300",
                                                      "eps_directory_age_seconds > 3000"))
        shutil.copy(RULES_TESTS, folder / RULES_TESTS.name)
        result = run(tool("promtool"), "test", "rules", str(folder / RULES_TESTS.name))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("EpsDirectoryStale", result.stdout + result.stderr)


class Dashboard(TestCase):
    timeout = 60

    def dashboard(self) -> dict[str, Any]:
        return json.loads(DASHBOARD.read_text())

    def test_the_json_is_the_generators_output(self):
        result = run(sys.executable, str(DASHBOARD_SCRIPT))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, DASHBOARD.read_text(),
                         "run: python contrib/grafana/dashboard.py > contrib/grafana/epsproxy.json")

    def test_importable_with_a_datasource_input(self):
        dashboard = self.dashboard()
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        panels = dashboard["panels"]
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)))
        rows = [p["title"] for p in panels if p["type"] == "row"]
        for program in ("twistd sd", "twistd eps", "--mode public", "--mode private",
                        "Processes", "Certificates"):
            self.assertTrue(any(program in row for row in rows), (program, rows))
        for panel in panels:
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
            if panel["type"] == "row":
                continue
            self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"]["uid"], "${datasource}", panel["title"])

    def test_every_query_is_valid_promql(self):
        folder = temp_dir(self)
        rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
                 for i, (_, expr) in enumerate(dashboard_queries(self.dashboard()))]
        self.assertGreater(len(rules), 40)
        (folder / "queries.yml").write_text(yaml.safe_dump(
            {"groups": [{"name": "dashboard", "rules": rules}]}))
        result = run(tool("promtool"), "check", "rules", str(folder / "queries.yml"))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class MetricNamesOfQueries(TestCase):
    """The helper that reads metric names out of PromQL."""

    def test_names_and_not_the_rest(self):
        cases = {
            'sum by (le, method) (rate(a_bucket{method="x", b=~"y|z"}[5m]))': {"a_bucket"},
            "time() - b_seconds > 14 * 86400 or c_total offset 1h": {"b_seconds", "c_total"},
            'label_replace(rate(d_total[10m]), "listener", "sd", "", "") > bool 1e3':
                {"d_total"},
            "e and on (job, instance) max by (job) (f) == 1 unless g * -Inf": {"e", "f", "g"},
            "histogram_quantile(0.95, sum(rate(h_bucket[$__rate_interval])))": {"h_bucket"},
            'i{x="a}b", y="{"}': {"i"},
            "vector(1)": set(),
        }
        for expr, names in cases.items():
            self.assertEqual(metric_names(grafana_to_promql(expr)), names, expr)

    def test_a_selector_by_name_is_refused(self):
        with self.assertRaises(ValueError):
            metric_names('{__name__=~".+_total"}')


class NamedMetricsExist(TestCase):
    """Real programs, scraped: every metric the rules and the dashboard use exists."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        folder = temp_dir(self)
        self.expositions: dict[str, bytes] = {}
        sd = yield start_sd_program(self, folder / "sd")
        programs = [
            sd,
            (yield start_eps_program(self, folder / "eps", sd)),
            (yield start_proxy_program(self, folder / "public", "public")),
            (yield start_proxy_program(self, folder / "private", "private")),
        ]
        for program in programs:
            self.expositions[program.name] = yield program.scrape()
        self.exported = set().union(*(series_names(e) for e in self.expositions.values()))

    def test_every_metric_of_the_alert_rules_exists(self):
        for alert, expr in rule_expressions().items():
            missing = metric_names(expr) - self.exported - NOT_EXPORTED
            self.assertEqual(missing, set(), alert)

    def test_every_metric_of_the_dashboard_exists(self):
        dashboard = json.loads(DASHBOARD.read_text())
        for where, expr in dashboard_queries(dashboard):
            names = metric_names(grafana_to_promql(expr))
            self.assertTrue(names, where)
            self.assertEqual(names - self.exported - NOT_EXPORTED, set(), where)

    def test_what_prometheus_makes_is_not_exported(self):
        # (the allowance above covers only series no program exports)
        self.assertEqual(NOT_EXPORTED & self.exported, set())
        self.assertNotIn("eps_no_such_metric", self.exported)

    def test_each_program_exports_its_own_families(self):
        own = {"sd": "sd_records", "eps": "eps_requests_total",
               "proxy --mode public": "proxy_active_splices",
               "proxy --mode private": "private_proxy_announcements"}
        for program, name in own.items():
            self.assertIn(name, families(self.expositions[program]), program)

    def test_the_monitoring_doc_describes_every_family_and_alert(self):
        doc = MONITORING_DOC.read_text()
        for program, exposition in self.expositions.items():
            for name in families(exposition):
                self.assertIn(f"`{name}`", doc, program)
        for alert in rule_expressions():
            self.assertIn(f"`{alert}`", doc)
