"""Fast branches (one addmm per site, one A-matmul per shared input) and mixed-precision adapters."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import traced
from helpers import randomize_lora
from zoo import assert_close

import lora_fx
from lora_fx.examples import zoo_models as zm
from lora_fx.graph_module import NODE_LORA
from lora_fx.passes.fused import lora_addmm

aten = torch.ops.aten
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_nodes(gm, target):
    return [n for n in gm.graph.nodes if NODE_LORA in n.meta and n.target is target]


def _grads(gm, args):
    gm.train()
    out = gm(*args).logits
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * probe).sum().backward()
    params = lora_fx.lora_parameters(gm)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


def test_llama_branches_are_fused():
    _, args, _, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    # 2 layers x (q/k/v + gate/up) share one A-matmul each; every site ends in one addmm
    cats = _lora_nodes(lgm, aten.cat.default)
    assert len(cats) == 4 and sorted(len(c.args[0]) for c in cats) == [2, 2, 3, 3]
    assert len(_lora_nodes(lgm, lora_addmm)) == 14
    assert len(_lora_nodes(lgm, aten.linear.default)) == 2 * 4  # per layer: fused qkv, o, fused gate/up, down
    assert not _lora_nodes(lgm, aten.mul.Tensor) and not _lora_nodes(lgm, aten.dropout.default)
    names = [n for n, _ in lgm.named_parameters() if "lora_" in n]
    assert names[:2] == ["model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert len(names) == 2 * 14


def test_fused_equals_unfused_and_folds():
    _, args, _, gm = traced("llama")
    fused = lora_fx.lorafy(gm, TARGETS, rank=4)
    plain = lora_fx.lorafy(gm, TARGETS, rank=4, dropout=0.1)  # dropout: nothing is fused
    assert not _lora_nodes(plain, aten.cat.default) and len(_lora_nodes(plain, aten.linear.default)) == 14
    randomize_lora(fused)
    with torch.no_grad():
        for p, q in zip(lora_fx.lora_parameters(plain), lora_fx.lora_parameters(fused), strict=True):
            p.copy_(q)
    plain.eval()  # dropout off, grads comparable
    out_f, g_f = _grads(fused, args)
    plain.train(False)
    out = plain(*args).logits
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * probe).sum().backward()
    g_p = [p.grad for p in lora_fx.lora_parameters(plain)]
    assert_close(out_f, out.detach())
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(g_f, g_p, strict=True))
    assert worst <= 1e-5, worst
    folded = lora_fx.fold(fused)  # fold erases cat/split/addmm and proves the graph is the captured one
    assert not any(NODE_LORA in n.meta for n in folded.graph.nodes)
    assert_close(folded.eval()(*args).logits, fused.eval()(*args).logits)


@pytest.fixture(scope="module")
def llama_bf16():
    model, args, kwargs = zm.llama()
    model = model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.trace(model, args, kwargs), args


def test_bf16_base_keeps_fp32_adapters(llama_bf16):
    gm, args = llama_bf16
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    params = lora_fx.lora_parameters(lgm)
    assert {p.dtype for p in params} == {torch.float32}
    base = [p for n, p in lgm.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16}  # half the bytes of an fp32 base
    randomize_lora(lgm)
    out, grads = _grads(lgm, args)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    same = lora_fx.lorafy(gm, TARGETS, rank=4, autocast_adapter_dtype=False)
    assert {p.dtype for p in lora_fx.lora_parameters(same)} == {torch.bfloat16}


def test_bf16_fold_is_correctly_rounded(llama_bf16):
    gm, _ = llama_bf16
    lgm = lora_fx.lorafy(gm, ["q_proj"], rank=4)
    randomize_lora(lgm, std=0.02)
    folded = lora_fx.fold(lgm)
    name = "model.layers.0.self_attn.q_proj"
    w = gm.get_parameter(f"{name}.weight").float()
    a, b = (lgm.get_parameter(f"{name}.lora_{x}.weight") for x in "AB")
    expected = (w + b.detach() @ a.detach()).to(torch.bfloat16)  # scale 1: alpha = rank
    assert torch.equal(folded.get_parameter(f"{name}.weight"), expected)


def test_autocast_training():
    _, args, _, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    randomize_lora(lgm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(lgm, args)
    assert out.dtype == torch.bfloat16
    _, ref = _grads(lgm, args)
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(grads, ref, strict=True))
    assert all(g.dtype == torch.float32 for g in grads) and worst < 0.05, worst  # bf16 has 8 mantissa bits


@pytest.mark.slow
def test_torch_compile_full_graph_trains():
    _, args, _, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    randomize_lora(lgm)
    _, ref = _grads(lgm, args)
    torch._dynamo.reset()
    compiled = torch.compile(lgm, fullgraph=True)
    compiled.train()
    out = compiled(*args).logits
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * probe).sum().backward()
    grads = [p.grad for p in lora_fx.lora_parameters(lgm)]
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(grads, ref, strict=True))
    assert worst <= 1e-4, worst
