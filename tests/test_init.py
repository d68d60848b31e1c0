"""PiSSA / OLoRA initialisations (lora_fx/residual.py): PEFT's factors and residual base, the adapter saved
as plain LoRA over the original weight (PEFT's conversion), unconverted PEFT adapters, fold, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.errors import SiteError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    return model, ids, lora_fx.trace(model, (ids,))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def train_both(lgm, pm, seed=1):
    """The same 'training' step on both sides: every A and B moved by the same random amount."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for br in lgm.lora_report.branches:
            layer = pm.base_model.model.get_submodule(br.key)
            for ours, theirs in ((br.a, layer.lora_A["default"].weight), (br.b, layer.lora_B["default"].weight)):
                p = lgm.get_parameter(ours)
                p.add_(0.05 * torch.randn(p.shape, generator=g))
                theirs.copy_(p)


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_init_matches_peft_and_saves_as_plain_lora_over_the_original(llama, init, tmp_path):
    model, ids, gm = llama
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=init)).eval()
    lgm = lora_fx.lorafy(gm, [f"*.{t}" for t in TARGETS], rank=4, alpha=8, init=init)
    assert len(lgm.lora_report.branches) == 4
    for br in lgm.lora_report.branches:  # PEFT's factors (QR / full SVD are deterministic) and residual base
        layer = pm.base_model.model.get_submodule(br.key)
        assert rel(lgm.get_parameter(br.a), layer.lora_A["default"].weight) < TOL
        assert rel(lgm.get_parameter(br.b), layer.lora_B["default"].weight) < TOL
        assert rel(lgm.get_parameter(br.site.weight), layer.base_layer.weight) < TOL
        assert not torch.equal(lgm.get_parameter(br.site.weight), gm.get_parameter(br.site.weight))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, gm.get_parameter(
        "model.layers.0.self_attn.q_proj.weight"))  # the user's model keeps W
    assert rel(lgm(ids).logits, model(ids).logits) < TOL  # residual + s·B0 A0 = W
    train_both(lgm, pm)
    trained = lgm(ids).logits
    assert rel(trained, pm(ids).logits) < TOL
    assert rel(lora_fx.fold(lgm)(ids).logits, trained) < TOL  # folded into the residual base

    lora_fx.save_adapter(lgm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    on_original = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    assert rel(on_original(ids).logits, trained) < TOL  # PEFT, on the ORIGINAL model
    assert rel(lora_fx.load_adapter(gm, tmp_path / "a")(ids).logits, trained) < TOL  # lora-fx, same


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_unconverted_peft_adapter_loads_with_the_residual_base(llama, init, tmp_path):
    model, ids, gm = llama
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=init)).eval()
    lgm = lora_fx.lorafy(gm, [f"*.{t}" for t in TARGETS], rank=4, alpha=8, init=init)
    train_both(lgm, pm, seed=2)
    pm.save_pretrained(tmp_path / "raw")  # PEFT's default: A/B over the residual, init_lora_weights=init
    loaded = lora_fx.load_adapter(gm, tmp_path / "raw")
    assert rel(loaded(ids).logits, pm(ids).logits) < TOL


@pytest.mark.slow
def test_pissa_niter_and_slices(llama):
    model, ids, gm = llama
    lgm = lora_fx.lorafy(gm, "*.q_proj", rank=2, init="pissa_niter_4")
    assert rel(lgm(ids).logits, model(ids).logits) < 1e-4  # randomised SVD, the residual still adds up to W
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100,
                                                               n_positions=16, use_cache=False)).eval()
    g2 = lora_fx.trace(gpt, (ids,))
    sliced = lora_fx.lorafy(g2, lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3, init="olora"), rank=2)
    w0 = g2.get_parameter("transformer.h.0.attn.c_attn.weight")
    w1 = sliced.get_parameter("transformer.h.0.attn.c_attn.weight")
    assert torch.equal(w0[:, 32:64], w1[:, 32:64]) and not torch.equal(w0[:, :32], w1[:, :32])  # (in, out) Conv1D
    assert rel(sliced(ids).logits, gpt(ids).logits) < TOL


def test_bad_inits_are_refused(llama):
    _, _, gm = llama
    with pytest.raises(SiteError, match="init must be one of"):
        lora_fx.lorafy(gm, "*.q_proj", init="loftq")
    with pytest.raises(SiteError, match="rank 40 exceeds min"):
        lora_fx.lorafy(gm, "*.v_proj", rank=40, init="olora")

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.conv = nn.Conv1d(8, 8, 1)

        def forward(self, ids):
            h = self.emb(ids)
            return self.conv(h.transpose(1, 2)).transpose(1, 2) @ self.emb.weight.T

    tg = lora_fx.trace(Tied().eval(), (torch.randint(0, 10, (2, 3)),))
    with pytest.raises(SiteError, match="conv sites take init='kaiming'"):
        lora_fx.lorafy(tg, "conv", init="pissa")
    with pytest.raises(SiteError, match="other ops read that weight too"):
        lora_fx.lorafy(tg, lora_fx.Target("emb.weight", ops=("matmul", "linear")), init="olora")
