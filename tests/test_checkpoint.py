"""The checkpoint pass: same gradients as the un-checkpointed module, far fewer saved activations."""

from __future__ import annotations

import datetime
import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import randomize_lora
from torch.utils.checkpoint import CheckpointPolicy
from zoo import assert_close

import lora_fx
from lora_fx.examples import zoo_models as zm
from lora_fx.passes import checkpoint as ckpt_pass


class Block(torch.nn.Module):
    """Pre-norm residual MLP with dropout (the shape of a transformer block, small)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 32), torch.nn.Linear(32, dim)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


class DropNet(torch.nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block() for _ in range(n))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@functools.cache
def _dropnet():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    return lora_fx.trace(DropNet().eval(), (x,)), (x,)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@functools.cache
def _llama(dropout: float):
    model, args, kwargs = zm.llama()
    model.config.attention_dropout = dropout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, args, kwargs)
    return gm, args


def _step(module, args, seed=0):
    """(loss, LoRA grads, bytes of activations autograd saved outside checkpointed regions)."""
    module.train()
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        loss = (logits * probe).sum()  # a well-conditioned loss (a norm at the end makes square() flat)
    loss.backward()
    params = lora_fx.lora_parameters(getattr(module, "module", module))  # DDP wraps it
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads, sum(saved.values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("order", ["lorafy-then-checkpoint", "checkpoint-then-lorafy"])
def test_same_gradients_with_dropout(order):
    gm, args = _dropnet()
    targets = ["up", "down", "head"]
    if order == "lorafy-then-checkpoint":
        lgm = lora_fx.lorafy(gm, targets, rank=2, dropout=0.3)
        randomize_lora(lgm)
        ckpt = lora_fx.checkpoint(lgm, "*layers.*")
    else:
        ckpt = lora_fx.lorafy(lora_fx.checkpoint(gm, "*layers.*"), targets, rank=2, dropout=0.3)
        randomize_lora(ckpt)
        lgm = lora_fx.lorafy(gm, targets, rank=2, dropout=0.3)
        randomize_lora(lgm)
    assert ckpt.checkpoint_state.blocks == ("layers.0", "layers.1", "layers.2")
    loss0, g0, saved0 = _step(lgm, args)
    loss1, g1, saved1 = _step(ckpt, args)
    assert float(loss0) == float(loss1)
    assert max(_rel(a, b) for a, b in zip(g1, g0, strict=True)) <= 1e-6
    assert saved1 < 0.5 * saved0, f"checkpointing kept {saved1} of {saved0} saved bytes"
    _, g2, _ = _step(ckpt, args, seed=1)  # other masks: the gradient changes (dropout is really on)
    assert max(_rel(a, b) for a, b in zip(g2, g0, strict=True)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("order", ["lorafy-then-checkpoint", "checkpoint-then-lorafy"])
def test_llama_same_gradients_with_dropout(order):
    gm, args = _llama(dropout=0.1)  # attention dropout and LoRA dropout: masks must be replayed
    if order == "lorafy-then-checkpoint":
        lgm = lora_fx.lorafy(gm, LLAMA_TARGETS, rank=4, dropout=0.1)
        randomize_lora(lgm)
        ckpt = lora_fx.checkpoint(lgm, "*.layers.*")
    else:
        ckpt = lora_fx.lorafy(lora_fx.checkpoint(gm, "*.layers.*"), LLAMA_TARGETS, rank=4, dropout=0.1)
        randomize_lora(ckpt)
        lgm = lora_fx.lorafy(gm, LLAMA_TARGETS, rank=4, dropout=0.1)
        randomize_lora(lgm)
    assert ckpt.checkpoint_state.blocks == ("model.layers.0", "model.layers.1")
    assert ckpt.code == lgm.code  # the graph (and the flat code shown) is unchanged
    loss0, g0, saved0 = _step(lgm, args)
    loss1, g1, saved1 = _step(ckpt, args)
    assert len(g1) == 2 * 7 * 2
    assert float(loss0) == float(loss1)
    worst = max(_rel(a, b) for a, b in zip(g1, g0, strict=True))
    assert worst <= 1e-6, f"checkpointed grads differ from plain ones: rel err {worst:.3g}"
    assert saved1 < 0.5 * saved0, f"checkpointing kept {saved1} of {saved0} saved bytes"


def test_selective_policy_keeps_matmuls():
    gm, args = _dropnet()
    lgm = lora_fx.lorafy(gm, ["up", "down"], rank=2, dropout=0.1)
    randomize_lora(lgm)
    _, g0, saved0 = _step(lgm, args)
    _, g_full, saved_full = _step(lora_fx.checkpoint(lgm, "*layers.*"), args)
    _, g_sel, saved_sel = _step(lora_fx.checkpoint(lgm, "*layers.*", policy="selective"), args)
    for g in (g_full, g_sel):
        assert max(_rel(a, b) for a, b in zip(g, g0, strict=True)) <= 1e-6
    # Selective checkpointing stores its kept outputs inside the region (invisible to the hook):
    # outside, both keep the same region inputs.
    assert saved_sel == saved_full < saved0


def test_selective_policy_recomputes_low_rank_products(monkeypatch):
    """The selective policy keeps the base and A matmuls' outputs and recomputes each LoRA B product
    (inner dimension the rank, 1/16 of its output width here): keeping both it and the base output
    would store two wide outputs per site, more than training without checkpointing keeps."""
    gm, args = _llama(dropout=0.0)
    lgm = lora_fx.lorafy(gm, LLAMA_TARGETS, rank=4)
    randomize_lora(lgm)
    decisions = []
    real = ckpt_pass._selective_policy

    def spy(ctx, op, *a, **kw):
        decision = real(ctx, op, *a, **kw)
        if not ctx.is_recompute:
            decisions.append((op, decision))
        return decision

    monkeypatch.setattr(ckpt_pass, "_selective_policy", spy)
    _, g_sel, _ = _step(lora_fx.checkpoint(lgm, "*.layers.*", policy="selective"), args)
    _, g0, _ = _step(lgm, args)
    assert max(_rel(a, b) for a, b in zip(g_sel, g0, strict=True)) <= 1e-6
    kept = [op for op, d in decisions if d == CheckpointPolicy.MUST_SAVE]
    lora_b = [op for op, d in decisions if op is torch.ops.aten.addmm.default]
    assert len(lora_b) == 2 * 7  # one LoRA B product per site, 7 sites in each of 2 layers
    assert torch.ops.aten.addmm.default not in kept
    # per layer: 7 base matmuls, 4 A matmuls (q/k/v and gate/up share one each), 1 attention
    assert len([op for op in kept if op is torch.ops.aten.mm.default]) == 2 * (7 + 4)
    assert ckpt_pass._low_rank_product(torch.ops.aten.mm.default, (torch.ones(3, 16), torch.ones(16, 128)))
    assert not ckpt_pass._low_rank_product(torch.ops.aten.mm.default, (torch.ones(3, 64), torch.ones(64, 128)))


def test_eval_and_no_grad_run_the_flat_code():
    gm, args = _dropnet()
    lgm = lora_fx.lorafy(gm, ["up"], rank=2, dropout=0.1)
    randomize_lora(lgm)
    ckpt = lora_fx.checkpoint(lgm, "*layers.*")
    ckpt.eval()
    assert not ckpt.training
    assert torch.equal(ckpt(*args), lgm.eval()(*args))
    ckpt.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = ckpt(*args)
        torch.manual_seed(3)
        b = lgm.train()(*args)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_fold_export_and_adapter(tmp_path):
    model, args, _ = zm.functional()
    gm = lora_fx.trace(model, args)
    lgm = lora_fx.lorafy(gm, ["blocks.*.w_in", "blocks.*.w_mid", "blocks.*.w_out"], rank=2)
    randomize_lora(lgm)
    ckpt = lora_fx.checkpoint(lgm, "blocks.*")
    assert ckpt.checkpoint_state.blocks == ("blocks.0", "blocks.1")
    folded = lora_fx.fold(ckpt)
    ref = lora_fx.fold(lgm)
    assert_close(folded.eval()(*args), ref.eval()(*args))
    assert folded.code == ref.code
    report = lora_fx.fold_and_export(ckpt, tmp_path / "task.onnx")
    assert report.verification.ok, str(report)
    lora_fx.save_adapter(ckpt, tmp_path / "adapter")
    fresh = lora_fx.lorafy(gm, ["blocks.*.w_in", "blocks.*.w_mid", "blocks.*.w_out"], rank=2)
    lora_fx.load_adapter(fresh, tmp_path / "adapter")
    assert_close(fresh.eval()(*args), lgm.eval()(*args))


def test_shares_parameters_and_leaves_input_alone():
    model, args, _ = zm.functional()
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), ["blocks.*.w_in"], rank=2)
    before = lgm.code
    ckpt = lora_fx.checkpoint(lgm, ["blocks.0", "blocks.1"])
    assert lgm.code == before and "lora_fx_checkpoint" not in lgm.meta
    assert [id(p) for p in lora_fx.lora_parameters(ckpt)] == [id(p) for p in lora_fx.lora_parameters(lgm)]
    assert list(ckpt.state_dict()) == list(lgm.state_dict())


@pytest.mark.slow
def test_torch_compile_trains():
    model, args, _ = zm.functional()
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), ["blocks.*.w_in", "blocks.*.w_mid"], rank=2)
    randomize_lora(lgm)
    ckpt = lora_fx.checkpoint(lgm, "blocks.*", policy="selective")
    _, g0, _ = _step(lgm, args)
    torch._dynamo.reset()
    compiled = torch.compile(ckpt, fullgraph=True)
    _, g1, _ = _step(compiled, args)
    assert max(_rel(a, b) for a, b in zip(g1, g0, strict=True)) <= 1e-5  # inductor reorders float sums


def ddp_gradients_match() -> None:
    """Checkpointed module under DDP (gloo, one rank) == the plain lorafied module; run in its own process."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, args, _ = zm.functional()
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), ["blocks.*.w_in"], rank=2)
    randomize_lora(lgm)
    _, g0, _ = _step(lgm, args)
    ckpt = lora_fx.checkpoint(lgm, "blocks.*")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ddp = DistributedDataParallel(ckpt)
        _, g1, _ = _step(ddp, args)
    finally:
        dist.destroy_process_group()
    err = max(_rel(a, b) for a, b in zip(g1, g0, strict=True))
    assert err <= 1e-6, err


def test_ddp_single_process():
    # In a fresh interpreter with a time limit: gloo in the test process once waited forever on a futex
    # (after other tests' threads), which would hang the whole run (conftest sets GLOO_SOCKET_IFNAME=lo).
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_checkpoint; test_checkpoint.ddp_gradients_match()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"DDP with gloo did not finish in 180 s: {(e.stderr or '')[-2000:]}")
    assert done.returncode == 0, done.stderr[-3000:]


def test_errors_name_the_pattern_and_the_fix():
    model, args, _ = zm.functional()
    gm = lora_fx.trace(model, args)
    with pytest.raises(lora_fx.PatternError, match=r"'\*\.layers\.\*' matches no module.*blocks\.0"):
        lora_fx.checkpoint(gm, "*.layers.*")
    with pytest.raises(ValueError, match="policy must be one of"):
        lora_fx.checkpoint(gm, "blocks.*", policy="some")
