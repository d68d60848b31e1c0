"""verify_fold: prove that a folded export is the base export with new weights.

Three checks: (a) the folded FX graph equals the captured one (fold checks it), (b) the ONNX file has
the base export's exact structure (ops, topology, attributes, initializer names/shapes/dtypes,
inputs, outputs) with only adapted initializers' values changed (:mod:`.verify_onnx`), and (c) ONNX
Runtime on the file matches torch on the unfolded LoRA model on two input shapes (a file whose weights
exceed :data:`.segments.DEFAULT_BUDGET` runs as a chain of parts, so the check holds a bounded share
of them next to the model's own)::

    max |ort - torch| / max |torch|  <=  1e-4 (fp32), 1e-8 (fp64), 1e-2 (fp16), 5e-2 (bf16)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..capture import auto_dims, example_inputs
from ..errors import ExportError, VerifyError
from ..graph_facts import symbolic_dims
from ..graph_module import copy_module
from ..passes.dtype import cast_inputs, float_dtype
from ..passes.fold import FoldReport, fold
from . import onnx_files
from .ort import available_providers, run_onnx
from .segments import bounded_session
from .verify_onnx import StructureReport, compare_structure

RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def tolerance(model_dtype: torch.dtype, export_dtype: torch.dtype | None = None) -> float:
    """Max relative error allowed between ORT on the file and torch on the model: the looser of the
    two precisions (a bf16 model exported to fp16 is checked against a bf16 reference)."""
    dtypes = [model_dtype] if export_dtype is None else [model_dtype, export_dtype]
    return max(RTOL.get(d, 1e-4) for d in dtypes)


@dataclass
class NumericCheck:
    """ORT on the file vs torch on the LoRA model, for one input shape."""

    shapes: str
    max_abs_err: float
    max_rel_err: float  # max |ort - torch| / max |torch|
    ok: bool


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_fold`; ``ok`` only when every check that ran passed."""

    structure: StructureReport
    numerics: list[NumericCheck] = field(default_factory=list)
    provider: str | None = None
    graph_ok: bool | None = None  # (a) folded FX graph == captured graph; None when not checked
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.structure.ok and self.graph_ok is not False and all(c.ok for c in self.numerics))

    def __str__(self) -> str:
        lines = [f"verification: {'PASSED' if self.ok else 'FAILED'}"]
        if self.graph_ok is not None:
            lines.append(f"  FX graph == captured graph: {self.graph_ok}")
        lines += ["  " + line for line in str(self.structure).splitlines()]
        for c in self.numerics:
            lines.append(f"  ORT ({self.provider}) vs torch LoRA model at {c.shapes}: max rel err "
                         f"{c.max_rel_err:.2e} ({'ok' if c.ok else 'TOO LARGE'})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_fold(base: str | os.PathLike, task: str | os.PathLike, *, lgm: fx.GraphModule | None = None,
                fold_report: FoldReport | None = None, example_args: tuple | None = None,
                example_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                providers: list[str] | None = None, numerics_only: bool = False) -> VerifyReport:
    """Proves ``task`` (folded export) is ``base`` (base export) with new weights.

    (b) structure is always compared; with ``lgm`` (the unfolded LoRA model) also (a) its fold
    equals the captured graph and (c) ORT on ``task`` matches torch on ``lgm`` at two input shapes
    (the example's and a larger batch/sequence), max relative error <= 1e-4 in fp32.

    Raises:
        VerifyError: ``base`` or ``task`` is missing or not a valid ONNX model (``onnx.checker``
            runs on both first); the message names the file.
    """
    onnx_files.check(base, error=VerifyError, role="base")
    onnx_files.check(task, error=VerifyError, role="task")
    untied = dict(fold_report.untied) if fold_report else {}
    structure = compare_structure(base, task, aliases=_aliases(base, task, untied))
    if numerics_only:
        structure.ok = True  # the negative control is reported, not failed, for unfolded exports
    return verify_export(task, structure, lgm=lgm, fold_report=fold_report, example_args=example_args,
                         example_kwargs=example_kwargs, dtype=dtype, providers=providers,
                         notes=["unfolded export: structure is expected to differ from the base"] if numerics_only else [])


