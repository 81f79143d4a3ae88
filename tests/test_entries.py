"""
Tests for epsproxy.directory.entries: integration of records into entries, lookups,
queries (with the reference's quirks and our channel aliases), permissions and peers.
"""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.directory import entries as E


def record(name: str, section: str, data, created_at: str = "2021-05-17T10:00:00Z") -> dict:
    return {"name": name, "section": section, "data": data, "created_at": created_at}


def signed(rec: dict, hash_: str = "a" * 64, parent: str = "") -> dict:
    return {"parent_hash": parent, "hash": hash_, "signature": {"r": "1", "s": "2", "c": ""},
            "record": rec}


def service(name, methods, permissions=()):
    return {"name": name, "permissions": list(permissions), "methods": list(methods)}


def method(name, permissions=()):
    return {"name": name, "permissions": list(permissions)}


def perm(group, rights=("call",)):
    return {"group": group, "rights": list(rights)}


def entry(name, groups=(), services=(), channels=()):
    e = E.new_entry(name)
    e["groups"] = list(groups)
    e["services"] = list(services)
    e["channels"] = list(channels)
    return e


class NewEntryTests(SynchronousTestCase):
    def test_shape(self) -> None:
        self.assertEqual(
            E.new_entry("hd-1"),
            {"name": "hd-1", "groups": [], "channels": [], "services": [], "certificates": [],
             "settings": [], "preferences": None, "records": [],
             "properties": {"displayName": ""}},
        )

    def test_fresh_lists(self) -> None:
        a, b = E.new_entry("x"), E.new_entry("x")
        a["groups"].append("g")
        a["properties"]["displayName"] = "X"
        self.assertEqual(b["groups"], [])
        self.assertEqual(b["properties"], {"displayName": ""})


