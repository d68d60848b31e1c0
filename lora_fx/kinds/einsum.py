"""The ``einsum`` kind: a 2-operand ``torch.einsum`` whose one 2-D operand is a parameter.

The weight's subscripts are one output letter ``o`` (in the result) and one input letter ``i``
(contracted with the activation): ``"bsi,oi->bso"`` is a linear with W (out, in), ``"bsi,io->bso"``
with W (in, out). The branch rewrites the equation around a fresh rank letter ``r``::

    h = einsum("bsi,ri->bsr", dropout(x), A)       A (r, in)
    d = einsum("bsr,or->bso", h, B)                B (out, r)

Delta layouts are linear's (``"out,in"`` or ``"in,out"``, from the weight's subscripts).
"""

from __future__ import annotations

import torch

from ..graph_facts import param_source
from .base import IN_OUT, OUT_IN, OpKind, OpSpec, register

__all__ = ["EINSUM", "Einsum", "einsum_equations", "einsum_roles"]

aten = torch.ops.aten


def einsum_roles(equation: str, w_index: int) -> tuple[str, str, str] | None:
    """For a 2-operand einsum, the weight's (out letter, in letter) and the activation's subscripts."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2 or len(ops[w_index]) != 2:
        return None
    w, x = ops[w_index], ops[1 - w_index]
    outs = [c for c in w if c in out]
    ins = [c for c in w if c not in out]
    if len(outs) != 1 or len(ins) != 1 or ins[0] not in x or outs[0] in x:
        return None
    return outs[0], ins[0], x


def einsum_equations(site) -> tuple[str, str]:
    """(eq1, eq2) with eq1: x, A (r, in) -> h and eq2: h, B (out, r) -> the site's output."""
    eq = site.equation.replace(" ", "")
    out = eq.split("->")[1]
    out_c, in_c, xs = einsum_roles(eq, site.w_operand)
    r = next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in eq)
    hs = xs.replace(in_c, "") + r
    return f"{xs},{r}{in_c}->{hs}", f"{hs},{out_c}{r}->{out}"


class Einsum(OpKind):
    name = "einsum"
    dora = ("an einsum's weight has no fixed (out, in) row layout for DoRA's per-output magnitude in lora-fx; "
            "adapt it with plain LoRA, or write the op as a linear / matmul")
    functions = {aten.einsum.default: OpSpec("einsum", 1, 1, OUT_IN),  # operands list; roles per equation
                 torch.einsum: OpSpec("einsum", 1, 1, OUT_IN)}

    def describe(self, gm, node, spec):
        equation, operands = node.args[0], node.args[1]
        if not isinstance(equation, str) or not isinstance(operands, (list, tuple)) or len(operands) != 2:
            return None
        for wi, operand in enumerate(operands):
            wnode, wname, transposed = param_source(gm, operand)
            if wnode is None or transposed:
                continue
            roles = einsum_roles(equation, wi)
            if roles is None:
                return None
            out_c, _, _ = roles
            wsubs = equation.replace(" ", "").split("->")[0].split(",")[wi]
            layout = OUT_IN if wsubs.index(out_c) == 0 else IN_OUT
            shape = tuple(gm.get_parameter(wname).shape)
            in_f, out_f = self.features(shape, layout)
            return dict(op="einsum", kind=self.name, weight=wname, layout=layout, shape=shape, in_features=in_f,
                        out_features=out_f, transposed=False, equation=equation, w_operand=wi)
        return None

    def activation(self, node, site, spec):
        return node.args[1][1 - site.w_operand]

    def build(self, emit, gm, node, site, x, a, b):
        eq1, eq2 = einsum_equations(site)
        h = emit("call_function", aten.einsum.default, (eq1, [x, a]))
        return emit("call_function", aten.einsum.default, (eq2, [h, b]))

    def weight_input(self, node, site, spec):
        return None if site is None else node.args[1][site.w_operand]

    def replace_weight_input(self, node, site, spec, new):
        operands = list(node.args[1])
        operands[site.w_operand] = new
        node.args = (node.args[0], operands, *node.args[2:])


EINSUM = register(Einsum())
