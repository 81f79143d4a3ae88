"""
Tests for epsproxy.rules.settings: finding, parsing, variables, merging, validation and the
one-line error messages, including hostile files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings as hsettings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.rules import forms
from epsproxy.rules.forms import Map, Optional, Required
from epsproxy.rules.settings import (
    MAX_FILE_SIZE,
    SettingsError,
    load_settings,
    settings_paths,
)

ANY = forms.AnyMap()

TLS = Map(
    {
        "ca_certificate_files": Required(forms.StringList()),
        "certificate_file": Optional(forms.String()),
        "verify_client": Optional(forms.Boolean(), default=True),
    },
    strict=True,
)
SCHEMA = Map(
    {
        "name": Required(forms.String()),
        "port": Optional(forms.Integer(min=0, max=65535)),
        "tls": Optional(TLS),
        "channels": Optional(
            forms.List(
                Map(
                    {"name": Required(forms.String()), "type": Required(forms.String())},
                    strict=True,
                )
            )
        ),
    },
    strict=True,
)


class _Folders:
    """Helpers: a fresh temporary folder per test, files written from text or bytes."""

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="epsproxy-test-settings-"))
        self.addCleanup(shutil.rmtree, self.base, ignore_errors=True)

    def folder(self, name: str, files: dict[str, str | bytes]) -> Path:
        return self._write(self.base / name, files)

    def _write(self, path: Path, files: dict[str, str | bytes]) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for filename, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            (path / filename).write_bytes(data)
        return path

    def load(self, files: dict[str, str | bytes], schema: forms.Schema = ANY, **kw: Any) -> Any:
        self.role = Path(tempfile.mkdtemp(dir=self.base)) / "role"
        return load_settings([self._write(self.role, files)], schema, **kw)

    def error(self, files: dict[str, str | bytes], schema: forms.Schema = ANY, **kw: Any) -> str:
        e = self.assertRaises(SettingsError, self.load, files, schema, **kw)
        text = str(e)
        self.assertNotIn("\n", text)
        return text


class SettingsPathsTests(SynchronousTestCase):
    def test_option_wins(self) -> None:
        paths = settings_paths("/a:/b", "EPS_SETTINGS", {"EPS_SETTINGS": "/c"})
        self.assertEqual(paths, [Path("/a"), Path("/b")])

    def test_environment_variable(self) -> None:
        paths = settings_paths(None, "SD_SETTINGS", {"SD_SETTINGS": "::/x/../y::rel:"})
        self.assertEqual(paths, [Path("/y"), Path(os.getcwd()) / "rel"])
        for path in paths:
            self.assertTrue(path.is_absolute())

    def test_neither(self) -> None:
        e = self.assertRaises(SettingsError, settings_paths, None, "PROXY_SETTINGS", {})
        self.assertIn("--settings", str(e))
        self.assertIn("PROXY_SETTINGS", str(e))

    def test_only_separators(self) -> None:
        self.assertRaises(SettingsError, settings_paths, ":::", "EPS_SETTINGS", {})
        self.assertRaises(SettingsError, settings_paths, None, "EPS_SETTINGS", {"EPS_SETTINGS": ""})


class FindingTests(_Folders, SynchronousTestCase):
    def test_name_order_and_suffixes(self) -> None:
        role = self.folder(
            "role",
            {
                "20_b.yaml": "order: [b]\n",
                "10_a.yml": "order: [a]\n",
                "30_c.json": '{"order": ["c"]}',
                "40_d.txt": "order: [txt]\n",
                "50_e.yml.bak": "order: [bak]\n",
                ".hidden.yml": "order: [hidden]\n",
            },
        )
        self.folder("role/sub", {"00.yml": "order: [sub]\n"})
        self.assertEqual(load_settings([role], ANY)["order"], ["a", "b", "c"])

    def test_single_file(self) -> None:
        role = self.folder("role", {"one.yml": "name: x\n", "two.yml": "name: y\n"})
        self.assertEqual(load_settings([role / "one.yml"], ANY), {"name": "x"})

    def test_empty_folder(self) -> None:
        role = self.folder("role", {"readme.txt": "nothing"})
        e = self.assertRaises(SettingsError, load_settings, [role], ANY)
        self.assertIn(str(role), str(e))
        self.assertIn("no settings files", str(e))

    def test_missing_path(self) -> None:
        missing = self.base / "nope"
        e = self.assertRaises(SettingsError, load_settings, [missing], ANY)
        self.assertEqual(str(e), f"{missing}: no such file or folder")

    def test_no_paths(self) -> None:
        self.assertRaises(SettingsError, load_settings, [], ANY)

    def test_relative_display(self) -> None:
        role = self.folder("role", {"a.yml": "name: 1\n"})
        cwd = os.getcwd()
        os.chdir(self.base)
        self.addCleanup(os.chdir, cwd)
        e = self.assertRaises(SettingsError, load_settings, ["role"], SCHEMA)
        self.assertEqual(
            str(e), f"{os.path.join('role', 'a.yml')}: name: expected a string, got number"
        )
        self.assertTrue(role.is_dir())
        self.folder("base", {"a.yml": "port: 1\n"})
        e = self.assertRaises(SettingsError, load_settings, ["base", self.base / "role"], SCHEMA)
        self.assertEqual(
            str(e), f"{os.path.join('role', 'a.yml')}: name: expected a string, got number"
        )
        e = self.assertRaises(SettingsError, load_settings, ["base", "role/../base"], SCHEMA)
        self.assertEqual(str(e), "base:base: name: is required")

    def test_single_path_not_iterated(self) -> None:
        role = self.folder("role", {"a.yml": "name: x\n"})
        self.assertEqual(load_settings(str(role), ANY), {"name": "x"})
        self.assertEqual(load_settings(role, ANY), {"name": "x"})


class MergeTests(_Folders, SynchronousTestCase):
    def test_two_folders(self) -> None:
        first = self.folder(
            "base",
            {
                "1.yml": "name: base\nport: 1\nlist: [1]\nmap: {a: 1, b: {c: 1}}\nkeep: 1\n",
                "2.yml": "port: 2\nlist: [2]\n",
            },
        )
        second = self.folder(
            "role",
            {"1.yml": "name: role\nlist: [3]\nmap: {b: {d: 2}, e: 3}\nkeep: null\nnew: null\n"},
        )
        self.assertEqual(
            load_settings([first, second], ANY),
            {
                "name": "role",
                "port": 2,
                "list": [1, 2, 3],
                "map": {"a": 1, "b": {"c": 1, "d": 2}, "e": 3},
                "keep": 1,
                "new": None,
            },
        )

    def test_replace_key(self) -> None:
        result = self.load(
            {
                "1.yml": "channels: [a, b]\nmap: {x: 1}\nlast: {y: 1}\n",
                "2.yml": "channels!: [c]\nmap!: {z: 2}\nlast!: null\nfresh!: {inner!: 1}\n",
            }
        )
        self.assertEqual(
            result, {"channels": ["c"], "map": {"z": 2}, "last": None, "fresh": {"inner": 1}}
        )

    def test_replace_and_merge_same_key(self) -> None:
        text = self.error({"1.yml": "a: [1]\na!: [2]\n"})
        self.assertIn("1.yml: a!: both 'a' and 'a!' are given", text)

    def test_type_change_replaces(self) -> None:
        result = self.load({"1.yml": "a: {x: 1}\nb: [1]\n", "2.yml": "a: [1]\nb: 2\n"})
        self.assertEqual(result, {"a": [1], "b": 2})


class VariableTests(_Folders, SynchronousTestCase):
    def test_env_types(self) -> None:
        files = {"1.yml": """