class IntegrateTests(SynchronousTestCase):
    def test_signed_record_creates_entry_and_keeps_audit_trail(self) -> None:
        entries: dict = {}
        s = signed(record("hd-1", "groups", ["health-departments"]))
        E.integrate(entries, s)
        self.assertEqual(entries["hd-1"]["groups"], ["health-departments"])
        self.assertEqual(len(entries["hd-1"]["records"]), 1)
        self.assertIs(entries["hd-1"]["records"][0], s)

    def test_bare_record_gets_empty_hash_and_signature(self) -> None:
        entries: dict = {}
        rec = record("hd-1", "groups", ["g"])
        E.integrate(entries, rec)
        self.assertEqual(
            entries["hd-1"]["records"],
            [{"parent_hash": "", "hash": "", "signature": None, "record": rec}],
        )

    def test_section_is_replaced_not_merged(self) -> None:
        entries: dict = {}
        E.integrate(entries, record("hd-1", "groups", ["a", "b"]))
        E.integrate(entries, record("hd-1", "groups", ["c"]))
        E.integrate(entries, record("hd-1", "channels", [{"type": "stdout"}]))
        e = entries["hd-1"]
        self.assertEqual(e["groups"], ["c"])
        self.assertEqual(e["channels"], [{"type": "stdout", "settings": None}])
        self.assertEqual([r["record"]["section"] for r in e["records"]],
                         ["groups", "groups", "channels"])

    def test_records_for_other_operators_do_not_touch_entry(self) -> None:
        entries: dict = {}
        E.integrate(entries, record("hd-1", "groups", ["a"]))
        E.integrate(entries, record("hd-2", "groups", ["b"]))
        self.assertEqual(entries["hd-1"]["groups"], ["a"])
        self.assertEqual(len(entries["hd-1"]["records"]), 1)
        self.assertEqual(entries["hd-2"]["groups"], ["b"])

    def test_go_output_shapes(self) -> None:
        entries: dict = {}
        E.integrate(entries, record("op", "channels", [
            {"type": "grpc_server", "settings": {"address": "localhost:1"}},
            {"type": "grpc_client"}]))
        E.integrate(entries, record("op", "services", [
            {"name": "internals", "permissions": [perm("hd")],
             "methods": [{"name": "_ping", "permissions": []},
                         {"name": "add", "parameters": [
                             {"name": "x", "validators": [{"type": "IsInteger"}]},
                             {"name": "y"}]}]},
            {"name": "bare"}]))
        E.integrate(entries, record("op", "certificates", [
            {"fingerprint": "ab" * 32, "key_usage": "signing"}]))
        E.integrate(entries, record("op", "settings", [
            {"service": "proxy", "settings": {"allowed_domains": [".x"]}}]))
        e = entries["op"]
        self.assertEqual(e["channels"], [
            {"type": "grpc_server", "settings": {"address": "localhost:1"}},
            {"type": "grpc_client", "settings": None}])
        self.assertEqual(e["services"], [
            {"name": "internals", "permissions": [{"group": "hd", "rights": ["call"]}],
             "methods": [
                 {"name": "_ping", "permissions": [], "parameters": None},
                 {"name": "add", "permissions": [], "parameters": [
                     {"name": "x", "validators": [{"type": "IsInteger", "parameters": None}]},
                     {"name": "y", "validators": None}]}]},
            {"name": "bare", "permissions": [], "methods": []}])
        self.assertEqual(e["certificates"], [{"fingerprint": "ab" * 32, "key_usage": "signing"}])
        self.assertEqual(e["settings"], [
            {"operator": "", "service": "proxy", "environment": "",
             "settings": {"allowed_domains": [".x"]}}])

    def test_preferences_content_is_kept(self) -> None:
        # Better than the reference, which loses the content (SPEC §3.2 quirk).
        entries: dict = {}
        E.integrate(entries, record("op", "preferences", [
            {"operator": "hd-1", "service": "s", "settings": {"colour": "blue"}}]))
        self.assertEqual(entries["op"]["preferences"], [
            {"operator": "hd-1", "service": "s", "environment": "",
             "preferences": {"colour": "blue"}}])

    def test_properties_untouched(self) -> None:
        entries: dict = {}
        E.integrate(entries, record("op", "groups", ["g"]))
        self.assertEqual(entries["op"]["properties"], {"displayName": ""})

    def test_null_data_is_empty_section(self) -> None:
        entries: dict = {}
        E.integrate(entries, record("op", "groups", ["g"]))
        E.integrate(entries, record("op", "groups", None))
        self.assertEqual(entries["op"]["groups"], [])

    def test_malformed_records_are_refused_without_change(self) -> None:
        bad = [
            record("op", "properties", {"displayName": "x"}),
            record("op", ["channels"], []),
            record("op", "channels", {"type": "stdout"}),
            record("op", "channels", [{"settings": {}}]),
            record("op", "services", [{"name": "s", "methods": [{"permissions": []}]}]),
            record("op", "services", ["not a map"]),
            record("op", "services",
                   [{"name": "s", "permissions": [{"group": "g", "rights": "call"}]}]),
            record("op", "groups", ["ok", 1]),
            record("op", "settings", [{"service": "x"}]),
            record("op", "certificates", [{"fingerprint": "x"}]),
            record(None, "groups", []),
            {"record": "not a map"},
            {},
        ]
        for rec in bad:
            entries: dict = {"op": E.new_entry("op")}
            before = copy.deepcopy(entries)
            with self.assertRaises(E.EntryError, msg=repr(rec)):
                E.integrate(entries, rec)
            self.assertEqual(entries, before)

    @settings(deadline=None, max_examples=100)
    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.sampled_from(["type", "name", "settings", "group", "rights", "methods",
                             "permissions", "fingerprint", "key_usage", "x"]), inner,
            max_size=4),
        max_leaves=20),
        st.sampled_from(E.ENTRY_SECTIONS))
    def test_hostile_data_raises_only_entry_error(self, data, section) -> None:
        entries: dict = {}
        try:
            E.integrate(entries, record("op", section, data))
        except E.EntryError:
            self.assertEqual(entries, {})


