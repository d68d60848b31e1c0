"""The steps of one export, in plain sequence (``fold_and_export`` and ``export_decoder`` run them in a
staging folder beside the target; only a file that passed every step is installed)::

    fold      fold(lgm) (or the unfolded copy with folded=False), eval mode
    export    a backend (exporters/backends/) writes the file and proves its structure: the torch.onnx
              backend's parts are timed as "export", "structure", "base_export"
    verify    ORT on the file vs torch on the LoRA model, after the backend's structure proof (verify=...)
    quantize  exporters/quantize/step.py: int4/int8 task and base, proved alike (quantize=..., unless
              the backend quantized)

Each step's wall time lands in ``report.seconds[name]``. A new step: a typed function here, one line in
:func:`export_staged` (with an ``if`` when optional), and a field on ExportOptions when it has a setting.
"""

from __future__ import annotations

import logging
import os
import time

from torch import fx, nn

from ..dynamic_dims import static_notes
from ..errors import ExportError, VerifyError
from ..graph_module import LoraFxModule, capture_of, copy_module, fold_report_of
from ..passes.dtype import cast_inputs
from ..passes.fold import fold
from . import files
from .backends import (
    DEFAULT_BACKEND,
    Backend,
    ExportRequest,
    ExportResult,
    get_backend,
    select_backend,
    timed,
)
from .format import DecoderLayout
from .options import ExportOptions, ExportReport
from .quantize.step import quantize_staged
from .verify.numerics import variants
from .verify.proof import UNFOLDED_NOTE, VerifyReport, verify_export
from .verify.structure import StructureReport

__all__ = ["backend_step", "export_staged", "fold_step", "verify_step"]

# torch.onnx logs a warning per missing torchvision op on every export: noise for our users.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_staged(lgm: LoraFxModule, staged: str, options: ExportOptions, args: tuple, kwargs: dict, shapes,
                  *, path: str, decoder: DecoderLayout | None = None,
                  source: nn.Module | None = None) -> tuple[ExportReport, str]:
    """Runs the steps on ``lgm``, writing under ``staged``'s folder; returns the report and the file to
    install (the backend's, or the quantized one). ``path``: the final target, for messages; ``source``:
    the user's model (default: the one ``trace`` remembered for ``lgm``)."""
    seconds: dict[str, float] = {}
    notes: list[str] = static_notes(lgm)  # input dims the capture fixed: static in the file
    with timed(seconds, "fold"):
        module = fold_step(lgm, options)
    fold_report = fold_report_of(module)
    export_args, export_kwargs = cast_inputs((args, kwargs), options.dtype)
    if source is None:
        remembered = getattr(capture_of(lgm), "source", None)
        source = None if remembered is None else remembered.module
    request = ExportRequest(lgm, module, options, staged, export_args, export_kwargs, shapes, source=source,
                            decoder=decoder)
    del module  # the request holds the only reference: a backend may free it
    start = time.perf_counter()
    backend, result = backend_step(request, notes)
    seconds.update(result.seconds)
    seconds.setdefault("export", time.perf_counter() - start - sum(result.seconds.values()))
    report = ExportReport(path, options.folded, result.export, result.base, fold_report, None, seconds,
                          result.quantized, notes + result.notes, backend=backend.name)
    staged = request.staged
    if options.verify:
        with timed(seconds, "verify"):
            report.verification = verify_step(report, staged, result.structure, lgm, args, kwargs, options,
                                              quantized=result.quantized is not None)
    if options.quantize is not None and result.quantized is None:
        with timed(seconds, "quantize"):
            staged = quantize_staged(report, staged, options.quantize, lgm, variants(args, kwargs, lgm),
                                     options.providers)
    return report, staged


def fold_step(lgm: fx.GraphModule, options: ExportOptions) -> LoraFxModule:
    """The module to export: the fold (checked equal to the captured graph), or an unfolded copy."""
    return (fold(lgm) if options.folded else copy_module(lgm, freeze=False)).eval()


def backend_step(request: ExportRequest, notes: list[str]) -> tuple[Backend, ExportResult]:
    """The chosen backend's export (exporters/backends/base.py). With ``backend="auto"`` a failing
    non-default backend is noted and the default one runs instead, in a fresh folder."""
    backend = select_backend(request, notes)
    if backend.name == DEFAULT_BACKEND or request.options.backend != "auto":
        return backend, backend.export(request)
    try:
        return backend, backend.export(request)
    except ExportError as e:
        notes.append(f"backend {backend.name!r} failed ({e}): used {DEFAULT_BACKEND!r} instead")
    name = os.path.basename(request.staged)
    os.makedirs(os.path.join(request.folder, DEFAULT_BACKEND))
    request.staged = os.path.join(request.folder, DEFAULT_BACKEND, name)
    if request.module is None:  # the failed backend freed it
        request.module = fold_step(request.lgm, request.options)
    backend = get_backend(DEFAULT_BACKEND)
    return backend, backend.export(request)


def verify_step(report: ExportReport, staged: str, structure: StructureReport | None, lgm: fx.GraphModule,
                args: tuple, kwargs: dict, options: ExportOptions, quantized: bool = False) -> VerifyReport:
    """The backend's structure proof + the FX graph check + ORT numerics; a failure raises, so nothing is
    installed."""
    if structure is None:
        raise ExportError(f"internal: backend {report.backend!r} returned no structure proof for {report.path} "
                          f"with verify={options.verify!r}")
    files.check(staged, error=VerifyError, role="task")
    verification = verify_export(staged, structure, lgm=lgm, fold_report=report.fold, example_args=args,
                                 example_kwargs=kwargs, dtype=options.dtype, providers=options.providers,
                                 notes=[] if options.folded else [UNFOLDED_NOTE])
    verification.structure.unchanged = report.zero_adapter  # the adapted initializers keep their base values
    if quantized:  # the backend quantized the file itself: its error against fp32 torch is reported only
        verification.notes += [f"{c.shapes}: max rel err vs fp32 torch {c.max_rel_err:.2e} (quantized: not "
                               "enforced)" for c in verification.numerics]
        verification.numerics = []
    report.verification = verification
    if not verification.ok:
        hint = (f"\n(optimize={options.optimize!r}: if only the optimized graphs differ, export with "
                "optimize=False)" if options.optimize is not False and not verification.structure.ok else "")
        raise VerifyError(f"the export for {report.path} FAILED verification, so nothing was written:"
                          f"\n{verification}{hint}")
    return verification
