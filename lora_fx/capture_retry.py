"""What ``trace`` tries when torch.export refuses a model: a ladder of retries, each with a note.

torch.export (non-strict) refuses models whose Python code branches on tensor values (a data-dependent guard:
Longformer/LED's ``if is_global_attn``, FSMT's padding check, MoE loops that skip an expert without tokens),
that cast a submodule inside ``forward`` (``self.classifier.to(self.dtype)`` in Switch Transformers and
NLLB-MoE: fake weights cannot be swapped), or whose export path needs an input eager mode builds itself
(LongT5 without ``attention_mask``). The ladder, first success wins::

    0  torch.export.export, dynamic dims         (no-op module casts skipped: the weights already have that dtype)
    1  + attention_mask=ones                      when forward takes one, none was given, and the export failed
                                                  on a None (the graph then takes the mask: pass it)
    2  dense routing (dense_routing.py)           on a data-dependent guard: nonzero / torch.where(mask) made dense
                                                  and their scatter-adds masked (per-expert MoE loops run every
                                                  expert on every token, masked: exact); accepted only when the
                                                  graph equals the model at other input values (other routing)
    3  torch.export.draft_export, dynamic         only with trace(..., specialize_branches=True), on a data-dependent
                                                  guard: real tensors decide each such branch as the example does;
                                                  the torch graph asserts that decision at run time, an ONNX file
                                                  cannot (other inputs silently take the example's branch there),
                                                  so it is the user's choice, never a default
    4  the same, static shapes                    the file is static (its note says so)

What still fails raises :class:`~lora_fx.errors.CaptureError` from the first error, naming the model's source
line (the innermost frame outside torch) and the guard torch could not decide.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .dense_routing import NOTE, DenseRouting, prove_values
from .errors import CaptureError, short_message


@dataclass
class Attempt:
    """What the ladder captured: the graph, the inputs and dynamic shapes it was captured with (None: static)."""

    gm: fx.GraphModule
    kwargs: dict
    shapes: Any
    notes: list[str] = field(default_factory=list)
    dense: bool = False  # captured under DenseRouting: a train-mode capture needs it too

    def context(self) -> contextlib.AbstractContextManager:
        """What this capture ran under besides no-op casts (a recapture, e.g. in train mode, needs the same)."""
        return DenseRouting() if self.dense else contextlib.nullcontext()


@contextlib.contextmanager
def noop_casts() -> Iterator[None]:
    """``module.to(dtype/device)`` returns the module unchanged when every parameter and buffer already has that
    dtype and device (under torch.export the weights are fake tensors a cast cannot swap in place)."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, fmt = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if fmt is None and all((dtype is None or t.dtype == dtype or not t.is_floating_point())
                               and (device is None or t.device == device) for t in tensors):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def data_dependent(e: BaseException) -> bool:
    return "data-dependent" in str(e) or "DataDependent" in type(e).__name__


def _draft(model: nn.Module, args: tuple, kwargs: dict, shapes: Any, tries: int = 4) -> tuple[fx.GraphModule, list[str]]:
    """``torch.export.draft_export``: the data-dependent guards it specialised to the example (each asserted).

    draft_export is not deterministic (torch 2.13: the same model and example gave a graph whose runtime
    assertions fail on that very example in about half the runs): each graph is run on the example, and
    one that fails there is drafted again, ``tries`` times in all.
    """
    failed: BaseException | None = None
    for _ in range(tries):
        gm, guards = _draft_once(model, args, kwargs, shapes)
        try:
            with torch.no_grad():
                gm(*args, **kwargs)
            return gm, guards
        except Exception as e:  # noqa: BLE001 - any failure of the drafted graph on its own example
            failed = e
    raise CaptureError(f"torch.export.draft_export gave {tries} graphs that fail on the example itself "
                       f"({short_message(failed, 2)})") from failed


def _draft_once(model: nn.Module, args: tuple, kwargs: dict, shapes: Any) -> tuple[fx.GraphModule, list[str]]:
    loggers = [logging.getLogger(n) for n in ("torch.export._draft_export", "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in loggers]
    for log in loggers:  # draft_export logs each specialised guard with the whole graph: the note says it once
        log.setLevel(logging.ERROR)
    try:
        ep = torch.export.draft_export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
    report = getattr(ep, "_report", None)
    guards = [str(f.data.get("expr")) for f in getattr(report, "failures", []) if "expr" in getattr(f, "data", {})]
    return ep.module(check_guards=False), guards


def _mask_kwargs(model: nn.Module, args: tuple, kwargs: dict, e: BaseException) -> dict | None:
    """kwargs plus an all-ones ``attention_mask`` for the first 2-D integer input, where rung 1 applies."""
    if "attention_mask" in kwargs or not isinstance(e, (AttributeError, TypeError)) or "NoneType" not in str(e):
        return None
    try:
        if "attention_mask" not in inspect.signature(model.forward).parameters:
            return None
    except (TypeError, ValueError):
        return None
    ids = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() == 2
                and not t.is_floating_point()), None)
    return None if ids is None else {**kwargs, "attention_mask": torch.ones_like(ids)}


