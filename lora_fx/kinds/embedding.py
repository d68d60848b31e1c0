"""The ``embedding`` kind: a table lookup ``y = W[idx]`` (``nn.Embedding``, ``F.embedding``).

The weight (num, dim) is read as ``in = num`` (one-hot inputs), ``out = dim``. PEFT's branch::

    d = embedding(idx, A^T) @ B^T        A (r, num), B (dim, r); no dropout, A ~ N(0, 1/r)

Delta layout ``"embedding"``: ``B@A`` is (dim, num), so the weight gets its transpose. PEFT stores
the pair as ``lora_embedding_A`` / ``lora_embedding_B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import EMBED, OpKind, OpSpec, register, transposed

__all__ = ["EMBEDDING", "Embedding"]

aten = torch.ops.aten


class Embedding(OpKind):
    name = "embedding"
    functions = {aten.embedding.default: OpSpec("embedding", 1, 0, EMBED),
                 F.embedding: OpSpec("embedding", 0, 1, EMBED)}
    modules = {nn.Embedding: OpSpec("embedding", 0, -1, EMBED)}
    layouts = {EMBED: transposed}
    dropout = False
    float_input = False  # token ids
    kaiming = False
    peft_modules = {"Embedding": "embedding"}
    peft_tensors = ("lora_embedding_A", "lora_embedding_B")
    dora = ("DoRA's magnitude scales the output features of a layer, and an embedding's lookup has no such layer "
            "output to scale here (lora-fx does not implement PEFT's embedding DoRA); adapt it with plain LoRA "
            "(a Target without dora=True)")

    def features(self, shape, layout):
        return shape[0], shape[1]

    def lora_shapes(self, site, rank, width):
        return (rank, site.in_features), (site.out_features, rank)

    def build(self, emit, gm, node, site, x, a, b):
        table = emit("call_function", aten.t.default, (a,))
        return emit("call_function", aten.linear.default, (emit("call_function", aten.embedding.default, (table, x)), b))


EMBEDDING = register(Embedding())
