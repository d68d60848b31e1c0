"""fold_and_export and verify_fold: ship the folded graph, and prove it is the original graph.

``fold_and_export(lgm, "task.onnx")`` folds LoRA into the weights, exports with torch's dynamo
exporter (batch and sequence dynamic, inputs remembered from ``trace``), writes atomically, then
verifies: (a) the folded FX graph equals the captured one (fold checks it), (b) the ONNX file has the
base export's exact structure (ops, topology, attributes, initializer names/shapes/dtypes, inputs,
outputs) with only adapted initializers' values changed, and (c) ONNX Runtime on the file matches
torch on the unfolded LoRA model on two input shapes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..errors import ExportError, VerifyError
from ..graph_module import LoraFxModule, capture_of, copy_module, fold_report_of, lora_state
from ..passes.fold import FoldReport, fold, strip
from ..weights import check_materialized
from .fallback import Fallbacks
from .onnx_io import ExportInfo, check_target, install
from .ort import available_providers, ort_session, run_onnx
from .quantize import QuantizeConfig, QuantizeReport
from .quantized_export import check_quantize, quantize_staged
from .streaming import export_streaming
from .verify_onnx import StructureReport, compare_structure

# torch.onnx logs a warning per missing torchvision op on every export: noise for our users.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}


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
        return None if self.base is None else self.export.nodes - self.base.nodes

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
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p)) / 2**20


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
        verify: run :func:`verify_fold` (exports the base model to a temp dir for the comparison).
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
    if kv_cache:
        from .kv_cache import export_with_cache

        return export_with_cache(lgm, path, example_args=example_args, example_kwargs=example_kwargs, opset=opset,
                                 dynamic=dynamic, external_data=external_data, verify=verify, folded=folded,
                                 dtype=dtype, providers=providers, quantize=quantize)
    args, kwargs, shapes = _inputs(lgm, example_args, example_kwargs, dynamic)
    qcfg = check_quantize(quantize, folded, dtype)
    from .optimize import check_mode

    optimize = check_mode(optimize)
    final = os.path.abspath(os.fspath(path))
    directory = check_target(final)
    times: dict[str, float] = {}
    t = time.perf_counter()
    module = (fold(lgm) if folded else copy_module(lgm, freeze=False)).eval()
    times["fold"] = time.perf_counter() - t
    x_args, x_kwargs = _cast_inputs((args, kwargs), dtype)
    # Everything is written and verified in a temp folder beside the target; only a file that passed
    # verification replaces what is at ``path`` (a failure anywhere leaves it untouched).
    with tempfile.TemporaryDirectory(prefix=".lora_fx.", dir=directory) as tmp:
        staged = os.path.join(tmp, os.path.basename(final))
        fallbacks = Fallbacks()  # past the plain exporter's known failures; the base export reuses its fixes
        # Streamed: the exporter sees weightless skeletons; each weight is converted while written.
        info = export_streaming(module, staged, x_args, x_kwargs, dtype=dtype, exporter=fallbacks.export,
                                dynamic_shapes=shapes, opset=opset, external_data=external_data,
                                optimize=optimize, model_type=model_type)
        times["export"] = info.seconds
        report = ExportReport(final, folded, info, None, fold_report_of(module), None, times,
                              notes=fallbacks.notes)
        del module  # the folded copies of the adapted weights: not needed by the verification
        if verify:
            report.base = export_streaming(strip(lgm).eval(), os.path.join(tmp, "base.onnx"), x_args, x_kwargs,
                                           dtype=dtype, exporter=fallbacks.export, dynamic_shapes=shapes,
                                           opset=opset, external_data=external_data,
                                           optimize=optimize, model_type=model_type)
            times["base_export"] = report.base.seconds
            t = time.perf_counter()
            report.verification = verify_fold(report.base.path, staged, lgm=lgm, fold_report=report.fold,
                                              example_args=args, example_kwargs=kwargs,
                                              dtype=dtype, providers=providers, numerics_only=not folded)
            times["verify"] = time.perf_counter() - t
            if not report.verification.ok:
                hint = (f"\n(optimize={optimize!r}: if only the optimized graphs differ, export with optimize=False)"
                        if optimize is not False and not report.verification.structure.ok else "")
                raise VerifyError(f"the export for {final} FAILED verification, so nothing was written:"
                                  f"\n{report.verification}{hint}")
        if qcfg is not None:
            staged = quantize_staged(report, staged, qcfg, lgm, _variants(args, kwargs), providers)
        install(staged, final)
    info.path = final
    return report


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
    _check_onnx(base, "base")
    _check_onnx(task, "task")
    untied = dict(fold_report.untied) if fold_report else {}
    report = VerifyReport(structure=compare_structure(base, task, aliases=_aliases(base, task, untied)))
    if numerics_only:
        report.notes.append("unfolded export: structure is expected to differ from the base")
        report.structure.ok = True  # the negative control is reported, not failed, for unfolded exports
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
    args, kwargs, _ = _inputs(lgm, example_args, example_kwargs, dynamic=False)
    report.provider, report.numerics = _numerics(lgm, task, args, kwargs, dtype, providers, report.notes)
    return report


def _check_onnx(source: str | os.PathLike | Any, role: str) -> None:
    """Raises VerifyError naming the file unless ``onnx.checker`` accepts it: a file that is not
    ONNX (random bytes, an empty or truncated file) would otherwise reach the comparison as an empty
    ModelProto (protobuf parses b"" without error) or fail there with a bare protobuf error."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        what, target = f"{role} ModelProto", source
    else:
        what = target = os.fspath(source)
        if not os.path.isfile(target):
            raise VerifyError(f"{role} ONNX file {target!r} does not exist")
    try:
        onnx.checker.check_model(target)
    except Exception as e:  # ValidationError, protobuf DecodeError, OSError on external data
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        from .optimize import ORT_ONNX_DOMAIN_OPS

        if any(first.startswith(f"No Op registered for {op} ") for op in ORT_ONNX_DOMAIN_OPS):
            return  # an optimize="ort" file: ONNX Runtime registers this fused op in the ONNX domain
        raise VerifyError(f"{role} file {what!r} is not a valid ONNX model ({type(e).__name__}: {first}); "
                          "pass the .onnx files written by fold_and_export / torch.onnx.export") from e


