"""Facts about a graph that several passes ask: transposes, reads of a weight, names of copies.

One home for each (they were answered in four slightly different ways before):

* :func:`param_source`: the parameter (get_attr node, name) behind an op's weight argument.
* :func:`is_transpose`: an op between a weight and its matmul that only swaps its two dims
  (``aten.t``, ``numpy_T``, ``transpose``, ``permute``, ``w.T`` / ``w.mT``, ``w.t()``). Matched on the
  op itself, never on a substring of its name (``"aten.t"`` is also a prefix of ``aten.tanh``).
* :func:`weight_reads`: how many ops read each weight attribute (a read through a transpose counts
  once per user of the transpose), i.e. whether rewriting it changes only the site being adapted.
  One scan for every attribute: a pass asks it once, never once per site (that is sites x nodes).
* :func:`input_sizes` / :func:`symbolic_dims`: the sizes of a captured graph's inputs, and which dimensions
  of each example input it keeps symbolic (what ``lora_fx.dynamic_dims`` then proves by running it).
* :func:`call_suffix`, :func:`branch_leaf`, :func:`untied_name`: the names lorafy gives A/B of one
  call of a module and fold gives the folded copy of a shared weight, which refold looks up again in
  the ONNX file::

      site "path#k", slice (s, e)  ->  leaf  "<attr>_call<k>_slice<s>_<e>"  (lora_A.<leaf>, lora_B.<leaf>)
      untied copy of <path>.<attr> ->  "<path>.<attr>_folded_call<k>"       (``_call<k>`` only for "#k")
      untied module call k         ->  "<module>_folded_call<k>"            (symbolic_trace graphs)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

__all__ = ["branch_leaf", "call_suffix", "input_sizes", "is_transpose", "param_source", "symbolic_dims",
    "TRANSPOSES", "untied_module_name", "untied_name", "weight_reads"]

aten = torch.ops.aten

# call_function targets that only swap the two dims of a 2-D weight.
TRANSPOSES = frozenset({aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default,
                        torch.t, torch.transpose})
_METHOD_TRANSPOSES = frozenset({"t", "transpose", "permute"})
_ATTR_TRANSPOSES = frozenset({"T", "mT"})


def is_transpose(node: object) -> bool:
    """True when ``node`` is an fx node that transposes its first argument (see the module doc)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _METHOD_TRANSPOSES
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _ATTR_TRANSPOSES
    return node.target in TRANSPOSES


def param_source(gm: fx.GraphModule, arg: object) -> tuple[fx.Node | None, str | None, bool]:
    """The get_attr node of a parameter feeding ``arg`` (through at most one transpose of a 2-D
    weight), its qualified name, and whether it is transposed; (None, None, False) otherwise."""
    if not isinstance(arg, fx.Node):
        return None, None, False
    transposed = False
    if is_transpose(arg) and isinstance(arg.args[0], fx.Node):
        transposed, arg = True, arg.args[0]
    if arg.op != "get_attr":
        return None, None, False
    try:
        value = gm.get_parameter(str(arg.target))
    except AttributeError:
        return None, None, False
    if value.dim() != 2 and transposed:
        return None, None, False
    return arg, str(arg.target), transposed


def weight_reads(graph: fx.Graph) -> Counter[str]:
    """How many ops read each attribute (directly, or through a transpose of it), in one scan."""
    reads: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                reads[str(node.target)] += len(user.users) if is_transpose(user) else 1
    return reads


def call_suffix(site_id: str) -> str:
    """``"_call<k>"`` for the k-th call ``"path#k"`` of a module that reads one weight several times."""
    return f"_call{site_id.rpartition('#')[2]}" if "#" in site_id else ""


def branch_leaf(weight: str, site_id: str, sl: tuple[int, int] | None = None) -> str:
    """The leaf name of a branch's A/B parameters: ``<attr>[_call<k>][_slice<s>_<e>]``."""
    attr = weight.rpartition(".")[2]
    return f"{attr}{call_suffix(site_id)}" + (f"_slice{sl[0]}_{sl[1]}" if sl else "")


def untied_name(path: str, weight: str, site_id: str) -> str:
    """The name of the folded copy fold makes of a weight other ops still read."""
    attr = weight.rpartition(".")[2] if weight else "weight"
    name = f"{attr}_folded{call_suffix(site_id)}"
    return f"{path}.{name}" if path else name


def untied_module_name(target: str, k: int) -> str:
    """The name of the folded copy of a module whose k-th call is adapted (symbolic_trace graphs)."""
    return f"{target}_folded_call{k}"


def input_sizes(graph: fx.Graph, inputs: object) -> dict[int, tuple] | None:
    """Per leaf index of ``inputs`` (pytree leaves) that is a tensor, the size of the graph's placeholder for it
    (ints and ``SymInt``s); None when unknown (no shape metadata, as in symbolic_trace graphs, or placeholders
    that do not pair one to one, in order, with the tensor leaves)."""
    from torch.utils import _pytree as pytree

    vals = [v for n in graph.nodes if n.op == "placeholder" and isinstance(v := n.meta.get("val"), torch.Tensor)]
    tensors = [(k, t) for k, t in enumerate(pytree.tree_leaves(inputs)) if isinstance(t, torch.Tensor)]
    if not vals or len(vals) != len(tensors) or any(v.dim() != t.dim() for v, (_, t) in zip(vals, tensors, strict=True)):
        return None
    return {k: tuple(v.shape) for v, (k, _) in zip(vals, tensors, strict=True)}


def symbolic_dims(graph: fx.Graph, inputs: object) -> dict[int, set[int]] | None:
    """Per leaf index of ``inputs`` (pytree leaves), the dimensions the graph's placeholder for that
    tensor keeps symbolic; None when unknown (see :func:`input_sizes`). Symbolic is not proven: a graph
    can fix a size inside (``lora_fx.dynamic_dims`` proves them)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    sizes = input_sizes(graph, inputs)
    if sizes is None:
        return None
    return {k: {d for d, size in enumerate(shape) if not is_concrete_int(size)} for k, shape in sizes.items()}
