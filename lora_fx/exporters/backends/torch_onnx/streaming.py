"""Export without copies of the weights: trace a weightless skeleton, stream each weight into the file.

``torch.onnx.export`` needs shapes, not values, to build the graph. So the module is exported as a
*skeleton* (every tensor a fake tensor, already in the deployment dtype) and each ONNX
initializer is bound to a lazy tensor that converts the real weight when the file is written::

    skeleton  = module with W -> fake(W.shape, dtype)        # no memory
    program   = torch.onnx.export(skeleton, ...)             # graph only
    init[W]   = lazy: W.to(dtype)                            # evaluated once, while writing
    ir.save(program.model, path, external_data=...)          # one converted tensor alive at a time

A plain export of an fp32 model to fp16 holds the model, its fp16 copy and the exporter's buffers;
here the peak is the model plus one tensor. Tensors of the source module are matched to
initializers by the name the exporter gives them (the module's qualified names); every initializer
must be bound, so a missed one is an error, not a meta tensor written to disk.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ....errors import ExportError
from ....graph_module import LoraFxModule, copy_module
from ...files import ExportInfo
from .onnx_io import export_onnx

__all__ = ["SkeletonSpec", "bind_lazy", "export_streaming", "skeleton", "skeleton_spec"]


def skeleton(module: fx.GraphModule, dtype: torch.dtype | None = None) -> tuple[LoraFxModule, dict[str, torch.Tensor]]:
    """A copy of ``module`` whose parameters, buffers and tensor constants are fake tensors.

    Fake, not meta: a fake tensor keeps its device, so the exporter picks the same kernels and
    strides as for the real module (on meta, CPU attention's output strides differ and a
    ``.contiguous()`` turns into two extra Identity nodes) and the graph is the one a plain export
    writes, node for node.

    Floating tensors take ``dtype`` (default: unchanged); the graph's baked-in float dtype (casts,
    ``full(..., dtype=)``) is rewritten to match. Returns the skeleton and, per qualified name, the
    real tensor it stands for (the source's own tensor: nothing is copied).
    """
    from ....passes.dtype import float_dtype as _float_dtype
    from ....passes.dtype import retype as _retype

    sources: dict[str, torch.Tensor] = {}
    old = _float_dtype(module)
    out = copy_module(module, freeze=False)
    seen: dict[int, torch.Tensor] = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def ghost(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen:
            kind = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            with mode:
                seen[id(t)] = torch.empty(t.shape, dtype=kind, device=t.device)
        return seen[id(t)]

    for name, holder, attr, t in _tensors(out):
        sources.setdefault(name, t)
        if attr in holder._parameters:
            holder._parameters[attr] = nn.Parameter(ghost(t), requires_grad=False)
        elif attr in holder._buffers:
            holder._buffers[attr] = ghost(t)
        else:
            setattr(holder, attr, ghost(t))
    if dtype is not None and dtype != old:
        out = _retype(out, old, dtype)
    return out, sources


def _tensors(module: fx.GraphModule):
    """Every tensor the export reads: ``(qualified name, owner module, attribute, tensor)`` for each
    parameter and buffer (first name of a shared one included as well as its aliases) and each
    tensor constant read through ``get_attr`` (lifted by torch.export)."""
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for table in (mod._parameters, mod._buffers):
            for attr, t in list(table.items()):
                if t is not None:
                    yield dot + attr, mod, attr, t
    for node in module.graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            value = getattr(holder, attr, None)
            if (isinstance(value, torch.Tensor) and not isinstance(value, (nn.Parameter, FakeTensor))
                    and attr not in holder._buffers):
                yield str(node.target), holder, attr, value


@dataclass(frozen=True)
class SkeletonSpec:
    """All the exporter sees of a module exported by :func:`export_streaming`: its graph and, per
    tensor, name, shape, dtype (after ``dtype=``) and device, never a value. Two modules with equal
    specs export to the same ONNX graph (the exporter is deterministic, onnx_io's docstring; the
    optimizer hides weight values, optimize.py), so comparing specs proves what exporting both and
    comparing the files would, without the second export."""

    graph: tuple[str, ...]
    tensors: tuple[tuple[str, tuple[int, ...], str, str], ...]

    def first_difference(self, other: SkeletonSpec) -> str | None:
        """The first difference from ``other`` in words, or None when equal."""
        from ....graph_module import first_difference

        diff = first_difference(list(self.graph), list(other.graph))
        if diff is not None:
            return f"graph: {diff}"
        mine, theirs = {t[0]: t[1:] for t in self.tensors}, {t[0]: t[1:] for t in other.tensors}
        for name in sorted(mine.keys() | theirs.keys()):
            if mine.get(name) != theirs.get(name):
                return f"tensor {name}: {mine.get(name)} != {theirs.get(name)}"
        return None


def skeleton_spec(module: fx.GraphModule, dtype: torch.dtype | None = None) -> SkeletonSpec:
    """The :class:`SkeletonSpec` of ``module`` as :func:`skeleton` would export it (no copies)."""
    from ....graph_module import graph_signature

    lines = graph_signature(module.graph, dedupe=False)
    for node in module.graph.nodes:  # a call_module's behaviour lives in its module's settings
        if node.op == "call_module":
            sub = module.get_submodule(str(node.target))
            lines.append(f"module {node.target}: {type(sub).__qualname__}({sub.extra_repr()})")
    tensors = {}
    for name, _, _, t in _tensors(module):
        kind = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        tensors.setdefault(name, (name, tuple(t.shape), str(kind), str(t.device)))
    return SkeletonSpec(tuple(lines), tuple(sorted(tensors.values())))


def export_streaming(module: fx.GraphModule, path: str | os.PathLike, args: tuple, kwargs: dict | None = None,
                     *, dtype: torch.dtype | None = None, values: dict[str, Callable[[], torch.Tensor]] | None = None,
                     exporter: Callable[..., ExportInfo] = export_onnx, **export_kwargs: Any) -> ExportInfo:
    """Exports ``module`` like :func:`~.onnx_io.export_onnx`, weights streamed.

    Args:
        module: the GraphModule to export (real weights; they are read, never copied whole).
        path, args, kwargs, **export_kwargs: as for ``export_onnx`` (``dynamic_shapes``, ``opset``,
            ``external_data``); floating inputs are taken in ``dtype``.
        dtype: write floating weights in this dtype (each rounded once from the source).
        values: optional per-name producers overriding a weight's value (computed when written).
        exporter: ``export_onnx`` or a wrapper taking its arguments (``Fallbacks().export``).
    """
    skel, sources = skeleton(module, dtype)
    producers: dict[str, Callable[[], torch.Tensor]] = {name: _converter(sources, name, dtype) for name in sources}
    producers.update(values or {})
    try:
        return exporter(skel, path, args, kwargs, bind=lambda program: bind_lazy(program, producers), **export_kwargs)
    finally:
        # The lazy tensors outlive the export (onnxscript's rewrite rules keep the last graph they matched):
        # they must not keep the weights (a folded module's new weights, say) alive after it.
        sources.clear()


def _converter(sources: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        t = sources[name].detach()
        return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    return make


def bind_lazy(program: Any, producers: dict[str, Callable[[], torch.Tensor]]) -> None:
    """Replaces every initializer's (fake) value by a lazy tensor computed by its producer."""
    import onnx_ir as ir

    unbound = []
    for name, value in program.model.graph.initializers.items():
        const = value.const_value
        raw = getattr(const, "raw", None)
        if not isinstance(raw, FakeTensor):
            continue  # a real constant the exporter made itself (shapes, scalars)
        make = producers.get(name)
        if make is None:
            unbound.append(name)
            continue
        value.const_value = ir.LazyTensor(_as_ir(make, name, raw), dtype=const.dtype, shape=const.shape, name=name)
    if unbound:
        raise ExportError(f"internal: no source for initializer(s) {unbound[:3]} of the streamed export; "
                          f"known names look like {sorted(producers)[:3]}")


def _as_ir(make: Callable[[], torch.Tensor], name: str, like: torch.Tensor) -> Callable[[], Any]:
    def evaluate():
        from torch.onnx._internal.exporter._core import TorchTensor

        t = make()
        if t.shape != like.shape or t.dtype != like.dtype:
            raise ExportError(f"internal: initializer {name!r} is {tuple(like.shape)} {like.dtype} in the "
                              f"graph but its value is {tuple(t.shape)} {t.dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TorchTensor(t.contiguous(), name=name)
    return evaluate
