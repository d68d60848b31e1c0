"""The quantize step of ``fold_and_export``: quantized task and base files, proved alike, errors measured.

``quantize_step`` takes the verified fp32 task and base exports, quantizes both with one
:class:`~lora_fx.exporters.quantize.QuantizeConfig`, proves the quantized task is the quantized base
with new values (``compare_structure``; every changed quantized initializer derives from an fp32
initializer the fold changed) and measures the quantization error of each against its fp32 torch
model (see :class:`~lora_fx.exporters.quantize.QuantizeReport`).

Refolding a quantized file (``lora_fx.switching.refold``) reuses :func:`prove`.
"""

from __future__ import annotations

import os

from ...errors import VerifyError
from .. import files
from ..verify.numerics import output_errors, torch_outputs
from ..verify.ort import ort_session, run_onnx
from ..verify.structure import compare_structure
from .config import QuantizeConfig, QuantizeReport
from .quantizers import quantize_file

__all__ = ["prove", "quantize_staged", "quantize_step", "quantized_error", "quantized_path"]


def quantize_staged(report, staged: str, cfg: QuantizeConfig, lgm, variants, providers) -> str:
    """fold_and_export's quantize step on its staged files; returns the file to install.

    Fills ``report.quantized`` (proof and errors) when the fp32 export was verified; with
    ``verify=False`` it only quantizes.

    Raises:
        VerifyError: the quantized task is not the quantized base with new values (nothing is written).
    """
    if report.verification is None:
        out = quantized_path(staged)
        quantize_file(staged, out, cfg, external_data=report.export.external_data)
    else:
        out, report.quantized = quantize_step(
            staged, report.base.path, cfg, report.verification.structure.changed_initializers, lgm=lgm,
            untied=dict(report.fold.untied) if report.fold else None, variants=variants, external_data=report.export.external_data, providers=providers)
        if not report.quantized.ok:
            raise VerifyError(f"the {cfg.scheme} export for {report.path} FAILED verification, so nothing "
                              f"was written:\n{report.quantized}")
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
    from ...passes.fold import strip

    out, qbase = quantized_path(task), quantized_path(base)
    info = quantize_file(task, out, cfg, external_data=external_data)
    quantize_file(base, qbase, cfg, external_data=external_data)
    report = prove(out, qbase, cfg, info, fp32_changed, untied)
    if lgm is not None:
        report.provider, report.task_err = quantized_error(out, lgm, variants, providers)
        _, report.base_err = quantized_error(qbase, strip(lgm), variants, providers)
    return out, report


def quantized_path(path: str) -> str:
    """``<dir>/quantized/<name>``: the same file name, so an external data file is already named
    ``<name>.data`` as ``install`` and the final file expect."""
    folder = os.path.join(os.path.dirname(path), "quantized")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, os.path.basename(path))


def prove(task_q: str, base_q: str, cfg: QuantizeConfig, info, fp32_changed: list[str],
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
    names_t, names_b = files.initializer_names(task_q), files.initializer_names(base_q)
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
        err = output_errors(run_onnx(session, args, kwargs), torch_outputs(ref, args, kwargs))
        rms, mx = max(rms, err.rms_rel), max(mx, err.max_rel)
    return session.get_providers()[0], {"rms": rms, "max": mx}
