"""
Load a role's settings: find the files, parse, substitute variables, merge, validate.

A role (one ``sd``, ``eps`` or ``proxy`` process) is configured by the ``*.yml``,
``*.yaml`` and ``*.json`` files of one or more folders, named by ``--settings
DIR[:DIR...]`` or by the program's environment variable (``SD_SETTINGS``,
``EPS_SETTINGS``, ``PROXY_SETTINGS``).  The files are merged in order (SPEC §17):

- mappings merge recursively, lists are concatenated, other values are replaced;
- a ``null`` in a later file does not overwrite; a key ending in ``!`` (``channels!``)
  replaces the value of the key without ``!`` instead of merging into it.

Each file may declare ``vars`` (removed from the result)::

    vars:
      port: {source: env, variable: HD1_PORT, type: int, default: 5555}
      name: {source: literal, value: hd-1}

(a literal ``value`` or an env ``default`` may itself use ``$DIR`` and ``$PATH``)
and use them in string values: a value that is exactly ``$port`` becomes the typed value,
otherwise ``$name`` is replaced by its text and ``$$`` is a literal ``$``.  ``$DIR`` (the
absolute folder of the file) and ``$PATH`` (the file) are always defined; the reference
wrote ``/$DIR/...`` because its ``DIR`` lacked the leading slash, and that spelling still
works.  Substitution happens after parsing and on strings only, so YAML syntax can never
be injected through a variable.

Where the reference ignored unknown keys and died with a traceback on bad input
(SPEC §23.33/34), every problem here is a :class:`SettingsError` whose text is one line
naming the file and the key path: unknown key, missing key, wrong type (``no`` where a
string is expected is YAML 1.1's ``false``), invalid YAML or JSON, undefined variable.
Hostile files are bounded: 1 MiB per file, 64 levels of nesting, and no YAML aliases
(which is also how "billion laughs" expansion bombs are refused).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from twisted.logger import Logger

from epsproxy.rules import forms

__all__ = ["SettingsError", "settings_paths", "load_settings", "MAX_FILE_SIZE", "MAX_DEPTH"]

log = Logger()

MAX_FILE_SIZE = 1024 * 1024
MAX_DEPTH = 64
SETTINGS_SUFFIXES = (".yml", ".yaml", ".json")
CONTEXT_VARIABLES = ("DIR", "PATH")

_NAME = r"[a-zA-Z][a-zA-Z0-9_]*"
_EXACT_VARIABLE = re.compile(rf"\$({_NAME})")
_TOKEN = re.compile(rf"\$\$|\$({_NAME})")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_VARIABLE_TYPES = ("string", "int", "float", "bool", "any")
_SCALARS = (str, bool, int, float, type(None))

KeyPath = tuple[str | int, ...]


class SettingsError(Exception):
    """
    The settings cannot be used.  ``str()`` is one line: ``<file>[:line:col]: <key
    path>: <message>``.  A ``file`` given as a path is shown relative to the working
    folder when that is shorter; a ``str`` is shown as it is.
    """

    def __init__(
        self,
        message: str,
        *,
        file: os.PathLike[str] | str | None = None,
        path: Sequence[str | int] | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = " ".join(message.split())
        self.file = _display(file) if isinstance(file, os.PathLike) else file
        self.path = tuple(path) if path is not None else None
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}:{self.column}"
            parts.append(where)
        if self.path is not None:
            parts.append(forms.format_path(self.path))
        parts.append(self.message)
        return ": ".join(parts)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _display(path: str | os.PathLike[str]) -> str:
    """A path as the user would like to read it: relative to the cwd when inside it."""
    text = os.fspath(path)
    try:
        relative = os.path.relpath(text)
        # From "/" (a service's usual working folder) a relative path reads as a typo.
        at_root = os.path.dirname(os.getcwd()) == os.getcwd()
    except (OSError, ValueError):
        return text
    inside = not relative.startswith(os.pardir) and not at_root
    return relative if inside and len(relative) < len(text) else text


def settings_paths(
    option: str | None, env_var: str, environ: Mapping[str, str] = os.environ
) -> list[Path]:
    """
    The settings folders/files named by ``--settings`` (``option``; wins when not empty)
    or else by the environment variable ``env_var``: colon-separated, empty elements
    skipped, each made absolute.
    """
    text = option if option else environ.get(env_var, "")
    paths = [Path(os.path.abspath(element)) for element in text.split(":") if element]
    if not paths:
        raise SettingsError(f"no settings given: pass --settings DIR[:DIR...] or set {env_var}")
    return paths


def load_settings(
    paths: Iterable[str | os.PathLike[str]],
    schema: forms.Map,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """
    Read, substitute, merge and validate the settings found at ``paths`` (folders or
    single files) and return the normalised result of ``schema``.

    A folder contributes its ``*.yml``, ``*.yaml`` and ``*.json`` files in name order
    (not recursively; hidden files such as editor leftovers are skipped).  An empty
    file counts as an empty mapping.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    roots = [Path(os.path.abspath(os.fspath(p))) for p in paths]
    if not roots:
        raise SettingsError("no settings folders or files given")
    files = [f for root in roots for f in _settings_files(root)]
    merged: Any = {}
    origin = _Origin(None)
    for file in files:
        tree = _read_file(file)
        variables = _variables(tree.pop("vars", None), file, environ)
        tree = _substitute(tree, variables, file, ())
        merged, origin = _merge(merged, origin, tree, file, ())
        log.debug("read settings file {file}", file=str(file))
    try:
        return schema.validate(merged, ())
    except forms.FormError as e:
        source = origin.find(e.path)
        where: Path | str | None = source
        if source is None:
            where = files[0] if len(files) == 1 else ":".join(_display(r) for r in roots)
        raise SettingsError(e.message, file=where, path=e.path) from None


