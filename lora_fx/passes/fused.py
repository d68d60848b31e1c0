"""Fast LoRA branches for linear sites: one addmm on the output, one matmul per shared input.

Output side (every whole-weight linear site): the textbook branch adds two passes over the wide
output (``mul`` by the scale, then ``add``) and a third in backward. :func:`lora_addmm` folds both
into the GEMM's accumulate::

    before:  y' = y + s * linear(h, B)                        # h = linear(x, A), (..., r)
    after:   y' = addmm(y.view(-1, out), h.view(-1, r), B.T, alpha=s).view(y.shape)
             # eager: y.view(-1, out).addmm_(...), accumulated into the fresh y, no copy of y

Input side (:func:`fuse_shared_inputs`): branches that read the same input (q/k/v of one attention,
gate/up of one MLP) and have no LoRA dropout share one matmul with the concatenated A::

    before:  hq = linear(x, Aq); hk = linear(x, Ak); hv = linear(x, Av)
    after:   hq, hk, hv = split(linear(x, cat([Aq, Ak, Av])), [rq, rk, rv], -1)

The parameters stay separate (names, adapter files and PEFT interop unchanged); ``cat`` copies only
the small A matrices each step, and its backward splits the gradient back. Every node is tagged as a
LoRA node, so fold erases it like any other branch node.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from ..graph_module import NODE_LORA

__all__ = ["build_addmm", "fuse_shared_inputs", "lora_addmm"]

aten = torch.ops.aten


def lora_addmm(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y + scale * h @ b.T`` as one addmm over the flattened leading dimensions.

    With fp32 adapters on a half-precision base (``y`` bf16/fp16, ``h`` fp32) the sum is formed in
    fp32 and rounded once to ``y``'s dtype, as PEFT does. Under ``torch.autocast`` ``y`` and ``h``
    share the autocast dtype and addmm runs in it.

    In eager mode the sum is accumulated into ``y`` itself (``addmm_``): ``y`` is the site's fresh
    matmul output, which only this node reads and no backward saves, so the in-place form computes
    the same values and gradients without copying ``y`` into a new tensor first (see
    :func:`_accumulates_in_place` for when it does not apply).
    """
    if torch.compiler.is_exporting():  # ONNX: MatMul + Mul + Add, no Reshape/Shape plumbing
        return (y.to(h.dtype) + torch.nn.functional.linear(h, b) * scale).to(y.dtype)
    out = y.shape[-1]
    if _accumulates_in_place(y, h, b):
        flat = torch.ops.aten._unsafe_view(y, (-1, out))  # same storage, not an autograd view of y
        flat.addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
        return torch.ops.aten._unsafe_view(flat, y.shape)
    acc = y.reshape(-1, out)
    if acc.dtype != h.dtype:
        acc = acc.to(h.dtype)
    merged = torch.addmm(acc, h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
    return merged.to(y.dtype).view(y.shape)


def _accumulates_in_place(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`lora_addmm` may add into ``y``: plain eager autograd on a fresh, contiguous,
    non-view, non-leaf ``y`` of the adapters' dtype. Not under torch.compile (Inductor fuses the
    out-of-place form anyway) and not under any dispatch mode: the selective checkpoint policy caches
    the matmul output ``y`` in one (mutating it would corrupt the cache), and fake/meta tracing modes
    gain nothing from it."""
    return (y.dtype == h.dtype == b.dtype and y.dim() >= 2 and y.is_contiguous() and y._base is None
            and not (y.is_leaf and y.requires_grad) and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def build_addmm(emit, node: fx.Node, x: fx.Node, a: str, b: str, dropout: float, training: fx.Node,
                scale: float) -> fx.Node:
    """Emits ``lora_addmm(y, linear(dropout(x), A), B, s)`` after the site's ``node``; returns it."""
    a_node, b_node = emit("get_attr", a), emit("get_attr", b)
    if dropout > 0.0:
        x = emit("call_function", aten.dropout.default, (x, dropout, training))
    h = emit("call_function", aten.linear.default, (x, a_node))
    return emit("call_function", lora_addmm, (node, h, b_node, scale))


def _source(node: fx.Node) -> tuple[fx.Node, object]:
    """(the tensor a LoRA A-matmul reads, the dtype cast lorafy put on it or None)."""
    x = node.args[0]
    if isinstance(x, fx.Node) and NODE_LORA in x.meta and x.target is aten._to_copy.default:
        return x.args[0], x.kwargs.get("dtype")
    return x, None


def fuse_shared_inputs(graph: fx.Graph) -> int:
    """Merges LoRA A-matmuls that read the same tensor into one (see module doc); returns how many groups."""
    groups: dict[tuple[fx.Node, object], list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if (NODE_LORA in node.meta and node.target is aten.linear.default and len(node.args) == 2
                and not node.kwargs and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
                and ".lora_A." in f".{node.args[1].target}"):
            groups[_source(node)].append(node)
    fused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        first, tag = members[0], "+".join(str(m.meta[NODE_LORA]) for m in members)
        ranks = [int(graph.owning_module.get_parameter(str(m.args[1].target)).shape[0]) for m in members]
        with graph.inserting_before(first):
            a_nodes = []
            for m in members:
                a = graph.get_attr(m.args[1].target)
                a.meta[NODE_LORA] = tag
                a_nodes.append(a)
            cat = graph.call_function(aten.cat.default, (a_nodes, 0))
            h = graph.call_function(aten.linear.default, (first.args[0], cat))
        for n in (cat, h):
            n.meta[NODE_LORA] = tag
        with graph.inserting_after(h):
            parts = graph.call_function(aten.split_with_sizes.default, (h, ranks, -1))
        parts.meta[NODE_LORA] = tag
        cursor = parts
        for k, m in enumerate(members):
            with graph.inserting_after(cursor):
                cursor = graph.call_function(operator.getitem, (parts, k))
            cursor.meta[NODE_LORA] = m.meta[NODE_LORA]
            m.replace_all_uses_with(cursor)
        for m in members:
            old_a, old_x = m.args[1], m.args[0]
            graph.erase_node(m)
            for dead in (old_a, old_x):
                if isinstance(dead, fx.Node) and not dead.users and NODE_LORA in dead.meta:
                    graph.erase_node(dead)
        fused += 1
    return fused
