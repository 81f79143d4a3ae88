"""
Tests for epsproxy.directory.jsondir: the json directory back-end (SPEC §7.1) —
file selection and order, reloading only on change, errors naming the file and record,
keeping the last good data when a reload fails, and queries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.directory.jsondir import DirectoryError, JSONDirectory


def rec(name: str, section: str, data, created_at: str = "2021-05-17T10:00:00Z") -> dict:
    return {"name": name, "section": section, "data": data, "created_at": created_at}


def grpc_server(address: str = "localhost:8888") -> dict:
    return {"type": "grpc_server", "settings": {"address": address}}


BASE = [
    rec("hd-1", "groups", ["health-departments"]),
    rec("hd-1", "channels", [grpc_server(), {"type": "grpc_client", "settings": None}]),
    rec("hd-2", "groups", ["health-departments"]),
    rec("hd-2", "channels", [{"type": "jsonrpc_client", "settings": None}]),
    rec("ls-1", "groups", ["locations"]),
]


class JSONDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.tick = 1_600_000_000_000_000_000

    def write(self, name: str, content, raw: bool = False) -> Path:
        """Write a file and give it a fresh, strictly increasing mtime."""
        path = self.folder / name
        path.write_bytes(content if raw else json.dumps(content).encode())
        self.tick += 1_000_000_000
        os.utime(path, ns=(self.tick, self.tick))
        return path

    def count_reads(self, directory: JSONDirectory) -> list[Path]:
        reads: list[Path] = []
        original = directory._read

        def counting(file: Path) -> bytes:
            reads.append(file)
            return original(file)

        self.patch(directory, "_read", counting)
        return reads

    def capture_warnings(self) -> list[dict]:
        events: list[dict] = []

        def observer(event: dict) -> None:
            if event.get("log_namespace", "").startswith("epsproxy.directory.jsondir"):
                events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    # -- selection and order ----------------------------------------------------------

    def test_folder_in_name_order(self) -> None:
        self.write("002_more.json", {"records": [rec("hd-1", "groups", ["second"])]})
        self.write("001_base.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")
        self.assertEqual(d.name, "hd-1")
        self.assertEqual(d.own_entry()["groups"], ["second"])
        self.assertEqual([e["name"] for e in d.entries()], ["hd-1", "hd-2", "ls-1"])
        self.assertEqual(len(d.own_entry()["records"]), 3)
        first = d.own_entry()["records"][0]
        self.assertEqual(first["hash"], "")
        self.assertEqual(first["record"]["data"], ["health-departments"])

    def test_suffix_is_anchored(self) -> None:
        self.write("001_base.json", {"records": BASE})
        self.write("002_old.json.bak", {"records": [rec("hd-1", "groups", ["bak"])]})
        self.write("003_json", {"records": [rec("hd-1", "groups", ["nojson"])]})
        self.write("004_broken.JSON", b"not json", raw=True)
        (self.folder / "005_dir.json").mkdir()
        d = JSONDirectory(self.folder, "hd-1")
        self.assertEqual(d.own_entry()["groups"], ["health-departments"])

    def test_single_file_any_name(self) -> None:
        path = self.write("directory.txt", {"records": BASE})
        d = JSONDirectory(str(path), "hd-2")
        self.assertEqual(d.own_entry()["channels"][0]["type"], "jsonrpc_client")

    def test_empty_folder(self) -> None:
        d = JSONDirectory(self.folder, "hd-1")
        self.assertEqual(d.entries(), [])
        self.assertRaises(DirectoryError, d.own_entry)

    def test_created_at_normalised(self) -> None:
        self.write("a.json", {"records": [rec("hd-1", "groups", ["g"],
                                               "2022-05-23T09:18:04.500+02:00")]})
        d = JSONDirectory(self.folder, "hd-1")
        record = d.own_entry()["records"][0]["record"]
        self.assertEqual(record["created_at"], "2022-05-23T09:18:04.5+02:00")

    # -- lookups and queries ----------------------------------------------------------

    def test_entry_for_missing(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "nobody")
        e = self.assertRaises(DirectoryError, d.entry_for, "hd-9")
        self.assertEqual(str(e), "no directory entry found for hd-9")
        e = self.assertRaises(DirectoryError, d.own_entry)
        self.assertEqual(str(e), "no directory entry found for nobody")

    def test_query(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")

        def names(query) -> list[str]:
            return [e["name"] for e in d.entries(query)]

        self.assertEqual(names(None), ["hd-1", "hd-2", "ls-1"])
        self.assertEqual(names({}), ["hd-1", "hd-2", "ls-1"])
        self.assertEqual(names({"group": "health-departments"}), ["hd-1", "hd-2"])
        self.assertEqual(names({"group": "locations"}), ["ls-1"])
        self.assertEqual(names({"operator": "hd-2"}), ["hd-2"])
        self.assertEqual(names({"operator": "hd-2", "group": "locations"}), [])
        self.assertEqual(names({"channels": ["grpc_server"]}), ["hd-1"])
        self.assertEqual(names({"channels": ["eps_server"]}), ["hd-1"])
        self.assertEqual(names({"channels": ["grpc_client", "jsonrpc_client"]}),
                         ["hd-1", "hd-2"])
        self.assertEqual(names({"channels": []}), [])
        self.assertEqual(names({"group": "", "operator": "", "channels": None}),
                         ["hd-1", "hd-2", "ls-1"])

    def test_bad_query(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")
        for query in [{"channels": "grpc_server"}, {"channels": [1]}, ["x"]]:
            self.assertRaises(DirectoryError, d.entries, query)

    def test_query_results_are_copies_lookups_are_not(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")
        d.entries()[0]["channels"].clear()
        self.assertEqual(len(d.own_entry()["channels"]), 2)
        # entry_for is on every call's path: the directory's own dict, not a copy.
        self.assertIs(d.own_entry(), d.entry_for("hd-1"))

    def test_reload_interval_limits_looking_at_the_files(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1", reload_interval=3600)
        self.write("b.json", {"records": [
            {"name": "hd-9", "section": "groups", "data": [],
             "created_at": "2021-05-17T10:00:00Z"}]})
        with self.assertRaises(DirectoryError):
            d.entry_for("hd-9")
        d.reload_interval = 0
        self.assertEqual(d.entry_for("hd-9")["name"], "hd-9")

    # -- reloading --------------------------------------------------------------------

    def test_no_reload_when_unchanged(self) -> None:
        self.write("a.json", {"records": BASE})
        self.write("b.json", {"records": []})
        d = JSONDirectory(self.folder, "hd-1")
        reads = self.count_reads(d)
        for _ in range(5):
            d.entries()
            d.own_entry()
        self.assertEqual(reads, [])

    def test_reload_on_change(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")
        reads = self.count_reads(d)
        self.write("a.json", {"records": [rec("hd-1", "groups", ["changed"])]})
        self.assertEqual(d.own_entry()["groups"], ["changed"])
        self.assertRaises(DirectoryError, d.entry_for, "hd-2")
        self.assertEqual(len(reads), 1)
        d.own_entry()
        self.assertEqual(len(reads), 1)

    def test_reload_on_same_size_same_mtime_replacement(self) -> None:
        # An atomic replace (new inode) is noticed even if mtime and size are equal.
        path = self.write("a.json", {"records": [rec("hd-1", "groups", ["aaaa"])]})
        st = path.stat()
        d = JSONDirectory(self.folder, "hd-1")
        tmp = self.folder / "tmp"
        tmp.write_text(json.dumps({"records": [rec("hd-1", "groups", ["bbbb"])]}))
        os.utime(tmp, ns=(st.st_mtime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
        self.assertEqual(d.own_entry()["groups"], ["bbbb"])

    def test_reload_on_file_added_and_removed(self) -> None:
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")
        added = self.write("b.json", {"records": [rec("new-1", "groups", ["g"])]})
        self.assertEqual(d.entry_for("new-1")["groups"], ["g"])
        added.unlink()
        self.assertRaises(DirectoryError, d.entry_for, "new-1")

    def test_broken_reload_keeps_last_good(self) -> None:
        warnings = self.capture_warnings()
        self.write("a.json", {"records": BASE})
        d = JSONDirectory(self.folder, "hd-1")
        self.write("a.json", b'{"records": [', raw=True)
        reads = self.count_reads(d)
        self.assertEqual(d.own_entry()["groups"], ["health-departments"])
        self.assertEqual(len(d.entries()), 3)
        # The broken file is read once, not on every query, and warned about once.
        self.assertEqual(len(reads), 1)
        warned = [e for e in warnings if e.get("log_level").name == "warn"]
        self.assertEqual(len(warned), 1)
        self.assertIn("a.json", warned[0]["error"])
        # Fixing the file brings the new data in.
        self.write("a.json", {"records": [rec("hd-1", "groups", ["fixed"])]})
        self.assertEqual(d.own_entry()["groups"], ["fixed"])

    def test_vanished_folder_keeps_last_good(self) -> None:
        path = self.write("a.json", {"records": BASE})
        d = JSONDirectory(path, "hd-1")
        path.unlink()
        self.assertEqual(d.own_entry()["groups"], ["health-departments"])

    # -- errors on the first load -----------------------------------------------------

    def assertLoadError(self, content, *fragments: str, raw: bool = False) -> None:
        self.write("001_good.json", {"records": BASE})
        self.write("002_bad.json", content, raw=raw)
        e = self.assertRaises(DirectoryError, JSONDirectory, self.folder, "hd-1")
        self.assertIn("002_bad.json", str(e))
        for fragment in fragments:
            self.assertIn(fragment, str(e))

    def test_missing_path(self) -> None:
        e = self.assertRaises(DirectoryError, JSONDirectory, self.folder / "nope.json", "x")
        self.assertIn("nope.json", str(e))

    def test_invalid_json(self) -> None:
        self.assertLoadError(b'{"records": [', "invalid JSON", raw=True)

    def test_truncated(self) -> None:
        good = json.dumps({"records": BASE}).encode()
        self.assertLoadError(good[: len(good) // 2], "invalid JSON", raw=True)

    def test_not_utf8(self) -> None:
        self.assertLoadError(b'{"records": ["\xff\xfe"]}', raw=True)

    def test_nan_refused(self) -> None:
        self.assertLoadError(b'{"records": [NaN]}', "invalid JSON", raw=True)

    def test_deep_nesting(self) -> None:
        self.assertLoadError(b"[" * 100_000 + b"]" * 100_000, raw=True)

    def test_wrong_shape(self) -> None:
        for content in [[], {"records": None}, {"records": {}}, {"other": []}, "records"]:
            self.assertLoadError(content, "records")

    def test_record_not_object(self) -> None:
        self.assertLoadError({"records": [BASE[0], "x"]}, "record 1")

    def test_bad_record(self) -> None:
        bad = [
            rec("hd-1", "nonsense", []),
            {"name": "hd-1", "section": "groups", "created_at": "2021-05-17T10:00:00Z"},
            rec("hd-1", "groups", ["g"], "yesterday"),
            {"section": "groups", "data": ["g"], "created_at": "2021-05-17T10:00:00Z"},
            rec("hd-1", "channels", [{"settings": {}}]),
        ]
        for record in bad:
            self.assertLoadError({"records": [BASE[0], BASE[1], record]}, "record 2")

    def test_oversized_file(self) -> None:
        self.write("a.json", {"records": BASE})
        e = self.assertRaises(DirectoryError, JSONDirectory, self.folder, "hd-1",
                              max_file_size=100)
        self.assertIn("larger than 100 bytes", str(e))
