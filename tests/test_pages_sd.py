"""
The SD's directory browser (issue 16): a real SD holding the dev directory's records
(signed by hd-1, an sd-admin) and hostile ones, loaded in real headless Chromium; the
page parameter's validation; the renderers on plain values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from epsproxy.sd.browser import DirectoryBrowser, permission_matrix, record_rows
from tests.support.metrics import request
from tests.support.pages import dump_dom, screenshot, serve_page
from tests.support.sd import base_changes, change, sd_client, sign_chain, start_sd, \
    write_sd_settings

DEV_DIRECTORY = Path(__file__).resolve().parents[1] / "conf" / "dev" / "directory"
WHEN = "2025-01-01T10:00:00Z"
SCRIPT = "<script>document.title='owned'</script>"
IMG = "<img src=x onerror=alert(1)>"


def dev_changes() -> list[dict]:
    """The dev directory's records (without its pins, which are the dev PKI's)."""
    data = json.loads((DEV_DIRECTORY / "001_base.json").read_text())
    return [dict(r, created_at="2025-01-02T10:00:00Z") for r in data["records"]]


def hostile_changes() -> list[dict]:
    """An operator, a group, a service and a description holding markup."""
    return [
        change("evil", "groups", [SCRIPT]),
        change("evil", "services", [{
            "name": IMG, "description": SCRIPT,
            "permissions": [{"group": SCRIPT, "rights": ["call"]}],
            "methods": [{"name": "m" + SCRIPT, "permissions": []}]}]),
    ]


def _cells(dom: str, table_index_text: str) -> list[list[str]]:
    """The rows (cell texts) of the first table after the heading ``table_index_text``."""
    start = dom.index(table_index_text)
    end = dom.index("</table>", start)
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", dom[start:end], re.S):
        rows.append([re.sub(r"<[^>]+>", "", c).strip()
                     for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)])
    return rows


class DirectoryBrowserInBrowser(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        folder = write_sd_settings(Path(self.mktemp()).absolute())
        self.running = yield start_sd(folder)
        self.addCleanup(self.running.stop)
        rpc = sd_client(self.running.port_number)
        self.addCleanup(rpc.close)
        chain = sign_chain(base_changes(WHEN) + dev_changes() + hostile_changes())
        self.assertEqual((yield rpc.call("submitRecords", {"records": chain})), "ok")
        self.records = len(chain)
        sd = self.running.sd
        self.page = DirectoryBrowser(sd, reactor)
        self.port = yield serve_page(self, sd.registry, self.page, sd.readiness, program="sd")

    @defer.inlineCallbacks
    def test_browser_shows_admins_permissions_and_pins(self):
        dom = yield dump_dom(self, f"http://127.0.0.1:{self.port}/")
        self.assertIn("<title>Service directory</title>", dom)  # no script ran
        # hd-1 signed every record, and its signing certificate puts it in sd-admin.
        signers = _cells(dom, "<h2>Record signers</h2>")
        hd1 = [row for row in signers if row and row[0] == "hd-1"]
        self.assertEqual(len(hd1), 1, signers)
        self.assertIn("sd-admin", hd1[0][1])
        self.assertEqual(hd1[0][3], str(self.records))
        # health-departments may call ls-1's locations service.
        grants = _cells(dom, "<h2>Who may call what</h2>")
        self.assertIn(["ls-1 locations", "health-departments", "call"], grants)
        matrix = _cells(dom, "A caller in a row may call")
        header = matrix[0]
        column = header.index("ls-1 locations")
        row = next(r for r in matrix if r[0] == "group health-departments")
        self.assertEqual(row[column], "call")
        row = next(r for r in matrix if r[0] == "group proxy-providers")
        self.assertEqual(row[column], "")
        self.assertEqual(row[header.index("hd-1 connection-requests._connectionRequest")],
                         "call")
        # pins: operator and kind
        pins = _cells(dom, "<h2>Certificate fingerprints</h2>")
        kinds = sorted(r[2] for r in pins if len(r) == 3 and r[1] == "hd-1")
        self.assertEqual(kinds, ["TLS", "signing"])
        operators = _cells(dom, "<h2>Operators")
        ls1 = next(r for r in operators if r[0] == "ls-1")
        self.assertIn("location-services", ls1[1])
        self.assertIn("locations (add, lookup, check", ls1[3])
        self.assertIn(f"({self.records} records, newest first)", dom)

    @defer.inlineCallbacks
    def test_directory_strings_are_escaped(self):
        dom = yield dump_dom(self, f"http://127.0.0.1:{self.port}/")
        self.assertNotIn("<script>", dom)
        self.assertNotIn("<img", dom)
        self.assertIn("&lt;script&gt;document.title='owned'&lt;/script&gt;", dom)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;", dom)
        self.assertIn("<title>Service directory</title>", dom)

    @defer.inlineCallbacks
    def test_page_parameter(self):
        for bad in ("0", "-1", "x", "1.5", "", "10000001", "1&page=2", "%3Cb%3E"):
            answer = yield request(self.port, "/?page=" + bad)
            self.assertEqual(answer.status, 400, bad)
            self.assertIn(b"bad page parameter", answer.body)
            self.assertNotIn(b"<b>", answer.body)
        answer = yield request(self.port, "/?page=1")
        self.assertEqual(answer.status, 200)
        answer = yield request(self.port, "/?page=99")
        self.assertEqual(answer.status, 200)
        self.assertIn(b"no record on this page", answer.body)

    @defer.inlineCallbacks
    def test_screenshot_is_a_small_png(self):
        path = self.mktemp() + ".png"
        size = yield screenshot(self, f"http://127.0.0.1:{self.port}/", path, "900,1200")
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertLess(size, 300_000)


class Renderers(TestCase):
    """The browser's tables on plain values."""

    def test_permission_matrix(self):
        entries = {
            "ls-1": {"groups": ["ls"], "services": [
                {"name": "loc", "permissions": [{"group": "hd", "rights": ["call"]}],
                 "methods": [{"name": "add", "permissions": []},
                             {"name": "check", "permissions": [{"group": "admin",
                                                                "rights": ["call"]}]}]}]},
            "hd-1": {"groups": ["hd"], "services": [
                {"name": "pub", "permissions": [{"group": "*", "rights": ["call"]}],
                 "methods": [{"name": "ping", "permissions": []}]}]},
        }
        columns, rows, more_c, more_r = permission_matrix(entries)
        self.assertEqual(columns, ["hd-1 pub", "hd-1 pub.ping", "ls-1 loc", "ls-1 loc.add",
                                   "ls-1 loc.check"])
        table = dict(rows)
        self.assertEqual(table["group hd"], ["call", "call", "call", "call", "call"])
        self.assertEqual(table["group admin"], ["call", "call", "call", "", "call"])
        self.assertEqual(table["group ls"], ["call", "call", "", "", ""])
        self.assertEqual(table["operator hd-1"], ["call", "call", "call", "call", "call"])
        self.assertEqual((more_c, more_r), (0, 0))
        columns, rows, more_c, more_r = permission_matrix(entries, limit=2)
        self.assertEqual((len(columns), len(rows), more_c, more_r), (2, 2, 3, 3))

    def test_permission_matrix_of_odd_entries(self):
        entries = {"x": {"services": [{"name": "s", "methods": "junk"}, "junk"],
                         "groups": None}}
        columns, rows, _, _ = permission_matrix(entries)
        self.assertEqual(columns, ["x s"])
        self.assertEqual(rows, [("operator x", [""])])

    def test_record_rows_pages_newest_first(self):
        records = [{"hash": f"{i:064x}", "record": {"created_at": f"t{i}", "name": "n",
                                                    "section": "groups"},
                    "signature": {"c": "not a certificate"}} for i in range(120)]
        rows, pages = record_rows(records, 1)
        self.assertEqual(pages, 3)
        self.assertEqual([r[0] for r in rows][:2], [120, 119])
        self.assertEqual(len(rows), 50)
        self.assertTrue(rows[0][2].startswith("(unreadable"))
        rows, _ = record_rows(records, 3)
        self.assertEqual([r[0] for r in rows], list(range(20, 0, -1)))
        self.assertEqual(record_rows(records, 4)[0], [])
        self.assertEqual(record_rows([], 1), ([], 1))
