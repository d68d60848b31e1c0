"""Write ONNX files atomically with torch's dynamo exporter, open ONNX Runtime sessions, run them.

Facts about ``torch.onnx.export(..., dynamo=True)`` (torch 2.13, onnxscript 0.7, onnx-ir 1.1) that
shape this module, all measured here:

* ``dynamic_shapes`` takes ``torch.export.Dim.AUTO`` as is (so do ``Dim.DYNAMIC`` and named ``Dim``),
  for eager modules and for GraphModules from ``torch.export.export(...).module()``, so no
  conversion is done. A GraphModule must be given its dynamic shapes again: without them the export
  is static even though the GraphModule itself is dynamic. AUTO axes come out named after torch
  symbols (``s23``); they are renamed ``<input>_dim<axis>`` so exports of equal graphs name them alike.
* The exporter optimizes by default (``optimize=True``: onnxscript constant folding, rewrite rules,
  ``DeduplicateInitializersPass``, CSE, then ``NameFixPass`` which names constants ``val_NNN``).
  Some of it depends on weight *values*: a Gemm bias that is all zeros is dropped, and identical
  initializers of <= 1024 elements are merged (every fresh LayerNorm shares one weight/bias pair).
  The structure of an optimized export therefore depends on its weights, which defeats "the folded
  export has the base export's structure", so ``export_onnx`` never runs torch's optimizer; with
  ``optimize=True`` it runs the same passes with the weights opaque (:mod:`.optimize`).
  ONNX Runtime optimizes at session creation anyway: random GPT-2 small (batch 2, seq 16, 2 threads)
  took 31.4 ms unoptimized (1762 nodes, 6.2 s export) vs 32.8 ms optimized (651 nodes, 9.3 s).
* Both modes are deterministic: exporting one module twice gives byte-identical ModelProtos.
* Graph inputs are the tensor leaves of ``(args, kwargs)`` in pytree order; ``None`` and Python
  scalars (``use_cache=False``) are baked into the graph; unused tensor inputs stay graph inputs.
"""

from __future__ import annotations

import collections
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ....errors import ExportError, short_message
from ... import files
from ...files import ExportInfo
from ...format import op_name

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZER_FAILED", "export_onnx"]

# protobuf cannot serialize a ModelProto over 2 GiB; stay clear of it (graph + metadata).
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Names torch gives to dynamic dimensions (backed s<N>, unbacked u<N>).
_TORCH_SYMBOL = re.compile(r"[su]\d+")


OPTIMIZER_FAILED = "the ONNX optimizer failed"  # fallback.Fallbacks retries such an export unoptimized


def export_onnx(module: torch.nn.Module, path: str | os.PathLike[str], args: tuple[Any, ...],
                kwargs: dict[str, Any] | None = None, *, dynamic_shapes: Any = None, opset: int | None = None,
                external_data: bool | None = None, optimize: bool | str = False, model_type: str = "bert",
                decoder: bool = False, custom_translation_table: dict | None = None,
                bind: Callable[[Any], None] | None = None) -> ExportInfo:
    """Export ``module`` to ``path`` with the dynamo exporter, atomically.

    The model is exported in memory, written into a temporary folder next to ``path`` and moved into
    place with ``os.replace`` (data file first, then the model), so a failure leaves an earlier file
    at ``path`` and its data file untouched and no temporary files behind. Only the moment between
    the two renames of an external-data export is not atomic.

    Args:
        module: An ``nn.Module`` or a GraphModule from ``torch.export.export(...).module()``.
        path: Target ``.onnx`` file; its directory must exist and be writable.
        args: Example positional inputs. Use sizes >= 2 on dynamic axes (size 1 warns, see
            ``_warn_size_one``).
        kwargs: Example keyword inputs.
        dynamic_shapes: As for ``torch.export.export``: one entry per positional arg then one per
            kwarg value, e.g. ``({0: Dim.AUTO, 1: Dim.AUTO},)`` for a token batch.
        opset: ONNX opset version; ``None`` lets torch choose.
        external_data: Store weights in ``<path>.data`` (relative reference). ``None`` does so when
            the initializers exceed ~1.8 GB. Without external data a stale ``<path>.data`` left by
            an earlier export to the same path is removed.
        custom_translation_table: ONNX functions for ops torch's exporter lacks (see fallback.py).
        optimize: ``True``: :func:`.optimize.optimize_model`, onnxscript's optimizer
            with the weights opaque (the structure never depends on weight values); ``"ort"``: plus
            ONNX Runtime's transformer fusions (``model_type``); ``False``: the exporter's raw graph.
            torch's own optimizer is never run: it reads weight values (see the module docstring).
        model_type: ``onnxruntime.transformers`` model type for ``optimize="ort"``.
        decoder: a KV-cache decoder LLM: the optimizer also fuses its layers (:mod:`.llm_fusions`).
        bind: Called with the ONNXProgram before it is optimized and written (the streamed export
            binds its lazy weights there: see ``streaming.py``).

    Returns:
        An :class:`ExportInfo` read back from the written file.

    Raises:
        ExportError: The directory is missing or unwritable (raised before exporting), the exporter
            failed, or the file could not be written.
    """
    path = os.path.abspath(os.fspath(path))
    files.check_target(path)
    start = time.perf_counter()
    _warn_size_one(tuple(args), kwargs, dynamic_shapes, path)
    program = _run_exporter(module, path, tuple(args), kwargs, dynamic_shapes, opset, False,
                            custom_translation_table)
    _stable_axis_names(program)
    if bind is not None:
        bind(program)
    optimization = None
    if optimize is not False:
        from ....graph_module import fold_report_of
        from .optimize import optimize_model

        report = fold_report_of(module)  # a folded module's untied copies count as their weights
        try:
            program.model, optimization = optimize_model(program.model, optimize, model_type=model_type,
                                                         ties=dict(report.untied) if report else None,
                                                         decoder=decoder)
        except ExportError:
            raise
        except Exception as exc:  # onnxscript / onnx_ir passes (ProphetNet: "PassError: ... at step 0")
            # the cause first: notes keep a message's first 200 characters, and a long path would hide it
            raise ExportError(f"{OPTIMIZER_FAILED}: {short_message(exc)} (optimize={optimize!r}, file "
                              f"{os.path.basename(path)!r})") from exc
    if external_data is None:
        external_data = _initializer_nbytes(program.model) > _EXTERNAL_DATA_THRESHOLD
    _save(program.model, path, external_data)
    info = _describe(program.model, path, external_data, time.perf_counter() - start)
    info.optimization = optimization
    return info


