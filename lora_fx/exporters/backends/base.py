"""The export backend interface: what turns a folded module into ONNX file(s) plus a structural proof.

``fold_and_export`` / ``export_decoder`` (exporters/pipeline.py, exporters/decoder/) run::

    fold (pipeline) -> backend.export(request) -> verify numerics (pipeline) -> quantize (pipeline,
    unless the backend quantized) -> [decoder: I/O names, decode checks] -> install (pipeline)

A backend gets an :class:`ExportRequest` (the folded module, the base module with LoRA stripped, the
user's original model when ``trace`` remembered it, the :class:`~lora_fx.exporters.options.ExportOptions`
and a staging path) and returns an :class:`ExportResult`: what it wrote (:class:`ExportInfo`), the proof
that the task file is the base model's file with new initializer values (a ``StructureReport``), the
base file when it wrote one, and notes for the report.

Adding a backend (e.g. onnxruntime-genai's model builder) is one module with a :class:`Backend`
subclass, plus one ``register_backend(MyBackend())`` line in ``backends/__init__.py``::

    class Builder(Backend):
        name = "genai_builder"
        priority = 10               # "auto" asks backends in descending priority; torch_onnx is 0
        scope = "decoder"           # "auto" considers it only for export_decoder / kv_cache=True

        def supports(self, request):   # None: I take it; else the reason I don't (lands in report.notes)
            if request.source is None:
                return "the original Hugging Face model is not remembered by trace()"
            ...
        def export(self, request):
            # write request.staged (+ request.folder / "base.onnx" for the proof), e.g. from
            # request.source.config and request.module.state_dict() (the folded weights, fp32)
            structure = compare_structure(base_path, request.staged)      # exporters.verify.structure
            return ExportResult(describe(request.staged), structure, base=describe(base_path))

Selection (``options.backend``): ``"auto"`` takes the first registered backend, by priority, whose
``scope`` fits and whose ``supports`` returns None; each refusal on the way is noted. A named backend
that refuses is replaced by the default (``torch_onnx``) with a note; an unknown name is an
ExportError listing the registered ones. In ``"auto"`` mode a non-default backend that raises
:class:`~lora_fx.errors.ExportError` is noted and the default backend runs instead, in a fresh
folder. Whatever fails, nothing is installed (the staging folder goes away with its files).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ...errors import ExportError

if TYPE_CHECKING:
    from torch import nn

    from ...graph_module import LoraFxModule
    from ..files import ExportInfo
    from ..format import DecoderLayout
    from ..options import ExportOptions
    from ..quantize.config import QuantizeReport
    from ..verify.structure import StructureReport

__all__ = ["DEFAULT_BACKEND", "Backend", "ExportRequest", "ExportResult", "backend_names", "get_backend",
           "register_backend", "select_backend", "timed", "unregister_backend"]

DEFAULT_BACKEND = "torch_onnx"

# Called with each step's name around the step (benchmarks/scale.py measures memory per step with it).
step_observer: Callable[[str], AbstractContextManager] | None = None


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the ``with`` block to ``seconds[name]`` (an export step, or a named part of a
    backend's export: ``ExportResult.seconds``)."""
    start = time.perf_counter()
    with step_observer(name) if step_observer is not None else nullcontext():
        yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class ExportRequest:
    """What a backend is asked to export.

    Attributes:
        lgm: the LoRA module being exported (for a decoder export: its KV-cache recapture); read it,
            never change it.
        module: what to write, in eval mode: ``fold(lgm)`` (the captured graph with folded weights), or
            the unfolded LoRA copy when ``options.folded`` is False. A backend may set it to None once
            it is done with it: the pipeline holds no other reference, so the folded weights are freed
            before the verification runs.
        options: the export's settings (``options.dtype``, ``options.opset``, ``options.quantize``...).
        staged: write the task file here, under its final name (``<staging folder>/<name>.onnx``,
            external data as ``<name>.onnx.data`` beside it); ``folder`` is yours for other files.
        args, kwargs, shapes: example inputs (in ``options.dtype``) and their dynamic shapes, as
            ``torch.export`` takes them.
        source: the user's original model (``trace`` remembered it; for a decoder export the Hugging Face
            model the KV-cache graph was captured from), or None.
        decoder: for ``export_decoder`` (``kv_cache=True``): the KV-cache layout the file must serve
            (exporters/format.py); None for a plain export.
    """

    lgm: LoraFxModule
    module: nn.Module | None
    options: ExportOptions
    staged: str
    args: tuple
    kwargs: dict
    shapes: Any
    source: nn.Module | None = None
    decoder: DecoderLayout | None = None
    _base: nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def folder(self) -> str:
        """The staging folder of this backend (removed after the export, whatever happens)."""
        return os.path.dirname(self.staged)

    @property
    def base(self) -> nn.Module:
        """The base model: ``lgm`` with LoRA stripped, in eval mode (made on first use; shares weights)."""
        if self._base is None:
            from ...passes.fold import strip

            self._base = strip(self.lgm).eval()
        return self._base


