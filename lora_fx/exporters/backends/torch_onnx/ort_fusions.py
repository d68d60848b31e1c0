"""``optimize="ort"``: ONNX Runtime's python transformer fusions, refused when they read weight values.

Run by :func:`.optimize.optimize_model` after the weight-independent passes. The
fusions read constants by pattern, so :func:`ort_fusions` fuses the model a second time with every
weight replaced by generic values (seeded normal, no zeros, no equal tensors) and refuses when the two
fused graphs differ.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ....errors import ExportError

__all__ = ["ort_fusions"]


def ort_fusions(proto: Any, *, weights: set[str], model_type: str = "bert", check: bool = True) -> tuple[Any, dict[str, int]]:
    """Runs ONNX Runtime's python transformer fusions on an ``onnx.ModelProto``.

    Args:
        proto: the model (after :func:`optimize_model`); not changed.
        weights: names of its weight initializers (the others are graph constants fusions may read).
        model_type: ``onnxruntime.transformers.optimizer.MODEL_TYPES`` key; ``bert`` suits encoders,
            ``gpt2`` decoders.
        check: also fuse a copy whose weights are generic random values and refuse when the two
            fused graphs differ (a fusion that read a weight's value).

    Returns:
        (fused ModelProto, fused op counts).

    Raises:
        ExportError: onnxruntime's transformer tools are missing, or a fusion depends on weight values.
    """
    fused, stats = _fuse(proto, model_type)
    if check:
        probe, _ = _fuse(_generic_weights(proto, weights), model_type)
        difference = _structure_difference(fused, probe)
        if difference:
            raise ExportError(f"optimize='ort' refused: ONNX Runtime's fusions for model_type={model_type!r} depend on "
                              f"weight values, so the folded and base exports could differ in structure ({difference}); "
                              "use optimize=True (weight-independent onnxscript optimization)")
    return fused, stats


def _fuse(proto: Any, model_type: str) -> tuple[Any, dict[str, int]]:
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model as ort_optimize
    except ImportError as exc:
        raise ExportError(f"optimize='ort' needs onnxruntime's transformer tools ({exc}); pip install onnxruntime") from exc
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    options = FusionOptions(model_type)
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs every fusion it tries at INFO/WARNING
    try:
        model = ort_optimize(copy, model_type=model_type, num_heads=0, hidden_size=0,
                             optimization_options=options, opt_level=0)
    except Exception as exc:
        raise ExportError(f"optimize='ort': onnxruntime.transformers.optimizer failed for model_type={model_type!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        logger.setLevel(level)
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if isinstance(v, int)}
    fused = model.model
    domains = {n.domain for n in fused.graph.node} - {"", "ai.onnx"}
    for domain in domains - {o.domain for o in fused.opset_import}:  # the fusions add com.microsoft ops
        fused.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return fused, stats


_FLOATS = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _generic_weights(proto: Any, weights: set[str]) -> Any:
    """A copy whose float weights hold seeded normal values (+3: no zeros, ones or equal tensors), so
    that a rule reading weight values decides differently than on real weights."""
    import onnx
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    gen = np.random.default_rng(0)
    for t in copy.graph.initializer:
        if t.name in weights and t.data_type in _FLOATS:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array((gen.standard_normal(tuple(t.dims)) + 3.0).astype(dtype), t.name))
    return copy


def _structure_difference(a: Any, b: Any) -> str:
    from ...verify.structure import compare_structure

    result = compare_structure(a, b)
    return "" if result.ok else str(result).splitlines()[0]
