"""The quantize step of ``fold_and_export``, and refold for quantized files.

``quantize_step`` takes the verified fp32 task and base exports, quantizes both with one
:class:`~lora_fx.exporters.quantize.QuantizeConfig`, proves the quantized task is the quantized base
with new values (``compare_structure``; every changed quantized initializer derives from an fp32
initializer the fold changed) and measures the quantization error of each against its fp32 torch
model (see :class:`~lora_fx.exporters.quantize.QuantizeReport`).

``refold_quantized`` switches the adapter of a quantized file: ``refold_onnx`` on the fp32 base
export gives the fp32 task weights (fold's arithmetic: ``round(W + s·B'A')``), quantizing that with
the settings stored in the file gives the new file, which must be structurally the old one.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import AdapterError, ExportError, VerifyError
from . import onnx_files
from .ort import ort_session, run_onnx
from .quantize import QuantizeConfig, QuantizeReport, as_config, quantize_file, read_config
from .verify_onnx import compare_structure

__all__ = ["check_quantize", "quantize_staged", "quantize_step", "refold_quantized", "quantized_error"]


def check_quantize(quantize, folded: bool, dtype) -> QuantizeConfig | None:
    """The config for ``fold_and_export(quantize=...)``; checked before anything is exported."""
    if quantize is None:
        return None
    if not folded or dtype not in (None, torch.float32):
        raise ExportError(f"quantize={quantize!r} needs folded=True and dtype float32 (it quantizes the fp32 "
                          f"folded export); got folded={folded}, dtype={dtype}")
    return as_config(quantize)


def quantize_staged(report, staged: str, cfg: QuantizeConfig, lgm, variants, providers) -> str:
    """fold_and_export's quantize step on its staged files; returns the file to install.

    Fills ``report.quantized`` (proof and errors) when the fp32 export was verified; with
    ``verify=False`` it only quantizes.

    Raises:
        VerifyError: the quantized task is not the quantized base with new values (nothing is written).
    """
    t = time.perf_counter()
    if report.verification is None:
        out = _quantized_path(staged)
        quantize_file(staged, out, cfg, external_data=report.export.external_data)
    else:
        out, report.quantized = quantize_step(
            staged, report.base.path, cfg, report.verification.structure.changed_initializers, lgm=lgm,
            untied=dict(report.fold.untied) if report.fold else None, variants=variants, external_data=report.export.external_data, providers=providers)
        if not report.quantized.ok:
            raise VerifyError(f"the {cfg.scheme} export for {report.path} FAILED verification, so nothing "
                              f"was written:\n{report.quantized}")
    report.seconds["quantize"] = time.perf_counter() - t
    return out


def quantize_step(task: str, base: str, cfg: QuantizeConfig, fp32_changed: list[str], *, lgm=None,
                  untied: dict[str, str] | None = None, variants=(), external_data: bool = False, providers: list[str] | None = None
                  ) -> tuple[str, QuantizeReport]:
    """Writes ``quantized/<name>`` beside the fp32 ``task`` and returns it with its report.

    Args:
        task, base: the fp32 folded and base exports (verified).
        fp32_changed: the fp32 initializers the fold changed (from the fp32 structure proof).
        untied: fold's untied copies, ``{new name: weight it copies}``.
        lgm: the unmerged LoRA model; with it, the errors are measured on ``variants``
            (``[(args, kwargs), ...]``).
    """
    from ..passes.fold import strip

    out, qbase = _quantized_path(task), _quantized_path(base)
    info = quantize_file(task, out, cfg, external_data=external_data)
    quantize_file(base, qbase, cfg, external_data=external_data)
    report = _prove(out, qbase, cfg, info, fp32_changed, untied)
    if lgm is not None:
        report.provider, report.task_err = quantized_error(out, lgm, variants, providers)
        _, report.base_err = quantized_error(qbase, strip(lgm), variants, providers)
    return out, report


def _quantized_path(path: str) -> str:
    """``<dir>/quantized/<name>``: the same file name, so an external data file is already named
    ``<name>.data`` as ``install`` and the final file expect."""
    folder = os.path.join(os.path.dirname(path), "quantized")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, os.path.basename(path))


def _prove(task_q: str, base_q: str, cfg: QuantizeConfig, info, fp32_changed: list[str],
           untied: dict[str, str] | None = None) -> QuantizeReport:
    s = compare_structure(base_q, task_q, aliases=_quantized_aliases(task_q, base_q, untied or {}))
    roots = sorted(fp32_changed, key=len, reverse=True)
    underived = [n for n in s.changed_initializers if not any(n == r or n.startswith(r + "_") for r in roots)]
    return QuantizeReport(cfg, info, s.ok, s.first_difference, s.changed_initializers, underived)


def _quantized_aliases(task_q: str, base_q: str, untied: dict[str, str]) -> dict[str, str]:
    """fold's untied copies (``W_folded`` for ``W``) carry their names into the quantized initializers
    (``W_folded_T_Q4`` for ``W_T_Q4``): map each task-only one to its base counterpart."""
    if not untied:
        return {}
    names_t, names_b = onnx_files.initializer_names(task_q), onnx_files.initializer_names(base_q)
    out = {}
    for name in names_t - names_b:
        for new, old in untied.items():
            if name.startswith(new) and old + name[len(new):] in names_b:
                out[name] = old + name[len(new):]
    return out


def quantized_error(path: str, model, variants, providers=None) -> tuple[str, dict[str, float]]:
    """ORT on ``path`` vs torch ``model`` (fp32): worst relative RMS and relative max over ``variants``."""
    session = ort_session(path, providers=providers)
    ref = model.eval()
    rms = mx = 0.0
    for args, kwargs in variants:
        with torch.no_grad():
            expected = [t.detach().cpu().double().numpy() for t in pytree.tree_leaves(ref(*args, **kwargs))
                        if isinstance(t, torch.Tensor)]
        got = run_onnx(session, args, kwargs)
        diff = np.concatenate([(g.astype(np.float64) - e).ravel() for g, e in zip(got, expected, strict=True)])
        ref_all = np.concatenate([e.ravel() for e in expected])
        rms = max(rms, float(np.linalg.norm(diff) / max(np.linalg.norm(ref_all), 1e-30)))
        mx = max(mx, float(np.abs(diff).max(initial=0.0) / max(np.abs(ref_all).max(initial=0.0), 1e-30)))
    return session.get_providers()[0], {"rms": rms, "max": mx}


def refold_quantized(task_onnx: str | os.PathLike, adapter, out_path: str | os.PathLike, *,
                     base_onnx: str | os.PathLike) -> QuantizeReport:
    """Writes ``out_path``: the quantized ``task_onnx`` with ``adapter`` folded in instead.

    Args:
        task_onnx: a quantized file from ``fold_and_export(..., quantize=...)``.
        adapter: the new adapter (folder, Adapter or lorafied module).
        out_path: where to write (atomically; may equal ``task_onnx``).
        base_onnx: the fp32 base export of the model (``lora-fx export`` without an adapter, no
            quantization): the quantized file no longer holds the fp32 weights.

    Raises:
        AdapterError: ``task_onnx`` is not a lora-fx quantized file, or ``base_onnx`` is quantized.
        VerifyError: the result is not structurally ``task_onnx`` (another model's base export?).
    """
    from ..switching.refold import refold_onnx

    task_onnx, out_path = os.fspath(task_onnx), os.path.abspath(os.fspath(out_path))
    cfg = read_config(onnx_files.load(task_onnx, error=AdapterError)[0])
    if cfg is None:
        raise AdapterError(f"refold_quantized: {task_onnx} carries no lora-fx quantization settings; "
                           "pass a file written by fold_and_export(..., quantize=...)")
    if read_config(onnx_files.load(base_onnx, error=AdapterError)[0]) is not None:
        raise AdapterError(f"refold_quantized: base {base_onnx} is quantized; pass the fp32 base export "
                           "(lora-fx export MODEL --targets ... -o base.onnx, without --quantize)")
    external = os.path.exists(task_onnx + ".data")
    with onnx_files.staging(out_path) as staged:
        fp32 = os.path.join(os.path.dirname(staged), "fp32_task.onnx")
        ref = refold_onnx(base_onnx, adapter, fp32, base_onnx=base_onnx)
        info = quantize_file(fp32, staged, cfg, external_data=external)
        report = _prove(staged, task_onnx, cfg, info, list(ref.rewritten))
        report.underived = []  # the old adapter's weights differ too: only structure is the claim here
        if not report.structure_ok:
            raise VerifyError(f"refold of {task_onnx}: the new file is not structurally the old one "
                              f"({report.first_difference}); is {base_onnx} the base export of this model?")
        onnx_files.install(staged, out_path)
    return report
