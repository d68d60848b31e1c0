"""The decoder verb: ``export_decoder(lgm, path)`` (also ``fold_and_export(..., kv_cache=True)``).

One ONNX graph for prefill and decode, folded and verified::

    recapture   the model trace remembered, captured again with past/present (decoder/capture.py),
                the trained LoRA pairs moved over site by site
    steps       fold, a backend's export and structure proof, ORT numerics, quantize (exporters/steps.py)
    I/O names   past_key_values.{i}.key ... present.{i}.value, the layout as metadata (decoder/io_names.py)
    decode      ORT vs torch on a left-padded prefill and decode steps (decoder/checks.py)
    install     atomically, at ``path``

:func:`decoder_files` is that frame (recapture, staging, naming, install) for any writer; the
multi-LoRA export of a decoder (``export_multi_lora(..., kv_cache=True)``) uses it too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TypeVar

from torch import fx

from ...capture import example_inputs
from ...errors import VerifyError, short_message
from ...graph_module import LoraFxModule, lora_state
from ...weights import check_materialized
from .. import files
from ..backends.base import DEFAULT_BACKEND
from ..backends.genai_support import right_padding_only
from ..format import DECODER_KEY, DecoderLayout
from ..options import ExportOptions, ExportReport, resolve_options
from ..steps import export_staged
from .capture import recapture, source_model
from .checks import decode_checks
from .folder import folder_files, install_folder, read_genai_config
from .io_names import name_io

__all__ = ["decoder_files", "export_decoder"]

T = TypeVar("T")


def export_decoder(lgm: fx.GraphModule, path: str | os.PathLike, options: ExportOptions | None = None,
                   **overrides) -> ExportReport:
    """Exports a decoder LLM with past/present key-value inputs/outputs, for :class:`lora_fx.OnnxGenerator`,
    onnxruntime-genai and Optimum (see the module docstring). Settings as for :func:`lora_fx.fold_and_export`
    (``options`` and/or its keywords); the example inputs are built here (tokens, mask, past tensors).

    Returns the ExportReport with the prefill/decode checks appended to ``report.verification.numerics``.
    With ``quantize`` the proof is the quantized export's (quantized task == quantized base with new
    values); the prefill/decode checks against fp32 torch are then reported in the notes, not enforced.

    Raises:
        ExportError: the model has no KV-cache support (a Hugging Face ``*ForCausalLM`` traced with
            :func:`lora_fx.trace` is needed), a setting is wrong, or the export failed.
        VerifyError: a check failed (nothing at ``path`` changed).
    """
    lora_state(lgm, "export_decoder")
    check_materialized(lgm, "export_decoder")
    options = resolve_options(options, overrides, "export_decoder", extra=("options",))

    chosen: list[str] = []  # the backend that wrote the file

    def write(kv: LoraFxModule, layout: DecoderLayout, raw: str) -> tuple[ExportReport, str]:
        args, kwargs, shapes = example_inputs(kv, None, None, options.dynamic)
        written = export_staged(kv, raw, options, args, kwargs, shapes, path=final, decoder=layout,
                                source=source_model(lgm))
        chosen.append(written[0].backend)
        return written

    def check(kv: LoraFxModule, layout: DecoderLayout, named: str, report: ExportReport) -> None:
        if not options.verify:
            return
        try:
            checks = decode_checks(kv, named, layout, dtype=options.dtype, providers=options.providers,
                                   packed=right_padding_only(named))
        except Exception as e:  # ONNX Runtime refused to run the file (a kernel's limit): it failed verification
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise VerifyError(f"the KV-cache export for {final} FAILED verification: ONNX Runtime could not run "
                              f"it ({short_message(e, 2)})") from e
        if options.quantize is not None:
            report.verification.notes += [f"{c.shapes}: max rel err vs fp32 torch {c.max_rel_err:.2e} "
                                          "(quantized: not enforced)" for c in checks]
            checks = []
        report.verification.numerics += checks
        if not all(c.ok for c in checks):
            bad = "; ".join(f"{c.shapes}: max rel err {c.max_rel_err:.2e}" for c in checks if not c.ok)
            raise VerifyError(f"the KV-cache export for {final} FAILED verification ({bad}), so nothing was "
                              f"written:\n{report.verification}")

    final = os.path.abspath(os.fspath(path))
    try:
        report = decoder_files(lgm, final, write, check, tokenizer=options.tokenizer)
    except VerifyError as e:
        # "auto" chose a faster backend whose file then failed the checks against torch: nothing was
        # installed; the default backend exports it instead, and the report says why
        if options.backend != "auto" or not chosen or chosen[-1] == DEFAULT_BACKEND:
            raise
        report = export_decoder(lgm, path, dataclasses.replace(options, backend=DEFAULT_BACKEND))
        report.notes.append(f"backend {chosen[-1]}: its file failed verification ({short_message(e, 2)}); "
                            f"exported with {DEFAULT_BACKEND} instead")
    report.path = report.export.path = final
    return report


def decoder_files(lgm: fx.GraphModule, path: str,
                  write: Callable[[LoraFxModule, DecoderLayout, str], tuple[T, str]],
                  check: Callable[[LoraFxModule, DecoderLayout, str, T], None] | None = None, *,
                  tokenizer=None) -> T:
    """Recaptures ``lgm`` with a KV cache; ``write(kv, layout, raw)`` writes under ``raw``'s folder in a
    staging folder beside ``path`` and returns ``(what it wrote, the file to install)``; the file's I/O is
    named, ``check(kv, layout, named_file, result)`` runs, and the file is installed at ``path`` with the
    folder files serving stacks read beside it (decoder/folder.py: genai_config.json, config.json, ...)."""
    kv = recapture(lgm)
    layout: DecoderLayout = kv.meta[DECODER_KEY]
    final = os.path.abspath(os.fspath(path))
    name = os.path.basename(final)
    with files.staging(final) as staged:
        tmp = os.path.dirname(staged)
        raw, named = (os.path.join(tmp, d, name) for d in ("raw", "named"))
        for d in ("raw", "named"):
            os.makedirs(os.path.join(tmp, d))
        result, written = write(kv, layout, raw)
        name_io(written, named, layout)
        if check is not None:
            check(kv, layout, named, result)
        side = folder_files(source_model(lgm), layout, named, tokenizer=tokenizer,
                            genai=read_genai_config(os.path.dirname(written)))
        install_folder(named, final, side)
    if isinstance(getattr(result, "notes", None), list):
        result.notes += [str(side)] + side.notes
    return result
