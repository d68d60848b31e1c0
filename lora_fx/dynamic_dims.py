"""The dynamic dimensions of a capture, proven: a dim the ONNX file declares dynamic is one the captured
graph was run at, at two other sizes, and computed what the model computes there.

torch.export can keep an input dimension symbolic in the graph's signature while the graph inside fixed it
(PEGASUS-X pads its sequence to a multiple of the block size: with an example of 8 the padding, zero, is baked
in; Funnel Transformer pools with a reshape to the example's length). Such a graph, and every export of it,
fails or computes garbage at any other size, yet the file would declare the axis dynamic. So after capture,
:func:`prove_dims` grows each symbol of the graph's inputs (every input dim carrying it, together: ``input_ids``
and ``attention_mask`` share the sequence) to ``size + 1`` and ``size + 3``, by repeating the example along
the dim (token ids stay valid ids, masks stay 0/1), and runs the captured graph and the model there::

    all symbols grown at once, twice       -> both runs equal the model's: every dim proven (the usual case)
    else each symbol alone                 -> a symbol that fails is static: the file declares it fixed,
                                              with a note naming the input, the dim and the size

Proven dims are what ``trace`` hands the exporter as dynamic (:func:`lora_fx.capture.dynamic_shapes_for`'s
rule, minus what failed) and what verification grows (:func:`dynamic_dims`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import short_message
from .graph_facts import input_sizes
from .graph_module import capture_of

__all__ = ["dynamic_dims", "grow", "grown", "GROWTH", "input_names", "prove_dims", "redraw", "RTOL", "runs_as_model",
    "Symbol", "symbols"]

GROWTH = (1, 3)  # each symbol is proven at size + 1 and size + 3 (verification grows batch + 1, sequence + 3)
RTOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 5e-2, torch.bfloat16: 1e-1}


@dataclass(frozen=True)
class Symbol:
    """One symbolic size of a captured graph's inputs and the (leaf, dim)s it sizes (their sizes' expressions)."""

    name: str
    value: int  # its size in the example
    dims: tuple[tuple[int, int, object], ...]  # (leaf index, dim, sympy expression of that dim's size)


def input_names(model: nn.Module | None, args: tuple, kwargs: dict) -> list[str]:
    """A readable name for each pytree leaf of ``(args, kwargs)``: the forward's parameter name (``input_ids``),
    with the path inside it for nested inputs (``past[0]``)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] if model is not None else []
    except (TypeError, ValueError):
        params = []
    names = []
    for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]:
        head, rest = path[1], pytree.keystr(path[2:])
        if path[0].idx == 0:
            i = head.idx
            base = params[i] if i < len(params) else f"args[{i}]"
        else:
            base = str(head.key)
        names.append(base + rest)
    return names


