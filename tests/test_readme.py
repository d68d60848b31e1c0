"""README.md and docs/: short, every link resolves, the 30-second example runs, every name it calls exists."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def _example() -> str:
    section = README.read_text().split("## 30-second example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_is_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= 300


def test_readme_and_docs_keep_no_test_counts():
    for path in [README, *DOCS]:
        found = re.findall(r"\b\d+ (?:tests|passed|failed|skipped)\b", path.read_text())
        assert not found, f"{path.name}: counts kept by hand: {found}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path):
    links = _relative_links(path)
    missing = [t for t in links if not (path.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)}: links to missing files {missing}"
    if path == README:
        assert len(links) >= 10 and sum(t == "ARCHITECTURE.md" for t in links) == 1  # the layout: one link


def test_every_lora_fx_name_in_the_readme_resolves():
    """``lora_fx.X`` and ``lora_fx.sub.X`` in the README are importable names (no private or moved paths)."""
    names = sorted(set(re.findall(r"\blora_fx(?:\.[A-Za-z_]\w*)+", README.read_text())))
    assert len(names) >= 15
    for name in names:
        parts = name.split(".")
        assert not any(p.startswith("_") for p in parts), f"{name}: a private name"
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"README names {name}, but {'.'.join(parts[:cut])} has no {attr!r}"
            obj = getattr(obj, attr)


def test_set_up_runs_in_order_with_the_cpu_note_first():
    """venv, then torch on its own (its CPU-build note before the commands), then the package."""
    text = README.read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
    assert [c.split("#")[0].strip() for c in commands] == [
        "python3 -m venv .venv && . .venv/bin/activate", 'pip install "torch==2.13.0"', 'pip install -e ".[test]"']
    assert section.index("CPU build") < section.index("```bash")


def test_readme_test_command_is_the_one_ci_runs():
    command = re.search(r"Run the tests.*?```bash\n(.*?)\n```", README.read_text(), re.S).group(1).strip()
    assert command.startswith("python -m pytest") and command in (ROOT / ".ci" / "run").read_text()


def test_benchmark_tables_are_generated():
    """docs/benchmarks.md's results are what ``python -m benchmarks tables`` writes from benchmarks/results."""
    from benchmarks import tables

    assert not tables.write(check=True), "stale: run python -m benchmarks tables"
    assert tables.render().count("Measured 20") >= 8  # each result keeps the date of its run


@pytest.mark.slow  # two verified ONNX exports: about 15 s on an idle core pair, more under load
def test_the_30_second_example_runs(tmp_path: Path):
    (tmp_path / "example.py").write_text(_example())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verification: PASSED" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"base.onnx", "task.onnx", "adapters"}
    assert (tmp_path / "adapters" / "task" / "adapter_config.json").is_file()
    # the command-line lines that follow the example
    for line in ("verify base.onnx task.onnx", "export mlp --adapter adapters/task -o task2.onnx",
                 "verify base.onnx task2.onnx"):
        cli = subprocess.run([sys.executable, "-m", "lora_fx", *line.split()], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=env)
        assert cli.returncode == 0, f"lora-fx {line}: {cli.stdout[-2000:]}{cli.stderr[-2000:]}"
