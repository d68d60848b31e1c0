"""LoRA+ (lora_fx/loraplus.py): PEFT's parameter groups, from a lorafied module."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx

TARGETS = ["embed", "block1", "block2"]  # an embedding site and two linear sites of the tied-embedding LM


def _lorafied(zoo_traced):
    _, args, _, gm = zoo_traced("tied_lm")
    return lora_fx.lorafy(gm, TARGETS, rank=4), args


def test_groups_hold_exactly_the_b_matrices_at_ratio_times_lr(zoo_traced):
    lgm, _ = _lorafied(zoo_traced)
    groups = lora_fx.loraplus_param_groups(lgm, 1e-3, 16, loraplus_weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["A", "embedding", "B"]  # the empty no-decay B group is left out
    names = {id(p): n for n, p in lgm.named_parameters()}
    in_group = {g: sorted(names[id(p)] for p in by_name[g]["params"]) for g in by_name}
    assert in_group["B"] == ["block1.lora_B.weight", "block2.lora_B.weight"]
    assert in_group["A"] == ["block1.lora_A.weight", "block2.lora_A.weight"]
    assert in_group["embedding"] == ["embed.lora_A.weight", "embed.lora_B.weight"]  # PEFT: both at their own lr
    assert by_name["B"]["lr"] == pytest.approx(16e-3) and by_name["A"]["lr"] == pytest.approx(1e-3)
    assert by_name["embedding"]["lr"] == pytest.approx(1e-6)
    assert all(g["weight_decay"] == 0.1 for g in groups)
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(set(map(id, every))) == len(lora_fx.lora_parameters(lgm)) == 6


def test_same_groups_as_peft_create_loraplus_optimizer(zoo_traced):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    model, _, _, _ = zoo_traced("tied_lm")
    lgm, _ = _lorafied(zoo_traced)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=TARGETS))
    kwargs = {"lr": 2e-4, "loraplus_lr_ratio": 8, "loraplus_lr_embedding": 1e-5, "loraplus_weight_decay": 0.01}
    theirs = peft_loraplus(pm, torch.optim.AdamW, **kwargs)
    ours = lora_fx.create_loraplus_optimizer(lgm, torch.optim.AdamW, **kwargs)

    def summary(opt):  # (lr, weight decay) -> sorted shapes of the group's tensors; empty groups dropped
        return {(g["lr"], g["weight_decay"]): sorted(tuple(p.shape) for p in g["params"])
                for g in opt.param_groups if g["params"]}

    assert summary(ours) == summary(theirs)
    assert len(summary(ours)) == 3


def test_loraplus_optimizer_trains_b_faster(zoo_traced):
    lgm, args = _lorafied(zoo_traced)
    lgm.train()
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_(0, 0.05)
    start = {n: p.detach().clone() for n, p in lgm.named_parameters()}
    opt = lora_fx.create_loraplus_optimizer(lgm, torch.optim.SGD, lr=1e-2, loraplus_lr_ratio=16)
    target = torch.randn(lgm(*args).shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(lgm(*args), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = {n: (p.detach() - start[n]).norm().item() for n, p in lgm.named_parameters()}
    assert {n for n, d in moved.items() if d > 0} == {n for n, _ in lgm.named_parameters() if "lora_" in n}
    # plain SGD: a step is lr * grad, so B (16x lr) moves much more than A for gradients of similar size
    assert moved["block1.lora_B.weight"] > 2 * moved["block1.lora_A.weight"]


def test_bad_input(zoo_traced):
    lgm, _ = _lorafied(zoo_traced)
    with pytest.raises(ValueError, match="loraplus_lr_ratio > 0"):
        lora_fx.loraplus_param_groups(lgm, 1e-3, 0)
    with pytest.raises(ValueError, match="lr > 0"):
        lora_fx.create_loraplus_optimizer(lgm, torch.optim.AdamW, lr=-1.0, loraplus_lr_ratio=16)
    _, _, _, gm = zoo_traced("tied_lm")
    with pytest.raises(lora_fx.NoLoraError, match="carries no LoRA"):
        lora_fx.loraplus_param_groups(gm, 1e-3)