def symbols(graph: fx.Graph, inputs: object) -> list[Symbol] | None:
    """The free symbols of the graph's input sizes, each with the dims it sizes; None when the graph has no
    shape metadata to read (a symbolic_trace graph)."""
    sizes = input_sizes(graph, inputs)
    if sizes is None:
        return None
    found: dict[str, list] = {}
    values: dict[str, int] = {}
    for k, shape in sizes.items():
        for d, size in enumerate(shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            env = size.node.shape_env
            hints = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
            for s in expr.free_symbols:
                found.setdefault(str(s), []).append((k, d, expr))
                values[str(s)] = int(hints.get(s, 0))
    return [Symbol(name, values[name], tuple(dims)) for name, dims in found.items()]


def grow(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with dimension ``dim`` made ``size`` long by repeating its entries cyclically (ids stay ids)."""
    index = torch.arange(size, device=t.device) % max(t.shape[dim], 1)
    return t.index_select(dim, index)


def grown(inputs: tuple, syms: list[Symbol], steps: dict[str, int]) -> tuple:
    """``inputs`` (``(args, kwargs)``) with each symbol in ``steps`` grown by its step (every dim it sizes)."""
    flat, spec = pytree.tree_flatten(inputs)
    values = {s.name: s.value for s in syms}
    new = {**values, **{name: values[name] + step for name, step in steps.items()}}
    for s in syms:
        if s.name not in steps:
            continue
        for k, d, expr in s.dims:
            size = int(expr.xreplace({f: new[str(f)] for f in expr.free_symbols if str(f) in new}))
            flat[k] = grow(flat[k], d, size)
    return pytree.tree_unflatten(flat, spec)


def _tensors(out: object) -> list[torch.Tensor]:
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _mismatch(got: object, want: object) -> str | None:
    """Why the captured graph's outputs differ from the model's (None: they agree)."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return f"{len(got)} outputs where the model gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)} where the model's is {tuple(w.shape)}"
        if not (g.is_floating_point() and w.is_floating_point()) or not g.numel():
            if not torch.equal(g, w):
                return f"output {i} differs from the model's"
            continue
        g, w = g.detach().double(), w.detach().double()
        err = float((g - w).abs().max()) / max(float(w.abs().max()), 1e-12)
        if not err <= RTOL.get(w.dtype, 1e-3):
            return f"output {i} differs from the model's (max rel err {err:.1e})"
    return None


def _run(model: nn.Module | None, gm: nn.Module, inputs: tuple, exact: bool) -> str | None:
    """None when the captured graph runs on ``inputs`` and (``exact``) equals the model there (no ``model``:
    runs); else why not."""
    args, kwargs = inputs
    try:
        with torch.no_grad():
            got = gm(*args, **kwargs)
    except Exception as e:  # the graph fixed the size: a reshape, a view, an index out of range
        return f"the captured graph fails there ({short_message(e, 1)[:240]})"
    if model is None:
        return None
    try:
        with torch.no_grad():
            want = model(*args, **kwargs)
    except Exception as e:
        return f"the model itself fails there ({short_message(e, 1)[:240]})"
    why = _mismatch(got, want)
    return None if why is None or not exact else f"the captured graph's {why}"


def runs_as_model(model: nn.Module, gm: nn.Module, inputs: tuple) -> str | None:
    """None when the captured graph runs on ``inputs`` (an ``(args, kwargs)`` pair) and equals the model there;
    else why not (the proof of other input values: :func:`lora_fx.dense_routing.prove_values`)."""
    return _run(model, gm, inputs, exact=True)


def redraw(t: torch.Tensor, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    """A tensor like ``t`` of ``shape`` with other values: random floats, random token ids below ``t``'s largest
    + 1, ones for a 0/1 mask (what verification and the proof of other values feed a captured graph)."""
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device)
    hi = int(t.max()) + 1 if t.numel() else 2
    if hi <= 2:  # a mask
        return torch.ones(shape, dtype=t.dtype, device=t.device)
    return torch.randint(0, hi, shape, generator=gen, dtype=t.dtype).to(t.device)


def _materialized(model: nn.Module, inputs: tuple) -> bool:
    tensors = [*model.parameters(), *model.buffers(), *pytree.tree_leaves(inputs)]
    return not any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


