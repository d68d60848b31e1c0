"""Finds the matmuls LoRA can adapt. What is adaptable is the op-kind registry (:mod:`lora_fx.kinds`).

A *site* is one call of a matmul-like op whose weight is a parameter. Its module path comes from
``node.meta["nn_module_stack"]`` (torch.export) or the call_module target (symbolic_trace), falling back
to the parent of the weight's name. One weight used by several ops gives several sites, so each call
can be adapted on its own (GPT-2's tied ``lm_head`` / ``wte``).

Site ids: the module path when the module makes one adaptable call; else the weight's name when only
one op reads it; else ``path:weight``; a base shared by several calls gets ``#k`` (k-th in graph order).
Sites whose LoRA would belong to one module and weight under different ids (ProphetNet's decoder embeds
with ``position_embeddings`` and with its weight directly) share the base ``owner:weight`` and are
numbered, so their A/B names never collide.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx

from . import kinds
from .graph_module import NODE_LORA

__all__ = ["module_path", "Site", "sites"]


@dataclass(frozen=True)
class Site:
    """One adaptable matmul. ``in_features``/``out_features`` are the LoRA view: A (r,in), B (out,r)."""

    id: str  # unique: module path, or "path#k" when one module makes several calls
    path: str  # module path (nn_module_stack)
    op: str  # short op name: linear, addmm, matmul, einsum, conv2d, embedding, ...
    kind: str  # a registered op kind (lora_fx.kinds): linear, conv, embedding, einsum, ...
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

    @property
    def owner(self) -> str:
        """The module this site's LoRA belongs to (see :func:`owner_of`)."""
        return owner_of(self.path, self.weight)

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
    _share_owner_bases(found, bases)
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


def owner_of(path: str, weight: str) -> str:
    """The module LoRA of a site belongs to: the weight's owner when the caller reached into a child's weight
    (timm's ``F.linear(x, self.qkv.weight)``: path ``blocks.0.attn``, owner ``blocks.0.attn.qkv``), else the
    calling module's path. A tied weight read by another module (GPT-2's ``lm_head`` reading ``wte.weight``)
    is not owned below its caller and stays the caller's."""
    owner = weight.rpartition(".")[0]
    if owner and owner != path and (not path or owner.startswith(path + ".")):
        return owner
    return path


def _share_owner_bases(found: list[tuple[fx.Node, dict]], bases: list[str]) -> None:
    """Sites of one owner and weight with different bases get the base ``owner:weight`` (then numbered)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, info) in enumerate(found):
        groups.setdefault((owner_of(info["path"], info["weight"]), info["weight"]), []).append(i)
    for (owner, weight), members in groups.items():
        if len({bases[i] for i in members}) > 1:
            for i in members:
                bases[i] = f"{owner}:{weight}" if owner else weight


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


def _describe(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    spec = kinds.spec_of(gm, node)
    if spec is None:
        return None
    info = kinds.get(spec.kind).describe(gm, node, spec)
    if info is not None:
        info["path"] = module_path(node, info["weight"])
    return info