@dataclass
class ExportResult:
    """What a backend wrote and proved.

    Attributes:
        export: the task file at ``request.staged`` (:func:`lora_fx.exporters.files.describe` reads one).
        structure: the proof that the task file is the base model's file with only initializer values
            changed (``changed_initializers``: the adapted ones), e.g. ``compare_structure(base, task)``
            or the torch backend's skeleton proof (``by_construction``). Required when
            ``options.verify`` is true; None otherwise.
        base: the base file, when one was written (a file comparison's other side). Required when
            ``options.verify`` and ``options.quantize`` are set and ``quantized`` is None (the quantize step
            quantizes task and base alike and compares them).
        quantized: a backend that quantizes by itself (``options.quantize``) returns its report here, and
            the pipeline's quantize step is skipped.
        notes: fixes or choices worth telling the user (they land in ``report.notes``).
        seconds: wall time of named parts of the export (e.g. ``{"base_export": 2.1}``), merged into
            ``report.seconds``; the rest of the backend's time is reported as ``"export"``.
    """

    export: ExportInfo
    structure: StructureReport | None = None
    base: ExportInfo | None = None
    quantized: QuantizeReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class Backend:
    """One way of writing ONNX files (subclass it; see the module docstring)."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    scope: ClassVar[Literal["any", "decoder"]] = "any"

    def supports(self, request: ExportRequest) -> str | None:
        """None when this backend can export ``request``; else the reason it cannot (for the report)."""
        return None

    def export(self, request: ExportRequest) -> ExportResult:
        """Writes ``request.staged`` (and whatever its proof needs, inside ``request.folder``).

        Raises:
            ExportError: the export failed (the pipeline installs nothing).
        """
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Adds ``backend`` under ``backend.name``; a second backend with a taken name is an error unless
    ``replace`` (tests swap backends in and out)."""
    if not backend.name or not isinstance(backend.name, str):
        raise ExportError(f"register_backend: {type(backend).__name__} has no name (set the class attribute "
                          "`name = \"my_backend\"`)")
    if backend.name in _REGISTRY and not replace:
        raise ExportError(f"register_backend: a backend named {backend.name!r} is registered already "
                          f"({type(_REGISTRY[backend.name]).__name__}); pick another name or pass replace=True")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Removes a backend (the default stays)."""
    if name != DEFAULT_BACKEND:
        _REGISTRY.pop(name, None)


def backend_names() -> list[str]:
    """The registered backends, in the order "auto" asks them."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ExportError listing the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ExportError(f"backend={name!r} is not a registered export backend; use 'auto' or one of "
                          f"{backend_names()}")
    return _REGISTRY[name]


def select_backend(request: ExportRequest, notes: list[str]) -> Backend:
    """The backend for ``request`` by ``request.options.backend`` (see the module docstring); why a
    backend was passed over is appended to ``notes``."""
    wanted = request.options.backend
    if wanted != "auto":
        backend = get_backend(wanted)
        reason = backend.supports(request)
        if reason is None:
            return backend
        notes.append(f"backend {wanted!r} cannot export this ({reason}): used {DEFAULT_BACKEND!r} instead")
        return get_backend(DEFAULT_BACKEND)
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if backend.scope == "decoder" and request.decoder is None:
            continue
        reason = backend.supports(request)
        if reason is None:
            return backend
        notes.append(f"backend {backend.name!r} not used: {reason}")
    return get_backend(DEFAULT_BACKEND)
