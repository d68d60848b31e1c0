"""The ``experts`` op kind (lora_fx/kinds/experts.py): MoE expert weights of transformers 5.

Spec, on random tiny Hugging Face MoE decoders (Mixtral, Qwen3-MoE): each layer's 3-D expert
parameters (``experts.gate_up_proj`` (E, 2·inter, hidden), ``experts.down_proj`` (E, hidden, inter)),
read by ``transformers.grouped_mm_fallback(x, W.transpose(-2, -1), offs)``, are sites with the
per-expert LoRA view (in, out); ``lorafy`` adds A (E, r, in), B (E, out, r); B = 0 is the base bit
for bit; random A/B change the output, train (every A/B gets a gradient), and ``fold`` writes
``W'[e] = W[e] + s·B_e@A_e`` (fp32, one rounding) equal to the LoRA model; ``swap_adapter`` and
``combine_adapters`` handle per-expert adapters; ``save_adapter`` refuses them (no file format yet);
``fold_and_export`` verifies.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from helpers import randomize_lora
from sweep_models import HF_MODELS

import lora_fx
from lora_fx import delta as lora_delta
from lora_fx.adapters.adapter import adapter_of

HIDDEN, EXPERTS, INTER = 32, 4, 32  # sweep_models' TINY / MOE


@functools.cache
def _traced(name: str):
    model, args, kwargs = next(m for m in HF_MODELS if m.name == name).build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, args, lora_fx.trace(model, args, kwargs)


@pytest.fixture(scope="module")
def mixtral():
    return _traced("mixtral")  # shared: never mutate


def _logits(module, args):
    out = module(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name, inter", [("mixtral", 64), ("qwen3_moe", INTER)])
def test_expert_parameters_are_per_expert_sites(name, inter):
    _, _, gm = _traced(name)
    got = [(s.id, s.op, s.kind, s.layout, s.shape, s.in_features, s.out_features)
           for s in lora_fx.sites(gm) if s.kind == "experts"]
    assert got == [(f"model.layers.{i}.mlp.experts.{w}", "grouped_mm_fallback", "experts", "experts:out,in",
                    shape, n_in, n_out)
                   for i in range(2)
                   for w, shape, n_in, n_out in (("gate_up_proj", (EXPERTS, 2 * inter, HIDDEN), HIDDEN, 2 * inter),
                                                 ("down_proj", (EXPERTS, HIDDEN, inter), inter, HIDDEN))]


def test_lorafy_train_fold(mixtral):
    _, args, gm = mixtral
    base = _logits(gm, args)
    lgm = lora_fx.lorafy(gm, "*.experts.gate_up_proj", rank=4, alpha=8)
    shapes = {n: tuple(p.shape) for n, p in lgm.named_parameters() if ".lora_" in n}
    assert len(shapes) == 4  # one A and one B per layer
    assert sorted(set(shapes.values())) == [(EXPERTS, 4, HIDDEN), (EXPERTS, 2 * 64, 4)]
    # B = 0: bit for bit the same graph without branches (same frozen weights, same kernels); the
    # captured graph's weights require grad, which picks other CPU kernels (last-bit differences on Intel)
    assert torch.equal(_logits(lgm, args), _logits(lora_fx.strip(lgm), args))
    torch.testing.assert_close(_logits(lgm, args), base)

    randomize_lora(lgm, std=0.3)
    lgm.train()
    _logits(lgm, args).pow(2).mean().backward()
    grads = [n for n, p in lgm.named_parameters() if ".lora_" in n and p.grad is not None and p.grad.abs().sum() > 0]
    assert len(grads) == 4
    lgm.eval()
    lora = _logits(lgm, args)
    assert (lora - base).abs().max() > 1e-2

    folded = lora_fx.fold(lgm)
    assert not any(".lora_" in n for n, _ in folded.named_parameters())
    got = _logits(folded, args)
    assert ((got - lora).norm() / lora.norm()).item() <= 1e-5
    # W'[e] = W[e] + s·B_e@A_e in the stored (E, out, in) layout, rounded once (fp32 weights: exact)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    a = lgm.get_parameter(lgm.lora_report.branches[0].a)
    b = lgm.get_parameter(lgm.lora_report.branches[0].b)
    want = (gm.get_parameter(name).float() + 2.0 * torch.bmm(b.detach(), a.detach()))
    assert torch.equal(folded.get_parameter(name), want)


def test_swap_and_combine_per_expert_adapters(mixtral):
    _, args, gm = mixtral
    one = lora_fx.lorafy(gm, "*.experts", rank=4)
    two = lora_fx.lorafy(gm, "*.experts", rank=4)
    randomize_lora(one, std=0.3)
    randomize_lora(two, std=0.3, seed=5)
    swapped = lora_fx.swap_adapter(lora_fx.fold(one), adapter_of(two), old=adapter_of(one))
    want = _logits(two, args)
    assert ((_logits(swapped, args) - want).norm() / want.norm()).item() <= 1e-5
    combined = lora_fx.combine_adapters(gm, [(adapter_of(one), 1.0), (adapter_of(two), 0.5)])
    name = "model.layers.1.mlp.experts.down_proj"
    expect = gm.get_parameter(name).float()
    for lgm, w in ((one, 1.0), (two, 0.5)):
        br = next(b for b in lgm.lora_report.branches if b.site.weight == name)
        expect = expect + w * br.scale * torch.bmm(lgm.get_parameter(br.b).detach(), lgm.get_parameter(br.a).detach())
    assert torch.allclose(combined.get_parameter(name), expect, atol=1e-6)


def test_adapter_files_refuse_expert_branches(mixtral, tmp_path):
    _, _, gm = mixtral
    lgm = lora_fx.lorafy(gm, "*.experts.down_proj", rank=2)
    with pytest.raises(lora_fx.errors.AdapterError, match="per-expert MoE branches"):
        lora_fx.save_adapter(lgm, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_batched_product_refuses_slices():
    a, b = torch.ones(2, 1, 3), torch.ones(2, 4, 1)
    assert lora_delta.product([(a, b, 0.5, None)], 4, torch.float32, batched=True).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="slices"):
        lora_delta.product([(a, b, 0.5, (0, 2))], 4, torch.float32, batched=True)


@pytest.mark.slow
def test_fold_and_export_verifies(mixtral, tmp_path):
    _, _, gm = mixtral
    lgm = lora_fx.lorafy(gm, "*.experts", rank=4)
    randomize_lora(lgm, std=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lora_fx.fold_and_export(lgm, tmp_path / "moe.onnx")
    text = str(report)
    assert "verification: PASSED" in text
    assert len(report.verification.structure.changed_initializers) == 4  # the 2 x 2 stacked expert weights
    assert "grouped_mm_fallback" in text
