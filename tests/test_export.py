"""The CI proof: every zoo model, trained a little, folds and exports to ONNX that IS its base export."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from conftest import traced
from helpers import first_tensor, randomize_lora
from zoo import zoo_params

import lora_fx
from lora_fx.exporters.verify.ort import ort_session, run_onnx


def _train(lgm, args, kwargs, steps: int = 3):
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-2)
    lgm.train()
    for _ in range(steps):
        opt.zero_grad()
        first_tensor(lgm(*args, **kwargs)).float().pow(2).mean().backward()
        opt.step()
    lgm.eval()
    assert any(torch.count_nonzero(p) for p in lora_fx.lora_parameters(lgm)[1::2]), "B must be != 0"


@pytest.mark.parametrize("case", zoo_params(include_slow=True))
def test_zoo_folded_export_is_the_base_export(case, tmp_path):
    """The default proof (skeletons equal, one export) is checked against the full one (the base
    exported too and the files compared): same graph, and what it lists as adapted covers every change."""
    _, args, kwargs, gm = traced(case.name)
    lgm = lora_fx.lorafy(gm, case.targets, rank=2)
    _train(lgm, args, kwargs)
    report = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx")
    v = report.verification
    assert v.ok, str(v)
    assert v.graph_ok and v.structure.ok and report.lora_nodes_added == 0
    assert len(v.numerics) == 2 and all(c.max_rel_err <= 1e-4 for c in v.numerics)
    lines = str(report).splitlines()
    assert lines[0].startswith(f"wrote {report.path} (folded LoRA): {report.export.nodes} nodes")
    assert "verification: PASSED" in lines and "  FX graph == captured graph: True" in lines

    full = lora_fx.fold_and_export(lgm, tmp_path / "full.onnx", verify="full")
    assert full.verification.ok and not full.verification.structure.by_construction
    assert report.export.nodes == full.base.nodes == full.export.nodes
    assert f"  base export: {full.base.nodes} nodes; LoRA added 0 nodes" in str(full).splitlines()
    same = lora_fx.verify_fold(tmp_path / "full.onnx", tmp_path / "task.onnx")
    assert same.structure.ok and same.structure.changed_initializers == [], str(same)
    changed = full.verification.structure.changed_initializers
    assert len(changed) >= case.n_sites - len(full.verification.structure.added_initializers)
    if v.structure.by_construction:  # no untied weight: the skeletons prove it
        assert report.base is None and "structure identical to the base export by construction" in str(v)
        assert set(changed) <= set(v.structure.changed_initializers)
    else:  # an untied weight adds a tensor: the base was exported and compared
        assert report.fold.untied and report.base.nodes == report.export.nodes


def test_unfolded_export_fails_structure_negative_control(tmp_path):
    _, args, kwargs, gm = traced("gpt2")
    lgm = lora_fx.lorafy(gm, "*.c_attn", rank=2)
    randomize_lora(lgm)
    unfolded = lora_fx.fold_and_export(lgm, tmp_path / "unfolded.onnx", folded=False)
    assert unfolded.lora_nodes_added > 0
    assert unfolded.verification.numerics and all(c.ok for c in unfolded.verification.numerics)
    folded = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx", verify=False)
    raw = lora_fx.verify_fold(tmp_path / "task.onnx", tmp_path / "unfolded.onnx")
    assert not raw.structure.ok and "node" in raw.structure.first_difference
    assert lora_fx.verify_fold(unfolded.base.path if os.path.exists(unfolded.base.path) else
                               tmp_path / "task.onnx", folded.path).structure.ok


@pytest.mark.parametrize("name,target,max_seq", [
    ("gpt2", lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3), 60),  # 64 learned positions
    ("llama", "*.q_proj", 77),
])
def test_dynamic_batch_and_sequence_in_onnx_runtime(tmp_path, name, target, max_seq):
    """Traced with batch 2 / sequence 8; runs at batch 1 and 7, sequence 5 and up to 77."""
    model, args, _, gm = traced(name)
    lgm = lora_fx.lorafy(gm, target, rank=2)
    randomize_lora(lgm)
    path = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx").path
    session = ort_session(path)
    for batch, seq in [(1, 5), (7, 5), (1, max_seq), (7, max_seq)]:
        ids = torch.randint(0, 100, (batch, seq))
        (logits, *_) = run_onnx(session, (ids,))
        assert logits.shape[:2] == (batch, seq)
        with torch.no_grad():
            expected = lgm(ids).logits.numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,targets", [("gpt2", ["*.c_attn"]), ("llama", ["*.q_proj", "*.v_proj"])])
def test_fp16_export_for_gpu(tmp_path, name, targets):
    _, args, kwargs, gm = traced(name)
    lgm = lora_fx.lorafy(gm, targets, rank=2)
    randomize_lora(lgm)
    report = lora_fx.fold_and_export(lgm, tmp_path / "task16.onnx", dtype=torch.float16)
    model = onnx.load(report.path)
    dtypes = {t.data_type for t in model.graph.initializer if t.data_type in (1, 10)}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    v = report.verification
    assert v.structure.ok and v.provider
    assert "CPUExecutionProvider" in v.provider or "CUDA" in v.provider
    assert all(c.ok for c in v.numerics), str(v)


def test_external_data_and_atomic_failure(tmp_path, monkeypatch):
    _, args, kwargs, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    randomize_lora(lgm)
    report = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx", external_data=True)
    assert report.export.external_data and report.verification.ok
    before = (tmp_path / "task.onnx").read_bytes()
    import lora_fx.exporters.backends.torch_onnx.backend as ex

    def boom(*a, **k):
        raise lora_fx.ExportError("injected failure")

    monkeypatch.setattr(ex, "export_streaming", boom)
    with pytest.raises(lora_fx.ExportError, match="injected"):
        lora_fx.fold_and_export(lgm, tmp_path / "task.onnx")
    assert (tmp_path / "task.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.onnx", "task.onnx.data"]


def test_export_errors(tmp_path):
    _, _, _, gm = traced("mlp")
    with pytest.raises(lora_fx.ExportError, match="no LoRA"):
        lora_fx.fold_and_export(gm, tmp_path / "x.onnx")
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    with pytest.raises(lora_fx.ExportError, match="does not exist; create it"):
        lora_fx.fold_and_export(lgm, tmp_path / "no" / "such" / "x.onnx")


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    _, args, kwargs, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    path = tmp_path / "task.onnx"
    lora_fx.fold_and_export(lgm, path, verify=False)
    before = path.read_bytes()
    randomize_lora(lgm)
    import lora_fx.exporters.steps as ex

    real = ex.verify_export  # the default verification's checks after the structure proof

    def failing(*a, **k):
        rep = real(*a, **k)
        rep.graph_ok = False
        return rep

    monkeypatch.setattr(ex, "verify_export", failing)
    with pytest.raises(lora_fx.VerifyError, match="nothing was written"):
        lora_fx.fold_and_export(lgm, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["task.onnx"]


def test_numeric_tolerance_is_the_looser_of_model_and_file_precision():
    from lora_fx.exporters.verify.numerics import tolerance

    assert tolerance(torch.float32) == 1e-4
    assert tolerance(torch.float32, torch.float16) == 1e-2
    assert tolerance(torch.bfloat16, torch.float16) == 5e-2  # the bf16 reference limits the comparison
    assert tolerance(torch.float16, torch.float32) == 1e-2
