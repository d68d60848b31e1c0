"""Capture: any PyTorch model -> a GraphModule lora-fx can rewrite.

``trace`` runs ``torch.export.export(strict=False)`` (it handles Hugging Face transformers, which
``torch.fx.symbolic_trace`` no longer can) with batch and sequence dimensions dynamic, and returns a
:class:`~lora_fx.graph_module.LoraFxModule` whose ``.train()`` / ``.eval()`` work.

The graph is captured in eval mode (the graph you deploy). Mode-dependent ops are then rewired to read
``self.training``::

    dropout = aten.dropout(x, 0.1, False)           # as captured
    dropout = aten.dropout(x, 0.1, self.training)   # after capture
    sdpa(q, k, v)  ->  sdpa(q, k, v, dropout_p=self.training * 0.1)

Dropout rates that the eval graph no longer shows (attention dropout is 0.0 in eval) are read from a
second capture in train mode, aligned op by op. That capture only reads rates, so it uses static
shapes (symbolic shapes make a non-strict export of a Llama ~3x slower); ``trace(...,
train_capture=False)`` skips it when only the sites matter (``lora-fx inspect``: static shapes, one
capture).
"""

from __future__ import annotations

import difflib
import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .capture_retry import capture, noop_casts
from .dynamic_dims import input_names, prove_dims
from .errors import CaptureError, ExportError
from .graph_facts import symbolic_dims
from .graph_module import CAPTURE_KEY, NODE_MODE, Capture, LoraFxModule, SourceRef, capture_of, wrap
from .passes.functionalize import functionalize

__all__ = ["auto_dims", "dynamic_shapes_for", "example_inputs", "MODE_OPS", "ModeOp", "trace",
    "training_node"]

aten = torch.ops.aten


@dataclass(frozen=True)
class ModeOp:
    """Where a mode-dependent op keeps its train flag and its dropout rate (arg index or kwarg)."""

    flag: int | None
    rate: int | str | None


MODE_OPS: dict[object, ModeOp] = {
    aten.dropout.default: ModeOp(flag=2, rate=1),
    aten.feature_dropout.default: ModeOp(flag=2, rate=1),
    aten.alpha_dropout.default: ModeOp(flag=2, rate=1),
    aten.feature_alpha_dropout.default: ModeOp(flag=2, rate=1),
    aten.batch_norm.default: ModeOp(flag=5, rate=None),
    aten.scaled_dot_product_attention.default: ModeOp(flag=None, rate="dropout_p"),
}


