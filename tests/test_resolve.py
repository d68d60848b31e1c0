"""Patterns resolved on a captured module (lora_fx/resolve.py), as a specification:

* ``lorafy(gm, "all-linear")`` adapts exactly the modules PEFT's ``target_modules="all-linear"`` wraps
  (GPT-2's Conv1D and Llama's / BERT's linears, without the output embedding ``lm_head``); a tied output
  embedding of a non-Hugging Face model is the head too; linear modules the forward never calls are a note;
* a pattern naming a module of the model that the captured forward never calls says exactly that
  (BLIP retrieval's ``text_proj``), and one naming a called module without an adaptable matmul says so;
* in a list beside patterns that select sites, such a pattern is a warning and ``lora_report.unmatched``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import traced
from torch import nn

import lora_fx
from lora_fx.targets import owner_path


def _peft_all_linear(model: nn.Module) -> set[str]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _adapted(lgm) -> set[str]:
    return {owner_path(s) for s in lgm.lora_report.sites}


def _peft_rule(model: nn.Module) -> set[str]:
    """PEFT's rule read off the module tree (peft's import alone takes ~7 s; the slow test asks PEFT itself):
    every nn.Linear / Conv1D but the module get_output_embeddings() returns."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head}


@pytest.mark.parametrize("name, n_sites", [("gpt2", 8), ("llama", 14), ("bert", 13)])
def test_all_linear_is_peft_all_linear(name, n_sites):
    model, _, _, gm = traced(name)
    lgm = lora_fx.lorafy(gm, "all-linear", rank=2)
    assert _adapted(lgm) == _peft_rule(model) and len(_adapted(lgm)) == n_sites
    assert "lm_head" not in _adapted(lgm) and lgm.lora_report.notes == []
    assert {s.op for s in lgm.lora_report.sites} == ({"addmm"} if name == "gpt2" else {"linear"})  # Conv1D: addmm


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_all_linear_is_what_peft_wraps(name):
    model, _, _, gm = traced(name)
    fresh = type(model)(model.config)  # PEFT wraps modules in place: never the shared zoo model
    assert _adapted(lora_fx.lorafy(gm, "all-linear", rank=2)) == _peft_all_linear(fresh)


@pytest.mark.slow
def test_all_linear_leaves_out_the_masked_lm_decoder_as_peft_does():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    gm = lora_fx.trace(BertForMaskedLM(cfg).eval(), (torch.randint(3, 60, (2, 6)),))
    adapted = _adapted(lora_fx.lorafy(gm, "all-linear", rank=2))
    assert adapted == _peft_all_linear(BertForMaskedLM(cfg)) and "cls.predictions.transform.dense" in adapted
    assert "cls.predictions.decoder" not in adapted


def test_a_tied_output_embedding_is_the_head_without_hugging_face():
    _, _, _, gm = traced("tied_lm")  # a plain nn.Module: lm_head reads embed.weight
    linear = {s.path for s in lora_fx.sites(gm) if s.kind == "linear"}
    adapted = {s.path for s in lora_fx.lorafy(gm, "all-linear", rank=2).lora_report.sites}
    assert "lm_head" in linear and adapted == linear - {"lm_head"}
    _, _, _, mlp = traced("mlp")  # no embedding, no lm_head: every linear, the last one included
    assert len(lora_fx.lorafy(mlp, "all-linear", rank=2).lora_report.sites) == 3


class _Retrieval(nn.Module):
    """BLIP image-text retrieval's shape: projections that exist but are unused by the head that runs."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.text_proj = nn.Linear(8, 4)
        self.vision_proj = nn.Linear(8, 4)
        self.itm_head = nn.Linear(8, 2)

    def forward(self, x):
        return self.itm_head(self.norm(self.encoder(x)))


@pytest.fixture(scope="module")
def retrieval():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.trace(_Retrieval().eval(), (torch.randn(2, 8),))


def test_a_module_the_forward_never_calls_is_named_as_such(retrieval):
    with pytest.raises(lora_fx.PatternError) as err:
        lora_fx.lorafy(retrieval, "text_proj", rank=2)
    assert str(err.value).startswith("pattern 'text_proj': `text_proj` is a module of the model but the captured "
                                     "forward never calls it (unused for these inputs)")
    assert "closest" not in str(err.value)
    with pytest.raises(lora_fx.PatternError, match=r"none of the 2 .*\n.*`text_proj` is a module .*\n.*`vision_proj`"):
        lora_fx.lorafy(retrieval, ["text_proj", "vision_proj"], rank=2)
    with pytest.raises(lora_fx.PatternError, match=r"`norm` \(LayerNorm\) is called by the captured forward but "
                                                   "makes no adaptable matmul"):
        lora_fx.lorafy(retrieval, "norm", rank=2)


def test_beside_matching_patterns_an_unused_module_is_a_warning_and_reported(retrieval):
    with pytest.warns(UserWarning, match="`text_proj` is a module of the model but the captured forward never"):
        lgm = lora_fx.lorafy(retrieval, ["encoder", "text_proj"], rank=2)
    assert [s.id for s in lgm.lora_report.sites] == ["encoder"] and lgm.lora_report.unmatched == ["text_proj"]
    with pytest.warns(UserWarning, match=r"'all-linear': the linear module\(s\) text_proj, vision_proj are never"):
        lgm = lora_fx.lorafy(retrieval, "all-linear", rank=2)
    assert sorted(s.id for s in lgm.lora_report.sites) == ["encoder", "itm_head"]


@pytest.mark.slow
def test_blip_retrieval_projections_are_unused_with_the_itm_head():
    import transformers as tf

    cfg = tf.BlipConfig(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=128, max_position_embeddings=32,
                                         encoder_hidden_size=32, bos_token_id=1),
                        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = tf.BlipForImageTextRetrieval(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (torch.randint(3, 100, (2, 8)), torch.randn(2, 3, 32, 32)))
    with pytest.raises(lora_fx.PatternError, match="`text_proj` is a module of the model but the captured forward "
                                                   r"never calls it \(unused for these inputs\)"):
        lora_fx.lorafy(gm, "text_proj", rank=2)
    with pytest.warns(UserWarning, match=r"the linear module\(s\) (text|vision)_proj, (vision|text)_proj are never"):
        lgm = lora_fx.lorafy(gm, "all-linear", rank=2)
    assert _adapted(lgm) == _peft_all_linear(tf.BlipForImageTextRetrieval(cfg)) - {"text_proj", "vision_proj"}
