"""Task switching on folded models, and weighted combinations of adapters.

The LoRA paper deploys ``W' = W + s·B A`` and switches task by subtracting ``s·B A`` and adding
``s'·B' A'``. Done literally, every switch rounds once more and errors pile up. :func:`swap_adapter`
instead records the base weight of every site it touches once, and writes each new weight from it::

    W_new = round(fp32(W_base) + s'·B'A')             # the arithmetic of lora_fx.fold

Every swap starts from the same ``W_base``, so nothing drifts: the weights after the 100th swap to an
adapter are bit-identical to those after the first. ``W_base`` is exact when the module fold started
from is given (``base=``): swaps then give bit-identical weights to a fresh fold of the adapter.
Otherwise it is recovered once from the adapter that was folded (``old=``): exactly where one float
``x`` has ``round(x + s·B A) == W'`` (almost every entry when the delta is small next to the weight),
else as ``W' - s·B A`` in fp64; the result is within 1 ulp of ``max(|W'_old|, |W_new|)`` of a fresh
fold. The records (base weights of the swapped sites) live in ``folded.meta["lora_fx_swap"]``.

:func:`combine_adapters` folds ``sum_i w_i · s_i B_i A_i`` into the base graph: it concatenates the
factors along the rank (``A = [A_1; A_2]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2]``, scale 1), so the sum
is one LoRA branch per site that :func:`lora_fx.fold` merges (untying shared weights as usual).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from .. import delta as lora_delta
from .. import kinds
from ..adapters import Adapter, adapter_of, read_adapter
from ..delta import Branch
from ..errors import AdapterError
from ..graph_facts import weight_reads
from ..graph_module import fold_report_of, has_lora, lora_state, set_attr_path
from ..passes.fold import fold, strip
from ..passes.lorafy import lorafy
from ..sites import Site, sites
from ..targets import Target

SWAP_KEY = "lora_fx_swap"
AdapterLike = str | os.PathLike | Adapter | fx.GraphModule


@dataclass
class SwapState:
    """Kept at ``folded.meta["lora_fx_swap"]``: the base weight of every site swapped so far."""

    base: dict[str, torch.Tensor] = field(default_factory=dict)  # site id -> W_base
    exact: dict[str, bool] = field(default_factory=dict)  # site id -> W_base in W's dtype (else fp64)
    current: str = ""  # source of the adapter now folded in


def as_adapter(src: AdapterLike) -> Adapter:
    """An :class:`Adapter` from a folder, an Adapter, or a lorafied module (snapshot)."""
    if isinstance(src, Adapter):
        return src
    if isinstance(src, fx.GraphModule):
        return adapter_of(src)
    return read_adapter(src)


def swap_adapter(folded: fx.GraphModule, new: AdapterLike, *, old: AdapterLike | None = None,
                 base: nn.Module | None = None) -> fx.GraphModule:
    """Replaces the adapter folded into ``folded`` by ``new``, in place (see the module doc).

    Args:
        folded: what :func:`lora_fx.fold` returned (or a previous swap_adapter).
        new: the adapter to fold in: a folder, an :class:`Adapter`, or a lorafied module.
        old: on the first swap, the adapter that ``folded`` holds now (not needed with ``base``).
        base: the module fold started from (the traced graph or the eager model; its weights are
            read, never changed). Makes every swap exact.

    Returns:
        ``folded``, whose adapted weights are now ``W_base + delta(new)`` (new Parameter objects).

    Raises:
        AdapterError: ``folded`` was not folded, a site of ``new`` is not in the graph or has a weight
            other ops also read, or neither ``old`` nor ``base`` tells the base weights.
    """
    report = fold_report_of(folded)
    if report is None:
        raise AdapterError(f"swap_adapter: {type(folded).__name__} is not a folded module; pass what "
                           "lora_fx.fold(lgm) returned")
    found = {s.id: s for s in sites(folded)}
    adapter = as_adapter(new)
    groups = _group(adapter, found)
    state: SwapState | None = folded.meta.get(SWAP_KEY)
    if state is None:
        state = _first_state(folded, report, found, old, base)
    reads = weight_reads(folded.graph)
    for sid in groups.keys() - state.base.keys():  # a site no adapter touched so far
        site = found[sid]
        if reads[site.weight] != 1:
            raise AdapterError(f"swap_adapter: site {sid}'s weight {site.weight} is also read by other ops "
                               "(a tied weight); a swap would change them too. Fold an adapter that "
                               "covers this site with lora_fx.fold instead.")
        src = folded.get_parameter(site.weight) if base is None else _base_weight(base, site.weight, site)
        state.base[sid], state.exact[sid] = src.detach(), True
    new_weights = {}
    for sid, w_base in state.base.items():
        site = found[sid]
        w = folded.get_parameter(site.weight)
        ddt = lora_delta.compute_dtype(w.dtype)  # fold's dtype
        cdt = ddt if state.exact[sid] else torch.float64
        w_base = w_base.to(w.device)
        if sid in groups and any(br.magnitude for br in groups[sid]):  # DoRA: fold's arithmetic on W_base
            new_weights[sid] = lora_delta.fold_weight(w, groups[sid], adapter.tensors, site, ab_dtype=w.dtype,
                                                      base=w_base.to(cdt))[0]
        elif sid in groups:
            d = lora_delta.delta(groups[sid], adapter.tensors, site, ddt, ab_dtype=w.dtype)
            new_weights[sid] = (w_base.to(cdt) + d.to(cdt)).to(w.dtype)
        else:
            new_weights[sid] = w_base.to(w.dtype)
    for sid, value in new_weights.items():
        site = found[sid]
        set_attr_path(folded, site.weight, nn.Parameter(value, requires_grad=False))
        report.folded.pop(sid, None)
        if sid in groups:
            diff = (value.double() - state.base[sid].to(value.device).double()).abs()
            report.folded[sid] = float(diff.max()) if diff.numel() else 0.0
    state.current = adapter.source
    folded.meta[SWAP_KEY] = state
    return folded


def combine_adapters(gm: fx.GraphModule, items: list[tuple[AdapterLike, float]]) -> fx.GraphModule:
    """Folds the weighted sum of adapters into the base graph ``gm``.

    Every adapted weight becomes ``W + sum_i w_i · delta_i`` where ``delta_i`` is adapter i's
    ``scale · B @ A`` (zero where adapter i has no branch). A site whose summed rank exceeds
    ``min(in, out)`` gets the dense sum as a full-rank pair (A = I or B = I), which is exact too.
    Parameters get the base weight's dtype: combine in fp32 for full precision.

    Args:
        gm: the base graph (from :func:`lora_fx.trace`), or a lorafied module (its LoRA is dropped).
        items: ``(adapter, weight)`` pairs; adapters as folders, :class:`Adapter` or lorafied modules.

    Returns:
        A folded module (as from :func:`lora_fx.fold`).
    """
    if not items:
        raise AdapterError("combine_adapters: no adapters given; pass [(adapter_dir, weight), ...]")
    if has_lora(gm):
        gm = strip(gm)
    report = fold_report_of(gm)
    if report is not None and report.folded:
        raise AdapterError("combine_adapters: gm already holds a folded adapter; pass the base graph "
                           "(lora_fx.trace(model, args)) so no delta is counted twice")
    found = {s.id: s for s in sites(gm)}
    per_site: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, tuple[int, int] | None]]] = {}
    for src, weight in items:
        adapter = as_adapter(src)
        if adapter.dora:
            raise AdapterError(f"combine_adapters: {adapter.source} is a DoRA adapter; a weighted sum of DoRA "
                               "updates (each a rescaling of W + delta) is not a LoRA delta. Fold it alone "
                               "(lora_fx.fold) or swap it in (swap_adapter)")
        for sid, brs in _group(adapter, found).items():
            per_site.setdefault(sid, []).extend((*adapter.pair(br.key), float(weight) * br.scale, br.slice)
                                                for br in brs)
    factors = {sid: _factors(found[sid], parts) for sid, parts in per_site.items()}
    ranks = {sid: a.shape[1 if kinds.get(found[sid].kind).batched else 0] for sid, (a, _) in factors.items()}
    targets = [Target(re.compile(re.escape(sid)), rank=r, alpha=float(r)) for sid, r in ranks.items()]
    lgm = lorafy(gm, targets)
    made = {br.site.id: br for br in lora_state(lgm, "combine_adapters").branches}
    if made.keys() != factors.keys():
        raise AdapterError(f"combine_adapters: site ids {sorted(made.keys() ^ factors.keys())} select other "
                           "sites too; rename the modules or combine with lorafy + load_adapter by hand")
    with torch.no_grad():
        for sid, (a, b) in factors.items():
            for name, t in ((made[sid].a, a), (made[sid].b, b)):
                p = lgm.get_parameter(name)
                p.copy_(t.to(dtype=p.dtype, device=p.device))
    return fold(lgm)


# -- helpers ------------------------------------------------------------------------------------------

def _group(adapter: Adapter, found: dict[str, Site]) -> dict[str, list[Branch]]:
    """Branches by site id (slices in order), re-pointed at the graph's Site; checks that each fits."""
    import difflib

    groups: dict[str, list[Branch]] = {}
    for br in adapter.branches.values():
        site = found.get(br.site.id)
        if site is None:
            near = difflib.get_close_matches(br.site.id, sorted(found), n=3, cutoff=0.5)
            raise AdapterError(f"adapter {adapter.source}: branch {br.key} targets site {br.site.id}, which the "
                               f"graph does not have (nearest: {near or sorted(found)[:3]})")
        a, b = adapter.pair(br.key)
        rows = site.out_features if br.slice is None else br.slice[1] - br.slice[0]
        if not kinds.get(site.kind).fits(site, a, b, rows):
            raise AdapterError(f"adapter {adapter.source}: branch {br.key} has A {tuple(a.shape)}, B "
                               f"{tuple(b.shape)}, which do not fit site {site.id} ({site.weight} "
                               f"{tuple(site.shape)}, in={site.in_features}, out={site.out_features})")
        groups.setdefault(site.id, []).append(replace(br, site=site))
    for brs in groups.values():
        brs.sort(key=lambda br: br.slice or (0, 0))
    return groups