# --- finding and parsing files ------------------------------------------------------


def _settings_files(root: Path) -> list[Path]:
    """The files of one settings path: a folder's settings files in name order, or itself."""
    if root.is_dir():
        try:
            names = sorted(os.listdir(root))
        except OSError as e:
            raise SettingsError(f"cannot list folder: {e.strerror}", file=root) from None
        files = [
            root / name
            for name in names
            if name.endswith(SETTINGS_SUFFIXES)
            and not name.startswith(".")
            and (root / name).is_file()
        ]
        if not files:
            raise SettingsError(
                "no settings files (*.yml, *.yaml, *.json) in this folder", file=root
            )
        return files
    if not root.exists():
        raise SettingsError("no such file or folder", file=root)
    if not root.is_file():
        raise SettingsError("not a regular file or folder", file=root)
    return [root]


def _read_file(file: Path) -> dict[str, Any]:
    """Parse one settings file into a checked mapping (string keys, JSON-like values)."""
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise SettingsError(f"cannot read: {e.strerror}", file=file) from None
    if len(data) > MAX_FILE_SIZE:
        raise SettingsError(f"larger than {MAX_FILE_SIZE} bytes", file=file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SettingsError(
            f"not UTF-8 text (invalid byte at offset {e.start})", file=file
        ) from None
    if file.suffix == ".json":
        tree = _parse_json(text, file)
    else:
        tree = _parse_yaml(text, file)
    if tree is None:  # an empty file, or one holding only comments
        tree = {}
    if not isinstance(tree, dict):
        raise SettingsError(f"the top level must be a mapping, not {_type_name(tree)}", file=file)
    _check_tree(tree, file, ())
    return tree


class _SettingsLoader(yaml.SafeLoader):
    """
    ``SafeLoader`` without aliases (expansion bombs), with bounded nesting and without
    implicit timestamps (``2022-05-01`` stays the string it looks like).
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed", self.peek_event().start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _parse_yaml(text: str, file: Path) -> Any:
    loader = None
    try:
        loader = _SettingsLoader(text)  # checks for unprintable characters
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise SettingsError(
            f"invalid YAML: {problem}", file=file, line=line, column=column
        ) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise SettingsError(
            f"invalid YAML: unacceptable character #x{e.character:04x}",
            file=file,
            line=line,
            column=column,
        ) from None
    except (yaml.YAMLError, ValueError, TypeError, ArithmeticError, RecursionError) as e:
        # e.g. "!!int abc", an over-long integer, an impossible "!!timestamp"
        raise SettingsError(f"invalid YAML: {e}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(text: str, file: Path) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise SettingsError(
            f"invalid JSON: {e.msg}", file=file, line=e.lineno, column=e.colno
        ) from None
    except RecursionError:
        raise SettingsError("invalid JSON: nested too deeply", file=file) from None
    except ValueError as e:  # duplicate key, NaN, an over-long integer
        raise SettingsError(f"invalid JSON: {e}", file=file) from None


def _check_tree(value: Any, file: Path, path: KeyPath) -> None:
    """Refuse non-string keys, values JSON cannot hold, and too deep nesting."""
    if len(path) > MAX_DEPTH:
        raise SettingsError(f"nested deeper than {MAX_DEPTH} levels", file=file, path=path)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                hint = ""
                if isinstance(key, bool):
                    hint = " (YAML reads yes/no/on/off/true/false as booleans: quote the key)"
                raise SettingsError(f"key {key!r} is not a string{hint}", file=file, path=path)
            _check_tree(item, file, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_tree(item, file, (*path, index))
    elif not isinstance(value, _SCALARS):
        raise SettingsError(
            f"values of type {type(value).__name__} are not supported "
            "(only strings, numbers, booleans, null, lists and mappings)",
            file=file,
            path=path,
        )


# --- variables and substitution -----------------------------------------------------


def _variables(declared: Any, file: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """The variables a file may use: its own ``vars`` plus ``DIR`` and ``PATH``."""
    context: dict[str, Any] = {"DIR": str(file.parent), "PATH": str(file)}
    if declared is None:
        return context
    if not isinstance(declared, dict):
        raise SettingsError(
            f"expected a mapping of variables, got {_type_name(declared)}",
            file=file,
            path=("vars",),
        )
    variables = dict(context)
    for name, spec in declared.items():
        path = ("vars", name)
        if not re.fullmatch(_NAME, name):
            raise SettingsError(
                "a variable name is a letter followed by letters, digits or _",
                file=file,
                path=path,
            )
        if name in CONTEXT_VARIABLES:
            raise SettingsError(
                f"${name} is predefined and cannot be declared", file=file, path=path
            )
        variables[name] = _variable(spec, context, file, path, environ)
    return variables


def _variable(
    spec: Any, context: dict[str, Any], file: Path, path: KeyPath, environ: Mapping[str, str]
) -> Any:
    """The typed value of one declared variable."""
    if not isinstance(spec, dict):
        raise SettingsError(
            f"expected a mapping with 'source', got {_type_name(spec)}", file=file, path=path
        )
    source = spec.get("source")
    allowed = {
        "env": {"source", "variable", "type", "default"},
        "literal": {"source", "value", "type"},
    }
    if not isinstance(source, str) or source not in allowed:
        raise SettingsError(
            "'source' must be env or literal (prompt variables are not supported)",
            file=file,
            path=(*path, "source"),
        )
    for key in spec:
        if key not in allowed[source]:
            known = ", ".join(sorted(allowed[source]))
            raise SettingsError(
                f"unknown key for a {source} variable (known keys: {known})",
                file=file,
                path=(*path, key),
            )
    kind = spec.get("type", "string" if source == "env" else "any")
    if kind not in _VARIABLE_TYPES:
        raise SettingsError(
            f"'type' must be one of {', '.join(_VARIABLE_TYPES)}", file=file, path=(*path, "type")
        )
    if source == "env":
        env_name = spec.get("variable")
        if not isinstance(env_name, str) or not env_name:
            raise SettingsError(
                "an env variable needs 'variable' (the environment variable's name)",
                file=file,
                path=(*path, "variable"),
            )
        if env_name in environ:
            where = f"the environment variable {env_name}"
            return _convert(environ[env_name], kind, where, file, path)
        if spec.get("default") is None:
            raise SettingsError(
                f"the environment variable {env_name} is not set (and no default is given)",
                file=file,
                path=path,
            )
        value = _substitute(spec["default"], context, file, (*path, "default"))
        return _convert(value, kind, "the default", file, (*path, "default"))
    if "value" not in spec:
        raise SettingsError("a literal variable needs 'value'", file=file, path=(*path, "value"))
    value = _substitute(spec["value"], context, file, (*path, "value"))
    return _convert(value, kind, "the value", file, (*path, "value"))


def _convert(value: Any, kind: str, what: str, file: Path, path: KeyPath) -> Any:
    """Give a variable's raw value its declared type (never echoing the value: it may be secret)."""

    def fail(expected: str) -> SettingsError:
        return SettingsError(f"{what} is not {expected}", file=file, path=path)

    if kind == "any":
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise fail("a string (quote it)")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("a boolean (true/false, yes/no, on/off, 1/0)")
    if isinstance(value, bool):
        raise fail("an integer" if kind == "int" else "a number")
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            try:
                return int(value)
            except ValueError:  # more digits than Python converts
                pass
        raise fail("an integer")
    # float
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and "_" not in value:
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise fail("a finite number")
    return number


def _text(name: str, value: Any, file: Path, path: KeyPath) -> str:
    """A variable's value as it appears inside a longer string."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    raise SettingsError(
        f'${name} holds {_type_name(value)}; use it as a whole value ("${name}")',
        file=file,
        path=path,
    )


def _substitute(value: Any, variables: dict[str, Any], file: Path, path: KeyPath) -> Any:
    """Replace ``$NAME`` in every string value (never in keys), recursively."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables, file, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, file, (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def lookup(name: str) -> Any:
        if name not in variables:
            raise SettingsError(f"undefined variable ${name}", file=file, path=path)
        return variables[name]

    exact = _EXACT_VARIABLE.fullmatch(value)
    if exact:
        found = lookup(exact.group(1))
        return copy.deepcopy(found)

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "$"
        return _text(match.group(1), lookup(match.group(1)), file, path)

    result = _TOKEN.sub(replace, value)
    # The reference's $DIR had no leading slash, so its settings say "/$DIR/x".
    if _EXACT_VARIABLE.match(value, 1) and value.startswith("/") and result.startswith("//"):
        result = result[1:]
    return result


# --- merging with provenance --------------------------------------------------------


@dataclass
class _Origin:
    """Which file last set a value, mirrored down the merged tree (for error messages)."""

    file: Path | None
    children: dict[str | int, _Origin] = field(default_factory=dict)

    def find(self, path: Sequence[str | int]) -> Path | None:
        """The file of the deepest node along ``path`` (``None`` at the top level)."""
        node, found = self, None
        for item in path:
            child = node.children.get(item)
            if child is None:
                break
            node = found = child
        return found.file if found is not None else None


def _merge(old: Any, origin: _Origin, new: Any, file: Path, path: KeyPath) -> tuple[Any, _Origin]:
    """Merge ``new`` (from ``file``) into ``old``; return the value and its origins."""
    if isinstance(new, dict):
        if not isinstance(old, dict):
            old, origin = {}, _Origin(file)
        value = dict(old)
        children = dict(origin.children)
        for key, item in new.items():
            if key.endswith("!"):
                name = key[:-1]
                if name in new:
                    raise SettingsError(
                        f"both {name!r} and {key!r} are given", file=file, path=(*path, key)
                    )
                value[name], children[name] = _merge(
                    forms.MISSING, _Origin(file), item, file, (*path, name)
                )
            elif item is None and key in value:
                continue  # a later null does not overwrite
            else:
                previous = value.get(key, forms.MISSING)
                value[key], children[key] = _merge(
                    previous, children.get(key, _Origin(file)), item, file, (*path, key)
                )
        return value, _Origin(file, children)
    if isinstance(new, list):
        if not isinstance(old, list):
            old, origin = [], _Origin(file)
        items = list(old)
        children = dict(origin.children)
        for item in new:
            index = len(items)
            merged, children[index] = _merge(
                forms.MISSING, _Origin(file), item, file, (*path, index)
            )
            items.append(merged)
        return items, _Origin(file, children)
    return new, _Origin(file)
