"""The ``linear`` kind: ``y = x W^T`` in any of its graph forms.

Sites: ``aten.linear`` (``nn.Linear``, ``F.linear``; weight (out, in)), ``aten.addmm`` / ``mm`` /
``matmul`` with a parameter weight, directly or through a transpose (GPT-2 ``Conv1D`` is
``addmm(b, x, W[in, out])``; ``x @ w.T`` is ``matmul(x, numpy_T(w))``), and in ``symbolic_trace``
graphs ``nn.Linear``, ``F.linear``, ``torch.matmul`` / ``@`` / ``x.matmul(w)``.

Branch (A (r, in), B (out, r), PEFT's shapes)::

    d = linear(linear(dropout(x), A), B)          # = x A^T B^T

Whole-weight branches are fused into one addmm on the output (:mod:`lora_fx.passes.fused`).

Delta layouts: ``"out,in"`` is ``B@A`` itself, ``"in,out"`` (Conv1D, ``x @ w``) its transpose. Only
this kind supports output slices (``Target(slices=...)``: q and v of a fused qkv weight).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .base import IN_OUT, OUT_IN, OpKind, OpSpec, register, transposed

__all__ = ["LINEAR", "Linear"]

aten = torch.ops.aten


class Linear(OpKind):
    name = "linear"
    functions = {
        aten.linear.default: OpSpec("linear", 0, 1, OUT_IN),
        aten.addmm.default: OpSpec("linear", 1, 2, IN_OUT),
        aten.mm.default: OpSpec("linear", 0, 1, IN_OUT),
        aten.matmul.default: OpSpec("linear", 0, 1, IN_OUT),
        F.linear: OpSpec("linear", 0, 1, OUT_IN),
        torch.matmul: OpSpec("linear", 0, 1, IN_OUT),
        operator.matmul: OpSpec("linear", 0, 1, IN_OUT),
        torch.mm: OpSpec("linear", 0, 1, IN_OUT),
    }
    methods = {"matmul": OpSpec("linear", 0, 1, IN_OUT)}
    modules = {nn.Linear: OpSpec("linear", 0, -1, OUT_IN)}
    layouts = {OUT_IN: lambda d, shape: d, IN_OUT: transposed}
    slices = True
    dora = None  # DoRA: a magnitude per output row of W (lora_fx.dora)
    peft_modules = {"Linear": "linear", "Conv1D": "addmm"}

    def accepts(self, node, weight):
        return weight.dim() == 2

    def build(self, emit, gm, node, site, x, a, b):
        return emit("call_function", aten.linear.default, (emit("call_function", aten.linear.default, (x, a)), b))

    def build_merged(self, emit, node, x, a, b, dropout, training, scale):
        from ..passes.fused import build_addmm  # one addmm: y + s·(A x) Bᵀ, no wide mul/add

        return build_addmm(emit, node, x, a, b, dropout, training, scale)


LINEAR = register(Linear())
