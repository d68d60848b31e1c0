"""Command line: ``python -m benchmarks NAME [--smoke] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from . import BENCHMARKS
from .common import log, out_dir, quiet


def main(argv: list[str] | None = None) -> int:
    """Runs the named benchmark(s); returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; numbers are meaningless")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    ns = parser.parse_args(argv)
    quiet()
    out = out_dir(ns.out)
    names = BENCHMARKS if ns.name == "all" else (ns.name,)
    for name in names:
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.run(out, smoke=ns.smoke)
        log(f"{name}: done in {time.perf_counter() - start:.0f}s -> {result['md']}")
        with open(result["md"]) as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
