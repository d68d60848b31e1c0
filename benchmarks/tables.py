"""``python -m benchmarks tables``: the measured tables of docs/benchmarks.md, generated from benchmarks/results.

Each benchmark writes ``<name>.md`` from its JSON (``python -m benchmarks NAME``; ``--render`` redoes it from
the JSON alone), with the date, machine and load of its run. This puts those files, in a fixed order, between
the markers of docs/benchmarks.md, each with links to its JSON and plot, so no measured number in the docs is
kept by hand. ``--check`` exits 1 when the docs are stale (what tests/test_readme.py asserts).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import BENCHMARKS, GPU_BENCHMARKS

__all__ = ["BEGIN", "END", "DOCS", "RESULTS", "render", "write"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- tables:begin (python -m benchmarks tables) -->", "<!-- tables:end -->"
EXTRA = ("training_gpu_eager", "quantize_llm")  # results written by a variant run or a stage script


def _names(results: str) -> list[str]:
    order = [*BENCHMARKS, *GPU_BENCHMARKS, *EXTRA]
    present = {f[:-3] for f in os.listdir(results) if f.endswith(".md") and f != "README.md"}
    return [n for n in order if n in present] + sorted(present - set(order))


def render(results: str = RESULTS, docs: str = DOCS) -> str:
    """The generated section: every ``<name>.md`` of ``results`` with links relative to ``docs``' folder."""
    rel = os.path.relpath(results, os.path.dirname(docs)).replace(os.sep, "/")
    parts = []
    for name in _names(results):
        with open(os.path.join(results, f"{name}.md")) as f:
            parts.append(f.read().strip())
        links = [f"[{name}.{ext}]({rel}/{name}.{ext})" for ext in ("json", "png")
                 if os.path.isfile(os.path.join(results, f"{name}.{ext}"))]
        if links:
            parts.append("Data: " + ", ".join(links) + ".")
    return "\n\n".join(parts)


def write(docs: str = DOCS, results: str = RESULTS, check: bool = False) -> bool:
    """Replaces the text between the markers of ``docs``; returns whether it changed (``check``: write nothing)."""
    with open(docs) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{docs} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render(results, docs)}\n{END}{tail}"
    if new != text and not check:
        with open(docs, "w") as f:
            f.write(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tables", description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if docs/benchmarks.md is stale")
    ns = parser.parse_args(argv)
    changed = write(check=ns.check)
    print(f"{DOCS}: {'stale' if ns.check and changed else 'rewritten' if changed else 'up to date'}")
    return 1 if ns.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
