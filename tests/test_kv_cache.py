"""KV-cache export (lora_fx/exporters/kv_cache.py): structure == base export with cache, ORT == torch
on a left-padded prefill and decode steps, greedy generation == Hugging Face generate, per family."""

from __future__ import annotations

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
from lora_fx.exporters.decoder.capture import merged_model
from lora_fx.exporters.format import DECODER_KEY as METADATA_KEY


@functools.cache
def exported(name: str = "llama"):
    """(lgm, path, report) of a verified KV-cache export of a tiny random decoder, built once."""
    model, ids, targets = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (ids,))
    lgm = lora_fx.lorafy(gm, targets, rank=4, alpha=8)
    randomize_lora(lgm, std=0.3)
    path = os.path.join(tempfile.mkdtemp(prefix="lora_fx_kv_"), f"{name}.onnx")
    return lgm, path, lora_fx.fold_and_export(lgm, path, kv_cache=True)


def left_padded(ids: torch.Tensor, pads=(3, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def check_family(name: str) -> None:
    lgm, path, rep = exported(name)
    ver = rep.verification
    assert ver.ok and ver.structure.ok and ver.graph_ok
    assert rep.export.nodes == ver.structure.base_nodes and rep.lora_nodes_added == 0
    changed = set(ver.structure.changed_initializers)
    assert changed and all("lora" not in c for c in changed)
    kinds = [c.shapes for c in ver.numerics]
    assert sum(k.startswith("prefill") for k in kinds) == 1 and sum(k.startswith("decode") for k in kinds) == 3
    assert max(c.max_rel_err for c in ver.numerics) < 1e-4

    model = onnx.load(path, load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    layers = len(inputs) // 2 - 1
    assert layers == 2 and len(outputs) == 1 + 2 * layers
    assert inputs[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert outputs[0] == "logits" and outputs[-1] == f"present.{layers - 1}.value"
    assert METADATA_KEY in {p.key for p in model.metadata_props}

    _, ids, _ = build(name)
    prompt, mask = left_padded(ids)
    out = lora_fx.OnnxGenerator(path).generate(prompt, mask, max_new_tokens=12, eos_token_id=[])
    ref = merged_model(lgm).generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    assert out.dtype == torch.long and out.shape == (2, ids.shape[1] + 12)
    assert torch.equal(out, ref)


def test_llama_kv_export_verified_and_generates_like_hf():
    check_family("llama")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "qwen2", "qwen3", "gemma", "tied_llama", "mistral"])
def test_family(name):
    check_family(name)  # mistral: sliding window 4 < prompt + new tokens, tokens == HF generate's


def test_sliding_window_layers_keep_every_position():
    """Mistral / Gemma 2-3 sliding-window layers: the KV graph's cache keeps every position (present = past +
    new, as genai and OnnxGenerator feed it); the model's mask applies the window (test_family[mistral])."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from lora_fx.exporters.decoder.capture import full_cache, layout_of

    model, _, _ = build("mistral")
    assert {type(layer) for layer in DynamicCache(config=model.config).layers} == {DynamicSlidingWindowLayer}
    assert [type(layer) for layer in full_cache(model.config).layers] == [DynamicLayer, DynamicLayer]
    layout = layout_of(model)
    assert len(layout.kv) == 2 and layout.kv[0] == ((2, 8), (2, 8))  # (kv heads, head dim) of keys and values


@pytest.mark.slow
def test_eos_stops_each_row_and_pads():
    lgm, path, _ = exported()
    _, ids, _ = build("llama")
    prompt, mask = left_padded(ids)
    gen = lora_fx.OnnxGenerator(path)
    free = gen.generate(prompt, mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[1, ids.shape[1] + 2])  # a token row 1 produces at its 3rd step
    out = gen.generate(prompt, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    ref = merged_model(lgm).generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                     eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    new = out[:, ids.shape[1]:]
    for row in new:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]) + 1:] == 0).all()  # padded after its EOS
    assert (new[1] == eos).any()


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    _, path, _ = exported()
    _, ids, _ = build("llama")
    gen = lora_fx.OnnxGenerator(path)
    kw = dict(max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=1.5, top_p=0.9)
    a, b = gen.generate(ids, seed=1, **kw), gen.generate(ids, seed=1, **kw)
    assert torch.equal(a, b) and not torch.equal(a, gen.generate(ids, seed=2, **kw))
    greedy = gen.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(gen.generate(ids, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=1, seed=0), greedy)


@pytest.mark.slow
def test_unfolded_kv_export_generates_the_same():
    lgm, path, _ = exported()
    unfolded = os.path.join(os.path.dirname(path), "unfolded.onnx")
    rep = lora_fx.fold_and_export(lgm, unfolded, kv_cache=True, folded=False, verify=False)
    assert not rep.folded
    _, ids, _ = build("llama")
    a = lora_fx.OnnxGenerator(path).generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(lora_fx.OnnxGenerator(unfolded).generate(ids, max_new_tokens=6, eos_token_id=[]), a)


@pytest.mark.slow
def test_multi_lora_kv_export_serves_adapters_in_generation():
    from lora_fx.exporters.decoder.capture import source_model as _source
    from lora_fx.exporters.multi_lora import load_ort_adapter

    lgm, path, _ = exported()
    folder = os.path.dirname(path)
    served = os.path.join(folder, "served.onnx")
    exp = lora_fx.export_multi_lora(lgm, served, kv_cache=True)
    assert exp.inputs[:2] == ["input_ids", "attention_mask"] and len(exp.branches) == 4
    lora_fx.write_ort_adapter(lgm, os.path.join(folder, "task.onnx_adapter"), served)
    load_ort_adapter(os.path.join(folder, "task.onnx_adapter"), served)  # checks names, shapes, dtypes
    _, ids, _ = build("llama")
    gen = lora_fx.OnnxGenerator(served)
    with_adapter = gen.generate(ids, max_new_tokens=6, eos_token_id=[], adapter=os.path.join(folder, "task.onnx_adapter"))
    assert torch.equal(with_adapter, lora_fx.OnnxGenerator(path).generate(ids, max_new_tokens=6, eos_token_id=[]))
    base = _source(lgm).generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen.generate(ids, max_new_tokens=6, eos_token_id=[]), base)
