"""
Annotated example settings of each program, shipped in the package
(``epsproxy/examples/settings/<program>/``) and written out by ``eps example-settings
PROGRAM DIR``.

Each example starts with a ``vars`` block of literal values (the operator's name, the
addresses, where state lives); everything else refers to them, and every file path is
under ``$DIR`` (the folder the file is written to), so a written folder works wherever
it is. :func:`render` replaces those values (``--set NAME=VALUE``) in the text itself, so
the comments stay.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Mapping

__all__ = ["PROGRAMS", "ExampleError", "example_text", "example_values", "render", "write_example"]

#: Program (as ``eps example-settings`` names it) -> the example's path in the package.
PROGRAMS: dict[str, str] = {
    "sd": "sd/sd.yml",
    "eps": "eps/eps.yml",
    "proxy-public": "proxy-public/proxy.yml",
    "proxy-private": "proxy-private/proxy.yml",
}

_VAR_LINE = re.compile(
    r'^(?P<head>  (?P<name>[a-z_]+): \{source: literal, value: )(?P<value>"(?:[^"\\\n]|\\.)*")\}$',
    re.MULTILINE,
)
MAX_VALUE_LENGTH = 1024


class ExampleError(ValueError):
    """An unknown program or value, or a folder that cannot be written; one line."""


def example_text(program: str) -> str:
    """The shipped example settings of ``program`` (one of :data:`PROGRAMS`)."""
    if program not in PROGRAMS:
        raise ExampleError(
            f"no example settings for {program!r} (known: {', '.join(PROGRAMS)})"
        )
    folder = resources.files(__name__).joinpath("settings")
    return folder.joinpath(PROGRAMS[program]).read_text(encoding="utf-8")


def example_values(text: str) -> dict[str, str]:
    """The ``vars`` an example declares, with their current values."""
    return {m["name"]: json.loads(m["value"]) for m in _VAR_LINE.finditer(text)}


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with the given ``vars`` values replaced (comments and layout kept)."""
    known = example_values(text)
    for name, value in values.items():
        if name not in known:
            raise ExampleError(
                f"{name!r} is not a value of this example (known: {', '.join(known)})"
            )
        if not isinstance(value, str) or len(value) > MAX_VALUE_LENGTH or any(
            ord(c) < 0x20 or c == "\x7f" for c in value
        ):
            raise ExampleError(
                f"{name}: a value is one line of at most {MAX_VALUE_LENGTH} characters"
            )

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in values:
            return match.group(0)
        # JSON strings are YAML flow strings; '"' would end the value, so is escaped.
        return f"{match['head']}{json.dumps(values[name])}}}"

    return _VAR_LINE.sub(replace, text)


def write_example(
    program: str, folder: str | Path, values: Mapping[str, str] = {}, force: bool = False
) -> Path:
    """
    Write ``program``'s example into ``folder`` (made if missing, with an empty
    ``certs/`` beside it) and return the file written. An existing file is kept
    (:class:`ExampleError`) unless ``force``.
    """
    text = render(example_text(program), values)
    folder = Path(folder)
    target = folder / Path(PROGRAMS[program]).name
    if target.exists() and not force:
        raise ExampleError(f"{target} already exists (use --force to replace it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "certs").mkdir(mode=0o750, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    except OSError as e:
        raise ExampleError(f"{e.filename or folder}: cannot write ({e.strerror})") from None
    return target
