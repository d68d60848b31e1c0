"""Exports past the plain exporter's known failures on real models, each with a note; else a clear error.

``torch.onnx.export`` (dynamo) fails on some base models that lora-fx captures, lorafies and folds fine.
:class:`Fallbacks` wraps :func:`~.onnx_io.export_onnx`, recognises those failures and
retries with a fix that keeps the computed values and the dynamic shapes:

* ``Cannot view a tensor with shape ... and strides ...`` (T5, Hugging Face Swin, timm BEiT / MaxViT with
  dynamic shapes): the exporter's fake tensors carry other strides than eager kernels return (eager sdpa
  returns (b, s, h, d)-contiguous memory), so a ``view`` after a ``transpose`` that is legal in eager is
  refused. Every ``aten.view`` becomes ``aten.reshape``: the same values, and the same ONNX ``Reshape``.
* ``No ONNX function found for transformers.grouped_mm_fallback`` (Mixtral, Qwen3-MoE: transformers 5's
  grouped expert matmul): transformers ships an ONNX translation (one MatMul per expert); it is passed as
  ``custom_translation_table`` whenever the graph holds that op, before anything fails.

When no fix covers a failure, two retries keep the proof (both files are made the same way) and say so in
a note (``report.notes``), in this order:

* ``unoptimized``: onnxscript's optimizer failed on the exported graph (ProphetNet's n-gram streams, Laguna,
  Solar-Open: constant folding of ``SplitToSequence`` under dynamic shapes, "PassError: ... at step 0"):
  the file is the exporter's graph unoptimized, its dynamic dims kept (ONNX Runtime optimizes at load);
* ``opset``: a decoder exported at the opset the backend chose for its fusions (``default_opset``, 23:
  llm_fusions.py) failed inside torch.onnx: exported again at torch's default opset, unfused attention;
* ``static``: the dynamic export itself failed inside torch.onnx: the file is exported at the example
  inputs' shapes, and takes only those.

A fix or retry a first export needed is applied to the next one made through the same :class:`Fallbacks`
(the base export of ``fold_and_export``), so both files come from the same graph. A failure nothing covers
raises :class:`~lora_fx.errors.ExportError` naming the op or dimension that blocks and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ....errors import ExportError
from ...files import ExportInfo
from .onnx_io import OPTIMIZER_FAILED, export_onnx

__all__ = ["Fallbacks", "Fix", "explain", "translations", "views_as_reshapes"]

aten = torch.ops.aten


def views_as_reshapes(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` whose ``aten.view`` nodes are ``aten.reshape`` (parameters shared)."""
    from ....graph_module import copy_module

    out = copy_module(module, freeze=False)
    changed = 0
    for node in out.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default
            changed += 1
    if changed:
        out.recompile()
    return out


@dataclass(frozen=True)
class Fix:
    """One known exporter failure: how to recognise it, how to rewrite the module, what to tell the user."""

    name: str
    pattern: re.Pattern[str]
    apply: Callable[[fx.GraphModule], fx.GraphModule]
    note: str


FIXES: tuple[Fix, ...] = (
    Fix("views", re.compile(r"Cannot view a tensor with shape"), views_as_reshapes,
        "aten.view exported as aten.reshape: torch's exporter propagates other strides than the eager kernels "
        "(a view after a transpose was refused); values and the ONNX Reshape are the same"),
)


def translations(module: fx.GraphModule) -> tuple[dict[Any, Any] | None, str | None]:
    """ONNX translations for ops of ``module`` torch's exporter lacks, from transformers, and a note."""
    targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE as table
    except Exception:  # transformers absent or older: nothing to add
        return None, None
    wanted = [t for t in targets if t in table and "grouped_mm" in str(t)]
    if not wanted:
        return None, None
    names = ", ".join(sorted(str(t) for t in wanted))
    return ({t: table[t] for t in wanted},
            f"{names} exported with transformers' ONNX translation (one MatMul per expert)")


