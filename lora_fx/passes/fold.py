"""The fold pass: merge every LoRA branch into its weight, giving back the original graph.

For each adapted site::

    before:  y' = op(x, W) + s * B(A(dropout(x)))     # s = alpha / r
    after:   y  = op(x, W')      with  W' = round(fp32(W) + s * fp32(B @ A))   (in W's layout)

The delta is computed in fp32 (fp64 for fp64 weights) and rounded once to W's dtype: merging in bf16
would lose most of a small update. Invariants checked before returning: no LoRA node or parameter
remains, and the graph equals the one lorafy started from (same nodes, targets, args up to names).

A weight also used where the user put no LoRA (GPT-2's tied ``lm_head``/``wte``) is not overwritten:
the adapted site gets its own folded copy (``<weight>_folded``) and the report lists it in ``untied``.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import delta as lora_delta
from .. import kinds
from .._text import plural
from ..delta import Branch
from ..dora import dora_output
from ..errors import FoldError
from ..graph_facts import untied_module_name, untied_name, weight_reads
from ..graph_module import (
    FOLD_KEY,
    LORA_KEY,
    NODE_LORA,
    LoraFxModule,
    copy_module,
    del_attr_path,
    first_difference,
    graph_signature,
    has_attr_path,
    lora_state,
    prune_empty_modules,
    recompile_as,
    set_attr_path,
)
from ..residual import INITIAL_KEY
from ..sites import Site
from ..weights import check_materialized
from .fused import lora_addmm
from .lorafy import LoraState
from .quantize_base import dequantized
from .stand_ins import restore as restore_stand_ins

__all__ = ["fold", "FoldReport", "strip"]


@dataclass
class FoldReport:
    """What fold merged: per weight the largest |delta|, and the weights it had to untie."""

    folded: dict[str, float] = field(default_factory=dict)  # site id -> max |W' - W|
    untied: dict[str, str] = field(default_factory=dict)  # new parameter name -> weight it copies

    def __str__(self) -> str:
        lines = [f"folded {plural(len(self.folded), 'site')}"]
        lines += [f"  {sid}: max |dW| = {d:.3g}" for sid, d in self.folded.items()]
        lines += [f"  untied {new} (copy of {old}, which other uses still read)" for new, old in self.untied.items()]
        return "\n".join(lines)


def fold(gm: fx.GraphModule) -> LoraFxModule:
    """Returns a new module where every LoRA branch is merged into its weight (see module doc).

    A weight that no other op reads is replaced under its own name (a new Parameter: writing an
    attribute never changes the tensor that other names of it, such as tied registrations, hold).

    Raises:
        NoLoraError: ``gm`` carries no LoRA (a FoldError).
        FoldError: a delta is not finite (NaN/inf in A or B), or W + delta overflows W's dtype.
    """
    return _fold(gm, merge=True)


def strip(gm: fx.GraphModule) -> LoraFxModule:
    """The base model: LoRA branches removed, weights untouched (what fold gives with B = 0)."""
    return _fold(gm, merge=False)


def _fold(gm: fx.GraphModule, *, merge: bool) -> LoraFxModule:
    gm = dequantized(gm)  # QLoRA: fold into the dequantized weights the adapter was trained with
    state: LoraState = lora_state(gm, "fold" if merge else "strip")
    check_materialized(gm, "fold" if merge else "strip")
    out = copy_module(gm, freeze=False, codegen=False)  # recompiled below, once
    graph = out.graph
    by_site: dict[str, list[Branch]] = defaultdict(list)
    for br in state.branches:
        by_site[br.site.id].append(br)
    report = FoldReport()
    if merge:
        facts = _Facts(graph)  # one scan of the graph for all sites (a scan per site is quadratic)
        for _sid, branches in by_site.items():
            site = branches[0].site
            _merge_site(out, facts.nodes[site.node], site, branches, report, facts)
    _erase_lora(out, state)
    restore_stand_ins(graph)
    graph.lint()
    _check(out, state, report)  # the graph is the captured one: its code can be the captured code
    recompile_as(out, None if report.untied else state.base_code)
    del out.meta[LORA_KEY]
    out.meta.pop(INITIAL_KEY, None)  # PiSSA / OLoRA's initial A0, B0: the folded weight holds their residual
    out.meta[FOLD_KEY] = report
    return out


class _Facts:
    """What fold asks about the graph, read in one scan: nodes by name, reads of each weight, calls of
    each module (symbolic_trace graphs); kept true as sites are untied."""

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = {n.name: n for n in graph.nodes}
        self.reads = weight_reads(graph)
        for n in graph.nodes:  # DoRA's norm reads the site's weight: not a use fold must keep apart
            if n.op == "get_attr" and NODE_LORA in n.meta:
                self.reads[str(n.target)] -= len(n.users)
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)
        for n in graph.nodes:
            if n.op == "call_module":
                self.calls[str(n.target)].append(n)
        self.module_reads = Counter({t: len(c) for t, c in self.calls.items()})  # calls still on the module


def _merge_site(gm: LoraFxModule, node: fx.Node, site: Site, branches: list[Branch], report: FoldReport,
                facts: _Facts):
    w = gm.get_parameter(site.weight)
    cdt = lora_delta.compute_dtype(w.dtype)
    if any(br.magnitude for br in branches):  # DoRA: W' = m / ||W + delta|| · (W + delta), per output row
        rounded, merged = lora_delta.fold_weight(w, branches, gm.get_parameter, site)
        delta = merged - w.detach().to(cdt)  # for the report (and the diagnosis below)
    else:
        delta = lora_delta.delta(branches, gm.get_parameter, site, cdt)
    lo, hi = torch.aminmax(delta) if delta.numel() else (torch.zeros(()), torch.zeros(()))
    report.folded[site.id] = max(-float(lo), float(hi))  # max |delta| in one pass, no |delta| copy
    if not any(br.magnitude for br in branches):
        rounded, merged = lora_delta.merge(w, delta, into_delta=True)  # delta's buffer becomes W + delta
    new = nn.Parameter(rounded, requires_grad=False)
    if new.numel() and not torch.isfinite(torch.stack(torch.aminmax(new))).all():  # NaN/inf reach min or max
        delta = lora_delta.delta(branches, gm.get_parameter, site, cdt)  # diagnose only on failure
        _raise_non_finite(gm, site, branches, w, delta, merged, new)
    if node.op == "call_module":
        _merge_module(gm, node, new, report, facts)
    elif facts.reads[site.weight] == 1:  # writing W' under its name changes nothing else
        set_attr_path(gm, site.weight, new)
    else:
        _untie(gm, node, site, new, report)
        facts.reads[site.weight] -= 1  # this site reads its own copy now


def _raise_non_finite(gm, site: Site, branches: list[Branch], w, delta, merged, new) -> None:
    if not torch.isfinite(delta).all():
        bad = [n for br in branches for n in (br.a, br.b) if not torch.isfinite(gm.get_parameter(n)).all()]
        raise FoldError(f"site {site.id}: the LoRA delta for {site.weight} has NaN/inf values "
                        f"(non-finite parameters: {bad or 'none; the product overflowed'}); "
                        "nothing was folded. Check training (learning rate, loss scaling).")
    overflow = ~torch.isfinite(new) & torch.isfinite(w)
    if overflow.any():
        raise FoldError(f"site {site.id}: W + delta overflows {w.dtype} in {int(overflow.sum())} entries of "
                        f"{site.weight} (max |W + delta| = {float(merged.abs().max()):.3g}); "
                        "nothing was folded. Export in fp32 (dtype=None) or keep the adapter unfolded.")


def _untie(gm: LoraFxModule, node: fx.Node, site: Site, new: nn.Parameter, report: FoldReport):
    name = untied_name(site.path, site.weight, site.id)
    while has_attr_path(gm, name):
        name += "_"
    set_attr_path(gm, name, new)
    report.untied[name] = site.weight
    kind, spec = kinds.get(site.kind), kinds.spec_of(gm, node)
    src = kind.weight_input(node, site, spec)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
        repl = attr
        if src.op != "get_attr":  # weight reached through a transpose: copy it
            repl = gm.graph.create_node(src.op, src.target, (attr, *src.args[1:]), dict(src.kwargs))
    kind.replace_weight_input(node, site, spec, repl)


def _merge_module(gm: LoraFxModule, node: fx.Node, new: nn.Parameter, report: FoldReport, facts: _Facts):
    target = str(node.target)
    if facts.module_reads[target] == 1:
        gm.get_submodule(target).weight = new
        return
    facts.module_reads[target] -= 1  # this call reads its own copy now
    k = facts.calls[target].index(node)  # graph order as captured: the site's call number
    clone = copy.copy(gm.get_submodule(target))
    clone._parameters = dict(clone._parameters)
    clone.weight = new
    name = untied_module_name(target, k)
    set_attr_path(gm, name, clone)
    node.target = name
    report.untied[name] = target


def _erase_lora(gm: LoraFxModule, state: LoraState) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if NODE_LORA in node.meta and node.target in (torch.ops.aten.add.Tensor, lora_addmm, dora_output) and \
                isinstance(node.args[0], fx.Node) and NODE_LORA not in node.args[0].meta:
            node.replace_all_uses_with(node.args[0])
    for node in reversed(list(graph.nodes)):
        if NODE_LORA in node.meta:
            if node.users:
                raise FoldError(f"internal: LoRA node {node.name} still has users {list(node.users)}")
            graph.erase_node(node)
    for br in state.branches:
        for name in br.names:
            del_attr_path(gm, name)
    prune_empty_modules(gm)


def _check(gm: LoraFxModule, state: LoraState, report: FoldReport) -> None:
    leftovers = [n for n, _ in gm.named_parameters() if ".lora_A." in f".{n}" or ".lora_B." in f".{n}"]
    if leftovers:
        raise FoldError(f"internal: LoRA parameters remain after fold: {leftovers[:3]}")
    rename = dict(report.untied)
    sig = graph_signature(gm.graph, rename=rename)
    diff = first_difference(sig, state.base_signature)
    if diff is not None:
        raise FoldError(f"internal: the folded graph differs from the captured one at {diff}")
