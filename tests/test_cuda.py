"""lora-fx on a GPU: every stage runs on a CUDA model and agrees with the same stage on the CPU.

Skipped where torch sees no CUDA device (CI). ``LORA_FX_TEST_DEVICE=cpu`` runs the same specification
on the CPU (to check the tests themselves on a machine without a GPU).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import first_tensor, randomize_lora
from zoo import assert_close

import lora_fx
from lora_fx.examples import decoders

DEVICE = torch.device(os.environ.get("LORA_FX_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls in full precision (no TF32), so GPU and CPU agree to fp32 rounding; grad mode on
    (a failure inside a captured no-grad region leaves it off: torch's wrapper does not restore it)."""
    torch.set_grad_enabled(True)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _llama(device: torch.device, dtype: torch.dtype = torch.float32, dropout: float = 0.0, layers: int = 2):
    """A tiny random Llama traced on ``device`` and lorafied on all 7 projections, A/B randomized."""
    model, ids, _ = decoders.build("llama")
    model.config.num_hidden_layers = layers
    model = model.to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (ids.to(device),))
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4, alpha=8, dropout=dropout)
    randomize_lora(lgm)
    return lgm, ids.to(device)


def _loss(net, ids) -> torch.Tensor:
    out = net(ids)
    logits = (out.logits if hasattr(out, "logits") else out[0]).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _grads(net, lgm, ids) -> dict[str, torch.Tensor]:
    for p in lora_fx.lora_parameters(lgm):
        p.grad = None
    _loss(net, ids).backward()
    return {n: p.grad.detach().cpu().clone() for n, p in lgm.named_parameters() if p.requires_grad}


def test_train_step_matches_cpu():
    """Captured, lorafied and trained on the GPU: LoRA parameters live there, and loss and every LoRA
    gradient equal the CPU's (same weights) to fp32 rounding."""
    lgm, ids = _llama(DEVICE)
    ref, ref_ids = _llama(torch.device("cpu"))
    params = lora_fx.lora_parameters(lgm)
    assert params and all(p.device.type == DEVICE.type for p in params)
    assert all(not p.requires_grad for n, p in lgm.named_parameters() if "lora" not in n)
    lgm.train(), ref.train()
    got, want = _grads(lgm, lgm, ids), _grads(ref, ref, ref_ids)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoint_with_dropout_same_gradients():
    """lora_fx.checkpoint on the GPU: recomputation replays the device's RNG, so with LoRA dropout the
    gradients equal the un-checkpointed module's (rel. err <= 1e-6)."""
    lgm, ids = _llama(DEVICE, dropout=0.3)
    ck = lora_fx.checkpoint(lgm, "*.layers.*")
    lgm.train(), ck.train()
    torch.manual_seed(1)
    plain = _grads(lgm, lgm, ids)
    torch.manual_seed(1)
    ckpt = _grads(ck, lgm, ids)
    for name, g in plain.items():
        assert (ckpt[name] - g).norm() <= 1e-6 * g.norm() + 1e-12, name


def test_compile_trains_like_eager():
    """torch.compile(lgm) on the GPU: the loss equals eager's, and a few AdamW steps lower it."""
    lgm, ids = _llama(DEVICE)
    lgm.train()
    compiled = torch.compile(lgm)
    with torch.no_grad():
        assert_close(_loss(compiled, ids), _loss(lgm, ids), dtype=torch.float32)
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = _loss(compiled, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_base_fp32_adapters_autocast():
    """A bf16 base on the GPU: A/B stay fp32, a step under autocast trains them, fold rounds into bf16."""
    lgm, ids = _llama(DEVICE, dtype=torch.bfloat16)
    params = lora_fx.lora_parameters(lgm)
    assert {p.dtype for p in params} == {torch.float32}
    lgm.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = _loss(lgm, ids)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    lgm.eval()
    folded = lora_fx.fold(lgm)
    assert {p.dtype for p in folded.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert_close(folded(ids), lgm(ids), dtype=torch.bfloat16)


def test_fold_on_device_then_export(tmp_path):
    """fold keeps the weights on the GPU and equals the LoRA module; fold_and_export of the GPU module
    writes the captured graph, verified (structure and ONNX Runtime numerics) against it."""
    lgm, ids = _llama(DEVICE)
    lgm.eval()
    folded = lora_fx.fold(lgm)
    assert {p.device.type for p in folded.parameters()} == {DEVICE.type}
    assert_close(folded(ids), lgm(ids), dtype=torch.float32)
    report = lora_fx.fold_and_export(lgm, tmp_path / "llama.onnx")
    assert report.verification is not None and report.verification.ok and report.verification.numerics
    assert {p.device.type for p in lgm.parameters()} == {DEVICE.type}  # the input module is left where it was


def test_adapter_roundtrip_to_cpu(tmp_path):
    """An adapter trained on the GPU saves in PEFT format and loads into a CPU capture: same outputs."""
    lgm, ids = _llama(DEVICE)
    lora_fx.save_adapter(lgm, tmp_path / "adapter")
    cpu, cpu_ids = _llama(torch.device("cpu"))
    loaded = lora_fx.load_adapter(cpu, tmp_path / "adapter")
    lgm.eval(), loaded.eval()
    assert_close(first_tensor(loaded(cpu_ids)), first_tensor(lgm(ids)).cpu(), dtype=torch.float32)


def test_qlora_nf4_trains():
    """quantize_base on the GPU: nf4 base weights stay on the device, a step trains the LoRA parameters."""
    lgm, ids = _llama(DEVICE)
    q = lora_fx.quantize_base(lgm, scheme="nf4")
    assert {b.device.type for b in q.buffers()} == {DEVICE.type}
    q.train()
    params = lora_fx.lora_parameters(q)
    assert len(params) == 2 * 7 * 2
    _loss(q, ids).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
