"""The checkpoint pass: recompute the captured graph's blocks in backward (activation checkpointing).

Capture drops a model's own gradient checkpointing (``gradient_checkpointing_enable()`` is Python
control flow torch.export does not see). This pass puts it back on the graph: the nodes of every
module whose path matches a pattern (found from ``node.meta["nn_module_stack"]``, e.g. the decoder
layers ``model.layers.0`` ... for ``"*.layers.*"``) become one region, and in training each region
runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, RNG state preserved)::

    before:  h1 = layer0(h0, cos, sin, mask)          # every intermediate kept for backward
    after:   h1 = checkpoint(region0, h0, cos, sin, mask, W..., A..., B...)
             # forward keeps only the region's inputs; backward re-runs region0 (same dropout masks)

The module keeps its flat ``graph``: ``sites``, ``lorafy``, ``fold``, ``save_adapter`` and the
exporters read the graph, which is unchanged, and the regions are rebuilt from it on every
``recompile()`` (so LoRA branches added later by ``lorafy`` are recomputed with their block).
Only the generated ``forward`` differs, and only while it matters: in ``.train()`` mode with grad
enabled and outside ``torch.export``; otherwise the flat code runs, so nothing of this pass reaches
an exported graph.

Policies: ``"full"`` keeps only each region's inputs (least memory, one extra forward of the blocks);
``"selective"`` keeps the outputs of the matmuls and attention kernels and recomputes the cheap
elementwise ops between them (norms, activations, rotary, residual adds, dropout) and the low-rank
products (a LoRA B product, inner dimension the rank: recomputed from the kept base output and ``A x``,
so each site keeps one wide output, not two).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import operator
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.graph_module import _forward_from_src
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ..codegen import share_attribute_prefixes
from ..errors import PatternError
from ..graph_module import LoraFxModule, copy_module, wrap

__all__ = ["checkpoint", "CheckpointedModule", "CheckpointState", "CKPT_KEY", "POLICIES"]

CKPT_KEY = "lora_fx_checkpoint"
POLICIES = ("full", "selective")
aten = torch.ops.aten

# Outputs the selective policy keeps: the expensive ops (matmuls, attention, conv). Everything else
# between them is elementwise or a view and is recomputed.
_SAVE = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
         aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_efficient_attention.default,
         aten._scaled_dot_product_flash_attention.default,
         aten._scaled_dot_product_cudnn_attention.default}


@dataclass(frozen=True)
class CheckpointState:
    """Stored at ``gm.meta["lora_fx_checkpoint"]``: what to recompute. Plain data, no fx.Node."""

    patterns: tuple[str | re.Pattern, ...]
    policy: str
    blocks: tuple[str, ...]  # the module paths found, in graph order


class CheckpointedModule(LoraFxModule):
    """A LoraFxModule whose matched blocks are recomputed in backward (see the module docstring)."""

    def recompile(self):
        code = super().recompile()
        state = getattr(self, "meta", {}).get(CKPT_KEY)
        if state is None:  # during GraphModule.__init__ (meta not copied yet): flat code for now
            return code
        split = _split_graph(self.graph, state)
        python = share_attribute_prefixes(split.python_code(root_module="self"), split)
        cls = type(self)
        cls.forward = _dispatcher(cls.forward, _forward_from_src(python.src, python.globals, {}))
        return code

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.recompile()  # meta is copied after GraphModule.__init__ compiled the flat code
        return res

    @property
    def checkpoint_state(self) -> CheckpointState:
        return self.meta[CKPT_KEY]


def _dispatcher(flat, ckpt):
    """``forward``: the checkpointed code when it saves memory, else the flat code (same signature)."""

    @functools.wraps(flat)  # torch.export reads the signature of forward
    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_exporting():
            return ckpt(self, *args, **kwargs)
        return flat(self, *args, **kwargs)

    return forward


def checkpoint(gm: fx.GraphModule, blocks, *, policy: str = "full") -> CheckpointedModule:
    """Returns a new module that recomputes the blocks matched by ``blocks`` in backward.

    Args:
        gm: from :func:`lora_fx.trace` (before or after :func:`lora_fx.lorafy`). The result shares
            its parameters (training it trains ``gm``'s LoRA parameters); its graph is a copy.
        blocks: module-path pattern(s): a glob (``"*.layers.*"``), a plain name (``"layers.0"``:
            a path equal to it or ending in ``.layers.0``), a compiled regex, or a list of them. Each
            node belongs to the outermost module on its ``nn_module_stack`` that matches.
        policy: ``"full"`` (keep region inputs only) or ``"selective"`` (also keep matmul/attention
            outputs, recompute the elementwise ops).

    Raises:
        PatternError: a pattern matches no module of the graph (the message lists module paths).
        ValueError: unknown policy, or ``gm`` is not a GraphModule.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ValueError(f"checkpoint() needs a torch.fx.GraphModule from lora_fx.trace, got {type(gm).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"checkpoint policy must be one of {POLICIES}, got {policy!r}")
    patterns = (blocks,) if isinstance(blocks, (str, re.Pattern)) else tuple(blocks)
    if not patterns:
        raise PatternError("checkpoint() needs at least one module-path pattern, e.g. '*.layers.*'")
    paths = _module_paths(gm.graph)
    for p in patterns:
        if not any(_matches(p, path) for path in paths):
            near = ", ".join(sorted(paths, key=len)[:12])
            raise PatternError(f"checkpoint pattern {p!r} matches no module of the graph; module paths "
                               f"include: {near}")
    found = tuple(dict.fromkeys(b for n in gm.graph.nodes if (b := _block(n, patterns))))
    src = copy_module(gm, freeze=False)
    src.meta.pop(CKPT_KEY, None)
    out = wrap(src, cls=CheckpointedModule)
    out.meta[CKPT_KEY] = CheckpointState(patterns, policy, found)
    out.recompile()
    return out


def _matches(pattern: str | re.Pattern, path: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(path) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def _stack(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0].split("@")[0] for v in stack.values()]


def _module_paths(graph: fx.Graph) -> set[str]:
    return {p for n in graph.nodes for p in _stack(n)}


@functools.lru_cache(maxsize=4096)
def _block_of_stack(stack: tuple[str, ...], patterns: tuple) -> str | None:
    return next((p for p in stack if any(_matches(q, p) for q in patterns)), None)


def _block(node: fx.Node, patterns: tuple) -> str | None:
    return _block_of_stack(tuple(_stack(node)), patterns) if node.op == "call_function" else None


def _regions(graph: fx.Graph, patterns: tuple) -> list[list[fx.Node]]:
    """Maximal runs of consecutive call_function nodes of one block.

    Nodes without a module stack (LoRA branches lorafy inserted after their site, sym_size nodes)
    join the run they sit in; placeholders and get_attrs stay outside (regions take them as inputs);
    any other node ends the run.
    """
    runs: list[list[fx.Node]] = []
    current, run = None, []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op != "call_function":
            block = None
        elif node.meta.get("nn_module_stack"):
            block = _block(node, patterns)
        else:
            block = current
        if block != current or block is None:
            if run:
                runs.append(run)
            run = []
        current = block
        if block is not None:
            run.append(node)
    if run:
        runs.append(run)
    return runs


def _split_graph(flat: fx.Graph, state: CheckpointState) -> fx.Graph:
    """The flat graph with each region replaced by one checkpointed call (see module docstring)."""
    regions = _regions(flat, state.patterns)
    last = {r[-1]: r for r in regions}
    inside = {n for r in regions for n in r}
    split = fx.Graph()
    split._codegen = copy.deepcopy(flat._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in flat.nodes:
        if node in last:
            region = last[node]
            members = set(region)
            inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in members))
            outputs = [n for n in region if any(u not in members for u in n.users)]
            fn = _region_function(region, inputs, outputs, state.policy, len(env))
            call = split.call_function(fn, tuple(env[a] for a in inputs))
            for k, o in enumerate(outputs):
                env[o] = split.call_function(operator.getitem, (call, k))
                env[o].meta = o.meta
        elif node not in inside:
            env[node] = split.node_copy(node, lambda a: env[a])
    split.lint()
    return split


def _region_function(region: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], policy: str, k: int):
    g = fx.Graph()
    env = {a: g.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    for n in region:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    body = fx.GraphModule(torch.nn.Module(), g, class_name="checkpoint_region")
    if policy == "selective":
        def region_call(*args):
            return _torch_checkpoint(body, *args, use_reentrant=False, context_fn=_selective_context)
    else:  # no context_fn: dynamo cannot trace torch's own noop_context_fn as one
        def region_call(*args):
            return _torch_checkpoint(body, *args, use_reentrant=False)

    region_call.__name__ = region_call.__qualname__ = f"checkpoint_region_{k}"
    return region_call


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVE and not _low_rank_product(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _low_rank_product(op, args) -> bool:
    """A 2-d matmul whose inner dimension is at most 1/8 of its output width, such as a LoRA B product
    (inner dimension the rank): recomputing it costs few multiply-adds per output element, like the
    elementwise ops, while keeping it would store a second wide output next to the base matmul's."""
    if op is aten.addmm.default:
        a, b = args[1], args[2]
    elif op is aten.mm.default:
        a, b = args[0], args[1]
    else:
        return False
    return a.shape[-1] * 8 <= b.shape[-1]


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)