def prove_dims(model: nn.Module, gm: nn.Module, args: tuple, kwargs: dict
               ) -> tuple[dict[int, tuple[int, ...]] | None, list[str]]:
    """The input dims ``gm`` (the capture of ``model`` in its current mode) keeps symbolic and computes right
    at grown sizes, per pytree leaf of ``(args, kwargs)``; and a note for each symbolic dim that failed.

    None (no proof) for a module on the meta device (nothing to run), or a graph without shape metadata.
    """
    inputs = (args, kwargs)
    syms = symbols(gm.graph, inputs)
    if syms is None or not _materialized(model, inputs):
        return None, []
    failed: dict[str, str] = {}
    if syms:
        together = [_run(model, gm, grown(inputs, syms, {s.name: g for s in syms}), True) for g in GROWTH]
        if any(together):  # find the culprits; first, whether the model and the graph agree at the example
            base = _run(model, gm, inputs, True)
            reference = None if base is not None and "model itself fails" in base else model
            for s in syms:
                for g in GROWTH:
                    why = _run(reference, gm, grown(inputs, syms, {s.name: g}), base is None)
                    if why:
                        failed[s.name] = f"at size {s.value + g}: {why}"
                        break
    names = input_names(model, args, kwargs)
    notes = [_note(s, names, args, kwargs, failed[s.name]) for s in syms if s.name in failed]
    dims: dict[int, set[int]] = {}
    for s in syms:
        if s.name not in failed:
            for k, d, _ in s.dims:
                dims.setdefault(k, set()).add(d)
    for s in syms:  # a dim sized by a failed symbol too is static
        if s.name in failed:
            for k, d, _ in s.dims:
                dims.get(k, set()).discard(d)
    return {k: tuple(sorted(v)) for k, v in dims.items() if v}, notes


def _note(s: Symbol, names: list[str], args: tuple, kwargs: dict, why: str) -> str:
    flat = pytree.tree_leaves((args, kwargs))
    where = ", ".join(f"{names[k]} dim {d} (size {flat[k].shape[d]})" for k, d, _ in s.dims)
    return (f"{where}: static in the captured graph and its exports, although torch.export kept it symbolic; "
            f"{why}. Inputs must have exactly that size there")


def static_notes(gm: nn.Module) -> list[str]:
    """trace's notes on the input dims the capture fixed (static in every export), for the reports."""
    cap = capture_of(gm)
    return list(getattr(cap, "static_notes", None) or [])


def dynamic_dims(gm: nn.Module, inputs: object) -> dict[int, set[int]] | None:
    """The dims of each input leaf the export declares dynamic (and verification grows): those trace proved,
    else the graph's symbolic ones (:func:`lora_fx.graph_facts.symbolic_dims`); None when unknown."""
    from .graph_facts import symbolic_dims

    cap = capture_of(gm)
    if cap is not None and getattr(cap, "dims", None) is not None:
        return {k: set(v) for k, v in cap.dims.items()}
    return symbolic_dims(gm.graph, inputs)


def grown_failure(gm: nn.Module, example: tuple, inputs: tuple, who: str, e: BaseException) -> str:
    """The message of a verification that failed at grown inputs: which input dims grew, from what size to what
    (``input_ids dim 1: 8 -> 11``), who failed (torch, ONNX Runtime) and why."""
    cap = capture_of(gm)
    source = getattr(getattr(cap, "source", None), "module", None)
    names = input_names(source, *example)
    old, new = pytree.tree_leaves(example), pytree.tree_leaves(inputs)
    grew = [f"{names[k]} dim {d}: {a.shape[d]} -> {b.shape[d]}" for k, (a, b) in enumerate(zip(old, new, strict=False))
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            for d in range(a.dim()) if a.shape[d] != b.shape[d]]
    at = f"at grown sizes ({', '.join(grew)})" if grew else "at the example's sizes"
    return (f"{who} failed {at}: {short_message(e, 1)[:300]}. The file declares those dims dynamic; trace(..., "
            "dynamic=False) or an example of the size you deploy gives a static file")


def asserts_values(gm: nn.Module) -> bool:
    """Whether the graph asserts facts about input values at run time (draft_export's data-dependent branches,
    unbacked sizes): verification then grows the example by repetition, not with random values."""
    graph = getattr(gm, "graph", None)
    return graph is not None and any(n.op == "call_function" and n.target is torch.ops.aten._assert_scalar.default
                                     for n in graph.nodes)


def grow_to(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``t`` grown to ``shape`` by :func:`grow` along each dim that differs."""
    for d, size in enumerate(shape):
        if t.shape[d] != size:
            t = grow(t, d, size)
    return t
