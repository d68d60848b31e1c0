"""What onnxruntime-genai's model builder can build right, decided before building (genai_builder.py's
``supports``), and the padding convention of its files.

Support is the builder's own dispatch table (``builder_architectures``) minus what was measured to come
out wrong or not run against torch (onnxruntime-genai 0.18, transformers 5.25, tiny random configs of
every family; the routes are in docs/llm_deploy.md):

* ``WRONG_GRAPHS``: an architecture the builder accepts and builds wrongly (OLMo's LayerNorm as RMSNorm);
* ``vocab_clash``: a module as wide as the vocabulary (the builder takes it for the LM head);
* head or rotary sizes GroupQueryAttention's CPU kernel refuses (not a multiple of 16);
* dtypes and quantize settings the builder does not make.

A builder file's GroupQueryAttention reads the attention mask as row lengths: ``right_padded`` is how a
padded batch is fed to it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any

from ..format import BUILDER_KEY

__all__ = ["GENAI_EXTRA", "WRONG_GRAPHS", "builder_architectures", "right_padded", "right_padding_only",
           "unsupported", "vocab_clash"]

GENAI_EXTRA = 'pip install "lora-fx[genai]"'
# architectures the builder accepts but builds wrongly (measured against torch, onnxruntime-genai 0.18)
WRONG_GRAPHS = {"OlmoForCausalLM": "it builds OLMo's mean-centred LayerNorm as an RMSNorm (SimplifiedLayerNormalization: "
                                   "relative error 0.1-0.2 on tiny random OLMo configs)"}


def builder_architectures() -> frozenset[str]:
    """The ``architectures[0]`` names the installed builder dispatches on (its ``create_model``)."""
    import inspect

    from onnxruntime_genai.models import builder

    return frozenset(re.findall(r'architectures\[0\] == "(\w+)"', inspect.getsource(builder.create_model)))


def unsupported(model: Any, *, quantize: Any = None, dtype: Any = None, untied: dict | None = None) -> str | None:
    """None when the builder can build ``model`` (a Hugging Face causal LM) as asked; else why not."""
    import torch

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return f"onnxruntime-genai is not installed ({GENAI_EXTRA})"
    config = getattr(model, "config", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    if arch not in builder_architectures():
        return f"the model builder does not support {arch}"
    if arch in WRONG_GRAPHS:
        return f"the model builder's {arch} graph is wrong: {WRONG_GRAPHS[arch]}"
    if dtype not in (None, torch.float32):
        return f"dtype={dtype} on CPU (the builder's CPU precisions are fp32 and int4)"
    if quantize is not None and not _default_int4(quantize):
        return f"quantize={quantize!r}: the builder makes its own int4 only (quantize='int4')"
    if untied:
        return f"the fold untied {sorted(untied)} (an adapted tied weight): the builder would tie them again"
    heads = getattr(config, "num_attention_heads", 0) or 1
    head = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    if head % 16:
        return f"head size {head} (ONNX Runtime's CPU GroupQueryAttention needs a multiple of 16)"
    rope = getattr(config, "rope_parameters", None) or {}
    factor = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0
    if int(head * factor) % 16:
        return (f"rotary size {int(head * factor)} (head size {head} x partial_rotary_factor {factor}): ONNX Runtime's "
                "GroupQueryAttention needs a multiple of 16")
    return vocab_clash(model)


def vocab_clash(model: Any) -> str | None:
    """Why the builder would mistake a module of ``model`` for its embedding or LM head, or None.

    onnxruntime-genai 0.18's builder walks ``model.modules()`` and takes EVERY ``nn.Linear`` with
    ``out_features == vocab_size`` for the LM head (and every ``nn.Embedding`` with ``vocab_size`` rows
    for the embedding): a layer's projection as wide as the vocabulary (tiny random configs: vocab 128 =
    intermediate 128, or vocab 64 = hidden 64) gets an LM head too, and the file computes something else
    (relative error 0.3-0.6 against torch). Checked before building."""
    import torch

    vocab = getattr(model.config, "vocab_size", None)
    heads = {id(m) for m in (model.get_output_embeddings(), model.get_input_embeddings()) if m is not None}
    for name, m in model.named_modules():
        width = m.out_features if isinstance(m, torch.nn.Linear) else \
            m.num_embeddings if isinstance(m, torch.nn.Embedding) else None
        if width == vocab and id(m) not in heads:
            return (f"{name} ({type(m).__name__}) is as wide as the vocabulary ({vocab}): the model builder "
                    f"takes every such module for the {'LM head' if isinstance(m, torch.nn.Linear) else 'embedding'}"
                    " and its file would compute something else")
    return None


def _default_int4(quantize: Any) -> bool:
    """``"int4"`` or a config equal to lora-fx's default int4 one (the builder has its own settings)."""
    from ..quantize import as_config

    return quantize == "int4" or not isinstance(quantize, str) and as_config(quantize) == as_config("int4")


def right_padding_only(path: str) -> bool:
    """Whether the decoder file at ``path`` was made by the builder (padding only at the end of a row)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(meta.get(BUILDER_KEY, "{}")).get("padding") == "right"


def right_padded(ids: Any, mask: Any) -> tuple[Any, Any]:
    """The batch ``(ids, mask)`` (numpy, any 0/1 mask: left padding, holes) as a builder file takes it:
    each row's unmasked tokens moved to the front, the mask ``[1]*n + [0]*pad``. GroupQueryAttention reads
    the mask as row lengths (its ReduceSum) and its width (the longest row), and places a row's keys at
    positions 0..n-1: the same attention and rotary positions as the padded row (position ids = cumsum of
    the mask - 1). The logits of row b's last token are then at ``n_b - 1``."""
    import numpy as np

    keep = mask.astype(bool)
    lengths = keep.sum(1)
    front = np.arange(ids.shape[1])[None] < lengths[:, None]
    packed = np.zeros_like(ids)
    packed[front] = ids[keep]  # row-major order: each row's kept tokens, in order, to its front
    return packed, front.astype(mask.dtype)