def _first_state(folded: fx.GraphModule, report, found: dict[str, Site], old: AdapterLike | None,
                 base: nn.Module | None) -> SwapState:
    state = SwapState()
    if base is not None:
        for sid in report.folded:
            site = found[sid]
            name = report.untied.get(site.weight, site.weight)
            state.base[sid], state.exact[sid] = _base_weight(base, name, site).detach(), True
        return state
    if old is None:
        if report.folded:
            raise AdapterError("swap_adapter: the first swap needs old= (the adapter folded into this "
                               "module) or base= (the module fold started from) to recover base weights")
        return state
    adapter = as_adapter(old)
    if adapter.dora:
        raise AdapterError(f"swap_adapter: old adapter {adapter.source} is DoRA: its fold m / ||W + delta|| · "
                           "(W + delta) keeps only the direction of each row, so W cannot be recovered from the "
                           "folded weights and the adapter; pass base= (the module fold started from)")
    groups = _group(adapter, found)
    if groups.keys() != report.folded.keys():
        raise AdapterError(f"swap_adapter: old adapter {adapter.source} covers sites {sorted(groups)} but "
                           f"the module folded {sorted(report.folded)}; pass the adapter that was folded")
    for sid, brs in groups.items():
        site = found[sid]
        w = folded.get_parameter(site.weight).detach()
        d = lora_delta.delta(brs, adapter.tensors, site, lora_delta.compute_dtype(w.dtype), ab_dtype=w.dtype)
        mx, rep = float(d.abs().max()), report.folded[sid]
        if abs(mx - rep) > 1e-3 * max(mx, rep) + 4 * torch.finfo(w.dtype).eps * float(w.abs().max()):
            raise AdapterError(f"swap_adapter: old adapter {adapter.source} does not match what was folded "
                               f"at {sid} (its max |delta| {mx:.4g} vs fold's {rep:.4g}); pass the folded one")
        state.base[sid], state.exact[sid] = lora_delta.recover(w, d), False
    return state


