"""What to quantize and what came of it: :class:`QuantizeConfig` (checked by :func:`as_config`, stored in
the file under ``format.QUANTIZE_KEY`` and read back by :func:`read_config`), :class:`QuantizeInfo` (what
``quantize_file`` wrote) and :class:`QuantizeReport` (the proof and the errors). The quantizers themselves:
:mod:`.quantizers`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..._text import plural
from ...errors import ExportError
from ..format import QUANTIZE_KEY

__all__ = ["SCHEMES", "QuantizeConfig", "QuantizeInfo", "QuantizeReport", "as_config", "read_config"]

SCHEMES = ("int4", "int8")


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize.

    Attributes:
        scheme: ``"int4"`` (MatMulNBits, 4 bits) or ``"int8"``.
        block_size: weights per scale along the input dimension (MatMulNBits; power of 2, >= 16).
        symmetric: zero point fixed at the middle of the range; False stores per-block zero points.
        ops: op types to quantize; None: the scheme's default, ``("MatMul", "Gather")`` for int4 (the
            embedding ``Gather`` becomes ORT's ``GatherBlockQuantized``, 4 bits), ``("MatMul",)``
            otherwise (ORT quantizes ``Gather`` at 4 bits only).
        exclude: glob patterns over weight names kept in fp32 (e.g. ``("lm_head.*",)``).
        int8_method: ``"dynamic"`` (MatMulInteger, activations quantized at run time) or
            ``"weight_only"`` (MatMulNBits with 8 bits, activations stay fp32).
        accuracy_level: MatMulNBits compute precision: 4 (default) = int8 compute on CPU, measured 14.5x faster
            per decoded token than ORT's default (0: fp32 compute) on SmolLM2-135M with an 8-bit LM head (39 vs
            571 ms/token, 1 thread; the builder uses 4 as well); None: ORT's default.
        algorithm: ``"rtn"`` (round to nearest) or ``"hqq"`` (ORT's calibration-free Half-Quadratic
            Quantization: scales and zero points optimized per block; asymmetric, int4 MatMul only).
        head_bits: bits of the output heads (:func:`output_heads`: the MatMuls that produce a graph
            output, e.g. an LM head or a classifier): 8 (default: ``MatMulNBits`` with 8 bits under
            int4, like the rest under int8), 4 (int4: like the rest) or 32 (kept fp32). Rounding the
            logits' own weights to 4 bits costs a small model most of its accuracy (README).
    """

    scheme: str = "int4"
    block_size: int = 32
    symmetric: bool = True
    ops: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    int8_method: str = "dynamic"
    accuracy_level: int | None = 4
    algorithm: str = "rtn"
    head_bits: int = 8

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def nbits(self) -> bool:
        """Whether weights become ``MatMulNBits`` (int4, or int8 weight-only) rather than ``MatMulInteger``."""
        return self.scheme == "int4" or self.int8_method == "weight_only"


def as_config(quantize: str | QuantizeConfig, **overrides) -> QuantizeConfig:
    """``"int4"`` / ``"int8"`` / a config, checked; ``overrides`` replace its fields.

    Raises:
        ExportError: an unknown scheme, method, op type or a bad block size (the message lists what works).
    """
    if isinstance(quantize, str):
        if quantize not in SCHEMES:
            raise ExportError(f"quantize={quantize!r} is not a scheme; use one of {SCHEMES} or a QuantizeConfig")
        cfg = QuantizeConfig(scheme=quantize)
    elif isinstance(quantize, QuantizeConfig):
        cfg = quantize
    else:
        raise ExportError(f"quantize= takes {SCHEMES} or a lora_fx QuantizeConfig, not {type(quantize).__name__}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.scheme not in SCHEMES:
        raise ExportError(f"QuantizeConfig.scheme={cfg.scheme!r}; use one of {SCHEMES}")
    ops = cfg.ops if cfg.ops is not None else ("MatMul", "Gather") if cfg.scheme == "int4" else ("MatMul",)
    cfg = dataclasses.replace(cfg, ops=tuple(ops), exclude=tuple(cfg.exclude))
    if cfg.head_bits not in ((4, 8, 32) if cfg.scheme == "int4" else (8, 32)):
        raise ExportError(f"head_bits={cfg.head_bits!r} for {cfg.scheme}: use 8, 32 (fp32 heads)"
                          + (" or 4 (like the rest)" if cfg.scheme == "int4" else ""))
    if cfg.algorithm not in ("rtn", "hqq") or (cfg.algorithm == "hqq" and (cfg.scheme != "int4" or "MatMul" not in cfg.ops)):
        raise ExportError(f"algorithm={cfg.algorithm!r}: use 'rtn', or 'hqq' with scheme int4 (MatMul weights)")
    if cfg.int8_method not in ("dynamic", "weight_only"):
        raise ExportError(f"int8_method={cfg.int8_method!r}; use 'dynamic' or 'weight_only'")
    if cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1):
        raise ExportError(f"block_size={cfg.block_size}: MatMulNBits needs a power of 2 >= 16 (e.g. 32, 64, 128)")
    allowed = {"MatMul", "Gather"} if cfg.nbits else {"MatMul"}
    if not cfg.ops or set(cfg.ops) - allowed:
        raise ExportError(f"ops={cfg.ops} for {cfg.scheme} ({cfg.int8_method if cfg.scheme == 'int8' else 'MatMulNBits'}): "
                          f"quantizable op types are {sorted(allowed)}")
    return cfg


