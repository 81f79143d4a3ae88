"""
The steps of docs/operators.md as a test runs them: its fenced blocks whose info string
is ``sh guide-vars``, ``sh guide-step NAME`` or ``sh guide-service NAME``, in order, and
the shell that runs a step exactly as written.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred

ROOT = Path(__file__).resolve().parent.parent.parent
GUIDE = ROOT / "docs" / "operators.md"
#: The folder of this virtualenv's ``eps`` and ``twistd``: first on the steps' PATH.
BIN = str(Path(sys.executable).parent)

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_GUIDE_INFO = re.compile(r"sh guide-(?P<kind>vars|step|service)(?: (?P<name>[a-z0-9-]+))?")
_EXPORT = re.compile(r"^export (?P<name>[A-Z_][A-Z0-9_]*)=", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One guide block: ``kind`` is vars, step or service; ``line`` where it starts."""

    kind: str
    name: str
    text: str
    line: int


def guide_blocks(path: Path = GUIDE) -> list[Block]:
    """The guide's blocks in document order (other fenced blocks are left out)."""
    text = path.read_text("utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        info = match["info"].strip()
        if not info.startswith("sh guide-"):
            continue
        parsed = _GUIDE_INFO.fullmatch(info)
        if parsed is None:
            raise ValueError(f"{path}: malformed guide block info string {info!r}")
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(parsed["kind"], parsed["name"] or "", match["body"], line))
    return blocks


def exported_names(block: Block) -> list[str]:
    """The variables a ``guide-vars`` block exports, in order."""
    return [m["name"] for m in _EXPORT.finditer(block.text)]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports the kernel just handed out for port 0."""
    holders = []
    try:
        for _ in range(count):
            holder = socket.socket()
            holder.bind(("127.0.0.1", 0))
            holders.append(holder)
        return [h.getsockname()[1] for h in holders]
    finally:
        for holder in holders:
            holder.close()


def step_environment(values: Mapping[str, str]) -> dict[str, str]:
    """The environment of every step and service: ours, this venv first, the values."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("EPS_SETTINGS", "SD_SETTINGS", "PROXY_SETTINGS")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.update(values)
    return env


def run_step(block: Block, env: Mapping[str, str], cwd: Path) -> Deferred[Any]:
    """Run a step with ``bash -euo pipefail``: fires with (stdout, stderr, exit code)."""
    return utils.getProcessOutputAndValue(
        "/bin/bash", ["-euo", "pipefail", "-c", block.text], env=dict(env), path=str(cwd),
        reactor=reactor,
    )


def service_command(block: Block) -> list[str]:
    """The argv that runs a one-line ``guide-service`` block as the process itself."""
    line = block.text.strip()
    if "\n" in line:
        raise ValueError(f"guide-service {block.name} (line {block.line}) is not one command")
    return ["/bin/bash", "-euc", f"exec {line}"]