def _aliases(base, task, untied: dict[str, str]) -> dict[str, str]:
    """Maps untied parameter names to ONNX initializer names present in the files."""
    if not untied:
        return {}
    import onnx

    names_b = {t.name for t in onnx.load(os.fspath(base), load_external_data=False).graph.initializer}
    names_t = {t.name for t in onnx.load(os.fspath(task), load_external_data=False).graph.initializer}
    from .optimize import derived_aliases

    untied = {**untied, **derived_aliases(untied, names_t)}  # an optimized file folds W's layout ops: W::Transpose
    return {new: old for new, old in untied.items() if new in names_t and old in names_b}


def _numerics(lgm, task, args, kwargs, dtype, providers, notes) -> tuple[str | None, list[NumericCheck]]:
    providers = providers or available_providers()
    ref_model = copy_module(lgm, freeze=False).eval()
    # torch first, then ORT: the session is the only other holder of the weights while it runs,
    # and it holds them once (low_memory: no constant-folded casts, no pre-packed copies).
    cases = []
    for a, k in _variants(args, kwargs):
        with torch.no_grad():
            cases.append((a, k, [t for t in pytree.tree_leaves(ref_model(*a, **k)) if isinstance(t, torch.Tensor)]))
    del ref_model
    checks = []
    try:
        session = ort_session(task, providers=providers, low_memory=True)
    except ExportError as e:
        notes.append(f"numeric check skipped: {e}")
        return None, []
    provider = session.get_providers()[0]
    rtol = RTOL.get(dtype or _float_dtype(lgm), 1e-4)
    for a, k, expected in cases:
        ca, ck = _cast_inputs((a, k), dtype)
        try:
            got = run_onnx(session, ca, ck)
        except ExportError as e:
            notes.append(f"numeric check on {provider} skipped: {e}")
            return provider, checks
        err, scale = 0.0, 0.0
        for g, e in zip(got, expected, strict=False):
            e = e.detach().double().numpy()
            err = max(err, float(np.abs(g.astype(np.float64) - e).max(initial=0.0)))
            scale = max(scale, float(np.abs(e).max(initial=0.0)))
        rel = err / max(scale, 1e-12)
        shapes = ", ".join(str(tuple(t.shape)) for t in pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor))
        checks.append(NumericCheck(shapes, err, rel, rel <= rtol and len(got) == len(expected)))
    return provider, checks


def _float_dtype(gm: fx.GraphModule) -> torch.dtype:
    return next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)


def _inputs(lgm, example_args, example_kwargs, dynamic: bool) -> tuple[tuple, dict, Any]:
    cap = capture_of(lgm)
    if example_args is None and cap is None:
        raise ExportError("no example inputs: pass example_args=..., or capture the model with "
                          "lora_fx.trace(model, args) so they are remembered")
    args = tuple(example_args) if example_args is not None else cap.args
    kwargs = dict(example_kwargs or {}) if example_args is not None else dict(cap.kwargs)
    shapes = None
    if dynamic:
        from ..capture import dynamic_shapes_for

        shapes = cap.dynamic_shapes if (cap is not None and example_args is None) else dynamic_shapes_for(args, kwargs)
    return args, kwargs, shapes


def _retype(module: LoraFxModule, old: torch.dtype, new: torch.dtype) -> LoraFxModule:
    """Moves a captured graph to another float dtype: the capture baked its dtype into casts
    (``aten.to(x, float32)``, ``full(..., dtype=float32)``) and metadata asserts; rewrite those."""

    def swap(a):
        if a is old:
            return new
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        return a

    graph = module.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            continue
        node.args = swap(node.args)
        node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    graph.lint()
    module.recompile()
    return module


def _cast_inputs(tree, dtype: torch.dtype | None):
    if dtype is None:
        return tree
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def _variants(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """The example inputs, and the same with batch + 1 and (token inputs) sequence + 3."""
    gen = torch.Generator().manual_seed(0)

    def grow(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        shape = list(t.shape)
        shape[0] += 1
        token = not t.is_floating_point()
        if token and t.dim() >= 2:
            shape[1] += 3
        if t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=t.dtype)
        hi = int(t.max()) + 1 if t.numel() else 2
        if hi <= 2:  # a mask
            return torch.ones(shape, dtype=t.dtype)
        return torch.randint(0, hi, shape, generator=gen, dtype=t.dtype)

    return [(args, kwargs), pytree.tree_map(grow, (args, kwargs))]
