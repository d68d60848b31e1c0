"""The lorafy pass: rewrite selected matmuls into frozen-weight-plus-low-rank subgraphs.

For each selected site ``y = op(x, W)`` it adds, after the op::

    before:  y = linear(x, W, b)
    after:   y = linear(x, W, b)                        # W frozen
             d = linear(linear(dropout(x), A), B)       # A (r, in), B (out, r): trainable
             y' = y + (alpha / r) * d                   # every user of y now reads y'

B starts at zero, so a fresh result computes exactly what the input graph computes. The input
module, its graph and the user's model are never modified: the result is a deep copy whose base
parameters are new frozen Parameter objects sharing storage with the originals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import kinds
from .._text import plural
from ..capture import training_node
from ..delta import Branch
from ..dynamic_dims import static_notes
from ..errors import SiteError
from ..graph_facts import branch_leaf
from ..graph_module import (
    LORA_KEY,
    NODE_LORA,
    GeneratedCode,
    LoraFxModule,
    copy_module,
    graph_signature,
    has_attr_path,
    lora_state,
    set_attr_path,
)
from ..resolve import output_heads, unmatched_reason, unused_linears
from ..sites import Site, sites
from ..targets import Selection, as_targets, is_all_linear, owner_path, resolve
from .fused import fuse_shared_inputs
from .stand_ins import stand_in
from .variants import add_magnitude, build_dora, check_init, init_pair, settle

__all__ = ["lora_parameters", "lorafy", "LoraReport", "LoraState"]

aten = torch.ops.aten


@dataclass
class LoraReport:
    """What lorafy matched, and the parameter budget."""

    branches: list[Branch]
    trainable: int
    total: int
    rslora: bool = False
    notes: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # patterns of a list that selected no site (PEFT's rule)

    @property
    def sites(self) -> list[Site]:
        seen: dict[str, Site] = {}
        for br in self.branches:
            seen.setdefault(br.site.id, br.site)
        return list(seen.values())

    def __str__(self) -> str:
        w = max([len("site"), *(len(br.site.id) for br in self.branches)])
        lines = [f"{'site':<{w}} {'op':<10} {'weight shape':<14} {'rank':>4} {'scale':>6}  slice"]
        for br in self.branches:
            shape = "x".join(map(str, br.site.shape))
            sl = "" if br.slice is None else f"[{br.slice[0]}:{br.slice[1]}]"
            lines.append(f"{br.site.id:<{w}} {br.site.op:<10} {shape:<14} {br.rank:>4} {br.scale:>6.3g}  {sl}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{plural(len(self.sites), 'site')}, {plural(len(self.branches), 'LoRA pair')}; trainable "
                     f"{self.trainable:,} / {self.total:,} parameters ({pct:.3f}%)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class LoraState:
    """Stored at ``gm.meta["lora_fx"]``: everything fold / save / export need. No fx.Node inside."""

    branches: list[Branch]
    base_signature: list[str]
    report: LoraReport
    base_code: GeneratedCode | None = None  # the captured module's code: fold's result adopts it


def lorafy(gm: fx.GraphModule, patterns, *, rank: int = 8, alpha: float | None = None,
           dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False,
           exclude=None, autocast_adapter_dtype: bool = True, dora: bool = False) -> LoraFxModule:
    """Returns a new GraphModule where the selected sites carry trainable LoRA branches.

    Args:
        gm: from :func:`lora_fx.trace`, ``torch.fx.symbolic_trace``, or a lorafied module (new sites).
        patterns: glob / regex / :class:`lora_fx.Target` or a list; ``"all-linear"`` is every linear-like
            site but the output head (PEFT's meaning). A list is an error only when no pattern selects a
            site (PEFT's rule); the others are warned about and listed in ``lora_report.unmatched``.
        rank: r, the default for every target. ``alpha`` defaults to ``rank`` (scale 1).
        dropout: LoRA dropout on the branch input, active in ``.train()`` mode only.
        init: ``"kaiming"`` (PEFT's default) or ``"gaussian"`` for A, B zero; or PEFT's ``"pissa"``,
            ``"pissa_niter_<N>"``, ``"olora"``: A, B from W's SVD / QR, the base the residual W - s·B@A.
        use_rslora: scale = alpha / sqrt(rank) instead of alpha / rank.
        exclude: patterns of sites never to adapt.
        autocast_adapter_dtype: A/B of a bf16/fp16 weight are fp32 (the branch casts its input up and
            rounds ``y + s·B A x`` once to the base dtype); False keeps them in the weight's dtype.
        dora: DoRA on every selected site (a Target's ``dora`` overrides it): a trainable magnitude per
            output row, W' = m · (W + s·B@A) / ||W + s·B@A|| (see :mod:`lora_fx.passes.variants`).

    Raises:
        PatternError: no pattern selects a site (each one's closest sites, or the module it names that
            the captured forward never calls).
        SiteError: a setting does not fit a site, or the site already carries LoRA.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"lorafy() needs a torch.fx.GraphModule (from lora_fx.trace or "
                        f"torch.fx.symbolic_trace); got {type(gm).__name__}. Call lora_fx.trace(model, args).")
    check_init(init)
    found = sites(gm)
    all_linear = any(is_all_linear(t.pattern) for t in as_targets(patterns))
    heads = output_heads(gm, found) if all_linear else ()  # PEFT's "all-linear" leaves out the output head
    chosen, unmatched = resolve(found, patterns, rank=rank, alpha=alpha, dropout=dropout, exclude=exclude,
                                heads=heads, explain=lambda t: unmatched_reason(gm, t, found))
    skipped = [f"{unmatched_reason(gm, t, found)} (the other patterns' sites are adapted: a list is an error "
               "only when no pattern selects a site, as in PEFT)" for t in unmatched]
    skipped += unused_linears(gm) if all_linear else []

    prior: LoraState | None = gm.meta.get(LORA_KEY)
    out = copy_module(gm, freeze=True, codegen=False)  # recompiled below, once
    base_signature = prior.base_signature if prior else graph_signature(out.graph)
    graph = out.graph
    by_name = {n.name: n for n in graph.nodes}
    branches = list(prior.branches) if prior else []
    training = _training(graph) if chosen else None  # found once: a scan per site is sites x nodes
    for sel in (settle(sel, dora, init) for sel in chosen):
        branches += _adapt(out, by_name[sel.site.node], sel, init, use_rslora, autocast_adapter_dtype, training)
    fuse_shared_inputs(graph)
    stand_in(graph)  # eager training: causal masks as is_causal, autocast-safe regions (fold undoes it)
    graph.lint()
    out.recompile()

    trainable = sum(out.get_parameter(n).numel() for br in branches for n in br.names)
    total = sum(p.numel() for p in out.parameters())
    notes = [sel.note for sel in chosen if sel.note] + skipped
    report = LoraReport(branches, trainable, total, use_rslora, notes,
                        [str(getattr(t.pattern, "pattern", t.pattern)) for t in unmatched])
    for note in notes:
        warnings.warn(f"lora_fx.lorafy: {note}", stacklevel=2)
    report.notes += static_notes(gm)  # trace warned them: input sizes the graph (and its exports) fix
    base_code = prior.base_code if prior else GeneratedCode(gm)
    out.meta[LORA_KEY] = LoraState(branches, base_signature, report, base_code)
    return out


def lora_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of a lorafied module, A then B (then DoRA's m) per branch, in graph order."""
    state: LoraState = lora_state(gm, "lora_parameters")
    return [gm.get_parameter(n) for br in state.branches for n in br.names]


def _key(site: Site, sl: tuple[int, int] | None) -> tuple[str, str]:
    """(PEFT-style module key, parameter leaf name) of one branch."""
    return owner_path(site), branch_leaf(site.weight, site.id, sl)


def _adapt(gm: LoraFxModule, node: fx.Node, sel: Selection, init: str, rslora: bool,
           autocast_dtype: bool, training: fx.Node) -> list[Branch]:
    site = sel.site
    weight = gm.get_parameter(site.weight)
    scale = sel.alpha / (math.sqrt(sel.rank) if rslora else sel.rank)
    graph = gm.graph
    kind, spec = kinds.get(site.kind), kinds.spec_of(gm, node)
    x = kind.activation(node, site, spec)
    emit = kinds.Emitter(graph, node, tag=site.id)
    ranges = sel.slices or [None]
    half = weight.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if half and autocast_dtype else weight.dtype
    if dtype != weight.dtype and kind.float_input:
        x = emit("call_function", aten._to_copy.default, (x,), {"dtype": dtype})
    made, deltas = [], []
    for sl in ranges:
        path, leaf = _key(site, sl)
        prefix = f"{path}." if path else ""
        a_name, b_name = f"{prefix}lora_A.{leaf}", f"{prefix}lora_B.{leaf}"
        if has_attr_path(gm, a_name) or has_attr_path(gm, b_name):
            raise SiteError(f"site {site.id} already carries LoRA ({a_name}); lorafy each site once, "
                            "or fold() first and lorafy the folded module")
        width = site.out_features if sl is None else sl[1] - sl[0]
        a_shape, b_shape = kind.lora_shapes(site, sel.rank, width)
        a = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=weight.device))
        b = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=weight.device))
        set_attr_path(gm, a_name, a)
        set_attr_path(gm, b_name, b)
        key = path if leaf == "weight" else (f"{path}.{leaf}" if path else leaf)
        init_pair(gm, kind, sel, a, b, sl, scale, key)  # PiSSA / OLoRA also write the residual base
        mag = add_magnitude(gm, site, prefix, leaf, sl, dtype) if sel.dora else None
        made.append(Branch(key, site, a_name, b_name, sel.rank, sel.alpha, scale, sel.dropout, sl, mag))
        if sel.dora:
            continue  # the DoRA graph is built for all of the site's branches at once, below
        merged = None if sl is not None else kind.build_merged(emit, node, x, a_name, b_name, sel.dropout,
                                                                 training, scale)
        if merged is not None:  # the kind's fused form of y + s·B(A x) (linear: one addmm)
            deltas.append(merged)
            break
        try:
            d = _branch(emit, kind, gm, node, site, x, a_name, b_name, sel.dropout, training)
        except NotImplementedError as e:
            raise SiteError(f"site {site.id}: {e} is not supported by LoRA") from e
        if sl is not None:
            d = emit("call_function", aten.constant_pad_nd.default, (d, [sl[0], site.out_features - sl[1]]))
        deltas.append(d)
    else:
        if sel.dora:
            deltas = [build_dora(emit, kind, gm, node, site, x, made, sel, training, scale, weight.dtype)]
        else:
            total = deltas[0]
            for d in deltas[1:]:
                total = emit("call_function", aten.add.Tensor, (total, d))
            scaled = emit("call_function", aten.mul.Tensor, (total, scale))
            if dtype != weight.dtype:
                scaled = emit("call_function", aten._to_copy.default, (scaled,), {"dtype": weight.dtype})
            deltas = [emit("call_function", aten.add.Tensor, (node, scaled))]
    merged = deltas[0]  # every user of y reads y' (the site's own branch nodes keep reading y)
    node.replace_all_uses_with(merged, delete_user_cb=lambda user: user.meta.get(NODE_LORA) != site.id)
    return made


def _branch(emit: kinds.Emitter, kind: kinds.OpKind, gm: fx.GraphModule, node: fx.Node, site: Site, x: fx.Node,
            a: str, b: str, dropout: float, training: fx.Node) -> fx.Node:
    """Emits one branch for the site's ``node`` (the kind's builder); returns the unscaled delta."""
    a_node, b_node = emit("get_attr", a), emit("get_attr", b)
    if dropout > 0.0 and kind.dropout:
        x = emit("call_function", aten.dropout.default, (x, dropout, training))
    return kind.build(emit, gm, node, site, x, a_node, b_node)


def _training(graph: fx.Graph) -> fx.Node:
    """``self.training`` for LoRA dropout; one lorafy creates is tagged so fold erases it again."""
    exists = any(n.op == "get_attr" and n.target == "training" for n in graph.nodes)
    node = training_node(graph)
    if not exists:
        node.meta[NODE_LORA] = "training"
    return node