@dataclass
class Fallbacks:
    """Exports with the fixes above; remembers which were needed (``applied``: fix names, ``"unoptimized"``,
    ``"static"``) and why (``notes``). Once ``settled`` (the task file is written), later exports (the base
    export of the proof) apply exactly those and add none: a base export that fails otherwise is an error,
    never a file exported differently from the task's."""

    applied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settled: bool = False
    default_opset: int | None = None  # an opset the backend chose (not the user): the "opset" retry drops it

    def export(self, module: fx.GraphModule, path: str, args: tuple, kwargs: dict | None = None,
               **options: Any) -> ExportInfo:
        for fix in FIXES:
            if fix.name in self.applied:
                module = fix.apply(module)
        table, note = translations(module) if isinstance(module, fx.GraphModule) else (None, None)
        if note and note not in self.notes:
            self.notes.append(note)
        first: tuple[str, str] | None = None  # the first failure no fix covered: what the error explains
        while True:
            try:
                return export_onnx(module, path, args, kwargs, custom_translation_table=table,
                                   **self._retried(options))
            except ExportError as e:
                text = _cause_text(e)
                fix = None if self.settled else next(
                    (f for f in FIXES if f.name not in self.applied and f.pattern.search(text)), None)
                if fix is not None and isinstance(module, fx.GraphModule):
                    self.applied.append(fix.name)
                    self.notes.append(fix.note)
                    module = fix.apply(module)
                    continue
                first = first or (text, str(e))
                if self.settled or not self._retry(text, self._retried(options), args, kwargs):
                    also = "" if first[0] == text else f" (retried {sorted(RETRIES & set(self.applied))}: {e})"
                    raise ExportError(explain(*first) + also) from e

    def _retried(self, options: dict[str, Any]) -> dict[str, Any]:
        """The export options with the retries this job needed so far."""
        out = dict(options)
        if "unoptimized" in self.applied:
            out["optimize"] = False
        if "static" in self.applied:
            out["dynamic_shapes"] = None
        if "opset" in self.applied:
            out["opset"] = None
        return out

    def _retry(self, text: str, options: dict[str, Any], args: tuple, kwargs: dict | None) -> bool:
        """Records the next retry for a failure no fix covers (see the module docstring); False: none left."""
        said = _first_line(text)
        if OPTIMIZER_FAILED in text and options.get("optimize") is not False:
            self.applied.append("unoptimized")
            self.notes.append(f"unoptimized: onnxscript's optimizer failed on this graph ({said}); the file is the "
                              "exporter's graph, not optimized (ONNX Runtime optimizes it when loading), with its "
                              "dynamic dims; the base export of the proof is unoptimized alike")
            return True
        if self.default_opset is not None and options.get("opset") == self.default_opset:
            self.applied.append("opset")
            self.notes.append(f"opset: the export at opset {self.default_opset} (for the decoder fusions) failed "
                              f"inside torch.onnx ({said}); exported at torch's default opset, attention not fused; "
                              "the base export of the proof alike")
            return True
        if options.get("dynamic_shapes") is not None and not _NO_FUNCTION.search(text):
            self.applied.append("static")
            shapes = ", ".join(str(tuple(t.shape)) for t in pytree.tree_leaves((args, kwargs or {}))
                               if isinstance(t, torch.Tensor))
            self.notes.append(f"static: the dynamic export failed inside torch.onnx ({said}); the file is exported "
                              f"at the example inputs' shapes ({shapes}) and takes only those; the base export of "
                              "the proof is static alike")
            return True
        return False


RETRIES = frozenset({"unoptimized", "opset", "static"})


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 200 else line[:199] + "…"


def _cause_text(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 4:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


_NODE = re.compile(r"While executing %(\S+) : .*?target=([\w.:]+)")
_NO_FUNCTION = re.compile(r"No ONNX function found for\s*<?(?:OpOverload\(op=)?['\"]?([\w.:]+)")
_VIEW = re.compile(r"Cannot view a tensor with shape (\S+ ?\S*\)?) .*? as a tensor with shape (\([^)]*\))")
_GUARD = re.compile(r"(Constraints violated[^\n]*|GuardOnDataDependentSymNode[^\n]*|specialized[^\n]*)")


def explain(text: str, first: str) -> str:
    """An export error that names the op / node / dimension that blocks and what to do."""
    where = ""
    node = _NODE.search(text)
    if node:
        where = f" at node {node.group(1)} ({node.group(2)})"
    if (m := _NO_FUNCTION.search(text)) and "complex-valued" in text:
        return (f"the model computes with complex tensors (the op {m.group(1)}{where} reads one), which ONNX "
                "cannot represent. What to do: make the model use a real-valued implementation of that layer "
                "(for rotary embeddings: the cos/sin form instead of torch.polar / view_as_complex), or keep the "
                f"adapter unfolded in PyTorch. Exporter said: {first[:600]}")
    if m := _NO_FUNCTION.search(text):
        return (f"torch's ONNX exporter has no translation for the op {m.group(1)}{where}. What to do: register one "
                f"with torch.onnx.export(custom_translation_table={{op: onnxscript_function}}), or make the model use "
                f"another implementation of that layer (for transformers MoE experts: "
                f"config._experts_implementation = 'eager'). Exporter said: {first[:600]}")
    if m := _VIEW.search(text):
        return (f"torch's ONNX exporter cannot view a tensor of shape {m.group(1)} as {m.group(2)}{where}, even "
                "after exporting views as reshapes. What to do: export with fixed shapes "
                f"(fold_and_export(..., dynamic=False)). Exporter said: {first[:600]}")
    if m := _GUARD.search(text):
        return (f"a dynamic dimension cannot stay dynamic in the export{where}: {m.group(1)[:300]}. What to do: "
                "export with fixed shapes (fold_and_export(..., dynamic=False)) or with example inputs of "
                f"the sizes you will serve. Exporter said: {first[:600]}")
    head, _, rest = first.partition("\n")
    return f"{head}{where}" + (f"\n{rest}" if rest else "")
