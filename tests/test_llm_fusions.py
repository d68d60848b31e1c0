"""lora_fx.exporters.backends.torch_onnx.llm_fusions: a KV-cache decoder's own export, fused.

One tiny Llama (grouped-query attention) exported with ``backend="torch_onnx"``: fused op counts, the
proof by construction still holding (the fusions ran with every weight hidden), ORT vs torch on a
left-padded prefill and decode steps, and left-padded greedy generation equal to Hugging Face."""

from __future__ import annotations

import collections
import functools
import os
import tempfile
import warnings

import onnx
import pytest
import torch
from helpers import randomize_lora

import lora_fx
from lora_fx.examples.decoders import build
from lora_fx.exporters.backends.torch_onnx import llm_fusions
from lora_fx.exporters.decoder.capture import merged_model

pytest.importorskip("onnxruntime")


def _export(name: str) -> tuple:
    model, ids, targets = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lgm = lora_fx.lorafy(lora_fx.trace(model, (ids,)), targets, rank=4, alpha=8)
    randomize_lora(lgm, std=0.3)
    path = os.path.join(tempfile.mkdtemp(prefix=f"lora_fx_fused_{name}_"), "model.onnx")
    return lgm, ids, path, lora_fx.fold_and_export(lgm, path, kv_cache=True, backend="torch_onnx")


@functools.cache
def exported(name: str = "llama") -> tuple:
    """(lgm, ids, path, report) of the tiny decoder's torch_onnx KV-cache export. The Llama is test_kv_cache's
    export (the default suite makes it anyway) when "auto" chose torch_onnx for it (the builder refuses head
    size 8), else exported here."""
    if name == "llama":
        from test_kv_cache import exported as kv_exported

        lgm, path, rep = kv_exported()  # no argument: the cache entry test_kv_cache's default tests fill
        if rep.backend == "torch_onnx":
            return lgm, build("llama")[1], path, rep
    return _export(name)


def _ops(path: str) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def test_tiny_llama_decoder_is_fused_and_still_proven():
    _, _, path, rep = exported()
    ops = _ops(path)
    layers = 2
    assert rep.backend == "torch_onnx" and rep.export.opset == llm_fusions.DECODER_OPSET
    assert ops["Attention"] == layers and ops["RotaryEmbedding"] == 2 * layers  # q and k per layer
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["SimplifiedLayerNormalization"] == 1
    assert ops["Neg"] == ops["Pow"] == ops["Reciprocal"] == ops["Softmax"] == 0  # rotary, RMSNorm, attention spelled out
    assert ops["Expand"] <= 3  # the mask's, none repeating keys/values
    fusions = rep.export.optimization.fusions
    assert fusions["RotaryEmbedding"] == 2 * layers and fusions["Attention (grouped kv)"] == layers
    assert fusions["Attention (3-D, past inside)"] == layers and ops["Transpose"] == 0  # no per-head layout ops
    assert rep.export.nodes < 0.5 * rep.export.optimization.nodes_before
    ver = rep.verification
    assert ver.ok and ver.structure.ok and ver.structure.by_construction and rep.lora_nodes_added == 0
    padded = [c for c in ver.numerics if "left-padded" in c.shapes]
    decode = [c for c in ver.numerics if c.shapes.startswith("decode")]
    assert len(padded) == 1 and len(decode) == 3 and max(c.max_rel_err for c in padded + decode) < 1e-4


def test_fused_file_generates_left_padded_batches_like_hf():
    lgm, ids, path, _ = exported()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    prompt = ids.masked_fill(mask == 0, 0)
    out = lora_fx.OnnxGenerator(path).generate(prompt, mask, max_new_tokens=10, eos_token_id=[])
    ref = merged_model(lgm).generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)


def test_fusions_never_see_a_weight_value(monkeypatch):
    """optimize_model runs fuse_decoder with every weight's value hidden: base and task fuse alike."""
    import numpy as np
    import onnx_ir as ir

    from lora_fx.exporters.backends.torch_onnx.optimize import optimize_model

    x = ir.val("x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.val("w", shape=ir.Shape([4, 3]), type=ir.TensorType(ir.DataType.FLOAT),
               const_value=ir.tensor(np.ones((4, 3), np.float32), name="w"))
    node = ir.node("MatMul", [x, w])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 23})
    seen = []
    fuse = llm_fusions.fuse_decoder
    monkeypatch.setattr(llm_fusions, "fuse_decoder",
                        lambda m: seen.append(m.graph.initializers["w"].const_value) or fuse(m))
    model, report = optimize_model(ir.Model(graph, ir_version=10), True, decoder=True)
    assert seen == [None] and model.graph.initializers["w"].const_value is not None  # hidden, then restored
    assert set(report.fusions) >= {"SimplifiedLayerNormalization", "RotaryEmbedding"} and not any(report.fusions.values())


def test_rules_leave_an_unmatched_graph_alone():
    """Below opset 23 (no Attention op) only the RMSNorm fusions apply; a graph without the patterns is
    unchanged."""
    import onnx_ir as ir

    _, _, path, _ = exported()
    model = ir.load(path)
    before = collections.Counter(n.op_type for n in model.graph)
    counts = llm_fusions.fuse_decoder(model)  # already fused: nothing left to match
    assert not any(counts.values()) and collections.Counter(n.op_type for n in model.graph) == before


@pytest.mark.slow
@pytest.mark.parametrize("name,rotary,grouped", [("qwen3", 4, 2), ("gemma", 4, 2), ("phi3", 4, 2), ("gpt2", 0, 0),
                                                  ("gpt_neox", 4, 0), ("tied_llama", 4, 2)])
def test_families_fuse_where_the_patterns_apply(name, rotary, grouped):
    """GPT-2 has learned positions (no rotary), GPT-NeoX rotates half of each head (the rotated slice fuses)
    and repeats no keys/values; every file passes the decode checks."""
    _, _, path, rep = exported(name)
    ops = _ops(path)
    assert rep.verification.ok
    assert ops["RotaryEmbedding"] == rotary and rep.export.optimization.fusions.get("Attention (grouped kv)", 0) == grouped
    assert ops["Attention"] == 2  # torch writes sdpa as ONNX Attention at opset 23