class LookupTests(SynchronousTestCase):
    def test_channel_first_match_and_aliases(self) -> None:
        e = entry("op", channels=[
            {"type": "jsonrpc_server", "settings": {"n": 1}},
            {"type": "grpc_server", "settings": {"n": 2}},
            {"type": "eps_server", "settings": {"n": 3}},
            {"type": "eps_client", "settings": None}])
        self.assertEqual(E.channel(e, "jsonrpc_server")["settings"], {"n": 1})
        self.assertEqual(E.channel(e, "grpc_server")["settings"], {"n": 2})
        self.assertEqual(E.channel(e, "eps_server")["settings"], {"n": 2})
        self.assertEqual(E.channel(e, "grpc_client")["type"], "eps_client")
        self.assertIsNone(E.channel(e, "stdout"))
        self.assertIsNone(E.channel(E.new_entry("x"), "grpc_server"))

    def test_canonical_channel_type(self) -> None:
        self.assertEqual(E.canonical_channel_type("eps_server"), "grpc_server")
        self.assertEqual(E.canonical_channel_type("grpc_server"), "grpc_server")
        self.assertEqual(E.canonical_channel_type("eps_client"), "grpc_client")
        self.assertEqual(E.canonical_channel_type("stdout"), "stdout")

    def test_settings_for_wildcards_and_order(self) -> None:
        e = E.new_entry("op")
        e["settings"] = [
            {"operator": "hd-1", "service": "proxy", "environment": "", "settings": {"n": 1}},
            {"operator": "", "service": "proxy", "environment": "", "settings": {"n": 2}},
            {"operator": "", "service": "", "environment": "", "settings": {"n": 3}},
            {"operator": "hd-2", "service": "proxy", "environment": "", "settings": {"n": 4}},
        ]
        self.assertEqual(E.settings_for(e, "proxy", "hd-1")["settings"], {"n": 1})
        self.assertEqual(E.settings_for(e, "proxy", "hd-2")["settings"], {"n": 2})
        self.assertEqual(E.settings_for(e, "other", "hd-2")["settings"], {"n": 3})
        e["settings"] = e["settings"][:1]
        self.assertIsNone(E.settings_for(e, "proxy", "hd-2"))
        self.assertIsNone(E.settings_for(e, "other", "hd-1"))

    def test_service_for(self) -> None:
        e = entry("op", services=[service("a", [method("x")]),
                                  service("b", [method("y"), method("x")])])
        self.assertEqual(E.service_for(e, "x")["name"], "a")
        self.assertEqual(E.service_for(e, "y")["name"], "b")
        self.assertIsNone(E.service_for(e, "z"))
        self.assertIsNone(E.service_for(E.new_entry("none"), "x"))


class QueryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.entries = {
            "hd-1": entry("hd-1", groups=["hd"], channels=[{"type": "grpc_server",
                                                              "settings": {}}]),
            "hd-2": entry("hd-2", groups=["hd", "x"], channels=[{"type": "eps_client",
                                                                   "settings": None}]),
            "ls-1": entry("ls-1", groups=["ls"]),
        }

    def names(self, **kw) -> list[str]:
        return sorted(e["name"] for e in E.query(self.entries, **kw))

    def test_no_filter_matches_all(self) -> None:
        self.assertEqual(self.names(), ["hd-1", "hd-2", "ls-1"])
        self.assertEqual(self.names(group="", operator=""), ["hd-1", "hd-2", "ls-1"])

    def test_group_and_operator(self) -> None:
        self.assertEqual(self.names(group="hd"), ["hd-1", "hd-2"])
        self.assertEqual(self.names(group="hd", operator="hd-2"), ["hd-2"])
        self.assertEqual(self.names(group="ls", operator="hd-2"), [])
        self.assertEqual(self.names(operator="nobody"), [])

    def test_channels_with_aliases(self) -> None:
        self.assertEqual(self.names(channels=["grpc_server"]), ["hd-1"])
        self.assertEqual(self.names(channels=["eps_server"]), ["hd-1"])
        self.assertEqual(self.names(channels=["grpc_client"]), ["hd-2"])
        self.assertEqual(self.names(channels=["stdout", "eps_client", "eps_server"]),
                         ["hd-1", "hd-2"])

    def test_empty_channel_list_matches_nothing(self) -> None:
        # Reference quirk, kept: an explicit empty list is not "no filter".
        self.assertEqual(self.names(channels=[]), [])

    def test_accepts_a_list_of_entries(self) -> None:
        self.assertEqual(len(E.query(list(self.entries.values()), group="hd")), 2)


class CanCallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hd = entry("hd-1", groups=["health-departments"])
        self.ls = entry("ls-1", groups=["locations"])
        self.nobody = entry("x")

    def test_service_level_permission_covers_every_method(self) -> None:
        callee = entry("op", services=[service("s", [method("a"), method("b")],
                                               [perm("health-departments")])])
        self.assertTrue(E.can_call(self.hd, callee, "a"))
        self.assertTrue(E.can_call(self.hd, callee, "b"))
        self.assertFalse(E.can_call(self.ls, callee, "a"))

    def test_method_level_permission_adds(self) -> None:
        callee = entry("op", services=[service("s", [
            method("a", [perm("locations")]), method("b")], [perm("health-departments")])])
        self.assertTrue(E.can_call(self.ls, callee, "a"))
        self.assertFalse(E.can_call(self.ls, callee, "b"))
        self.assertTrue(E.can_call(self.hd, callee, "a"))

    def test_star_is_anyone(self) -> None:
        callee = entry("op", services=[service("s", [method("a", [perm("*")]), method("b")])])
        self.assertTrue(E.can_call(self.nobody, callee, "a"))
        self.assertFalse(E.can_call(self.nobody, callee, "b"))

    def test_right_must_be_call(self) -> None:
        callee = entry("op", services=[service("s", [method("a")],
                                               [perm("health-departments", ["read"]),
                                                perm("*", [])])])
        self.assertFalse(E.can_call(self.hd, callee, "a"))

    def test_no_service_or_unknown_method(self) -> None:
        self.assertFalse(E.can_call(self.hd, E.new_entry("op"), "a"))
        callee = entry("op", services=[service("s", [method("a")], [perm("*")])])
        self.assertFalse(E.can_call(self.hd, callee, "zzz"))
        self.assertFalse(E.can_call(self.hd, callee, ""))

    def test_first_service_with_the_method_decides(self) -> None:
        callee = entry("op", services=[
            service("first", [method("a")], [perm("locations")]),
            service("second", [method("a")], [perm("health-departments")])])
        self.assertFalse(E.can_call(self.hd, callee, "a"))
        self.assertTrue(E.can_call(self.ls, callee, "a"))

    def test_does_not_modify_entries(self) -> None:
        callee = entry("op", services=[service("s", [method("a", [perm("*")])])])
        before = copy.deepcopy((self.hd, callee))
        E.can_call(self.hd, callee, "a")
        self.assertEqual((self.hd, callee), before)


class PeerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hd1 = entry("hd-1", groups=["hd"], services=[
            service("s", [method("a", [perm("ls")])], [perm("hd")])])
        self.hd2 = entry("hd-2", groups=["hd"])
        self.ls1 = entry("ls-1", groups=["ls"])
        self.open = entry("open", groups=["nobody"],
                          services=[service("s", [method("a")], [perm("*")])])
        self.other = entry("other", groups=["z"],
                           services=[service("s", [method("a")], [perm("hd")])])
        self.all = [self.hd1, self.hd2, self.ls1, self.open, self.other]

    def test_peer_groups(self) -> None:
        self.assertEqual(E.peer_groups(self.hd1), {"hd", "ls"})
        self.assertEqual(E.peer_groups(self.open), {"*"})
        self.assertEqual(E.peer_groups(self.hd2), set())

    def names(self, base, incoming_only) -> list[str]:
        return sorted(e["name"] for e in E.peers(base, self.all, incoming_only))

    def test_peers_both_directions(self) -> None:
        # hd-1 may call "other" (hd in other's groups); hd-2 and ls-1 may call hd-1.
        self.assertEqual(self.names(self.hd1, False), ["hd-2", "ls-1", "other"])
        self.assertEqual(self.names(self.hd1, True), ["hd-2", "ls-1"])

    def test_star_makes_no_peer(self) -> None:
        # Reference quirk: "*" is compared literally.
        self.assertEqual(self.names(self.open, False), [])
        self.assertEqual(self.names(self.ls1, False), ["hd-1"])

    def test_each_peer_once_and_not_self(self) -> None:
        both = entry("both", groups=["hd"], services=[service("s", [method("a")],
                                                              [perm("hd")])])
        result = E.peers(both, [both, self.hd1, self.hd2], False)
        self.assertEqual(sorted(e["name"] for e in result), ["hd-1", "hd-2"])

    def test_accepts_mapping(self) -> None:
        mapping = {e["name"]: e for e in self.all}
        self.assertEqual(sorted(e["name"] for e in E.peers(self.hd1, mapping, True)),
                         ["hd-2", "ls-1"])
