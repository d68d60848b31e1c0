"""fold_and_export: ship the folded graph as ONNX, verified to be the base export with new weights.

It is a pipeline of named steps over one :class:`ExportJob`, run in a staging folder beside the
target; only a file that passed every step is installed at ``path``::

    fold         fold(lgm) (or the unfolded copy with folded=False), eval mode
    export       exporters.streaming: a weightless skeleton in the export dtype (passes/dtype.py
                 rewrites its graph's casts), each weight converted while written (fold in fp32, round
                 once to dtype=...); through exporters.fallback and exporters/optimize.py (optimize=...)
    structure    the base model's skeleton (LoRA stripped) equals the exported one: the base export is
                 this graph with the base weights, proven without exporting it       (verify=True)
    base_export  the base model exported beside it, when the skeletons differ (an untied weight, an
                 unfolded export), for quantize=..., or with verify="full"
    verify       structure (proven, or compared with the base file) + FX graph + ORT numerics
    quantize     exporters.quantized_export: int4/int8 task and base, proved alike    (quantize=...)

``kv_cache=True`` wraps the whole pipeline (exporters/kv_cache.py: re-capture with past/present,
canonical I/O names, prefill/decode checks).

To add a step (a new option, as quantize=... was added): add its option to :class:`ExportOptions`
and a keyword to :func:`fold_and_export`, write ``def _mystep(job: ExportJob) -> None`` that reads
and updates the job (``job.module``, ``job.staged``, ``job.report``...), and insert
``Step("mystep", _mystep, when=lambda job: job.options.mystep)`` into :data:`PIPELINE` where it
belongs. Each step's wall time lands in ``report.seconds[name]``.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..capture import example_inputs
from ..errors import ExportError, VerifyError
from ..graph_module import LoraFxModule, copy_module, fold_report_of, lora_state
from ..passes.dtype import cast_inputs
from ..passes.fold import FoldReport, fold, strip
from ..weights import check_materialized
from . import onnx_files
from .fallback import Fallbacks
from .onnx_io import ExportInfo
from .quantize import QuantizeConfig, QuantizeReport
from .quantized_export import check_quantize, quantize_staged
from .streaming import SkeletonSpec, export_streaming, skeleton_spec
from .verify import NumericCheck, VerifyReport, variants, verify_export, verify_fold
from .verify_onnx import StructureReport

__all__ = ["PIPELINE", "ExportJob", "ExportOptions", "ExportReport", "NumericCheck", "Step", "VerifyReport",
           "fold_and_export", "verify_fold"]

# torch.onnx logs a warning per missing torchvision op on every export: noise for our users.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


@dataclass
class ExportReport:
    """What fold_and_export wrote and measured."""

    path: str
    folded: bool
    export: ExportInfo
    base: ExportInfo | None
    fold: FoldReport | None
    verification: VerifyReport | None
    seconds: dict[str, float]
    quantized: QuantizeReport | None = None  # with quantize=: ``export`` is the fp32 file it came from
    notes: list[str] = field(default_factory=list)  # fixes the export needed (exporters/fallback.py)

    @property
    def lora_nodes_added(self) -> int | None:
        """Nodes the export has beyond the base export (0 when folded)."""
        if self.base is None:
            proven = self.verification is not None and self.verification.structure.by_construction
            return 0 if proven and self.verification.structure.ok else None
        return self.export.nodes - self.base.nodes

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self._what()}): {self.export.nodes} nodes, "
                 f"{self.export.initializers} initializers, {_file_mib(self.export.path):.1f} MiB on disk"
                 + (" (with its .data file)" if self.export.external_data else "")]
        if self.base is not None:
            lines.append(f"  base export: {self.base.nodes} nodes; LoRA added {self.lora_nodes_added} nodes")
        if self.fold is not None and self.fold.untied:
            lines.append(f"  untied: {self.fold.untied}")
        if self.export.optimization is not None:
            lines.append(f"  {self.export.optimization}")
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        if self.verification is not None:
            lines.append(str(self.verification))
        if self.quantized is not None:
            lines.append(str(self.quantized))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _what(self) -> str:
        if not self.folded:
            return "UNFOLDED LoRA"
        if self.fold is not None and self.fold.folded and not any(self.fold.folded.values()):
            return "base weights: every LoRA delta is zero (no adapter loaded or trained)"
        return "folded LoRA"


def _file_mib(path: str) -> float:
    """Size of the .onnx file and its external data file, MiB (0 before they exist)."""
    return onnx_files.file_bytes(path) / 2**20


@dataclass(frozen=True)
class ExportOptions:
    """fold_and_export's settings (see its docstring); steps read them as ``job.options``."""

    opset: int | None = None
    dynamic: bool = True
    external_data: bool | None = None
    verify: bool | str = True
    folded: bool = True
    dtype: torch.dtype | None = None
    providers: list[str] | None = None
    quantize: QuantizeConfig | None = None
    optimize: bool | str = True
    model_type: str = "bert"


