"""Builders of LoRA branches, one per op kind. Each returns the delta node ``d`` with::

    d = B(A(dropout(x)))                           # linear kind, A (r, in), B (out, r)
    d = conv1x1_B(convA(dropout(x)))               # conv: A keeps kernel/stride/padding/dilation
    d = embedding(idx, A.T) @ B.T                  # embedding: A (r, num), B (dim, r)
    d = einsum(eq2, einsum(eq1, dropout(x), A), B) # einsum, rewritten around the rank letter

Every node made here is tagged with ``meta[NODE_LORA] = branch name`` so fold can find and erase it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..graph_module import NODE_LORA
from ..sites import OPS, Site, einsum_roles

aten = torch.ops.aten


@dataclass
class Emitter:
    """Inserts nodes after a cursor, tagging each with the branch name."""

    graph: fx.Graph
    cursor: fx.Node
    tag: str

    def __call__(self, op: str, target, args=(), kwargs=None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            if op == "get_attr":
                node = self.graph.get_attr(target)
            else:
                node = self.graph.call_function(target, tuple(args), kwargs or {})
        node.meta[NODE_LORA] = self.tag
        self.cursor = node
        return node


def activation(gm: fx.GraphModule, node: fx.Node, site: Site) -> fx.Node:
    """The input of the site's matmul (token ids for an embedding)."""
    if node.op == "call_module":
        return node.args[0]
    if site.kind == "einsum":
        return node.args[1][1 - site.w_operand]
    spec = OPS.get(node.target) or OPS[torch.matmul]
    return node.args[spec.x] if len(node.args) > spec.x else node.kwargs["input"]


def build(emit: Emitter, gm: fx.GraphModule, node: fx.Node, site: Site, x: fx.Node, a: str, b: str,
          dropout: float, training: fx.Node) -> fx.Node:
    """Emits one branch for the site's ``node``; returns the (unscaled) delta."""
    a_node, b_node = emit("get_attr", a), emit("get_attr", b)
    if dropout > 0.0 and site.kind != "embedding":  # PEFT applies no dropout to embeddings
        x = emit("call_function", aten.dropout.default, (x, dropout, training))
    return BUILDERS[site.kind](emit, gm, node, site, x, a_node, b_node)


def _linear(emit, gm, node, site, x, a, b):
    return emit("call_function", aten.linear.default, (emit("call_function", aten.linear.default, (x, a)), b))


def _embedding(emit, gm, node, site, x, a, b):
    table = emit("call_function", aten.t.default, (a,))
    return emit("call_function", aten.linear.default, (emit("call_function", aten.embedding.default, (table, x)), b))


def conv_params(gm: fx.GraphModule, node: fx.Node) -> tuple[int, object, object, object]:
    """(spatial dims, stride, padding, dilation) of a conv site, whatever its graph form."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if mod.padding_mode != "zeros":
            raise NotImplementedError(f"{node.target}: padding_mode={mod.padding_mode!r}")
        return mod.weight.dim() - 2, mod.stride, mod.padding, mod.dilation
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    w = gm.get_parameter(str(given["weight"].target))
    nd = w.dim() - 2
    return nd, given.get("stride", [1] * nd), given.get("padding", [0] * nd), given.get("dilation", [1] * nd)


def _conv(emit, gm, node, site, x, a, b):
    nd, stride, padding, dilation = conv_params(gm, node)
    target = {1: aten.conv1d, 2: aten.conv2d}[nd]
    first = target.padding if isinstance(padding, str) else target.default
    h = emit("call_function", first, (x, a, None, stride, padding, dilation, 1))
    return emit("call_function", target.default, (h, b))


def einsum_equations(site: Site) -> tuple[str, str]:
    """(eq1, eq2) with eq1: x, A (r, in) -> h and eq2: h, B (out, r) -> the site's output."""
    eq = site.equation.replace(" ", "")
    out = eq.split("->")[1]
    out_c, in_c, xs = einsum_roles(eq, site.w_operand)
    r = next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in eq)
    hs = xs.replace(in_c, "") + r
    return f"{xs},{r}{in_c}->{hs}", f"{hs},{out_c}{r}->{out}"


def _einsum(emit, gm, node, site, x, a, b):
    eq1, eq2 = einsum_equations(site)
    h = emit("call_function", aten.einsum.default, (eq1, [x, a]))
    return emit("call_function", aten.einsum.default, (eq2, [h, b]))


BUILDERS: dict[str, Callable] = {"linear": _linear, "conv": _conv, "embedding": _embedding, "einsum": _einsum}


def lora_shapes(site: Site, rank: int, out_features: int, weight: torch.Tensor) -> tuple[tuple, tuple]:
    """Shapes of A and B for a site (or one slice of it, ``out_features`` wide)."""
    if site.kind == "conv":
        kernel = tuple(weight.shape[2:])
        return (rank, site.in_features, *kernel), (out_features, rank, *([1] * len(kernel)))
    if site.kind == "embedding":
        return (rank, site.in_features), (site.out_features, rank)
    return (rank, site.in_features), (out_features, rank)


def init_pair(a: torch.Tensor, b: torch.Tensor, init: str, kind: str) -> None:
    """B = 0 so a fresh branch adds exactly nothing; A random (PEFT's kaiming-uniform by default)."""
    with torch.no_grad():
        if init == "kaiming" and kind != "embedding":
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)
        elif init in ("gaussian", "kaiming"):
            nn.init.normal_(a, std=1.0 / a.shape[0])
        else:
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        b.zero_()
