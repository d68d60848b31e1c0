"""verify_fold: prove that a folded export is the base export with new weights.

Three checks: (a) the folded FX graph equals the captured one (fold checks it), (b) the ONNX file has
the base export's exact structure (ops, topology, attributes, initializer names/shapes/dtypes,
inputs, outputs) with only adapted initializers' values changed (:mod:`.structure`, or a backend's
proof by construction), and (c) ONNX Runtime on the file matches torch on the unfolded LoRA model on
two input shapes (:mod:`.numerics`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import fx

from ...capture import example_inputs
from ...errors import VerifyError
from ...passes.fold import FoldReport, fold
from .. import files
from ..format import derived_aliases
from .numerics import NumericCheck, check_numerics
from .structure import StructureReport, compare_structure

__all__ = ["VerifyReport", "compare_files", "verify_export", "verify_fold"]


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


UNFOLDED_NOTE = "unfolded export: structure is expected to differ from the base"


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
    files.check(base, error=VerifyError, role="base")
    files.check(task, error=VerifyError, role="task")
    untied = dict(fold_report.untied) if fold_report else {}
    structure = compare_files(base, task, untied=untied, numerics_only=numerics_only)
    return verify_export(task, structure, lgm=lgm, fold_report=fold_report, example_args=example_args,
                         example_kwargs=example_kwargs, dtype=dtype, providers=providers,
                         notes=[UNFOLDED_NOTE] if numerics_only else [])


def compare_files(base: str | os.PathLike, task: str | os.PathLike, *, untied: dict[str, str] | None = None,
                  numerics_only: bool = False) -> StructureReport:
    """(b) on two written files: :func:`compare_structure`, fold's untied copies (``untied``: ``{copy:
    weight}``) matched to their weights. ``numerics_only`` (an unfolded export, which differs by design):
    the difference is reported, not failed."""
    structure = compare_structure(base, task, aliases=_aliases(base, task, untied or {}))
    if numerics_only:
        structure.ok = True  # the negative control is reported, not failed, for unfolded exports
    return structure


def verify_export(task: str | os.PathLike, structure: StructureReport, *, lgm: fx.GraphModule | None = None,
                  fold_report: FoldReport | None = None, example_args: tuple | None = None,
                  example_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                  providers: list[str] | None = None, notes: list[str] | None = None) -> VerifyReport:
    """The checks after the structure (b): with ``lgm``, (a) its fold equals the captured graph and (c)
    ORT on ``task`` matches torch on ``lgm`` at two input shapes. ``structure`` comes from
    :func:`compare_files` (:func:`verify_fold`) or from a backend's proof (``fold_and_export``)."""
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
    report.provider, report.numerics = check_numerics(lgm, task, args, kwargs, dtype, providers, report.notes)
    return report


def _aliases(base, task, untied: dict[str, str]) -> dict[str, str]:
    """Maps untied parameter names to ONNX initializer names present in the files."""
    if not untied:
        return {}
    names_b, names_t = files.initializer_names(base), files.initializer_names(task)
    untied = {**untied, **derived_aliases(untied, names_t)}  # an optimized file folds W's layout ops: W::Transpose
    return {new: old for new, old in untied.items() if new in names_t and old in names_b}
