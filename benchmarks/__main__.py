"""Command line: ``python -m benchmarks NAME [--smoke] [--out DIR]``; ``python -m benchmarks tables [--check]``
regenerates docs/benchmarks.md's tables from the results (:mod:`benchmarks.tables`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Any

from . import BENCHMARKS, GPU_BENCHMARKS
from .common import load_results, log, out_dir, quiet, write_outputs


def main(argv: list[str] | None = None) -> int:
    """Runs the named benchmark(s); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tables"]:
        from .tables import main as tables

        return tables(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, *GPU_BENCHMARKS, "all"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; numbers are meaningless")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the .md and .png from the JSON already in the output folder")
    ns = parser.parse_args(argv)
    quiet()
    out = out_dir(ns.out)
    names = BENCHMARKS if ns.name == "all" else (ns.name,)
    for name in names:
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        if ns.render:
            result = render(module, out, name)
        else:
            result = module.run(out, smoke=ns.smoke)
        log(f"{name}: done in {time.perf_counter() - start:.0f}s -> {result['md']}")
        with open(result["md"]) as f:
            print(f.read())
    if not ns.smoke:
        log(f"summary: {write_summary(out)}")
    return 0


def render(module: Any, out: str, name: str) -> dict[str, str]:
    """Rewrites ``<name>.md`` and ``<name>.png`` from ``<name>.json`` (after a change to the tables or plots)."""
    data = load_results(os.path.join(out, f"{name}.json"))
    return write_outputs(out, name, data, lambda: module._markdown(data), lambda fig: module._plot(fig, data))


def write_summary(out: str) -> str:
    """Concatenates the benchmarks' markdown files present in ``out`` into ``out/README.md``."""
    parts = ["# lora-fx benchmark results", "",
             "Written by `python -m benchmarks NAME`; each section links its JSON (all samples) and plot.", ""]
    for name in BENCHMARKS + GPU_BENCHMARKS:
        md = os.path.join(out, f"{name}.md")
        if os.path.isfile(md):
            with open(md) as f:
                parts += [f.read().rstrip(), "",
                          f"Data: [{name}.json]({name}.json). Plot:", "", f"![{name}]({name}.png)", ""]
    path = os.path.join(out, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


if __name__ == "__main__":
    sys.exit(main())
