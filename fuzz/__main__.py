"""
Run the fuzz targets under atheris (libFuzzer).

Usage::

    python -m fuzz TARGET [libFuzzer args]    # one target, in this process
    python -m fuzz all [libFuzzer args]       # every target in turn, then a summary table
    python -m fuzz list                       # the targets

Targets: see :data:`fuzz.targets.TARGETS`.  Defaults (any given argument wins):
``-max_len`` of the target, ``-rss_limit_mb=2048``, ``-timeout=10``,
``-print_final_stats=1``.  New inputs go to ``run/fuzz/corpus/<target>/`` (the seeds in
``fuzz/corpus/<target>/`` are only read); crashes to ``run/fuzz/artifacts/``; ``all``
keeps each target's output in ``run/fuzz/<target>.log`` and the table in
``run/fuzz/summary.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
WORK = ROOT / "run" / "fuzz"


def _names() -> list[str]:
    # Importing fuzz.targets imports no epsproxy module (the targets import lazily), so
    # the instrumentation below still sees every epsproxy module load.
    from fuzz.targets import TARGETS

    return list(TARGETS)


def _libfuzzer_args(name: str, args: list[str]) -> list[str]:
    from fuzz.targets import TARGETS

    defaults = {
        "-max_len": str(TARGETS[name].max_len),
        "-rss_limit_mb": "2048",
        "-timeout": "10",
        "-print_final_stats": "1",
        "-artifact_prefix": f"{WORK / 'artifacts'}/{name}-",
    }
    given = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    flags = [f"{k}={v}" for k, v in defaults.items() if k not in given]
    options = [a for a in args if a.startswith("-")]
    folders = [a for a in args if not a.startswith("-")]
    if not folders:
        work = WORK / "corpus" / name
        work.mkdir(parents=True, exist_ok=True)
        folders = [str(work), str(SEEDS / name)]
    (WORK / "artifacts").mkdir(parents=True, exist_ok=True)
    return [*flags, *options, *folders]


def run_one(name: str, args: list[str]) -> int:
    """Fuzz ``name`` in this process (libFuzzer exits the process when it is done)."""
    import atheris
    from twisted.logger import globalLogBeginner

    # Nobody reads the log here; without an observer it would be buffered.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    with atheris.instrument_imports(include=["epsproxy"]):
        import epsproxy.eps.links.wire  # noqa: F401
        import epsproxy.rules.forms  # noqa: F401
        import epsproxy.net.jsonrpc  # noqa: F401
        import epsproxy.proxy.clienthello  # noqa: F401
        import epsproxy.rules.records  # noqa: F401
    from fuzz.targets import TARGETS, records_context

    target = TARGETS[name]
    if name == "records":
        records_context()  # the dev PKI, before the clock starts
    atheris.Setup([f"fuzz-{name}", *_libfuzzer_args(name, args)], target.function)
    atheris.Fuzz()
    return 0


_STAT = re.compile(rb"stat::(\w+):\s*(\d+)")
_CORPUS = re.compile(rb"corp: (\d+)/(\d+)(\w*)b")


def _summarise(name: str, output: bytes, returncode: int, seconds: float) -> dict:
    stats = {k.decode(): int(v) for k, v in _STAT.findall(output)}
    corpus = _CORPUS.findall(output)
    result = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
    for marker, label in ((b"libFuzzer: timeout", "HANG"),
                          (b"out-of-memory", "OUT OF MEMORY"),
                          (b"Uncaught Python exception", "CRASH"),
                          (b"deadly signal", "CRASH")):
        if marker in output:
            result = label
            break
    artifact = re.search(rb"Test unit written to (\S+)", output)
    if artifact:
        result += f" ({artifact.group(1).decode()})"
    executions = stats.get("number_of_executed_units", 0)
    return {
        "target": name,
        "executions": executions,
        "seconds": seconds,
        "exec/s": executions / seconds if seconds else 0.0,
        "peak RSS MB": stats.get("peak_rss_mb", 0),
        "corpus": f"{int(corpus[-1][0])} files" if corpus else "?",
        "result": result,
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| target | executions | seconds | exec/s | peak RSS (MB) | corpus | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['executions']:,} | {r['seconds']:.0f} | {r['exec/s']:,.0f}"
            f" | {r['peak RSS MB']} | {r['corpus']} | {r['result']} |"
        )
    return "\n".join(lines)


def run_all(names: list[str], args: list[str]) -> int:
    """Each target in its own process, one after the other; prints the summary table."""
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        log_path = WORK / f"{name}.log"
        print(f"fuzzing {name} ... (output in {log_path})", flush=True)
        started = time.monotonic()
        with open(log_path, "wb") as log:
            process = subprocess.run(
                [sys.executable, "-m", "fuzz", name, *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        seconds = time.monotonic() - started
        row = _summarise(name, log_path.read_bytes(), process.returncode, seconds)
        rows.append(row)
        print(f"  {row['executions']:,} executions in {seconds:.0f} s: {row['result']}", flush=True)
    table = _table(rows)
    print()
    print(table)
    (WORK / "summary.md").write_text(table + "\n")
    return 0 if all(r["result"] == "ok" for r in rows) else 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    names = _names()
    if command == "list":
        from fuzz.targets import TARGETS

        for t in TARGETS.values():
            print(f"{t.name:12} -max_len={t.max_len:<6} {t.description}")
        return 0
    if command == "all":
        return run_all(names, args)
    if command not in names:
        print(f"unknown target {command!r}; targets: {', '.join(names)}, or all", file=sys.stderr)
        return 2
    return run_one(command, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