def _warn_size_one(args: tuple[Any, ...], kwargs: dict[str, Any] | None, dynamic_shapes: Any, path: str) -> None:
    """Warn when an axis asked to be dynamic has example size 1.

    torch.onnx captures eager modules with ``backed_size_oblivious`` so those stay dynamic, but a
    GraphModule captured at size 1 keeps static output shapes (ORT then warns or fails at other
    sizes), and without ``dynamic_shapes`` the axis is baked in.
    """
    import torch

    if not isinstance(dynamic_shapes, (tuple, list)):
        return
    for i, (value, spec) in enumerate(zip((*args, *(kwargs or {}).values()), dynamic_shapes, strict=False)):
        if isinstance(value, torch.Tensor) and isinstance(spec, dict):
            ones = [a for a, dim in spec.items() if dim is not None and -value.dim() <= a < value.dim() and value.shape[a] == 1]
            if ones:
                warnings.warn(f"{path}: input {i} axes {ones} are marked dynamic but have example size 1, which torch may specialize (a GraphModule captured at size 1 exports static shapes); use example sizes >= 2", stacklevel=3)


def _run_exporter(module: Any, path: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None,
                  dynamic_shapes: Any, opset: int | None, optimize: bool, translations: dict | None = None) -> Any:
    """Call ``torch.onnx.export`` in memory and return its ONNXProgram."""
    import torch

    with warnings.catch_warnings():
        # torch's own exporter deep-copies TreeSpecs, which warns about LeafSpec: not the user's to fix
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        if isinstance(module, torch.fx.GraphModule):
            # A torch.export GraphModule cannot switch to eval() (NotImplementedError): its dropout
            # and batch-norm mode were baked in at capture, so the training-mode warning is noise.
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        try:
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                opset_version=opset, optimize=optimize, verbose=False,
                custom_translation_table=translations,  # ops torchlib lacks (exporters/fallback.py)
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {path!r}: {short_message(exc)}") from exc
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {path!r}; is torch >= 2.9 installed?")
    return program


def _stable_axis_names(program: Any) -> None:
    """Rename torch-generated axis symbols (``s23``) to ``<first input using it>_dim<axis>``."""
    import onnx_ir as ir

    mapping: dict[str | ir.SymbolicDim, str] = {}
    for value in program.model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and _TORCH_SYMBOL.fullmatch(dim.value):
                mapping.setdefault(dim.value, f"{value.name}_dim{axis}")
    if mapping:
        program.rename_axes(mapping)


def _initializer_nbytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save(model: Any, path: str, external_data: bool) -> None:
    """Writes the exporter's model to ``path`` (and ``path + '.data'``), atomically."""
    import onnx_ir as ir

    data_name = os.path.basename(path) + ".data"
    files.write_model(path, lambda staged: ir.save(model, staged, external_data=data_name if external_data else None))


def _describe(model: Any, path: str, external: bool, seconds: float) -> ExportInfo:
    """Summarize the written model from memory (reading a multi-GB file back would cost a second parse)."""
    ops = collections.Counter(op_name(n.domain, n.op_type) for n in model.graph)
    inits = model.graph.initializers.values()
    return ExportInfo(path=path, nodes=len(model.graph), op_counts=dict(ops), initializers=len(inits),
                      initializer_bytes=sum(v.const_value.nbytes for v in inits if v.const_value is not None),
                      external_data=external, seconds=seconds, opset=model.opset_imports.get("", 0))
