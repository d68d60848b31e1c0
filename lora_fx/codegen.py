"""Python code generation for the GraphModules lora-fx hands back: fx's generated ``forward``, faster.

fx writes every parameter read as the full attribute chain from ``self``; :func:`share_attribute_prefixes`
resolves each shared module once per call. Used by ``LoraFxModule.recompile`` (graph_module.py) and the
checkpointed code (passes/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import keyword
from collections import Counter

from torch import fx
from torch.fx import graph as fx_graph
from torch.fx.graph import PythonCode

__all__ = ["share_attribute_prefixes"]


def share_attribute_prefixes(code: PythonCode, graph: fx.Graph) -> PythonCode:
    """``code`` with each module path that several ``get_attr`` nodes read resolved once per call.

    fx writes every parameter read as the full chain from ``self``
    (``getattr(self.model.layers, "0").self_attn.q_proj.lora_A.weight``: one ``Module.__getattr__`` per
    link, ~3000 per forward of a 22-layer decoder, ~10% of its host time). Here the first read of a
    shared module binds it to a local (``(_lfx_3 := getattr(_lfx_2, "0"))``) and later reads start
    from that local. Attribute reads only, in the order fx wrote them, on the same line (fx's line
    map stays valid): the same objects are read as before, within one call. Lines in another form
    (other torch versions) are left as written.
    """
    src = code.src
    reads = [n for n in graph.nodes if n.op == "get_attr" and isinstance(n.target, str)]
    if "_lfx_" in src or len(reads) < 2:
        return code
    uses = Counter(".".join(atoms[:k]) for atoms in (n.target.split(".") for n in reads) for k in range(1, len(atoms)))
    local = {prefix: f"_lfx_{i}" for i, prefix in enumerate(p for p, count in uses.items() if count > 1)}
    if not local:
        return code
    lines, bound, changed = src.split("\n"), set(), False
    at = {n.name: n.target for n in reads}
    for i, line in enumerate(lines):
        name = line.strip().split(" ", 1)[0].split(":", 1)[0]
        target = at.get(name)
        if target is None:
            continue
        before = " = " + fx_graph._format_target("self", target)
        j = line.find(before)
        end = j + len(before)
        if j < 0 or (end < len(line) and line[end] != ";"):
            continue
        atoms, expr = target.split("."), "self"
        for k, atom in enumerate(atoms):
            expr = _attribute(expr, atom)
            prefix = ".".join(atoms[:k + 1])
            if prefix in bound:
                expr = local[prefix]
            elif prefix in local:
                expr, bound = f"({local[prefix]} := {expr})", bound | {prefix}
        lines[i] = line[:j] + " = " + expr + line[end:]
        changed = True
    if not changed:
        return code
    return dataclasses.replace(code, src="\n".join(lines))


def _attribute(expr: str, atom: str) -> str:
    return f"{expr}.{atom}" if atom.isidentifier() and not keyword.iskeyword(atom) else f'getattr({expr}, "{atom}")'
