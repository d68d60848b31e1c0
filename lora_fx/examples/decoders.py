"""Tiny random decoder LLMs of each Hugging Face family the KV-cache export supports.

``build(name)`` returns ``(model, input_ids, targets)``: an eval-mode ``*ForCausalLM`` with
``use_cache=False`` (what :func:`lora_fx.trace` captures), a batch-2 prompt, and the LoRA targets
that exercise the family's projections (fused qkv slices for GPT-2 / GPT-NeoX / Phi-3).
"""

from __future__ import annotations

from typing import Any

import torch

from ..targets import Target

__all__ = ["build", "DECODERS"]

_VOCAB = 96
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, vocab_size=_VOCAB, use_cache=False, eos_token_id=3, pad_token_id=0,
              bos_token_id=1)


def _llama(**kw: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**_SMALL, "num_key_value_heads": 2, **kw})), ["*.q_proj", "*.v_proj"]


def _tied_llama():
    model, _ = _llama(tie_word_embeddings=True)
    return model, ["*.q_proj", "*.v_proj", "*.down_proj"]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=_VOCAB, use_cache=False,
                     eos_token_id=3, bos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg), [Target("*.c_attn", slices=[0, 2], chunks=3), "*.c_proj"]


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**{**_SMALL, "rotary_pct": 0.5})
    return GPTNeoXForCausalLM(cfg), [Target("*.query_key_value", slices=[(0, 32), (64, 96)]), "*.dense_4h_to_h"]


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**{**_SMALL, "num_key_value_heads": 2})
    # qkv_proj rows: q (32) | k (16) | v (16)
    return Phi3ForCausalLM(cfg), [Target("*.qkv_proj", slices=[(0, 32), (48, 64)]), "*.o_proj"]


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**_SMALL, "num_key_value_heads": 2})), ["*.q_proj", "*.v_proj"]


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**_SMALL, "num_key_value_heads": 2, "head_dim": 8})
    return Qwen3ForCausalLM(cfg), ["*.q_proj", "*.k_proj", "*.v_proj"]


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(**{**_SMALL, "num_key_value_heads": 1, "head_dim": 8})
    return GemmaForCausalLM(cfg), ["*.q_proj", "*.v_proj", "*.up_proj"]


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**{**_SMALL, "num_key_value_heads": 2, "sliding_window": 4})  # window < prompt + new tokens
    return MistralForCausalLM(cfg), ["*.q_proj", "*.v_proj"]


DECODERS = {"llama": _llama, "tied_llama": _tied_llama, "gpt2": _gpt2, "gpt_neox": _neox, "phi3": _phi3,
            "qwen2": _qwen2, "qwen3": _qwen3, "gemma": _gemma, "mistral": _mistral}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, list]:
    """``(model, input_ids [2, 8], targets)`` for one family (random weights, seeded)."""
    torch.manual_seed(seed)
    model, targets = DECODERS[name]()
    ids = torch.randint(4, _VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    return model.eval(), ids, targets
