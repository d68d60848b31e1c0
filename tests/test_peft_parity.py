"""Parity with PEFT (issue 2, criterion 5): same A/B -> same outputs and same A/B gradients.

For GPT-2 (``c_attn``: Conv1D, ``aten.addmm`` with an (in, out) weight), Llama (``q_proj``,
``v_proj``: nn.Linear) and BERT (``query``, ``value``), both sides get r=4, alpha=8 and the same random
A and B (B non-zero); outputs and the gradients of ``sum((w * output)**2)`` (w fixed, random) with respect to every A and B
must agree within 1e-5 (relative to the largest magnitude, when it exceeds 1).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = 1e-5


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg), ["c_attn"], {}


def llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj"], {}


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # a padded row, so the attention mask matters
    return transformers.BertModel(cfg, add_pooling_layer=False), ["query", "value"], {"attention_mask": mask}


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (absolute where |b| < 1)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("build", [gpt2, llama, bert], ids=["gpt2", "llama", "bert"])
def test_outputs_and_gradients_match_peft(build):
    torch.manual_seed(0)
    model, targets, kwargs = build()
    model.eval()
    ids = torch.randint(0, 100, (2, 8))
    lgm = lora_fx.lorafy(lora_fx.trace(model, (ids,), kwargs), [f"*.{t}" for t in targets], rank=4, alpha=8)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    pm.eval()
    branches = lgm.lora_report.branches
    assert len(branches) == 2 * len(targets)  # every target in both layers
    gen = torch.Generator().manual_seed(1)
    pairs = []  # (lora-fx parameter, PEFT parameter)
    with torch.no_grad():
        for br in branches:
            layer = pm.base_model.model.get_submodule(br.key)
            for ours, theirs in ((br.a, layer.lora_A["default"].weight), (br.b, layer.lora_B["default"].weight)):
                p = lgm.get_parameter(ours)
                value = torch.randn(p.shape, generator=gen) * 0.2
                p.copy_(value)
                theirs.copy_(value)
                pairs.append((p, theirs))
    assert all(lgm.get_parameter(br.b).abs().min() > 0 for br in branches)

    ours_out = main_output(lgm(ids, **kwargs))
    theirs_out = main_output(pm(ids, **kwargs))
    # sum(out**2) weighted by a fixed random tensor: BERT's output is layer-normed, so plain
    # sum(out**2) is nearly constant and its gradient nearly zero
    weight = torch.rand(ours_out.shape, generator=gen) + 0.5
    ((ours_out * weight) ** 2).sum().backward()
    ((theirs_out * weight) ** 2).sum().backward()
    out_err = rel_err(ours_out.detach(), theirs_out.detach())
    grad_err = max(rel_err(p.grad, q.grad) for p, q in pairs)
    assert out_err <= TOL, f"outputs differ from PEFT by {out_err:.3g}"
    assert grad_err <= TOL, f"A/B gradients differ from PEFT by {grad_err:.3g} (relative to max |grad|)"
    assert all(p.grad.abs().max() > 1e-2 for p, _ in pairs)  # gradients worth comparing