def trace(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *,
          dynamic: bool = True, dynamic_shapes=None, train_capture: bool = True,
          specialize_branches: bool = False) -> LoraFxModule:
    """Captures ``model`` into a GraphModule with torch.export (non-strict).

    Args:
        model: any ``nn.Module`` (Hugging Face models included; set ``use_cache=False``).
        args: example positional inputs; a batch of at least 2 keeps the batch dimension dynamic
            (a batch of 1 is repeated to 2 for the capture).
        kwargs: example keyword inputs (``attention_mask=...``).
        dynamic: make dim 0 of every tensor input, and dim 1 of integer (token) inputs, dynamic.
        dynamic_shapes: explicit ``torch.export`` dynamic shapes instead of that rule (e.g. the
            past-length axis of KV-cache tensors).
        train_capture: read the dropout rates that only train mode shows (sdpa's ``dropout_p``) from a
            second, static-shape capture in train mode. False skips it: one capture, for listing
            sites and budgets (``.train()`` then trains with the eval graph's rates).
        specialize_branches: when torch.export cannot decide a branch on tensor values (a data-dependent
            guard), capture it as the example takes it (``torch.export.draft_export``). The torch graph raises
            on inputs that branch otherwise; an ONNX file cannot check that and computes the example's branch
            for every input, so this is off by default (a CaptureError names the line and the guard).
            Per-expert MoE routing loops need no flag: they are captured densely (every expert on every token,
            masked: exact; ``lora_fx/dense_routing.py``) once the graph equals the model at other inputs.

    Returns:
        A :class:`LoraFxModule` computing ``model(*args, **kwargs)``; its parameters are the
        model's own tensors (nothing is copied) and it remembers the example inputs.

    Raises:
        CaptureError: torch.export failed; the message shows why and what to try.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"trace() needs an nn.Module, got {type(model).__name__}")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    args, kwargs, notes = _unaliased(args, kwargs)
    if dynamic:
        args, kwargs, note = _batch_of_two(args, kwargs)
        notes += [note] if note else []
    shapes = dynamic_shapes if dynamic_shapes is not None else (
        dynamic_shapes_for(args, kwargs, model) if dynamic else None)

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        attempt = capture(model, args, kwargs, shapes, _export, lambda a, k: dynamic_shapes_for(a, k, model),
                          static_retry=dynamic_shapes is None, specialize=specialize_branches)
        gm, kwargs, notes = attempt.gm, attempt.kwargs, notes + attempt.notes
        dynamic = dynamic and attempt.shapes is not None  # the ladder's static rung: a static graph and file
        if functionalize(gm.graph):  # in-place writes backward would trip on (custom autograd Functions)
            gm.recompile()
        dims, static_notes = None if dynamic else {}, []
        if dynamic and dynamic_shapes is None:
            dims, static_notes = prove_dims(model, gm, args, kwargs)
            static_notes = _fixed_notes(gm.graph, args, kwargs, model) + static_notes
        train_rates = None
        if train_capture and _has_mode_ops(gm.graph):
            model.train()
            try:  # static shapes: only the mode ops' rates are read from this graph
                with noop_casts(), attempt.context():
                    train_rates = _mode_rates(_export(model, args, kwargs, None).graph)
            except CaptureError as e:  # e.g. wav2vec2's LayerDrop: `if self.training and torch.rand([]) < p`
                notes.append(_train_capture_note(e))
    finally:
        for m, mode in modes.items():
            m.training = mode

    notes += static_notes
    notes += _rewire_modes(gm.graph, train_rates)
    out = wrap(gm)
    out.training = modes[model]
    example = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
    # the GraphModule takes its inputs flat (no *args grouping): store the flat spec for its exports
    flat = dynamic_shapes if dynamic_shapes is not None else (_dynamic_shapes(args, kwargs, dims) if dynamic else None)
    out.meta[CAPTURE_KEY] = Capture(example[0], example[1], flat, notes, SourceRef(model),
                                    model=_model_name(model), dims=dims, static_notes=static_notes)
    for note in notes:
        warnings.warn(f"lora_fx.trace: {note}", stacklevel=2)
    return out


def _model_name(model: nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return type(model).__name__ + (f" ({name})" if name else "")


def _train_capture_note(e: CaptureError) -> str:
    cause = e.__cause__ or e
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
    return ("the train-mode capture (used only to read dropout rates that vanish in eval mode, like attention "
            f"dropout) failed ({type(cause).__name__}: {first}); the eval graph's dropout ops follow .train(), "
            "but train-only dropout rates (sdpa dropout_p) stay 0 and train-only layers (LayerDrop) never skip")


def dynamic_shapes_for(args: tuple, kwargs: dict, model: nn.Module | None = None) -> tuple:
    """``torch.export`` dynamic_shapes: batch (dim 0) dynamic, and sequence (dim 1) for token ids.

    One entry per positional arg, then one per kwarg value (the order torch.export expects). With
    ``model``, the args a ``forward(self, a, *args)`` collects in ``*args`` share one tuple entry,
    as torch.export wants.
    """
    shapes = _dynamic_shapes(args, kwargs)
    n = _named_positional(model) if model is not None else None
    if n is None or n > len(args):
        return shapes
    return (*shapes[:n], tuple(shapes[n:len(args)]), *shapes[len(args):])


def _named_positional(model: nn.Module) -> int | None:
    """How many named positional parameters ``model.forward`` has before its ``*args`` (None: no ``*args``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return i
    return None


def auto_dims(t: object) -> tuple[int, ...]:
    """The dimensions ``dynamic=True`` makes dynamic: batch (dim 0), and sequence (dim 1) of token ids."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return ()
    return (0, 1) if t.dim() >= 2 and not (t.is_floating_point() or t.is_complex()) else (0,)


def _dynamic_shapes(args: tuple, kwargs: dict, dims: dict[int, tuple[int, ...]] | None = None) -> tuple:
    """One spec per positional arg then per kwarg: :func:`auto_dims` of each tensor leaf, or with ``dims`` (per
    leaf index: the dims proven dynamic) those of them; every other dim static."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    specs = [{d: torch.export.Dim.AUTO for d in auto_dims(t) if dims is None or d in dims.get(k, ())} or None
             for k, t in enumerate(flat)]
    a, kw = pytree.tree_unflatten(specs, spec)
    return (*a, *kw.values())


