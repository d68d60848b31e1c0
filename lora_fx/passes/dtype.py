"""The dtype pass: a captured graph moved to another float dtype (fp16 / bf16 for deployment).

The capture baked its float dtype into the graph; :func:`retype` rewrites it::

    aten.to(x, torch.float32)              ->  aten.to(x, torch.float16)
    aten.full(..., dtype=torch.float32)    ->  aten.full(..., dtype=torch.float16)
    aten._assert_tensor_metadata(x, dtype=torch.float32)   ->  (removed)

The weights themselves are converted by the streamed export (exporters/streaming.py: each one while
it is written), after fold merged in fp32, so every weight is rounded once.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..graph_module import LoraFxModule

__all__ = ["cast_inputs", "float_dtype", "retype"]


def float_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The dtype of the first floating parameter (fp32 when there is none)."""
    return next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)


def cast_inputs(tree, dtype: torch.dtype | None):
    """Floating tensors of a pytree of inputs in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tree
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def retype(module: LoraFxModule, old: torch.dtype, new: torch.dtype) -> LoraFxModule:
    """Moves a captured graph to another float dtype: the capture baked its dtype into casts
    (``aten.to(x, float32)``, ``full(..., dtype=float32)``) and metadata asserts; rewrite those."""

    def swap(a):
        if a is old:
            return new
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        return a

    graph = module.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            continue
        node.args = swap(node.args)
        node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    graph.lint()
    module.recompile()
    return module