def _base_weight(base: nn.Module, name: str, site: Site) -> torch.Tensor:
    try:
        t = base.get_parameter(name)
    except AttributeError as e:
        raise AdapterError(f"swap_adapter: base module {type(base).__name__} has no parameter {name} "
                           f"(weight of site {site.id}); pass the module fold started from") from e
    if tuple(t.shape) != tuple(site.shape):
        raise AdapterError(f"swap_adapter: base {name} has shape {tuple(t.shape)}, site {site.id} needs "
                           f"{tuple(site.shape)}; pass the module fold started from")
    return t


def _factors(site: Site, parts: list[tuple[torch.Tensor, torch.Tensor, float, tuple[int, int] | None]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A == sum w·scale·B_i@A_i`` (slices placed in their rows), scale 1.

    ``parts`` are ``(A_i, B_i, w_i·scale_i, slice_i)``.
    """
    if kinds.get(site.kind).batched:  # per-expert pairs (E, r, in), (E, out, r): stack the ranks
        return (torch.cat([a.float() for a, _, _, _ in parts], 1),
                torch.cat([b.float() * scale for _, b, scale, _ in parts], 2))
    rank = sum(a.shape[0] for a, _, _, _ in parts)
    if rank <= min(site.in_features, site.out_features):
        a_s, b_s = [], []
        for a, b, scale, sl in parts:
            wide = torch.zeros(site.out_features, *b.shape[1:], dtype=torch.float32)
            rows = slice(None) if sl is None else slice(*sl)
            wide[rows] = b.float() * scale
            a_s.append(a.float())
            b_s.append(wide)
        return torch.cat(a_s, 0), torch.cat(b_s, 1)
    kind = kinds.get(site.kind)
    if kind.lora_in(site) != site.in_features:  # a kernel wider than 1: no full-rank pair
        raise AdapterError(f"combine_adapters: site {site.id} ({site.kind} {tuple(site.shape)}): summed rank {rank} "
                           f"exceeds min(in, out) = {min(site.in_features, site.out_features)}; combine fewer "
                           "adapters there")
    dense = lora_delta.product(parts, site.out_features, torch.float32)  # (out, in)
    full = min(site.in_features, site.out_features)  # dense = B @ A with A = I or B = I
    a_shape, b_shape = kind.lora_shapes(site, full, site.out_features)
    if site.in_features <= site.out_features:
        return torch.eye(full).reshape(a_shape), dense.reshape(b_shape)
    return dense.reshape(a_shape), torch.eye(full).reshape(b_shape)