def _fixed_notes(graph: fx.Graph, args: tuple, kwargs: dict, model: nn.Module) -> list[str]:
    """Notes on dimensions ``dynamic=True`` asked for that the model's code fixed to the example size
    (torch.export specialises them without a word, e.g. a Python loop over the sequence)."""
    symbolic = symbolic_dims(graph, (args, kwargs))
    if symbolic is None:
        return []
    notes, names = [], input_names(model, args, kwargs)
    for k, t in enumerate(pytree.tree_leaves((args, kwargs))):
        for d in auto_dims(t):
            if d not in symbolic.get(k, ()):
                notes.append(f"{names[k]} dim {d} (size {t.shape[d]}): fixed to the example's size by the model's "
                             "code (a Python loop or size check over it): the captured graph, and every export of "
                             "it, accept only that size there")
    return notes


def example_inputs(gm: nn.Module, example_args: tuple | None = None, example_kwargs: dict | None = None,
                   dynamic: bool = True) -> tuple[tuple, dict, Any]:
    """(args, kwargs, dynamic_shapes) to run or export ``gm``: the given example, else trace()'s.

    Raises:
        ExportError: no example given and ``gm`` was not captured by :func:`trace`.
    """
    cap = capture_of(gm)
    if example_args is None and cap is None:
        raise ExportError("no example inputs: pass example_args=..., or capture the model with "
                          "lora_fx.trace(model, args) so they are remembered")
    if example_args is None:
        return cap.args, dict(cap.kwargs), (cap.dynamic_shapes if dynamic else None)
    args, kwargs = tuple(example_args), dict(example_kwargs or {})
    return args, kwargs, (dynamic_shapes_for(args, kwargs) if dynamic else None)


def _unaliased(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
    """The example inputs with every tensor that shares memory with an earlier one cloned.

    torch.export captures two inputs that are one tensor (``model(ids, labels=ids)``) as one graph input:
    the graph would then read ``input_ids`` where the model reads ``labels``, for every later call.
    """
    seen: set[int] = set()
    cloned: list[str] = []
    flat, spec = pytree.tree_flatten((args, kwargs))
    names = [f"args{pytree.keystr(p[1:])}" if p[0].idx == 0 else f"{p[1].key}{pytree.keystr(p[2:])}"
             for p, _ in pytree.tree_flatten_with_path((args, kwargs))[0]]
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor) and t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                flat[i] = t.clone()
                cloned.append(names[i])
            seen.add(ptr)
    if not cloned:
        return args, kwargs, []
    args, kwargs = pytree.tree_unflatten(flat, spec)
    return args, kwargs, [f"example inputs {cloned} shared memory with an earlier input and were cloned for the "
                          "capture (torch.export would have made them one graph input)"]


def _batch_of_two(args: tuple, kwargs: dict) -> tuple[tuple, dict, str | None]:
    # torch.export specialises a size-1 dim to the constant 1: a batch-1 example would give a static
    # batch-1 graph (and ONNX model) without a word. Repeating the example to batch 2 keeps it dynamic.
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    if not leaves or any(t.shape[0] != 1 for t in leaves):
        return args, kwargs, None
    args, kwargs = pytree.tree_map_only(
        torch.Tensor, lambda t: t.expand(2, *t.shape[1:]).clone() if t.dim() else t, (args, kwargs))
    return args, kwargs, "example batch of 1 repeated to 2 so the batch dimension stays dynamic"


def _export(model: nn.Module, args: tuple, kwargs: dict, shapes) -> fx.GraphModule:
    try:
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises many types; we add the culprit and the fixes
        raise CaptureError(_capture_advice(model, e)) from e
    return ep.module(check_guards=False)


