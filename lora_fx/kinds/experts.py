"""The ``experts`` kind: MoE expert weights, a 3-D parameter used by a grouped matmul.

Transformers 5 stores the experts of a MoE block (Mixtral, Qwen2/3-MoE, OLMoE, ...) as one 3-D
parameter per projection, ``experts.gate_up_proj`` / ``experts.down_proj`` of shape (E, out, in),
and computes them with a *grouped* matmul over tokens sorted by expert::

    y = grouped_mm(x, W.transpose(-2, -1), offs)      x (N, in), W (E, out, in), offs (E,) cumulative
                                                      rows offs[e-1]:offs[e] of y = x[rows] @ W[e]^T

In a captured graph that is ``transformers.grouped_mm_fallback`` (transformers' custom op, CPU and
fp32) or ``aten._grouped_mm`` (CUDA, bf16); the weight reaches it directly (layout (E, in, out)) or
through a transpose of its last two dims (layout (E, out, in)). Any op with that
``(input, weight, offs)`` signature whose weight is a 3-D parameter is a site.

Per-expert LoRA, like PEFT's ``target_parameters``: for each expert e, A_e (r, in) and B_e (out, r),
stored stacked as A (E, r, in), B (E, out, r). The branch is two grouped matmuls with the site's
own ``offs``, so each token only meets its expert's pair::

    h = grouped_mm(dropout(x), A^T, offs)     (N, r)        A^T = A.transpose(-2, -1) (E, in, r)
    d = grouped_mm(h, B^T, offs)              (N, out)      B^T (E, r, out)

Delta: ``D[e] = scale · B_e @ A_e`` (E, out, in) (:func:`lora_fx.delta.product`, batched over the
experts, fp32, one rounding at the merge), then the weight's layout: ``"experts:out,in"`` keeps it,
``"experts:in,out"`` swaps the last two dims. Folding writes ``W'[e] = W[e] + D[e]`` for every e.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .base import OpKind, OpSpec, op_name, register

__all__ = ["EXPERTS", "Experts", "EXPERTS_IN_OUT", "EXPERTS_OUT_IN", "GROUPED_OPS"]

aten = torch.ops.aten

EXPERTS_OUT_IN = "experts:out,in"  # W (E, out, in), the op reads W.transpose(-2, -1) (transformers 5)
EXPERTS_IN_OUT = "experts:in,out"  # W (E, in, out), the op reads W itself

# ops with the signature (input (N, in), weight (E, in, out), offs (E,)) -> (N, out)
GROUPED_OPS = ("grouped_mm_fallback", "_grouped_mm")


def _last_two_swapped(node: fx.Node) -> bool:
    """Whether ``node`` is ``transpose(w, -2, -1)`` (or ``(1, 2)``) of a 3-D tensor."""
    if node.op != "call_function" or node.target not in (aten.transpose.int, torch.transpose):
        return False
    dims = {d % 3 for d in node.args[1:3]} if len(node.args) >= 3 else set()
    return dims == {1, 2}


class Experts(OpKind):
    name = "experts"
    functions = {aten._grouped_mm.default: OpSpec("experts", 0, 1, EXPERTS_IN_OUT)}
    layouts = {EXPERTS_OUT_IN: lambda d, shape: d.reshape(shape),
               EXPERTS_IN_OUT: lambda d, shape: d.transpose(-2, -1).reshape(shape)}
    batched = True  # A, B and the delta carry a leading expert dim: D[e] = B[e] @ A[e]
    dora = ("MoE expert weights are batched (one weight per expert, tokens routed between them), and DoRA's "
            "per-output magnitude is not implemented for them; adapt the experts with plain LoRA")

    def function_spec(self, target: object) -> OpSpec | None:
        """Grouped-matmul ops registered after import (transformers' custom op), by name."""
        if isinstance(target, torch._ops.OpOverload) and op_name(target.__name__) in GROUPED_OPS:
            return OpSpec(self.name, 0, 1, EXPERTS_IN_OUT)
        return None

    def describe(self, gm, node, spec):
        if len(node.args) < 3 or node.kwargs:  # no offs, or extra options (bias, out dtype): not a site
            return None
        src = node.args[spec.w]
        if not isinstance(src, fx.Node):
            return None
        layout = EXPERTS_IN_OUT
        if _last_two_swapped(src) and isinstance(src.args[0], fx.Node):
            src, layout = src.args[0], EXPERTS_OUT_IN
        if src.op != "get_attr":
            return None
        try:
            weight = gm.get_parameter(str(src.target))
        except AttributeError:
            return None
        if weight.dim() != 3:
            return None
        shape = tuple(weight.shape)
        in_f, out_f = self.features(shape, layout)
        return dict(op=op_name(node.target), kind=self.name, weight=str(src.target), layout=layout, shape=shape,
                    in_features=in_f, out_features=out_f, transposed=layout == EXPERTS_OUT_IN)

    def features(self, shape, layout):
        _, a, b = shape
        return (b, a) if layout == EXPERTS_OUT_IN else (a, b)

    def lora_shapes(self, site, rank, width):
        experts = site.shape[0]
        return (experts, rank, site.in_features), (experts, width, rank)

    def fits(self, site, a, b, rows):
        experts = site.shape[0]
        return (a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] == experts and a.shape[1] == b.shape[2]
                and a.shape[2] == site.in_features and b.shape[1] == rows)

    def init_pair(self, a, b, init):
        """Each expert's A_e drawn like a linear's A (kaiming-uniform over its (r, in)); B = 0."""
        for e in range(a.shape[0]):
            super().init_pair(a[e], b[e], init)

    def build(self, emit, gm, node, site, x, a, b):
        offs = node.args[2]
        at = emit("call_function", aten.transpose.int, (a, -2, -1))
        h = emit("call_function", node.target, (x, at, offs))
        bt = emit("call_function", aten.transpose.int, (b, -2, -1))
        return emit("call_function", node.target, (h, bt, offs))

    def weight_input(self, node, site, spec):
        return node.args[spec.w]

    def accepts_module(self, mod: nn.Module) -> bool:
        return False


EXPERTS = register(Experts())
