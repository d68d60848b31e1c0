"""Finds the matmuls LoRA can adapt. What is adaptable is data: ``OPS`` and ``MODULE_OPS`` below.

A *site* is one call of a matmul-like op whose weight is a parameter. Its module path comes from
``node.meta["nn_module_stack"]`` (torch.export) or the call_module target (symbolic_trace), falling back
to the parent of the weight's name. One weight used by several ops gives several sites, so each call
can be adapted on its own (GPT-2's tied ``lm_head`` / ``wte``).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_facts import is_transpose
from .graph_module import NODE_LORA

aten = torch.ops.aten

# Weight layouts. A LoRA pair is always A (r, in) and B (out, r) (PEFT's shapes); the layout says how
# the weight tensor stores (out, in) so fold can add B@A in the right place.
OUT_IN = "out,in"  # nn.Linear, x @ w.T
IN_OUT = "in,out"  # GPT-2 Conv1D (addmm), x @ w
CONV = "conv"  # (out, in, *kernel)
EMBED = "embedding"  # (num_embeddings, dim): a lookup; A is (r, num), B is (dim, r)


@dataclass(frozen=True)
class OpSpec:
    """How to read one op: its kind, which arg is the activation, which the weight, default layout."""

    kind: str  # "linear" | "conv" | "embedding" | "einsum"
    x: int
    w: int
    layout: str


OPS: dict[object, OpSpec] = {
    aten.linear.default: OpSpec("linear", 0, 1, OUT_IN),
    aten.addmm.default: OpSpec("linear", 1, 2, IN_OUT),
    aten.mm.default: OpSpec("linear", 0, 1, IN_OUT),
    aten.matmul.default: OpSpec("linear", 0, 1, IN_OUT),
    aten.conv1d.default: OpSpec("conv", 0, 1, CONV),
    aten.conv2d.default: OpSpec("conv", 0, 1, CONV),
    aten.conv1d.padding: OpSpec("conv", 0, 1, CONV),
    aten.conv2d.padding: OpSpec("conv", 0, 1, CONV),
    aten.embedding.default: OpSpec("embedding", 1, 0, EMBED),
    aten.einsum.default: OpSpec("einsum", 1, 1, OUT_IN),  # operands list; resolved per equation
    # symbolic_trace graphs call torch functions directly
    F.linear: OpSpec("linear", 0, 1, OUT_IN),
    torch.matmul: OpSpec("linear", 0, 1, IN_OUT),
    operator.matmul: OpSpec("linear", 0, 1, IN_OUT),
    torch.mm: OpSpec("linear", 0, 1, IN_OUT),
    F.conv1d: OpSpec("conv", 0, 1, CONV),
    F.conv2d: OpSpec("conv", 0, 1, CONV),
    F.embedding: OpSpec("embedding", 0, 1, EMBED),
    torch.einsum: OpSpec("einsum", 1, 1, OUT_IN),
}

MODULE_OPS: dict[type, OpSpec] = {
    nn.Linear: OpSpec("linear", 0, -1, OUT_IN),
    nn.Conv1d: OpSpec("conv", 0, -1, CONV),
    nn.Conv2d: OpSpec("conv", 0, -1, CONV),
    nn.Embedding: OpSpec("embedding", 0, -1, EMBED),
}

GROUPS_ARG = 6  # conv*(input, weight, bias, stride, padding, dilation, groups)


@dataclass(frozen=True)
class Site:
    """One adaptable matmul. ``in_features``/``out_features`` are the LoRA view: A (r,in), B (out,r)."""

    id: str  # unique: module path, or "path#k" when one module makes several calls
    path: str  # module path (nn_module_stack)
    op: str  # short op name: linear, addmm, matmul, einsum, conv2d, embedding, ...
    kind: str
    weight: str  # qualified name of the weight parameter
    layout: str
    shape: tuple[int, ...]
    in_features: int
    out_features: int
    node: str  # fx node name
    transposed: bool = False  # weight reaches the op through a transpose
    equation: str | None = None  # einsum only
    w_operand: int | None = None  # einsum only: which operand is the weight

    @property
    def params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.id:<40} {self.op:<10} {self.weight} [{shape}]"


def sites(gm: fx.GraphModule) -> list[Site]:
    """Lists every adaptable matmul of ``gm`` in graph order (LoRA's own matmuls excluded)."""
    found: list[tuple[fx.Node, dict]] = []
    for node in gm.graph.nodes:
        if NODE_LORA in node.meta:
            continue
        info = _describe(gm, node)
        if info is not None:
            found.append((node, info))
    per_path = Counter(info["path"] for _, info in found)
    per_weight = Counter(info["weight"] for _, info in found)
    bases = []
    for _, info in found:
        path, weight = info["path"], info["weight"]
        # one call in a module -> its path; else the weight's name if only one op reads it
        if per_path[path] == 1 and path:
            bases.append(path)
        elif per_weight[weight] == 1:
            bases.append(weight)
        else:
            bases.append(f"{path}:{weight}" if path else weight)
    per_base = Counter(bases)
    seen: Counter = Counter()
    out = []
    for (node, info), base in zip(found, bases, strict=True):
        sid = base
        if per_base[base] > 1:  # the same module reads the same weight several times: number the calls
            sid = f"{base}#{seen[base]}"
            seen[base] += 1
        out.append(Site(id=sid, node=node.name, **info))
    return out


def weight_node(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, str | None, bool]:
    """The get_attr node feeding a site's weight (through at most one transpose), its name, transposed."""
    spec = _spec(gm, node)
    if spec is None or spec.kind == "einsum" or node.op == "call_module":
        return None, None, False
    return _param_source(gm, _arg(node, spec.w))


def module_path(node: fx.Node, weight: str | None) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.split("@")[0]
    if weight is None:
        return ""
    return weight.rpartition(".")[0]


def _spec(gm: fx.GraphModule, node: fx.Node) -> OpSpec | None:
    if node.op == "call_function":
        return OPS.get(node.target)
    if node.op == "call_method" and node.target == "matmul":
        return OPS[torch.matmul]
    if node.op == "call_module":
        return MODULE_OPS.get(type(gm.get_submodule(str(node.target))))
    return None


def _arg(node: fx.Node, i: int):
    return node.args[i] if len(node.args) > i else None


def _param_source(gm: fx.GraphModule, arg) -> tuple[fx.Node | None, str | None, bool]:
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


def _describe(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    spec = _spec(gm, node)
    if spec is None:
        return None
    op = (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target)))
    op = str(op).split(".")[0]
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if spec.kind == "conv" and mod.groups != 1:
            return None
        wname, weight, transposed = f"{node.target}.weight", mod.weight, False
        op = type(mod).__name__
    elif spec.kind == "einsum":
        return _describe_einsum(gm, node)
    else:
        wnode, wname, transposed = _param_source(gm, _arg(node, spec.w))
        if wnode is None:
            return None
        weight = gm.get_parameter(wname)
        if spec.kind == "conv" and (_arg(node, GROUPS_ARG) or 1) != 1:
            return None
        if spec.kind == "linear" and weight.dim() != 2:
            return None
    layout = spec.layout
    if transposed:
        layout = IN_OUT if layout == OUT_IN else OUT_IN
    shape = tuple(weight.shape)
    if spec.kind == "linear":
        out_f, in_f = shape if layout == OUT_IN else shape[::-1]
    elif spec.kind == "conv":
        out_f, in_f = shape[0], shape[1]
    else:
        in_f, out_f = shape
    return dict(path=module_path(node, wname), op=op, kind=spec.kind, weight=wname, layout=layout,
                shape=shape, in_features=in_f, out_features=out_f, transposed=transposed)


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


def _describe_einsum(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    for wi, operand in enumerate(operands):
        wnode, wname, transposed = _param_source(gm, operand)
        if wnode is None or transposed:
            continue
        roles = einsum_roles(equation, wi)
        if roles is None:
            return None
        out_c, in_c, _ = roles
        weight = gm.get_parameter(wname)
        wsubs = equation.replace(" ", "").split("->")[0].split(",")[wi]
        layout = OUT_IN if wsubs.index(out_c) == 0 else IN_OUT
        shape = tuple(weight.shape)
        out_f, in_f = shape if layout == OUT_IN else shape[::-1]
        return dict(path=module_path(node, wname), op="einsum", kind="einsum", weight=wname,
                    layout=layout, shape=shape, in_features=in_f, out_features=out_f, equation=equation,
                    w_operand=wi)
    return None