@dataclass
class ExportJob:
    """What the steps of one fold_and_export share; each step reads and updates it."""

    lgm: fx.GraphModule
    path: str  # the final target
    staged: str  # the file being written, under its final name in a staging folder beside ``path``
    options: ExportOptions
    args: tuple  # example inputs (trace()'s unless given), for torch
    kwargs: dict
    shapes: Any  # dynamic_shapes for the exporter
    module: LoraFxModule | None = None  # what the export step writes
    spec: SkeletonSpec | None = None  # what the exporter saw of it (exporters/streaming.py)
    structure: StructureReport | None = None  # the structure proof, when the skeletons alone prove it
    export_args: tuple = ()  # the example inputs in the export dtype
    export_kwargs: dict = field(default_factory=dict)
    report: ExportReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    fallbacks: Fallbacks = field(default_factory=Fallbacks)  # fixes the exporter needed; reused for the base

    @property
    def folder(self) -> str:
        """The staging folder (removed after the pipeline, whatever happens)."""
        return os.path.dirname(self.staged)


@dataclass(frozen=True)
class Step:
    """One named step of :data:`PIPELINE`, run when ``when(job)`` is true."""

    name: str
    run: Callable[[ExportJob], None]
    when: Callable[[ExportJob], bool] = lambda job: True


