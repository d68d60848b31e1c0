"""Binding an adapter to a graph: ``load_adapter(gm, adapter)`` checks every branch, then copies A/B.

A graph without LoRA is first lorafied with the adapter's sites, ranks, alphas and slices (one exact
:class:`~lora_fx.targets.Target` per site), so an adapter folder plus a traced model is enough.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import torch
from torch import fx

from ..delta import Branch
from ..errors import AdapterError, PatternError
from ..graph_module import capture_of, has_lora, lora_state
from ..passes.lorafy import lorafy
from ..targets import Target
from .adapter import Adapter
from .peft_format import file_keys, read_adapter

__all__ = ["load_adapter"]


def load_adapter(gm: fx.GraphModule, src: str | os.PathLike | Adapter) -> fx.GraphModule:
    """Loads an adapter into a lorafied module, in place, after checking all of it.

    ``gm`` may also be a graph without LoRA (from :func:`lora_fx.trace`): it is then lorafied with the
    adapter's sites, ranks, alphas and slices, and the new module is returned.

    Returns:
        The module holding the adapter (``gm`` itself when it was lorafied already).

    Raises:
        AdapterError: a key of the model is missing from the file, the file has keys the model lacks,
            or a shape or scale (alpha / r) differs; the message lists them with the nearest names.
            Nothing is changed then.
    """
    adapter = src if isinstance(src, Adapter) else read_adapter(src)
    if not has_lora(gm):
        try:
            gm = lorafy(gm, _targets(adapter), use_rslora=adapter.use_rslora)
        except PatternError as e:
            made_for = f"it was made for {adapter.model}" if adapter.model else "its config does not say for which model"
            here = capture_of(gm).model if capture_of(gm) is not None else type(gm).__name__
            keys = sorted(adapter.branches)
            raise AdapterError(f"{adapter.source}: the adapter's targets ({', '.join(keys[:3])}"
                               f"{f', ... {len(keys)} in all' if len(keys) > 3 else ''}) are not in this model "
                               f"({here}); {made_for}. Load it into that model, or train an adapter for this one "
                               f"({e})") from e
    state = lora_state(gm, "load_adapter")
    want = {br.key: br for br in state.branches}
    have = adapter.branches
    problems = []
    for key in sorted(want.keys() - have.keys()):
        br = want[key]
        problems.append(f"missing {key} (module parameters {br.a}, {br.b}){_near(key, have, 'file')}")
    for key in sorted(have.keys() - want.keys()):
        names = file_keys(have[key], key in adapter.peft)
        problems.append(f"unexpected {'/'.join(names)}{_near(key, want, 'module')}")
    for key in sorted(want.keys() & have.keys()):
        problems += _mismatches(gm, want[key], have[key], adapter.pair(key))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise AdapterError(f"adapter {adapter.source} does not fit the module ({len(problems)} problem(s)); "
                           f"nothing was loaded:\n  {shown}\nFix: lorafy the graph with the adapter's "
                           "targets, ranks and alphas (its adapter_config.json lists them), or pass a "
                           "graph without LoRA to load_adapter to have it lorafied from the file.")
    with torch.no_grad():
        for key, br in want.items():
            for name, t in zip(br.names, adapter.tensors_of(key), strict=True):
                p = gm.get_parameter(name)
                p.copy_(t.to(dtype=p.dtype, device=p.device))
    return gm


def _near(key: str, pool, where: str) -> str:
    close = difflib.get_close_matches(key, sorted(pool), n=3, cutoff=0.5)
    return f"; nearest in the {where}: {', '.join(close)}" if close else f"; the {where} has none like it"


def _mismatches(gm, want: Branch, have: Branch, pair: tuple[torch.Tensor, torch.Tensor]) -> list[str]:
    out = []
    for role, name, t in (("lora_A", want.a, pair[0]), ("lora_B", want.b, pair[1])):
        shape = tuple(gm.get_parameter(name).shape)
        if tuple(t.shape) != shape:
            out.append(f"shape {want.key}.{role}: file {tuple(t.shape)} vs module {shape} ({name})")
    if not (torch.isfinite(pair[0]).all() and torch.isfinite(pair[1]).all()):
        out.append(f"values {want.key}: A or B holds NaN/inf")
    if not math.isclose(want.scale, have.scale, rel_tol=1e-6):
        out.append(f"scale {want.key}: file alpha/r = {have.alpha:g}/{have.rank} -> {have.scale:g}, module "
                   f"{want.alpha:g}/{want.rank} -> {want.scale:g} (lorafy with alpha={have.alpha:g})")
    if (want.magnitude is None) != (have.magnitude is None):
        what = ("has DoRA magnitudes (use_dora)", "does not") if have.magnitude else ("is plain LoRA", "has DoRA")
        out.append(f"variant {want.key}: the file {what[0]}, the module {what[1]} (lorafy with "
                   f"dora={have.magnitude is not None})")
    if have.slice is not None and have.slice != want.slice:
        out.append(f"slice {want.key}: file {have.slice} vs module {want.slice}")
    return out


def _targets(adapter: Adapter) -> list[Target]:
    """lorafy targets that recreate an adapter's branches: one exact Target per site."""
    by_site: dict[str, list[Branch]] = {}
    for br in adapter.branches.values():
        by_site.setdefault(br.site.id, []).append(br)
    targets = []
    for site, brs in by_site.items():
        first = brs[0]
        slices = tuple(br.slice for br in brs if br.slice is not None) or None
        targets.append(Target(re.compile(re.escape(site)), rank=first.rank, alpha=first.alpha,
                              dropout=first.dropout, slices=slices, dora=first.magnitude is not None,
                              init=adapter.init or None))
    return targets
