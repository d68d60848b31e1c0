"""Stand-ins while training (passes/stand_ins.py): autocast over a captured graph computes what eager
autocast computes, and fold puts every captured op back."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from conftest import traced
from helpers import first_tensor, randomize_lora

import lora_fx
from lora_fx.passes import stand_ins
from lora_fx.passes.attention import causal_sdpa

aten = torch.ops.aten


class RotaryLike(torch.nn.Module):
    """A table computed in fp32 without gradients and with autocast off *only when it is on* (a Hugging
    Face rotary embedding's ``maybe_autocast(enabled=False)``: off at capture, so not in the graph),
    cast to the activations' dtype, scaling a projection."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.register_buffer("freq", torch.randn(8, 4))

    def forward(self, x):
        autocast_off = (torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type)
                        else contextlib.nullcontext())
        with torch.no_grad(), autocast_off:
            table = (self.freq.float() @ torch.ones(4, 8, device=x.device)).cos().to(x.dtype)
        return self.q_proj(x) * table[0]


def _lorafied_rotary():
    torch.manual_seed(0)
    model = RotaryLike().eval()
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lgm = lora_fx.lorafy(lora_fx.trace(model, (x,)), ["q_proj"], rank=2)
    return model, lgm, x


def test_no_grad_region_runs_without_autocast():
    """Under autocast the captured no-grad region computes its table in fp32, as eager autocast does
    (the captured dtype assertion would otherwise reject the step); outside autocast nothing changes."""
    model, lgm, x = _lorafied_rotary()
    targets = [n.target for n in lgm.graph.nodes if n.op == "call_function"]
    assert targets.count(stand_ins.no_grad_region) == 1
    lgm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lgm(x)
        want = model(x)  # eager autocast: q_proj in bf16, the no-grad table in fp32
    assert got.dtype == want.dtype
    # B = 0: the base model, up to kernel choice (lgm's frozen base picks other CPU matmul kernels than
    # the eager model's trainable weights: last-bit differences in bf16 on some CPUs)
    torch.testing.assert_close(got, want)
    got.float().sum().backward()
    assert all(p.grad is not None for p in lora_fx.lora_parameters(lgm))
    torch.testing.assert_close(lgm(x), model(x), rtol=1e-6, atol=1e-6)


def test_compiled_autocast_matches_eager():
    _, lgm, x = _lorafied_rotary()
    randomize_lora(lgm)
    lgm.train()
    compiled = torch.compile(lgm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), lgm(x))


def test_metadata_check_skips_only_the_dtype_under_autocast():
    t = torch.ones(2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        stand_ins.metadata_check(t, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stand_ins.metadata_check(t, dtype=torch.float32)  # autocast chose bf16: accepted
        with pytest.raises(RuntimeError, match="[Dd]evice"):
            stand_ins.metadata_check(t, dtype=torch.float32, device=torch.device("meta"))
    stand_ins.metadata_check(torch.ones(2, device="meta"), dtype=torch.float32)  # meta: no autocast to ask


def test_llama_stand_ins_counted_and_restored_by_fold():
    """A captured Llama: each mask-taking attention and each dtype assertion has its stand-in; an
    autocast step trains; fold gives back the captured graph (its signature check passes) without them."""
    _, args, _, gm = traced("llama")
    captured = {str(op): sum(n.target is op for n in gm.graph.nodes) for op in stand_ins.STAND_INS}
    lgm = lora_fx.lorafy(gm, ["q_proj", "v_proj"], rank=4)
    randomize_lora(lgm)
    count = {str(op): sum(n.meta.get(stand_ins.NODE_STAND_IN) == str(op) for n in lgm.graph.nodes)
             for op in stand_ins.STAND_INS}
    assert count[str(aten.scaled_dot_product_attention.default)] == 2  # one per layer
    assert count[str(aten._assert_tensor_metadata.default)] == captured[str(aten._assert_tensor_metadata.default)] > 0
    assert sum(n.target is causal_sdpa for n in lgm.graph.nodes) == 2
    lgm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first_tensor(lgm(*args)).float().sum().backward()
    assert all(p.grad is not None for p in lora_fx.lora_parameters(lgm))
    folded = lora_fx.fold(lgm)
    assert not any(stand_ins.NODE_STAND_IN in n.meta for n in folded.graph.nodes)
    assert {str(op): sum(n.target is op for n in folded.graph.nodes) for op in stand_ins.STAND_INS} == captured
