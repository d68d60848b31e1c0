"""Out-of-place forms of the captured graph's in-place ops that would break backward.

A custom ``torch.autograd.Function`` is captured as its forward, inlined. Hugging Face's ``XSoftmax`` (SEW-D,
older DeBERTa) ends its forward with an in-place ``masked_fill_`` on the softmax output: eager training never
differentiates that forward (the Function's own backward runs instead), but the captured graph's autograd
does, and softmax's backward needs its output unmodified::

    before:  p = softmax(s, -1);  p2 = masked_fill_(p, m, 0)     # backward: "modified by an inplace operation"
    after:   p = softmax(s, -1);  p2 = masked_fill(p, m, 0)      # same values; later reads of p read p2

:func:`functionalize` rewrites an in-place ``aten.op_`` into ``aten.op`` (same overload) where the tensor it
overwrites is needed by backward: produced by an op whose backward reads its output (softmax, sigmoid, tanh,
exp...) or read by another op before it. The overwritten tensor must be an intermediate that nothing aliases
(not an input, a parameter or buffer, a view, or viewed): then every later read of it reads the result instead,
and the graph computes exactly what it computed. Other in-place ops stay (ReLU(inplace) after a conv: in place
saves an activation and breaks nothing). ``trace`` runs it on the graph before recording it as the captured
graph, so fold gives back this graph and the ONNX export (which functionalizes anyway) is unchanged.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["functionalize", "out_of_place", "SAVES_OUTPUT"]

aten = torch.ops.aten

# ops whose backward reads their output (an in-place write on it corrupts their gradient)
SAVES_OUTPUT = frozenset({"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "sigmoid", "tanh",
                          "exp", "relu", "elu", "sqrt", "rsqrt", "hardsigmoid", "silu"})


def _overload(node: object) -> torch._ops.OpOverload | None:
    if isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target
    return None


def _aliases(op: torch._ops.OpOverload) -> bool:
    """Whether an op's output may alias an input (a view, or an in-place op returning ``self``)."""
    return any(r.alias_info is not None for r in op._schema.returns)


def out_of_place(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.op.overload`` for an in-place ``aten.op_.overload`` writing its first argument, if it exists."""
    schema = op._schema
    args = schema.arguments
    name = op.overloadpacket.__name__
    if not (name.endswith("_") and not name.startswith("_") and args and args[0].alias_info is not None
            and args[0].alias_info.is_write):
        return None
    packet = getattr(aten, name[:-1], None)
    functional = getattr(packet, op._overloadname, None) if packet is not None else None
    if functional is None or _aliases(functional):
        return None
    if [a.name for a in functional._schema.arguments] != [a.name for a in args]:
        return None
    return functional


def _needed_by_backward(x: fx.Node, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    producer = _overload(x)
    if producer is not None and producer.overloadpacket.__name__ in SAVES_OUTPUT:
        return True
    return any(u is not node and order[u] < order[node] for u in x.users)


def _private(x: object, node: fx.Node) -> bool:
    """``x`` is an intermediate tensor that nothing else aliases (writing it changes nothing but itself)."""
    producer = _overload(x)
    if producer is None or _aliases(producer):
        return False
    return all(u is node or _overload(u) is None or not _aliases(_overload(u)) or u.op != "call_function"
               for u in x.users)


def functionalize(graph: fx.Graph) -> int:
    """Rewrites in-place ops that would break backward into their out-of-place forms (see the module doc);
    returns how many. The caller recompiles the module."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    n = 0
    for node in list(graph.nodes):
        op = _overload(node)
        functional = out_of_place(op) if op is not None and op._schema.is_mutable else None
        x = node.args[0] if node.args else None
        if functional is None or not _private(x, node) or not _needed_by_backward(x, node, order):
            continue
        node.target = functional
        for user in list(x.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(x, node)
        n += 1
    if n:
        graph.lint()
    return n