def _capture_advice(model: nn.Module, e: Exception) -> str:
    text = str(e).strip().splitlines()
    head = "\n    ".join(text[:6]) if text else type(e).__name__
    msg = str(e)
    tips = []
    if "Cache" in msg:
        tips.append("the model returns a KV cache: set model.config.use_cache = False (or pass use_cache=False)")
    if "data-dependent" in msg or "DataDependent" in type(e).__name__:
        tips.append("Python control flow on tensor values (if x.sum() > 0) cannot be captured: use "
                    "torch.where / torch.cond, or torch.fx.symbolic_trace with concrete_args")
    elif "Constraint" in msg or "specializ" in msg:
        tips.append("a dimension was specialised by the model's code: try trace(..., dynamic=False)")
    if isinstance(e, (TypeError, RuntimeError, ValueError)) and "data-dependent" not in msg:
        tips.append("check that the example args/kwargs fit model.forward (names, shapes, dtypes): "
                    "calling model(*args, **kwargs) eagerly should work first")
    tips.append("or trace it yourself with torch.fx.symbolic_trace(model) and pass that GraphModule to lorafy")
    tip_text = "".join(f"\n  - {t}" for t in tips)
    return (f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {head}"
            f"\nWhat to try:{tip_text}")


def _is_mode_op(n: fx.Node) -> bool:
    """A mode-dependent op; a batch norm without running statistics (weight standardization, timm's
    ScaledStdConv2d: ``F.batch_norm(w, None, None, training=True)``) always uses batch statistics."""
    if n.op != "call_function" or n.target not in MODE_OPS:
        return False
    return not (n.target is aten.batch_norm.default and len(n.args) > 3 and n.args[3] is None)


def _has_mode_ops(graph: fx.Graph) -> bool:
    return any(_is_mode_op(n) for n in graph.nodes)


def _rate(node: fx.Node, spec: ModeOp) -> float:
    if isinstance(spec.rate, int):
        return float(node.args[spec.rate]) if len(node.args) > spec.rate else 0.0
    if isinstance(spec.rate, str):
        if spec.rate in node.kwargs:
            return float(node.kwargs[spec.rate])
        return float(node.args[4]) if len(node.args) > 4 else 0.0  # sdpa: dropout_p is arg 4
    return 0.0


def _mode_rates(graph: fx.Graph) -> list[tuple[str, float]]:
    return [(str(n.target), _rate(n, MODE_OPS[n.target])) for n in graph.nodes
            if _is_mode_op(n)]


def _rewire_modes(graph: fx.Graph, train_rates: list[tuple[str, float]] | None) -> list[str]:
    """Makes mode-dependent ops follow ``self.training``; returns notes for the user."""
    nodes = [n for n in graph.nodes if _is_mode_op(n)]
    if not nodes:
        return []
    notes = []
    rates = [_rate(n, MODE_OPS[n.target]) for n in nodes]
    ours = [str(n.target) for n in nodes]
    if train_rates is not None and ours == [t for t, _ in train_rates]:  # the usual case: same ops
        rates = [r for _, r in train_rates]
    elif train_rates is not None:  # align op by op (difflib: quadratic, only when the captures differ)
        theirs = [t for t, _ in train_rates]
        matcher = difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                rates[block.a + k] = train_rates[block.b + k][1]
        extra = len(theirs) - sum(b.size for b in matcher.get_matching_blocks())
        if extra:
            notes.append(f"{extra} train-only op(s) (e.g. nn.MultiheadAttention's attention dropout) "
                         "vanish in the eval capture; .train() cannot bring them back")
    training = training_node(graph)
    for node, rate in zip(nodes, rates, strict=True):
        spec = MODE_OPS[node.target]
        node.meta[NODE_MODE] = {"rate": rate}
        if spec.flag is not None:
            args = list(node.args)
            if isinstance(spec.rate, int) and len(args) > spec.rate:
                args[spec.rate] = rate
            args[spec.flag] = training
            node.args = tuple(args)
        elif rate > 0.0:
            with graph.inserting_before(node):
                p = graph.call_function(operator.mul, (training, rate))
            p.meta[NODE_MODE] = {"rate": rate}
            if len(node.args) > 4:  # dropout_p given positionally: replace it in place
                node.args = (*node.args[:4], p, *node.args[5:])
            else:
                node.kwargs = {**node.kwargs, spec.rate: p}
    graph.lint()
    return notes


def training_node(graph: fx.Graph) -> fx.Node:
    """The graph's ``self.training`` get_attr node, created after the placeholders if missing."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == "training":
            return node
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            last = node
    with warnings.catch_warnings():  # fx warns that "training" is no tensor or module: it is a bool
        warnings.simplefilter("ignore")
        with graph.inserting_after(last) if last else graph.inserting_before(next(iter(graph.nodes))):
            node = graph.get_attr("training")
    node.meta[NODE_MODE] = {"flag": True}
    return node