def capture(model: nn.Module, args: tuple, kwargs: dict, shapes: Any, export: Callable,
            shapes_for: Callable[[tuple, dict], Any], static_retry: bool = True, specialize: bool = False) -> Attempt:
    """Runs the ladder (module doc); ``export(model, args, kwargs, shapes)`` is one torch.export call that raises
    CaptureError, ``shapes_for`` gives the dynamic shapes for other kwargs; ``static_retry=False`` (shapes the
    caller chose) skips rung 4; ``specialize`` allows rung 3 (draft_export).

    Raises:
        CaptureError: every rung failed; the first failure's message, plus the source line and guard.
    """
    first: BaseException | None = None
    refused: list[str] = []  # why dense routing's graph was not accepted (tried once: the proof would not change)
    ways = ("export", "dense", "draft") if specialize else ("export", "dense")
    with noop_casts():
        for static in ((False, True) if shapes is not None and static_retry else (shapes is None,)):
            kw, notes = kwargs, [_STATIC_NOTE] if static and shapes is not None else []
            for way in ways:
                for _ in range(2 if way != "dense" or not refused else 0):  # again with attention_mask=ones (rung 1)
                    dyn = None if static else (shapes if kw is kwargs else shapes_for(args, kw))
                    try:
                        return _attempt(model, args, kw, dyn, way, export, notes)
                    except _Refused as e:
                        refused.append(str(e))
                        break
                    except Exception as e:  # torch.export raises many types
                        cause = e.__cause__ if isinstance(e, CaptureError) and e.__cause__ is not None else e
                        first = first or e
                    masked = _mask_kwargs(model, args, kw, cause)
                    if masked is None:
                        break
                    kw, notes = masked, [*notes, _MASK_NOTE]
                if not data_dependent(cause):
                    break  # dense routing and draft_export only get past data-dependent guards
    head = first.__cause__ if isinstance(first, CaptureError) and first.__cause__ is not None else first
    tried = "attention_mask=ones, dense routing, " + ("draft_export, " if specialize else "") + "static shapes"
    last = "" if cause is head else (f"\nthe retries ({tried}) got further; the last failure: "
                                     f"{short_message(cause, 3)}{where(cause)}")
    last += "".join(f"\ndense routing (rung 2) was refused: {r}" for r in refused)
    hint = "" if specialize or not data_dependent(head) else _SPECIALIZE_HINT
    raise CaptureError(f"{first}{where(head)}{last}{hint}") from head


class _Refused(CaptureError):
    """Rung 2 captured a graph that its proof refused (or had nothing to make dense): the next rung is tried."""


def _attempt(model, args, kw, dyn, way: str, export: Callable, notes: list[str]) -> Attempt:
    if way == "export":
        return Attempt(export(model, args, kw, dyn), kw, dyn, list(notes))
    if way == "dense":
        return _dense(model, args, kw, dyn, export, notes)
    gm, guards = _draft(model, args, kw, dyn)
    return Attempt(gm, kw, dyn, [*notes, _draft_note(guards)])


def _dense(model, args, kw, dyn, export: Callable, notes: list[str]) -> Attempt:
    """Rung 2 (dense_routing.py): the capture with per-expert loops dense, accepted once proven at other values."""
    routing = DenseRouting()
    try:
        with routing:
            gm = export(model, args, kw, dyn)
    except Exception as e:  # the next rung (draft_export) still gets the original data-dependent guard
        cause = e.__cause__ if isinstance(e, CaptureError) and e.__cause__ is not None else e
        if routing.used:
            raise _Refused(f"its capture failed: {short_message(cause, 1)[:300]}{where(cause)}") from e
        raise _Refused(_NO_INDEX_OPS) from e
    if not routing.used:
        raise _Refused(_NO_INDEX_OPS)
    why = prove_values(model, gm, args, kw)
    if why is not None:
        raise _Refused(f"its graph differs from the model: {why}")
    return Attempt(gm, kw, dyn, [*notes, NOTE], dense=True)


_NO_INDEX_OPS = "the model has no data-dependent index op (nonzero, torch.where(mask)) to make dense"
_SPECIALIZE_HINT = ("\nWhat to do: rewrite that branch without reading tensor values (torch.cond, torch.where), or "
                    "trace(..., specialize_branches=True): each such branch is captured as this example takes it, "
                    "the torch graph raises on inputs that branch otherwise, but an ONNX export of it cannot check "
                    "that and computes the example's branch for every input")
_STATIC_NOTE = ("the dynamic capture failed: the graph, and every export of it, is static (it takes the example's "
                "shapes only)")
_MASK_NOTE = ("captured with attention_mask=ones (the model's export path needs one where eager mode builds it): "
              "the graph and its exports take attention_mask as an input")


def _draft_note(guards: list[str]) -> str:
    shown = ", ".join(dict.fromkeys(guards[:4])) or "none reported"
    return (f"torch.export could not decide {len(guards)} data-dependent branch(es) ({shown}); draft_export took "
            "them as the example does, and the graph asserts that at run time: inputs that branch otherwise "
            "(e.g. other global-attention or expert routing patterns) raise in torch and are not covered by the file")


def where(e: BaseException) -> str:
    """``\\nat <file>:<line> in <function>: <code>`` for the innermost frame outside torch (the model's line),
    plus the guard of a data-dependent error; empty when neither is known."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _framework(f.filename)]
    text = ""
    if frames:
        f = frames[-1]
        text += f"\nat {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    guard = re.search(r"data-dependent expression (.+?) \(unhinted", str(e))
    if guard:
        text += f"\nguard torch could not decide: {guard.group(1)}"
    return text


def _framework(filename: str) -> bool:
    parts = filename.replace("\\", "/")
    return any(p in parts for p in ("/torch/", "/lora_fx/", "/contextlib.py", "/functools.py")) or \
        parts.endswith(("transformers/utils/generic.py", "transformers/utils/output_capturing.py",
                        "transformers/utils/deprecation.py"))
