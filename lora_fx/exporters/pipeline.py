"""fold_and_export: ship the folded graph as ONNX, verified to be the base export with new weights.

One call: the settings (:class:`~.options.ExportOptions`, or the same names as keywords) are checked,
the steps of :mod:`.steps` run in a staging folder beside the target (fold, a backend's export and
structure proof, the numeric checks, quantize), and only a file that passed every step is installed
at ``path``. ``kv_cache=True`` is :func:`~.decoder.export.export_decoder` (the decoder verb).
"""

from __future__ import annotations

import os

from torch import fx

from ..capture import example_inputs
from ..errors import ExportError
from ..graph_module import lora_state
from ..weights import check_materialized
from . import files
from .decoder.export import export_decoder
from .options import ExportOptions, ExportReport, resolve_options
from .steps import export_staged

__all__ = ["ExportOptions", "ExportReport", "export_decoder", "fold_and_export"]


def fold_and_export(lgm: fx.GraphModule, path: str | os.PathLike, options: ExportOptions | None = None, *,
                    example_args: tuple | None = None, example_kwargs: dict | None = None, kv_cache: bool = False,
                    **overrides) -> ExportReport:
    """Folds LoRA into the weights and writes an ONNX file with the base model's exact graph.

    Args:
        lgm: what :func:`lora_fx.lorafy` returned (trained or not).
        path: target ``.onnx``; written atomically (an existing file survives any failure).
        options: an :class:`~lora_fx.ExportOptions`; keywords below override its fields.
        example_args, example_kwargs: default: the inputs given to :func:`lora_fx.trace`.
        kv_cache: a decoder LLM with past/present key-value inputs/outputs, for
            :class:`lora_fx.OnnxGenerator`: :func:`lora_fx.export_decoder` (also checked on a prefill and
            decode steps).
        **overrides: fields of :class:`~lora_fx.ExportOptions`:

            dynamic: keep batch (and sequence, for token inputs) dynamic.
            external_data: weights in ``<path>.data``; None = only above ~1.8 GB.
            verify: ``True`` (default): prove the file is the base export with new weights and check ORT
                against torch. The structure is proven from the skeletons when the base model's equals
                the exported one (same graph, same tensor names/shapes/dtypes: the exporter never sees
                weight values, so a base export would be this graph), otherwise (an untied weight,
                ``folded=False``, ``quantize=``) by exporting the base beside it and comparing the files.
                ``"full"``: always export the base and compare files (:func:`verify_fold`). ``False``: no
                checks.
            folded: False exports the unfolded LoRA graph (debugging, multi-adapter serving); the
                report then counts the nodes LoRA added.
            dtype: e.g. ``torch.float16`` for GPU inference: fold in fp32, round once, write fp16.
            providers: ONNX Runtime execution providers for the numeric check (default: CUDA when
                onnxruntime-gpu and a GPU are there, else CPU).
            quantize: ``"int4"`` / ``"int8"`` / a :class:`~lora_fx.QuantizeConfig` (block size,
                symmetric, ops, exclusions): fold and verify in fp32, then quantize task and base alike
                with ONNX Runtime's quantizers, prove the quantized task is the quantized base with new
                values, and report both quantization errors (``report.quantized``).
            optimize: ``True`` (default): onnxscript's optimizer with the weights opaque, so the file is
                as small and fast as a plain ``torch.onnx.export`` and its structure never depends on
                weight values (:mod:`lora_fx.exporters.backends.torch_onnx.optimize`); ``"ort"``: plus
                ONNX Runtime's transformer fusions (LayerNorm, GELU, attention where they match),
                refused if one reads weight values; ``False``: the exporter's raw graph. The base export
                for the proof is optimized the same way.
            model_type: for ``optimize="ort"``: ``onnxruntime.transformers`` model type (``bert``
                fuses LayerNorm/SkipLayerNorm/GELU in encoders and decoders alike; ``gpt2``...).
            opset: ONNX opset (None: torch's choice).
            backend: ``"auto"`` (default) or a registered backend's name (exporters/backends/);
                ``report.backend`` says which one wrote the file, ``report.notes`` why another was not used.

    Raises:
        ExportError: a setting is wrong, or the export or write failed (nothing at ``path`` changed).
        VerifyError: the export failed verification (nothing at ``path`` changed; the message shows
            the first difference).
    """
    lora_state(lgm, "fold_and_export")  # export a plain model with torch.onnx.export
    check_materialized(lgm, "fold_and_export")
    options = resolve_options(options, overrides, "fold_and_export",
                              extra=("options", "example_args", "example_kwargs", "kv_cache"))
    if kv_cache:  # a decoder with past/present: the decoder verb
        if example_args is not None or example_kwargs:
            raise ExportError("kv_cache=True builds its own example inputs (tokens, mask, past tensors); "
                              "drop example_args / example_kwargs")
        return export_decoder(lgm, path, options)
    args, kwargs, shapes = example_inputs(lgm, example_args, example_kwargs, options.dynamic)
    final = os.path.abspath(os.fspath(path))
    with files.staging(final) as staged:
        report, staged = export_staged(lgm, staged, options, args, kwargs, shapes, path=final)
        files.install(staged, final)  # the quantize step may have replaced the staged file
    report.export.path = final
    return report