def fold_and_export(lgm: fx.GraphModule, path: str | os.PathLike, *, example_args: tuple | None = None,
                    example_kwargs: dict | None = None, opset: int | None = None, dynamic: bool = True,
                    external_data: bool | None = None, verify: bool = True, folded: bool = True,
                    dtype: torch.dtype | None = None, providers: list[str] | None = None,
                    quantize: str | QuantizeConfig | None = None,
                    kv_cache: bool = False, optimize: bool | str = True, model_type: str = "bert") -> ExportReport:
    """Folds LoRA into the weights and writes an ONNX file with the base model's exact graph.

    Args:
        lgm: what :func:`lora_fx.lorafy` returned (trained or not).
        path: target ``.onnx``; written atomically (an existing file survives any failure).
        example_args, example_kwargs: default: the inputs given to :func:`lora_fx.trace`.
        dynamic: keep batch (and sequence, for token inputs) dynamic.
        external_data: weights in ``<path>.data``; None = only above ~1.8 GB.
        verify: ``True`` (default): prove the file is the base export with new weights and check ORT
            against torch. The structure is proven from the skeletons when the base model's equals the
            exported one (same graph, same tensor names/shapes/dtypes: the exporter never sees weight
            values, so a base export would be this graph), otherwise (an untied weight, ``folded=False``,
            ``quantize=``) by exporting the base beside it and comparing the files. ``"full"``: always
            export the base and compare files (:func:`verify_fold`). ``False``: no checks.
        folded: False exports the unfolded LoRA graph (debugging, multi-adapter serving); the
            report then counts the nodes LoRA added.
        dtype: e.g. ``torch.float16`` for GPU inference: fold in fp32, round once, write fp16.
        providers: ONNX Runtime execution providers for the numeric check (default: CUDA when
            onnxruntime-gpu and a GPU are there, else CPU).
        quantize: ``"int4"`` / ``"int8"`` / a :class:`~lora_fx.exporters.quantize.QuantizeConfig`
            (block size, symmetric, ops, exclusions): fold and verify in fp32, then quantize task and
            base alike with ONNX Runtime's quantizers, prove the quantized task is the quantized base
            with new values, and report both quantization errors (``report.quantized``).
        kv_cache: a decoder LLM with past/present key-value inputs/outputs, for
            :class:`lora_fx.OnnxGenerator` (see :mod:`lora_fx.exporters.kv_cache`); also checked on a
            prefill and decode steps.
        optimize: ``True`` (default): onnxscript's optimizer with the weights opaque, so the file is
            as small and fast as a plain ``torch.onnx.export`` and its structure never depends on
            weight values (:mod:`lora_fx.exporters.optimize`); ``"ort"``: plus ONNX Runtime's
            transformer fusions (LayerNorm, GELU, attention where they match), refused if one reads
            weight values; ``False``: the exporter's raw graph. The base export for the proof is
            optimized the same way.
        model_type: for ``optimize="ort"``: ``onnxruntime.transformers`` model type (``bert``
            fuses LayerNorm/SkipLayerNorm/GELU in encoders and decoders alike; ``gpt2``...).

    Raises:
        ExportError: export or write failed (nothing at ``path`` changed).
        VerifyError: the export failed verification (nothing at ``path`` changed; the message shows
            the first difference).
    """
    lora_state(lgm, "fold_and_export")  # export a plain model with torch.onnx.export
    check_materialized(lgm, "fold_and_export")
    if kv_cache:  # a decoder with past/present: its own wrapper around this pipeline
        from .kv_cache import export_with_cache

        return export_with_cache(lgm, path, example_args=example_args, example_kwargs=example_kwargs, opset=opset,
                                 dynamic=dynamic, external_data=external_data, verify=verify, folded=folded,
                                 dtype=dtype, providers=providers, quantize=quantize, optimize=optimize,
                                 model_type=model_type)
    from .optimize import check_mode

    if verify not in (True, False, "full"):
        raise ExportError(f"verify={verify!r} is not supported: use True (default: structure proof + numeric "
                          "checks), 'full' (also export the base model and compare the files) or False")
    options = ExportOptions(opset, dynamic, external_data, verify, folded, dtype, providers,
                            check_quantize(quantize, folded, dtype), check_mode(optimize), model_type)
    args, kwargs, shapes = example_inputs(lgm, example_args, example_kwargs, dynamic)
    final = os.path.abspath(os.fspath(path))
    with onnx_files.staging(final) as staged:
        job = ExportJob(lgm, final, staged, options, args, kwargs, shapes, export_args=args, export_kwargs=kwargs)
        run_pipeline(job)
        onnx_files.install(job.staged, final)  # a step may have replaced the staged file (quantize)
    job.report.export.path = final
    return job.report


def run_pipeline(job: ExportJob, steps: list[Step] | None = None) -> ExportJob:
    """Runs the steps (default :data:`PIPELINE`) whose ``when`` holds, timing each."""
    for step in PIPELINE if steps is None else steps:
        if step.when(job):
            start = time.perf_counter()
            step.run(job)
            job.seconds[step.name] = time.perf_counter() - start
    return job


def _fold(job: ExportJob) -> None:
    """The module to export: the fold (checked equal to the captured graph), or an unfolded copy."""
    job.module = (fold(job.lgm) if job.options.folded else copy_module(job.lgm, freeze=False)).eval()


