"""QLoRA: quantize_base stores frozen weights quantized, trains LoRA on them, folds into Ŵ."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from helpers import randomize_lora
from zoo import assert_close

import lora_fx
from lora_fx.errors import LoraFxError
from lora_fx.passes.quantize_base import NF4, QuantizedWeight, dequantized, quantize_base

TARGETS = ["*.q_proj", "*.v_proj", "*.down_proj"]


@pytest.fixture(scope="module")
def llama():
    _, args, kwargs, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    randomize_lora(lgm, std=0.02)
    return args, kwargs, lgm


@pytest.mark.parametrize("scheme, levels, bits", [("int8", 255, 8), ("int4", 15, 4), ("nf4", 16, 4)])
def test_quantized_weight_round_trip(scheme, levels, bits):
    w = torch.randn(48, 40)
    qw = QuantizedWeight(w, "w", scheme, 64, torch.float32)
    assert qw.codes.numel() * qw.codes.element_size() * 8 == 30 * 64 * bits  # 1920 weights padded to 30 blocks
    deq = qw()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, 0)).reshape(-1, 64)
    m = blocks.abs().amax(1, keepdim=True)
    step = (m / 127) if scheme == "int8" else (m / 7) if scheme == "int4" else m * 0.1610  # widest NF4 gap / 2
    err = (deq.reshape(-1, 64) - blocks).abs()
    assert (err <= step / 2 * 1.0001 if scheme != "nf4" else err <= step).all()
    assert len(torch.unique(deq.reshape(-1, 64) / m)) <= levels * 30
    if scheme == "nf4":  # every value is an NF4 level times its block's max
        ratio = deq.reshape(-1, 64) / m
        assert torch.isclose(ratio.unsqueeze(-1), torch.tensor(NF4), atol=1e-6).any(-1).all()


def test_quantize_base_replaces_weights_and_keeps_lora(llama):
    args, kwargs, lgm = llama
    q = quantize_base(lgm, scheme="nf4")
    rep = q.meta["lora_fx_qbase"]
    assert sorted(rep.weights) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert rep.bytes_after < 0.16 * rep.bytes_before  # 4 bits + one fp32 scale per 64
    names = {n for n, _ in q.named_parameters()}
    assert not names & set(rep.weights) and "model.layers.0.self_attn.k_proj.weight" in names
    assert {id(p) for p in lora_fx.lora_parameters(q)} == {id(p) for p in lora_fx.lora_parameters(lgm)}
    ref, out = lgm(*args, **kwargs).logits, q(*args, **kwargs).logits
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.2
    wide = quantize_base(lgm, ["model.layers.*"], scheme="int8")
    assert len(wide.meta["lora_fx_qbase"].weights) == 14  # 7 projections x 2 layers
    with pytest.raises(LoraFxError, match="match no frozen weight"):
        quantize_base(lgm, ["nope.*"])
    with pytest.raises(LoraFxError, match="scheme"):
        quantize_base(lgm, scheme="fp3")


def test_quantized_module_holds_no_high_precision_weight():
    import gc
    import weakref

    from lora_fx.examples import zoo_models
    from lora_fx.graph_module import capture_of

    model, args, kwargs = zoo_models.llama()
    ref = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args, kwargs), TARGETS, rank=4)
    q = quantize_base(lgm)
    assert capture_of(lgm).source is not None and capture_of(q).source is None  # the capture forgot the model
    del model, lgm
    gc.collect()
    assert ref() is None  # the fp32 weight is gone: q holds its codes only


def test_backward_dequantizes_again_instead_of_saving(llama, monkeypatch):
    args, kwargs, lgm = llama
    q = quantize_base(lgm, scheme="int4")
    plain = dequantized(q)
    calls = []
    original = QuantizedWeight.forward
    monkeypatch.setattr(QuantizedWeight, "forward", lambda self: calls.append(self.name) or original(self))
    loss = q(*args, **kwargs).logits.square().mean()
    assert len(calls) == 6
    loss.backward()
    assert len(calls) > 6  # unpack re-dequantized the weights autograd would have kept
    grads = [p.grad.clone() for p in lora_fx.lora_parameters(q)]
    for p in lora_fx.lora_parameters(q):
        p.grad = None
    plain(*args, **kwargs).logits.square().mean().backward()  # same weights, no hooks: same gradients
    for g, p in zip(grads, lora_fx.lora_parameters(plain), strict=True):
        assert_close(g, p.grad)
        p.grad = None


def test_fold_uses_the_dequantized_weights(llama):
    args, kwargs, lgm = llama
    q = quantize_base(lgm, scheme="nf4")
    folded = lora_fx.fold(q)
    assert_close(folded(*args, **kwargs).logits, q(*args, **kwargs).logits)
    # folding into the original fp32 weights instead would be off by the quantization error
    assert float((lora_fx.fold(lgm)(*args, **kwargs).logits - folded(*args, **kwargs).logits).abs().max()) > 1e-3
    base = lora_fx.strip(q)
    w = base.get_parameter("model.layers.0.self_attn.q_proj.weight")
    qw = next(m for m in q.modules() if isinstance(m, QuantizedWeight) and m.name.endswith("0.self_attn.q_proj.weight"))
    assert torch.equal(w, qw())


@pytest.mark.slow
def test_qlora_train_fold_export_int4(llama, tmp_path):
    args, kwargs, lgm = llama
    q = quantize_base(lgm, ["model.layers.*"], scheme="nf4")
    opt = torch.optim.AdamW(lora_fx.lora_parameters(q), lr=1e-2)
    q.train()
    for _ in range(3):
        q(*args, **kwargs).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    q.eval()
    report = lora_fx.fold_and_export(q, tmp_path / "task4.onnx", quantize="int4")
    # the fp32 proof is against the dequantized base: only the adapted weights differ from it
    assert report.verification.ok and len(report.verification.structure.changed_initializers) == 6
    assert report.quantized.ok and report.quantized.fold_cost < 1.5