def verify_export(task: str | os.PathLike, structure: StructureReport, *, lgm: fx.GraphModule | None = None,
                  fold_report: FoldReport | None = None, example_args: tuple | None = None,
                  example_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                  providers: list[str] | None = None, notes: list[str] | None = None) -> VerifyReport:
    """The checks after the structure (b): with ``lgm``, (a) its fold equals the captured graph and (c)
    ORT on ``task`` matches torch on ``lgm`` at two input shapes. ``structure`` comes from
    :func:`compare_structure` (:func:`verify_fold`) or from the skeleton proof (``fold_and_export``)."""
    report = VerifyReport(structure=structure, notes=list(notes or []))
    if lgm is None:
        return report
    if fold_report is None:
        try:
            fold(lgm)  # raises FoldError when the folded graph differs from the captured one
            report.graph_ok = True
        except Exception as e:  # report, don't raise: this is the proof step
            report.graph_ok = False
            report.notes.append(f"fold failed: {e}")
    else:
        report.graph_ok = True  # fold() returned, and it checks the graph before returning
    args, kwargs, _ = example_inputs(lgm, example_args, example_kwargs, dynamic=False)
    report.provider, report.numerics = _numerics(lgm, task, args, kwargs, dtype, providers, report.notes)
    return report


def _aliases(base, task, untied: dict[str, str]) -> dict[str, str]:
    """Maps untied parameter names to ONNX initializer names present in the files."""
    if not untied:
        return {}
    from .optimize import derived_aliases

    names_b, names_t = onnx_files.initializer_names(base), onnx_files.initializer_names(task)
    untied = {**untied, **derived_aliases(untied, names_t)}  # an optimized file folds W's layout ops: W::Transpose
    return {new: old for new, old in untied.items() if new in names_t and old in names_b}


def _numerics(lgm, task, args, kwargs, dtype, providers, notes) -> tuple[str | None, list[NumericCheck]]:
    providers = providers or available_providers()
    ref_model = copy_module(lgm, freeze=False).eval()
    # torch first, then ORT: the session is the only other holder of the weights while it runs, and
    # it holds them once (low_memory: no constant-folded casts, no pre-packed copies) or, for a big
    # file, a bounded share at a time (segments.bounded_session: the graph run as a chain of parts).
    cases = []
    for a, k in variants(args, kwargs, lgm):
        with torch.no_grad():
            cases.append((a, k, [t for t in pytree.tree_leaves(ref_model(*a, **k)) if isinstance(t, torch.Tensor)]))
    del ref_model
    checks = []
    try:
        session = bounded_session(task, providers=providers)
    except ExportError as e:
        notes.append(f"numeric check skipped: {e}")
        return None, []
    provider = session.get_providers()[0]
    rtol = tolerance(float_dtype(lgm), dtype)
    for a, k, expected in cases:
        ca, ck = cast_inputs((a, k), dtype)
        try:
            got = run_onnx(session, ca, ck)
        except ExportError as e:
            notes.append(f"numeric check on {provider} skipped: {e}")
            return provider, checks
        err, scale = 0.0, 0.0
        for g, e in zip(got, expected, strict=False):
            e = e.detach().cpu().double().numpy()  # a GPU module's outputs: compared on the host
            err = max(err, float(np.abs(g.astype(np.float64) - e).max(initial=0.0)))
            scale = max(scale, float(np.abs(e).max(initial=0.0)))
        rel = err / max(scale, 1e-12)
        shapes = ", ".join(str(tuple(t.shape)) for t in pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor))
        checks.append(NumericCheck(shapes, err, rel, rel <= rtol and len(got) == len(expected)))
    return provider, checks


def variants(args: tuple, kwargs: dict, gm: fx.GraphModule | None = None) -> list[tuple[tuple, dict]]:
    """The example inputs, and the same with batch + 1 and (token inputs) sequence + 3.

    With ``gm`` (the captured module) a dimension grows only where its graph keeps it symbolic: a
    model whose capture specialised a size (e.g. Mamba's sequence loop unrolled to the example length)
    is checked on the sizes its graph, and so its ONNX file, accepts. No dimension left to grow: the
    example inputs only."""
    gen = torch.Generator().manual_seed(0)
    dynamic = None if gm is None else symbolic_dims(gm.graph, (args, kwargs))

    def grow(k, t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        shape = list(t.shape)
        for d in auto_dims(t):  # batch + 1, token sequence + 3: the dims trace makes dynamic
            if dynamic is None or d in dynamic.get(k, ()):
                shape[d] += 1 if d == 0 else 3
        if t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device)
        hi = int(t.max()) + 1 if t.numel() else 2
        if hi <= 2:  # a mask
            return torch.ones(shape, dtype=t.dtype, device=t.device)
        return torch.randint(0, hi, shape, generator=gen, dtype=t.dtype).to(t.device)

    flat, spec = pytree.tree_flatten((args, kwargs))
    grown = [grow(k, t) for k, t in enumerate(flat)]
    if all(not isinstance(a, torch.Tensor) or a.shape == b.shape for a, b in zip(flat, grown, strict=True)):
        return [(args, kwargs)]  # nothing the graph lets grow
    return [(args, kwargs), pytree.tree_unflatten(grown, spec)]
