"""Give a captured graph its blocks back, so FSDP2 can shard it one transformer block at a time.

``torch.export`` flattens the model: one graph whose root reads every weight, which defeats
per-block ``fully_shard`` (a block that is never *called* never gathers or frees its shard). This
pass splits the flat graph (with ``torch.fx.passes.split_module``) into one submodule per block,
each owning its block's base weights *and* the LoRA A/B of the sites inside it::

    before:  root.forward: embed -> [every op of layer 0] -> ... -> [layer N-1] -> norm -> head
    after:   root.forward: x = pre(ids); x = blocks.0(x, ...); ...; x = blocks.N-1(x, ...); post(x)
             blocks.i: a GraphModule with model.layers.i.* weights and their lora_A / lora_B

A node belongs to block i when its module path (``nn_module_stack``; for LoRA nodes the site's path;
for weight reads the weight's name) is under ``<prefix>.<i>``; other nodes join the latest block
their inputs come from, so the blocks run in order and no block reads a later one. Tensors are
shared, never copied: the split module computes exactly what ``lgm`` computes, and
``lora_parameters`` / ``save_adapter`` keep working on ``lgm`` (same Parameter objects).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from .errors import SiteError
from .graph_module import (
    CAPTURE_KEY,
    NODE_LORA,
    LoraFxModule,
    del_attr_path,
    get_attr_path,
    has_lora,
    lora_state,
    prune_empty_modules,
    set_attr_path,
    wrap,
)
from .sites import module_path

__all__ = ["BLOCKS", "blocks_of", "split_blocks", "split_name"]

BLOCKS = "blocks"


def split_blocks(lgm: fx.GraphModule, prefix: str = "model.layers") -> LoraFxModule:
    """Returns ``lgm`` split into ``pre``, ``blocks.<i>`` and ``post`` submodules (see module doc).

    Args:
        lgm: a captured or lorafied module (from ``trace`` / ``lorafy``).
        prefix: module path of the block list (``model.layers`` for Llama/Qwen/Mistral,
            ``transformer.h`` for GPT-2, ``bert.encoder.layer`` for BERT).

    Raises:
        SiteError: no node of the graph lies under ``prefix.<i>`` (the message lists the module
            paths the graph has).
    """
    block = re.compile(rf"^{re.escape(prefix)}\.(\d+)(?:\.|$)")
    sites = {br.site.id: br.site.path for br in lora_state(lgm, "split_blocks").branches} if has_lora(lgm) else {}

    def own(node: fx.Node) -> int | None:
        if NODE_LORA in node.meta:
            path = sites.get(node.meta[NODE_LORA], "")
        elif node.op == "get_attr":
            path = str(node.target)
        else:
            path = module_path(node, None) or ""
        m = block.match(path)
        return int(m.group(1)) if m else None

    owners = {node: own(node) for node in lgm.graph.nodes if node.op not in ("placeholder", "output")}
    found = {b for b in owners.values() if b is not None}
    post = max(found, default=0) + 2
    order = list(owners)
    end = max((i for i, n in enumerate(order) if owners[n] is not None and n.op != "get_attr"), default=-1)
    part: dict[fx.Node, int] = {}
    for i, (node, mine) in enumerate(owners.items()):
        inputs = max((part.get(a, 0) for a in node.all_input_nodes), default=0)
        if mine is not None:
            part[node] = max(mine + 1, inputs)
        elif i > end and inputs:
            part[node] = post  # after the last block (final norm, head): the post part
        else:
            part[node] = inputs  # masks, shape arithmetic, getitem: where their inputs are
    if not found:
        paths = sorted({(module_path(n, None) or "").rsplit(".", 1)[0] for n in lgm.graph.nodes if n.op == "call_function"})
        raise SiteError(f"split_blocks: no node lies under {prefix!r}.<i>; module paths in this graph include "
                        f"{[p for p in paths if p][:6]}; pass prefix= the path of the block list")
    last = max(part.values())

    def callback(node: fx.Node) -> int:
        return part.get(node, 0) if node.op != "get_attr" else 0

    split = split_module(lgm, lgm, callback, keep_original_order=True, keep_original_node_name=True)
    split.graph._codegen = copy.deepcopy(lgm.graph._codegen)  # same (args, kwargs) -> output pytree
    _move_weights_in(split)
    out = wrap(split)
    out.meta = {k: v for k, v in lgm.meta.items() if k == CAPTURE_KEY}
    names = {f"submod_{i + 1}": f"{BLOCKS}.{i}" for i in sorted(found)}
    names |= {f"submod_{k}": "post" if k > max(found) + 1 else f"pre{k or ''}"
              for k in range(last + 1) if f"submod_{k}" not in names}
    _rename(out, names)
    out.training = lgm.training
    return out


def split_name(name: str) -> str:
    """The name a parameter of the split module has in ``lgm`` (``blocks.3.model.layers.3.x`` -> ``model.layers.3.x``)."""
    head, _, rest = name.partition(".")
    if head == BLOCKS:
        return rest.partition(".")[2]
    return rest if head in ("pre", "post") else name


def blocks_of(split: nn.Module) -> list[nn.Module]:
    """The block submodules of :func:`split_blocks`' result, in order (what to ``fully_shard``)."""
    holder = getattr(split, BLOCKS, None)
    if holder is None:
        raise SiteError(f"{type(split).__name__} has no '{BLOCKS}' submodule: pass what split_blocks() returned")
    return [holder.get_submodule(str(i)) for i in sorted(int(k) for k, _ in holder.named_children())]


def _move_weights_in(split: fx.GraphModule) -> None:
    """split_module passes weights to each part as inputs; a weight read by one part only moves
    into that part (a get_attr there), so sharding the part shards it. Tensors are shared, not copied."""
    graph = split.graph
    for call in [n for n in graph.nodes if n.op == "call_module"]:
        sub = split.get_submodule(str(call.target))
        holders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        keep_args, moved = [], False
        for arg, ph in zip(call.args, holders, strict=True):
            value = _param(split, arg)
            if value is None or len(arg.users) != 1:
                keep_args.append(arg)
                continue
            set_attr_path(sub, str(arg.target), value)
            with sub.graph.inserting_before(ph):
                attr = sub.graph.get_attr(str(arg.target))
            ph.replace_all_uses_with(attr)
            sub.graph.erase_node(ph)
            moved = True
        if moved:
            sub.recompile()
            call.args = tuple(keep_args)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    parts = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    for name in list(dict(split.named_parameters(remove_duplicate=False))):
        if name.partition(".")[0] not in parts and name not in read:
            del_attr_path(split, name)  # moved into the one part that reads it
    prune_empty_modules(split)
    split.recompile()


def _param(root: nn.Module, arg) -> nn.Parameter | None:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = get_attr_path(root, str(arg.target))
    return value if isinstance(value, (nn.Parameter, torch.Tensor)) else None


def _rename(gm: fx.GraphModule, names: dict[str, str]) -> None:
    """Moves call_module targets ``submod_k`` to readable names (``blocks.3``, ``pre``, ``post``)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names:
            new = names[node.target]
            module = gm.get_submodule(node.target)
            delattr(gm, node.target)
            owner, _, leaf = new.rpartition(".")
            parent = gm
            if owner:
                if not hasattr(gm, owner):
                    gm.add_module(owner, nn.Module())
                parent = gm.get_submodule(owner)
            parent.add_module(leaf, module)
            node.target = new
    gm.recompile()
