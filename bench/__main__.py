"""``python -m bench [NAME...]``: run the benchmarks and print their tables."""

from __future__ import annotations

import argparse
import os
import sys

from . import eps, relay, sd, sni
from .common import stop_on_sigterm

BENCHMARKS = {"sd": sd.main, "eps": eps.main, "relay": relay.main, "sni": sni.main}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true",
                        help="a short run of the SNI benchmark (seconds per path; "
                             "same as BENCH_SNI_QUICK=1)")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["BENCH_SNI_QUICK"] = "1"
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    stop_on_sigterm()
    for name in args.names or BENCHMARKS:
        print(f"\n== {name} ==", flush=True)
        BENCHMARKS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
