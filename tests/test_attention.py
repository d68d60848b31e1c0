"""Causal attention in training (passes/attention.py) and the in-place LoRA addmm (passes/fused.py):
the same values and gradients as before, only faster."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from helpers import randomize_lora

import lora_fx
from lora_fx.passes import attention, fused
from lora_fx.passes.attention import causal_sdpa

aten = torch.ops.aten
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
