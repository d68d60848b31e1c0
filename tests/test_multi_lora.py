"""Multi-LoRA serving without folding: one ONNX session, adapters switched per run."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from conftest import traced
from helpers import randomize_lora
from torch.utils import _pytree as pytree

import lora_fx
from lora_fx.errors import AdapterError, ExportError
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.exporters.multi_lora import (
    MultiLoraExport,
    export_multi_lora,
    load_ort_adapter,
    run_multi_lora,
    session_for,
    write_ort_adapter,
)
from lora_fx.graph_module import capture_of

pytest.importorskip("onnxruntime")
RTOL = 1e-4


def _rel(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().double().numpy()
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def _logits(module, args) -> torch.Tensor:
    with torch.no_grad():
        return next(t for t in pytree.tree_leaves(module(*args)) if isinstance(t, torch.Tensor))


def _trained(gm, seed: int, rank: int = 4):
    """A lorafied copy with random A and B (B != 0), standing in for a fine-tuned adapter."""
    lgm = lora_fx.lorafy(gm, "*.c_attn", rank=rank).eval()
    randomize_lora(lgm, std=0.2, seed=seed)
    return lgm


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_lora")
    _, args, _, gm = traced("gpt2")
    lgm = _trained(gm, seed=0)
    b_before = [p.detach().clone() for p in lora_fx.lora_parameters(lgm)]
    exp = export_multi_lora(lgm, tmp / "served.onnx")
    base_info = export_onnx(lora_fx.strip(lgm).eval(), tmp / "base.onnx", args,
                            dynamic_shapes=capture_of(lgm).dynamic_shapes)
    return dict(tmp=tmp, gm=gm, lgm=lgm, args=args, exp=exp, base_info=base_info, b_before=b_before)


def test_export_maps_every_lora_tensor_to_an_overridable_zero_initializer(served):
    exp, lgm = served["exp"], served["lgm"]
    assert len(exp.branches) == 2  # tiny GPT-2: two c_attn sites
    assert set(exp.names) == {n for br in lgm.lora_report.branches for n in (br.a, br.b)}
    assert exp.names["transformer.h.0.attn.c_attn.lora_A.weight"] == "transformer.h.0.attn.c_attn.lora_A.weight"
    proto = onnx.load(exp.path)
    inputs = [i.name for i in proto.graph.input]
    assert inputs[: len(exp.inputs)] == exp.inputs == ["input_ids"]
    assert set(inputs[len(exp.inputs):]) == set(exp.names.values())
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for a, b in exp.branches.values():
        assert inits[b].shape == exp.shapes[b] == (192, 4) and not inits[b].any()
        assert inits[a].shape == (4, 64)
    # the LoRA branch survived export: 2 Gemms (A, B) + scale + add per site beyond the base graph
    base = served["base_info"]
    assert exp.info.nodes == base.nodes + 4 * 2  # measured: 500 vs 492
    assert exp.info.op_counts["Gemm"] == base.op_counts["Gemm"] + 2 * 2
    # the user's module is untouched, and the mapping round-trips through the file's metadata
    assert all(torch.equal(p, q) for p, q in zip(lora_fx.lora_parameters(lgm), served["b_before"], strict=True))
    again = MultiLoraExport.read(exp.path)
    assert (again.names, again.branches, again.shapes) == (exp.names, exp.branches, exp.shapes)
    assert not [f for f in os.listdir(served["tmp"]) if f.endswith(".tmp")]


def test_one_session_serves_two_adapters_and_the_base(served):
    tmp, gm, args, exp = served["tmp"], served["gm"], served["args"], served["exp"]
    tasks = {"one": served["lgm"], "two": _trained(gm, seed=1)}
    adapters = {k: load_ort_adapter(write_ort_adapter(m, tmp / f"{k}.onnx_adapter", exp), exp.path)
                for k, m in tasks.items()}
    session = session_for(exp.path)
    for _ in range(2):  # interleaved, on one session
        for k, m in tasks.items():
            got = run_multi_lora(session, exp, args, adapter=adapters[k])[0]
            assert _rel(got, _logits(m, args)) <= RTOL, k
    base = _logits(lora_fx.strip(served["lgm"]), args)
    assert _rel(run_multi_lora(session, exp, args)[0], base) <= RTOL
    assert _rel(run_multi_lora(session, exp, args, adapter=adapters["one"])[0], base) > 1e-3
    # a bigger batch and sequence through the dynamic axes
    ids = torch.randint(0, 128, (3, 11))
    got = run_multi_lora(session, exp, (ids,), adapter=adapters["two"])[0]
    assert _rel(got, _logits(tasks["two"], (ids,))) <= RTOL


def test_adapter_scale_differing_from_the_export_is_rescaled(served):
    tmp, gm, args, exp = served["tmp"], served["gm"], served["args"], served["exp"]
    other = lora_fx.lorafy(gm, "*.c_attn", rank=4, alpha=12.0).eval()  # scale 3 vs 1 in the export
    with torch.no_grad():
        for p, q in zip(lora_fx.lora_parameters(other), lora_fx.lora_parameters(served["lgm"]), strict=True):
            p.copy_(q)
    adapter = load_ort_adapter(write_ort_adapter(lora_fx.adapter_of(other), tmp / "s3.onnx_adapter", exp.path), exp)
    got = run_multi_lora(session_for(exp.path), exp, args, adapter=adapter)[0]
    assert _rel(got, _logits(other, args)) <= RTOL


def test_adapter_for_another_model_is_a_clear_error(served, tmp_path):
    exp, gm = served["exp"], served["gm"]
    rank8 = _trained(gm, seed=2, rank=8)
    with pytest.raises(AdapterError, match=r"initializer 'transformer\.h\.0\.attn\.c_attn\.lora_A\.weight' is float32\[8, 64\]"):
        write_ort_adapter(rank8, tmp_path / "r8.onnx_adapter", exp)
    assert not os.listdir(tmp_path)
    # a file written for another export (rank 8) is refused before ORT runs it
    other = export_multi_lora(rank8, tmp_path / "r8.onnx")
    bad = write_ort_adapter(rank8, tmp_path / "r8.onnx_adapter", other)
    with pytest.raises(AdapterError, match=r"initializer 'transformer\.h\.\d\.attn\.c_attn\.lora_[AB]\.weight'.*expects float32"):
        load_ort_adapter(bad, exp)
    with pytest.raises(AdapterError, match="cannot read ONNX Runtime adapter"):
        (tmp_path / "junk.onnx_adapter").write_bytes(b"not an adapter")
        load_ort_adapter(tmp_path / "junk.onnx_adapter", exp)
    small = lora_fx.lorafy(traced("mlp")[3], "fc1", rank=4)
    with pytest.raises(AdapterError, match="branches missing"):
        write_ort_adapter(small, tmp_path / "mlp.onnx_adapter", exp)
    with pytest.raises(ExportError, match="carries no LoRA"):
        export_multi_lora(gm, tmp_path / "x.onnx")