def read_config(model: onnx.ModelProto) -> QuantizeConfig | None:
    """The settings a file was quantized with (stored by :func:`quantize_file`), or None."""
    for p in model.metadata_props:
        if p.key == QUANTIZE_KEY:
            stored = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(p.value).items()}
            stored.setdefault("head_bits", 4 if stored.get("scheme") == "int4" else 8)  # files from before head_bits
            return QuantizeConfig(**stored)
    return None


@dataclass
class QuantizeInfo:
    """What :func:`quantize_file` wrote."""

    path: str
    config: QuantizeConfig
    prepared: int  # MatMul/Gemm nodes put in quantizable form
    quantized: dict[str, int] = field(default_factory=dict)  # new op type -> count
    fp32_bytes: int = 0
    bytes: int = 0
    heads: list[str] = field(default_factory=list)  # output heads (quantized with head_bits)


@dataclass
class QuantizeReport:
    """The quantized file: structure proof against the quantized base, and the quantization errors.

    Errors are relative to the fp32 reference, worst over the checked inputs:
    ``rms = ||y_q - y||_2 / ||y||_2`` and ``max = max|y_q - y| / max|y|``.
    """

    config: QuantizeConfig
    info: QuantizeInfo
    structure_ok: bool
    first_difference: str | None
    changed: list[str]  # quantized initializers that differ from the quantized base
    underived: list[str]  # ...of which not derived from an initializer the fold changed (must be empty)
    task_err: dict[str, float] = field(default_factory=dict)  # quantized task vs unmerged fp32 LoRA model
    base_err: dict[str, float] = field(default_factory=dict)  # quantized base vs fp32 base
    provider: str | None = None

    @property
    def fold_cost(self) -> float | None:
        """task RMS error / base RMS error: how much the fold adds to quantization's own error."""
        b = self.base_err.get("rms")
        return None if not b else self.task_err.get("rms", 0.0) / b

    @property
    def ok(self) -> bool:
        finite = all(np.isfinite(v) for v in (*self.task_err.values(), *self.base_err.values()))
        return self.structure_ok and not self.underived and finite

    def __str__(self) -> str:
        c, i = self.config, self.info
        ops = ", ".join(f"{n} {op}" for op, n in i.quantized.items())
        how = (f"block {c.block_size}, {'symmetric' if c.symmetric else 'asymmetric'}" if c.nbits
               else "per-channel symmetric weights, dynamic activations")
        if i.heads and c.head_bits != (4 if c.scheme == "int4" else 8):
            how += f", {len(i.heads)} output head(s) {'fp32' if c.head_bits == 32 else f'{c.head_bits}-bit'}"
        lines = [f"quantized {c.scheme} ({ops}; {how}): {i.bytes / 2**20:.2f} MiB, "
                 f"{i.bytes / max(i.fp32_bytes, 1):.3f}x the fp32 file ({i.fp32_bytes / 2**20:.2f} MiB)"]
        if self.structure_ok:
            lines.append(f"  structure identical to the quantized base export; "
                         f"{plural(len(self.changed), 'quantized initializer')} changed, all derived from adapted weights"
                         if not self.underived else
                         f"  changed initializers NOT derived from adapted weights: {self.underived[:8]}")
        else:
            lines.append(f"  structure DIFFERS from the quantized base export: {self.first_difference}")
        if self.task_err:
            lines.append(f"  error ({self.provider}): quantized task vs fp32 LoRA model rms {self.task_err['rms']:.2e} "
                         f"max {self.task_err['max']:.2e}; quantized base vs fp32 base rms {self.base_err['rms']:.2e} "
                         f"max {self.base_err['max']:.2e}; fold cost {self.fold_cost:.2f}x the base's own error")
        return "\n".join(lines)