vars:
  s: {source: env, variable: S}
  i: {source: env, variable: I, type: int}
  f: {source: env, variable: F, type: float}
  b: {source: env, variable: B, type: bool}
  a: {source: env, variable: A, type: any}
values: [$s, $i, $f, $b, $a]
text: "$s $i $f $b $a"
"""}
        environ = {"S": "str", "I": "-42", "F": "0.1", "B": "Yes", "A": "7"}
        result = self.load(files, environ=environ)
        self.assertEqual(result["values"], ["str", -42, 0.1, True, "7"])
        self.assertEqual(result["text"], "str -42 0.1 true 7")
        self.assertNotIn("vars", result)

    def test_default(self) -> None:
        files = {
            "1.yml": "vars:\n  p: {source: env, variable: P, type: int, default: 5555}\n"
            "  d: {source: env, variable: D, default: '$DIR/x'}\nport: $p\nd: $d\n"
        }
        result = self.load(files, environ={})
        self.assertEqual(result["port"], 5555)
        self.assertEqual(result["d"], str(self.role / "x"))
        self.assertEqual(self.load(files, environ={"P": "1"})["port"], 1)

    def test_env_missing(self) -> None:
        text = self.error({"1.yml": "vars:\n  p: {source: env, variable: HD1_PORT}\n"}, environ={})
        self.assertIn("1.yml: vars.p: the environment variable HD1_PORT is not set", text)

    def test_bad_int_does_not_echo_value(self) -> None:
        text = self.error(
            {"1.yml": "vars:\n  p: {source: env, variable: P, type: int}\n"},
            environ={"P": "secret-abc"},
        )
        self.assertIn("1.yml: vars.p: the environment variable P is not an integer", text)
        self.assertNotIn("secret-abc", text)

    def test_bad_conversions(self) -> None:
        cases = [
            ("{source: env, variable: X, type: float}", "nan", "is not a finite number"),
            ("{source: env, variable: X, type: int}", "4_2", "is not an integer"),
            ("{source: env, variable: X, type: bool}", "maybe", "is not a boolean"),
            (
                "{source: literal, value: no, type: string}",
                "",
                "vars.v.value: the value is not a string",
            ),
            ("{source: literal, value: true, type: int}", "", "is not an integer"),
            ("{source: literal, value: 1.5, type: int}", "", "is not an integer"),
            ("{source: literal, value: '1' , type: float}", "", None),
        ]
        for spec, env, message in cases:
            files = {"1.yml": f"vars:\n  v: {spec}\n"}
            if message is None:
                self.load(files, environ={"X": env})
            else:
                self.assertIn(message, self.error(files, environ={"X": env}))

    def test_literal(self) -> None:
        files = {
            "1.yml": "vars:\n  l: {source: literal, value: [1, {a: 2}]}\n"
            "  n: {source: literal, value: 3, type: int}\n"
            "  p: {source: literal, value: '$DIR/c', type: string}\n"
            "a: $l\nb: $l\nn: $n\np: $p\n"
        }
        result = self.load(files)
        self.assertEqual(result["a"], [1, {"a": 2}])
        self.assertIsNot(result["a"], result["b"])
        self.assertEqual(result["n"], 3)
        self.assertEqual(result["p"], str(self.role / "c"))

    def test_bad_declarations(self) -> None:
        cases = [
            ("vars: [a]\n", "vars: expected a mapping of variables, got a list"),
            ("vars:\n  x: 1\n", "vars.x: expected a mapping with 'source'"),
            ("vars:\n  x: {source: prompt}\n", "vars.x.source: 'source' must be env or literal"),
            ("vars:\n  x: {source: [env]}\n", "vars.x.source: 'source' must be env or literal"),
            ("vars:\n  x: {source: env}\n", "vars.x.variable: an env variable needs 'variable'"),
            ("vars:\n  x: {source: literal}\n", "vars.x.value: a literal variable needs 'value'"),
            (
                "vars:\n  x: {source: literal, value: 1, variable: Y}\n",
                "vars.x.variable: unknown key",
            ),
            (
                "vars:\n  x: {source: literal, value: 1, type: list}\n",
                "vars.x.type: 'type' must be",
            ),
            ("vars:\n  DIR: {source: literal, value: 1}\n", "vars.DIR: $DIR is predefined"),
            ("vars:\n  1x: {source: literal, value: 1}\n", "vars.1x: a variable name"),
        ]
        for text, message in cases:
            self.assertIn(f"1.yml: {message}", self.error({"1.yml": text}))

    def test_variables_are_per_file(self) -> None:
        text = self.error(
            {"1.yml": "vars:\n  x: {source: literal, value: 1}\na: $x\n", "2.yml": "b: [$x]\n"}
        )
        self.assertIn("2.yml: b[0]: undefined variable $x", text)


class SubstitutionTests(_Folders, SynchronousTestCase):
    VARS = (
        "vars:\n  host: {source: literal, value: example}\n  port: {source: literal, value: 80}\n"
    )

    def test_text_and_escapes(self) -> None:
        files = {
            "1.yml": self.VARS + "url: 'http://$host:$port/$$host'\nprice: '$$5 $ $$$host'\n"
            "deep: [{a: '$host'}]\n'$host': key\nrelative: '$DIR/x'\n"
            "ref: /$DIR/../certs/root.crt\npath: $PATH\nslashes: '//$host'\n"
            "underscore: '$host_name'\n"
        }
        with self.assertRaises(SettingsError) as cm:
            self.load(files)
        self.assertIn("underscore: undefined variable $host_name", str(cm.exception))
        del_underscore = {"1.yml": files["1.yml"].replace("underscore: '$host_name'\n", "")}
        result = self.load(del_underscore)
        role = self.role
        self.assertEqual(result["url"], "http://example:80/$host")
        self.assertEqual(result["price"], "$5 $ $example")
        self.assertEqual(result["deep"], [{"a": "example"}])
        self.assertEqual(result["$host"], "key")
        self.assertEqual(result["relative"], f"{role}/x")
        self.assertEqual(result["ref"], f"{role}/../certs/root.crt")
        self.assertEqual(result["path"], str(role / "1.yml"))
        self.assertEqual(result["slashes"], "//example")

    def test_exact_keeps_type(self) -> None:
        result = self.load({"1.yml": self.VARS + "port: $port\ntext: '$port '\n"})
        self.assertEqual(result, {"port": 80, "text": "80 "})

    def test_undefined(self) -> None:
        text = self.error({"1.yml": "tls:\n  files: [ok, '$NOPE/x']\n"})
        self.assertIn("1.yml: tls.files[1]: undefined variable $NOPE", text)

    def test_structured_value_inside_text(self) -> None:
        text = self.error({"1.yml": "vars:\n  l: {source: literal, value: [1]}\na: 'x$l'\n"})
        self.assertIn("1.yml: a: $l holds a list; use it as a whole value", text)

    @hsettings(deadline=None, max_examples=50)
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
    def test_escaped_text_round_trips(self, text: str) -> None:
        escaped = text.replace("$", "$$")
        role = self.folder("prop", {"1.json": json.dumps({"v": escaped})})
        self.assertEqual(load_settings([role], ANY), {"v": text})


class ValidationTests(_Folders, SynchronousTestCase):
    def test_valid(self) -> None:
        result = self.load(
            {
                "1.yml": "name: hd-1\ntls:\n  ca_certificate_files: [/$DIR/root.crt]\n",
                "2.yml": "channels:\n  - {name: a, type: stdout}\nport: 5555\n",
            },
            SCHEMA,
        )
        self.assertEqual(
            result,
            {
                "name": "hd-1",
                "port": 5555,
                "tls": {
                    "ca_certificate_files": [str(self.role / "root.crt")],
                    "verify_client": True,
                },
                "channels": [{"name": "a", "type": "stdout"}],
            },
        )

    def test_unknown_key(self) -> None:
        text = self.error(
            {
                "1.yml": "name: x\n",
                "2.yml": "tls:\n  ca_certificate_files: []\n  validate_client: false\n",
            },
            SCHEMA,
        )
        self.assertIn("2.yml: tls.validate_client: unknown key (known keys: ", text)

    def test_missing_key_names_parent_file(self) -> None:
        text = self.error(
            {"1.yml": "name: x\n", "2.yml": "tls:\n  certificate_file: c.crt\n"}, SCHEMA
        )
        self.assertIn("2.yml: tls.ca_certificate_files: is required", text)

    def test_missing_key_at_top_names_folders(self) -> None:
        first = self.folder("base", {"1.yml": "port: 1\n"})
        second = self.folder("role", {"1.yml": "port: 2\n"})
        e = self.assertRaises(SettingsError, load_settings, [first, second], SCHEMA)
        self.assertEqual(str(e), f"{first}:{second}: name: is required")
        e = self.assertRaises(SettingsError, load_settings, [second], SCHEMA)
        self.assertEqual(str(e), f"{second / '1.yml'}: name: is required")

    def test_wrong_type_names_last_file(self) -> None:
        text = self.error({"1.yml": "name: x\nport: 1\n", "2.yml": "port: '1'\n"}, SCHEMA)
        self.assertIn("2.yml: port: expected an integer, got string", text)

    def test_list_element_names_its_file(self) -> None:
        text = self.error(
            {
                "1.yml": "name: x\nchannels: [{name: a, type: t}]\n",
                "2.yml": "channels: [{name: b}]\n",
            },
            SCHEMA,
        )
        self.assertIn("2.yml: channels[1].type: is required", text)

    def test_yaml_11_no(self) -> None:
        text = self.error({"1.yml": "name: no\n"}, SCHEMA)
        self.assertIn("1.yml: name: expected a string, got boolean", text)

    def test_sexagesimal_and_dates(self) -> None:
        self.assertIn(
            "1.yml: name: expected a string, got number",
            self.error({"1.yml": "name: 1:30\n"}, SCHEMA),
        )
        self.assertEqual(self.load({"1.yml": "name: 2022-05-01\n"}, SCHEMA), {"name": "2022-05-01"})


class ParsingTests(_Folders, SynchronousTestCase):
    def test_invalid_yaml(self) -> None:
        text = self.error({"1.yml": "name: x\ntls: [a\n  b: c\n"})
        self.assertRegex(text, r"1\.yml:\d+:\d+: invalid YAML: ")

    def test_invalid_json(self) -> None:
        text = self.error({"1.json": '{"a": 1,\n "b": }'})
        self.assertRegex(text, r"1\.json:2:7: invalid JSON: Expecting value$")

    def test_json_duplicates_and_constants(self) -> None:
        self.assertIn("duplicate key 'a'", self.error({"1.json": '{"a": 1, "a": 2}'}))
        self.assertIn("NaN is not allowed", self.error({"1.json": '{"a": NaN}'}))

    def test_top_level(self) -> None:
        self.assertIn(
            "1.yml: the top level must be a mapping, not a list", self.error({"1.yml": "- a\n"})
        )
        self.assertIn("not a string", self.error({"1.json": '"text"'}))
        self.assertIn("invalid YAML", self.error({"1.yml": "a: 1\n---\nb: 2\n"}))

    def test_empty_file(self) -> None:
        self.assertEqual(self.load({"1.yml": "# nothing yet\n", "2.yml": "a: 1\n"}), {"a": 1})

    def test_non_string_keys(self) -> None:
        text = self.error({"1.yml": "tls:\n  on: 1\n"})
        self.assertIn("1.yml: tls: key True is not a string", text)
        self.assertIn("quote the key", text)
        self.assertIn(
            "1.yml: channels[0]: key 3 is not a string",
            self.error({"1.yml": "channels: [{3: x}]\n"}),
        )
        self.assertIn("invalid YAML", self.error({"1.yml": "? [a, b]\n: c\n"}))

    def test_unsupported_values(self) -> None:
        self.assertIn("a: values of type bytes", self.error({"1.yml": "a: !!binary aGVsbG8=\n"}))
        self.assertIn("a: values of type set", self.error({"1.yml": "a: !!set {x}\n"}))
        self.assertIn("invalid YAML", self.error({"1.yml": "a: !!python/object:os.system {}\n"}))
        self.assertIn("invalid YAML", self.error({"1.yml": "a: !!int nope\n"}))


class HostileTests(_Folders, SynchronousTestCase):
    def test_alias_bomb(self) -> None:
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        for i in range(1, 6):  # 9**5 strings once expanded
            refs = ",".join([f"*{chr(96 + i)}"] * 9)
            lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [{refs}]")
        started = time.monotonic()
        text = self.error({"1.yml": "\n".join(lines) + "\n"})
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("1.yml:2:", text)
        self.assertIn("aliases (*name) are not allowed", text)
        self.assertIn("aliases", self.error({"1.yml": "base: &b {x: 1}\nother: {<<: *b}\n"}))

    def test_anchor_without_alias(self) -> None:
        self.assertEqual(self.load({"1.yml": "a: &x 1\n"}), {"a": 1})

    def test_size_cap(self) -> None:
        body = "a: '" + "x" * MAX_FILE_SIZE + "'\n"
        self.assertIn(f"1.yml: larger than {MAX_FILE_SIZE} bytes", self.error({"1.yml": body}))
        self.assertEqual(self.load({"1.yml": "a: '" + "x" * 1000 + "'\n"})["a"], "x" * 1000)

    def test_garbage(self) -> None:
        self.assertIn(
            "1.yml: not UTF-8 text (invalid byte at offset 2)",
            self.error({"1.yml": b"a:\xff\xfe\x00\x80garbage"}),
        )
        text = self.error({"1.yml": b"a: 1\nb: x\x00y\n"})
        self.assertIn("1.yml:2:5: invalid YAML: unacceptable character #x0000", text)
        self.assertIn("not UTF-8", self.error({"1.json": b"\x89PNG\r\n\x1a\n"}))

    def test_deep_nesting(self) -> None:
        for files in (
            {"1.yml": "a: " + "[" * 100_000 + "]" * 100_000 + "\n"},
            {"1.yml": "a:\n" + "".join("  " * i + "- \n" for i in range(1, 200))},
            {"1.json": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"},
            {"1.json": '{"a": ' + "[" * 100 + "]" * 100 + "}"},
        ):
            self.assertIn("nested", self.error(files))

    def test_huge_integer(self) -> None:
        self.assertIn("1.yml: invalid YAML", self.error({"1.yml": "a: " + "9" * 10_000 + "\n"}))
        self.assertIn("1.json: invalid JSON", self.error({"1.json": '{"a": ' + "9" * 10_000 + "}"}))

    @hsettings(deadline=None, max_examples=150)
    @given(data=st.binary(max_size=200), suffix=st.sampled_from(["yml", "json"]))
    def test_arbitrary_bytes(self, data: bytes, suffix: str) -> None:
        role = self.folder(f"prop-{suffix}", {f"1.{suffix}": data})
        try:
            load_settings([role], SCHEMA, environ={})
        except SettingsError as e:
            self.assertNotIn("\n", str(e))
            self.assertIn("1.", str(e))

    @hsettings(deadline=None, max_examples=150)
    @given(text=st.text(alphabet="ab:-[]{}&*!$ \n'\"#?|>,.0n", max_size=80))
    def test_arbitrary_yaml_like_text(self, text: str) -> None:
        role = self.folder("prop-text", {"1.yml": text})
        try:
            load_settings([role], SCHEMA, environ={})
        except SettingsError as e:
            self.assertNotIn("\n", str(e))

    @hsettings(deadline=None, max_examples=150)
    @given(
        spec=st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["source", "type", "value", "variable", "default", "x"]), inner
            ),
            max_leaves=8,
        ),
        use=st.sampled_from(["$v", "x$v", "$$v"]),
    )
    def test_arbitrary_variable_declarations(self, spec: Any, use: str) -> None:
        data = json.dumps({"vars": {"v": spec}, "name": use}).encode()
        role = self.folder("prop-vars", {"1.json": data})
        try:
            load_settings([role], SCHEMA, environ={"1": "2"})
        except SettingsError as e:
            self.assertNotIn("\n", str(e))


class NamedElementTests(_Folders, SynchronousTestCase):
    """A list element is named by its name in messages, and still traced to its file."""

    CHANNELS = Map({"channels": Required(forms.List(
        Map({"name": Required(forms.String()), "port": Required(forms.Integer(min=1))},
            strict=True),
        name_key="name",
    ))}, strict=True)

    def test_error_names_the_element_and_its_file(self) -> None:
        text = self.error({
            "1.yml": "channels:\n  - {name: peers, port: 1}\n",
            "2.yml": "channels:\n  - {name: gateway, port: 0}\n",
        }, self.CHANNELS)
        self.assertEqual(text, f"{self.role / '2.yml'}: channels[gateway].port: must be at least 1")

    def test_unusable_names_fall_back_to_the_index(self) -> None:
        for name in ("", "a b", "x" * 80, "[0]", "1", "null"):
            with self.subTest(name=name):
                text = self.error(
                    {"1.yml": json.dumps({"channels": [{"name": name, "port": 0}]})},
                    self.CHANNELS)
                expected = "channels[null].port" if name == "null" else "channels[0].port"
                self.assertIn(expected, text)
        text = self.error({"1.yml": "channels:\n  - {name: [x], port: 1}\n"}, self.CHANNELS)
        self.assertIn("channels[0].name: expected a string", text)

    def test_index_is_its_number(self) -> None:
        index = forms.Index(2, "gateway")
        self.assertEqual(index, 2)
        self.assertEqual({2: "x"}[index], "x")
        self.assertEqual(forms.format_path(("channels", index, "tls")), "channels[gateway].tls")