def _export(job: ExportJob) -> None:
    """Streamed export (exporters/streaming.py): a weightless skeleton in ``options.dtype`` (the dtype
    pass rewrites its graph), each weight converted while written; through the exporter fallbacks."""
    o = job.options
    job.export_args, job.export_kwargs = cast_inputs((job.args, job.kwargs), o.dtype)
    info = export_streaming(job.module, job.staged, job.export_args, job.export_kwargs, dtype=o.dtype,
                            exporter=job.fallbacks.export, dynamic_shapes=job.shapes, opset=o.opset,
                            external_data=o.external_data, optimize=o.optimize, model_type=o.model_type)
    job.report = ExportReport(job.path, o.folded, info, None, fold_report_of(job.module), None, job.seconds,
                              notes=job.fallbacks.notes)
    if o.verify:
        job.spec = skeleton_spec(job.module, o.dtype)
    job.module = None  # the folded copies of the adapted weights: not needed by the verification
    gc.collect()  # a GraphModule is a reference cycle (graph <-> module): free those copies before ORT runs


def _structure(job: ExportJob) -> None:
    """Proves the structure from the skeletons: the base model (LoRA stripped) as the export step would
    see it equals what it exported, so its export would be this very graph (SkeletonSpec). When they
    differ (an untied weight is an extra tensor), the base_export step exports it for a file comparison."""
    diff = job.spec.first_difference(skeleton_spec(strip(job.lgm), job.options.dtype))
    if diff is not None:
        job.report.notes.append(f"the base model's skeleton differs from the export's ({diff}): "
                                "the structure is compared with an exported base file instead")
        return
    adapted = {br.site.weight for br in lora_state(job.lgm, "fold_and_export").branches}
    names = onnx_files.initializer_names(job.staged)
    changed = sorted(n for n in names if n.partition("::")[0] in adapted)
    nodes = job.report.export.nodes
    job.structure = StructureReport(ok=True, base_nodes=nodes, task_nodes=nodes, changed_initializers=changed,
                                    by_construction=True)


def _base_export(job: ExportJob) -> None:
    """The base model (LoRA stripped), exported like the task (same dtype, fixes and optimization)."""
    o = job.options
    job.report.base = export_streaming(strip(job.lgm).eval(), os.path.join(job.folder, "base.onnx"), job.export_args,
                                       job.export_kwargs, dtype=o.dtype, exporter=job.fallbacks.export,
                                       dynamic_shapes=job.shapes, opset=o.opset, external_data=o.external_data,
                                       optimize=o.optimize, model_type=o.model_type)


def _verify(job: ExportJob) -> None:
    """verify_fold on the staged file; a failure raises, so nothing is installed."""
    o = job.options
    if job.structure is not None:
        onnx_files.check(job.staged, error=VerifyError, role="task")
        job.report.verification = verify_export(job.staged, job.structure, lgm=job.lgm, fold_report=job.report.fold,
                                                example_args=job.args, example_kwargs=job.kwargs, dtype=o.dtype,
                                                providers=o.providers)
    else:
        job.report.verification = verify_fold(job.report.base.path, job.staged, lgm=job.lgm,
                                              fold_report=job.report.fold, example_args=job.args,
                                              example_kwargs=job.kwargs, dtype=o.dtype, providers=o.providers,
                                              numerics_only=not o.folded)
    if not job.report.verification.ok:
        hint = (f"\n(optimize={o.optimize!r}: if only the optimized graphs differ, export with optimize=False)"
                if o.optimize is not False and not job.report.verification.structure.ok else "")
        raise VerifyError(f"the export for {job.path} FAILED verification, so nothing was written:"
                          f"\n{job.report.verification}{hint}")


def _quantize(job: ExportJob) -> None:
    """Quantizes the verified fp32 task (and base) files; proves and measures (exporters/quantized_export)."""
    o = job.options
    job.staged = quantize_staged(job.report, job.staged, o.quantize, job.lgm, variants(job.args, job.kwargs, job.lgm),
                                 o.providers)


PIPELINE: list[Step] = [
    Step("fold", _fold),
    Step("export", _export),
    Step("structure", _structure, when=lambda job: job.options.verify is True and job.options.folded
         and job.options.quantize is None),
    Step("base_export", _base_export, when=lambda job: job.options.verify and job.structure is None),
    Step("verify", _verify, when=lambda job: job.options.verify),
    Step("quantize", _quantize, when=lambda job: job.options.quantize is not None),
]
