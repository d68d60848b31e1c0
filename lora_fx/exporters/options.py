"""What an export is asked to do (:class:`ExportOptions`) and what it did (:class:`ExportReport`).

Every setting of ``fold_and_export`` / ``export_decoder`` is a field of :class:`ExportOptions`, defined
once here and checked once, in ``__post_init__``: a wrong type or value raises ExportError naming the
option and what works. The verbs take ``options=`` and/or the same names as keywords::

    opts = ExportOptions(dtype=torch.float16, optimize="ort")
    fold_and_export(lgm, "a.onnx", opts)                 # or fold_and_export(lgm, "a.onnx", dtype=..., ...)
    fold_and_export(lgm, "b.onnx", opts, verify=False)   # keywords override fields of opts
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._text import plural
from ..errors import ExportError
from . import files
from .quantize import QuantizeConfig, QuantizeReport, as_config

if TYPE_CHECKING:
    from ..passes.fold import FoldReport
    from .files import ExportInfo
    from .verify.proof import VerifyReport

__all__ = ["ExportOptions", "ExportReport", "resolve_options"]


@dataclass(frozen=True)
class ExportOptions:
    """The settings of an export (see :func:`lora_fx.fold_and_export` for what each one does).

    Attributes:
        opset: ONNX opset; None lets torch choose.
        dynamic: keep batch (and sequence, for token inputs) dynamic.
        external_data: weights in ``<path>.data``; None = only above ~1.8 GB.
        verify: True (structure proof + numeric checks), "full" (also export the base and compare the
            files) or False (no checks).
        folded: False exports the unfolded LoRA graph.
        dtype: write floating weights in this dtype (fold in fp32, round once); None keeps the model's.
        providers: ONNX Runtime execution providers for the numeric checks (None: the best available).
        quantize: "int4" / "int8" / a QuantizeConfig (stored as a QuantizeConfig); None: no quantization.
        optimize: True (weight-independent onnxscript optimizer), "ort" (plus ORT's fusions) or False.
        model_type: ``onnxruntime.transformers`` model type for ``optimize="ort"``.
        backend: "auto" or the name of a registered export backend (exporters/backends/).
        tokenizer: decoder exports: a transformers tokenizer or a folder with its files, written beside the
            model (decoder/folder.py); None: found from the model's ``name_or_path``.
    """

    opset: int | None = None
    dynamic: bool = True
    external_data: bool | None = None
    verify: bool | Literal["full"] = True
    folded: bool = True
    dtype: torch.dtype | None = None
    providers: list[str] | None = None
    quantize: QuantizeConfig | None = None
    optimize: bool | Literal["ort"] = True
    model_type: str = "bert"
    backend: str = "auto"
    tokenizer: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.opset is not None and (type(self.opset) is not int or self.opset < 7):
            _bad("opset", self.opset, "an ONNX opset version (an int such as 18) or None (torch's choice)")
        for name in ("dynamic", "folded"):
            if type(getattr(self, name)) is not bool:
                _bad(name, getattr(self, name), "True or False")
        if self.external_data not in (None, True, False):
            _bad("external_data", self.external_data, "True, False or None (only above ~1.8 GB)")
        if not any(self.verify is v for v in (True, False)) and self.verify != "full":
            _bad("verify", self.verify, "True (default: structure proof + numeric checks), 'full' (also export "
                 "the base model and compare the files) or False")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            _bad("dtype", self.dtype, "a floating torch dtype (torch.float16, torch.bfloat16...) or None")
        if self.providers is not None and (isinstance(self.providers, str)
                                           or not all(isinstance(p, str) for p in self.providers)):
            _bad("providers", self.providers, "a list of ONNX Runtime provider names, e.g. ['CPUExecutionProvider']")
        from .backends.torch_onnx.optimize import check_mode

        object.__setattr__(self, "optimize", check_mode(self.optimize))
        if not isinstance(self.model_type, str):
            _bad("model_type", self.model_type, "an onnxruntime.transformers model type such as 'bert' or 'gpt2'")
        if self.quantize is not None:
            if not self.folded or self.dtype not in (None, torch.float32):
                raise ExportError(f"quantize={self.quantize!r} needs folded=True and dtype float32 (it quantizes "
                                  f"the fp32 folded export); got folded={self.folded}, dtype={self.dtype}")
            object.__setattr__(self, "quantize", as_config(self.quantize))
        if not isinstance(self.backend, str):
            _bad("backend", self.backend, "'auto' or the name of a registered backend")
        if self.backend != "auto":
            from .backends import get_backend

            get_backend(self.backend)  # raises, listing the registered backends


def _bad(name: str, value: Any, works: str) -> None:
    raise ExportError(f"{name}={value!r} is not supported: use {works}")


FIELDS = tuple(f.name for f in dataclasses.fields(ExportOptions))


def resolve_options(options: ExportOptions | None, overrides: dict[str, Any], who: str,
                    extra: tuple[str, ...] = ()) -> ExportOptions:
    """``options`` (default: all defaults) with ``overrides`` applied, checked; an unknown keyword is an
    ExportError listing the valid ones (the fields, plus ``extra``: the verb's own keywords)."""
    if options is not None and not isinstance(options, ExportOptions):
        raise ExportError(f"{who}: options={options!r} is not an ExportOptions; pass "
                          "lora_fx.ExportOptions(...) or the settings as keywords")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ExportError(f"{who}() got unknown keyword(s) {unknown}; valid: {sorted(FIELDS + extra)}")
    base = options if options is not None else ExportOptions()
    return dataclasses.replace(base, **overrides) if overrides else base


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
    notes: list[str] = field(default_factory=list)  # fixes the export needed, the backend chosen
    backend: str = "torch_onnx"  # the backend that wrote the file

    @property
    def lora_nodes_added(self) -> int | None:
        """Nodes the export has beyond the base export (0 when folded)."""
        if self.base is None:
            proven = self.verification is not None and self.verification.structure.by_construction
            return 0 if proven and self.verification.structure.ok else None
        return self.export.nodes - self.base.nodes

    def __str__(self) -> str:
        mib = files.file_bytes(self.export.path) / 2**20
        lines = [f"wrote {self.path} ({self._what()}): {plural(self.export.nodes, 'node')}, "
                 f"{plural(self.export.initializers, 'initializer')}, {mib:.1f} MiB on disk"
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

    @property
    def zero_adapter(self) -> bool:
        """Every folded LoRA delta is zero (no adapter loaded or trained): the file is the base export."""
        return self.folded and self.fold is not None and bool(self.fold.folded) and not any(self.fold.folded.values())

    def _what(self) -> str:
        if not self.folded:
            return "UNFOLDED LoRA"
        if self.zero_adapter:
            return ("base weights: the adapter is all zero (every LoRA delta is zero: no adapter loaded or trained), "
                    "so the file equals the base export")
        return "folded LoRA"
