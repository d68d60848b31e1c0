"""refold_onnx: put another adapter into an exported, folded ONNX file by rewriting its weights.

For every initializer that the new adapter (or the one folded in now) adapts::

    W_new = round(fp32(W_base) + s'·B'A')        # lora_fx.fold's arithmetic, in the weight's layout

Nothing else in the file changes: nodes, names, order and all other initializers stay as they are,
so a file that verify_fold proved equal to the base export stays so. ``W_base`` comes from either

* ``base_onnx``: the export of the base model. Its initializers are the base weights bit for bit, so
  for an fp32 export the result holds exactly the weights ``fold_and_export`` writes for the new
  adapter. Initializers that differ from the base and that the new adapter does not touch (the old
  adapter's other sites) are set back to the base values.
* ``old_adapter``: the adapter folded into ``task_onnx``. The base is recovered once per weight from
  ``W_task - s·BA``: exact where the rounding is invertible, else within 1 ulp of ``max(|W|)``
  (see :func:`lora_fx.switching.swap_adapter`); the old adapter's other sites go back to that base.

An optimized export (fold_and_export's default) holds ``x @ W.T``'s weight transposed, as
``W::Transpose`` (see lora_fx.exporters.optimize); it is rewritten in that layout.
Which initializer a branch adapts: the untied copy ``<path>.<attr>_folded`` that fold makes for a
weight other ops share (GPT-2's ``wte``/``lm_head``) if the file has it, else the weight's own name.
A weight read by several nodes cannot be rewritten for one of them: re-export with fold_and_export.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .. import delta as lora_delta
from .. import kinds
from ..adapters import Adapter
from ..delta import Branch
from ..errors import AdapterError, VerifyError
from ..exporters import files as onnx_files
from ..exporters.format import derived_name, is_untied_copy
from ..exporters.quantize import QuantizeReport, quantize_file, read_config
from ..exporters.quantize.step import prove
from ..graph_facts import untied_name
from ..kinds import CONV, EMBED, IN_OUT, OUT_IN
from ..sites import Site
from .folded import AdapterLike, as_adapter

__all__ = ["RefoldReport", "refold_onnx", "refold_quantized"]

Group = tuple[Site, list[Branch], Adapter]  # an initializer's layout, the branches adapting it, their tensors


@dataclass
class RefoldReport:
    """What refold_onnx wrote: per initializer the largest change from the task file."""

    path: str
    rewritten: dict[str, float] = field(default_factory=dict)  # adapted by the new adapter
    restored: dict[str, float] = field(default_factory=dict)  # set back to the base weight
    base: str = ""  # "base_onnx" (exact) or "old_adapter" (recovered)
    source: str = ""  # the base file, or the old adapter, the base weights came from


    def __str__(self) -> str:
        origin = {"base_onnx": "the base export", "old_adapter": "the task file minus the old adapter"}
        how = origin.get(self.base, self.base)
        lines = [f"wrote {self.path} (base weights from {how}{f' {self.source}' if self.source else ''})"]
        lines += [f"  rewrote {n}: max |dW| = {d:.3g}" for n, d in self.rewritten.items()]
        lines += [f"  restored {n} to the base: max |dW| = {d:.3g}" for n, d in self.restored.items()]
        return "\n".join(lines)


def refold_onnx(task_onnx: str | os.PathLike, adapter: AdapterLike, out_path: str | os.PathLike, *,
                base_onnx: str | os.PathLike | None = None,
                old_adapter: AdapterLike | None = None) -> RefoldReport | QuantizeReport:
    """Writes ``out_path``: ``task_onnx`` with the new adapter folded in instead of the old one.

    Args:
        task_onnx: a folded export (from :func:`lora_fx.fold_and_export`).
        adapter: the new adapter (folder, :class:`~lora_fx.adapters.Adapter` or lorafied module).
        out_path: where to write (atomically; may equal ``task_onnx``).
        base_onnx: the export of the base model (exact base weights), or
        old_adapter: the adapter folded into ``task_onnx`` (base recovered from it). Pass one.

    A quantized ``task_onnx`` (``fold_and_export(..., quantize=...)``) is refolded by
    :func:`refold_quantized` (needs ``base_onnx``, the fp32 base export) and returns its
    :class:`~lora_fx.exporters.quantize.QuantizeReport`.

    Raises:
        AdapterError: neither or both of ``base_onnx`` / ``old_adapter``; a branch whose weight is
            not an initializer of the file, does not fit its shape, or is read by several nodes.
        ExportError: the file could not be written (nothing at ``out_path`` changed).
    """
    if (base_onnx is None) == (old_adapter is None):
        raise AdapterError("refold_onnx: pass exactly one of base_onnx= (the base model's export) or "
                           "old_adapter= (the adapter folded into the task file) to know the base weights")
    model, folder = onnx_files.load(task_onnx, error=AdapterError)
    if read_config(model) is not None:  # int4/int8: refold the fp32 base, quantize alike, prove
        if base_onnx is None:
            raise AdapterError(f"refold_onnx: {task_onnx} is quantized, so its weights cannot give back the base; "
                               "pass base_onnx= (the fp32 base export) instead of old_adapter=")
        return refold_quantized(task_onnx, adapter, out_path, base_onnx=base_onnx)
    external = any(onnx_files.is_external(t) for t in model.graph.initializer)
    inits = {t.name: t for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    new = _by_initializer(as_adapter(adapter), inits, readers)
    report = RefoldReport(os.path.abspath(os.fspath(out_path)), base="base_onnx" if base_onnx else "old_adapter",
                          source=os.fspath(base_onnx) if base_onnx else _adapter_name(old_adapter))
    base = _base_from_onnx(base_onnx, inits, new, folder) if base_onnx is not None else {}
    if old_adapter is not None:
        if as_adapter(old_adapter).dora:
            raise AdapterError(f"refold_onnx: old adapter {_adapter_name(old_adapter)} is DoRA, whose fold keeps only "
                               "each row's direction of W + delta: the base cannot be recovered from it; pass "
                               "base_onnx= (the base export) instead")
        for name, group in _by_initializer(as_adapter(old_adapter), inits, readers).items():
            w = torch.from_numpy(_array(inits[name], folder).copy())
            base[name] = lora_delta.recover(w, _delta(group, lora_delta.compute_dtype(w.dtype))).numpy()
        base.update({n: _array(inits[n], folder) for n in new if n not in base})  # untouched: exact
    patches: dict[str, np.ndarray] = {}
    for name in sorted(set(new) | set(base)):
        old = _array(inits[name], folder)
        value = base[name]
        if name in new:  # fold's arithmetic; an fp64 base (recovered) is added in fp64
            w = torch.from_numpy(old.copy())
            ddt = lora_delta.compute_dtype(w.dtype)
            cdt = torch.float64 if value.dtype == np.float64 else ddt
            site, brs, new_adapter = new[name]
            if any(br.magnitude for br in brs):  # DoRA: m / ||W + delta|| · (W + delta), fold's arithmetic
                value = lora_delta.fold_weight(w, brs, new_adapter.tensors, site, base=torch.from_numpy(value.copy())
                                               .to(cdt), ab_dtype=new_adapter.tensors[brs[0].a].dtype)[0].numpy()
            else:
                delta = _delta(new[name], ddt).to(cdt)  # A/B as trained
                value = (torch.from_numpy(value.copy()).to(cdt) + delta).to(w.dtype).numpy()
        value = value.astype(old.dtype, copy=False)
        # in the weights' own float type: no float64 copies of every weight on the hot path
        change = float(np.abs(value - old).max()) if old.size else 0.0
        (report.rewritten if name in new else report.restored)[name] = change
        patches[name] = value
    if external:
        _save_patched(model, folder, patches, report.path)
    else:
        for name, value in patches.items():
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
        onnx_files.write_model(report.path, lambda staged: onnx.save_model(model, staged))
    return report


def _transposed(weight: str) -> str:
    """The initializer name of ``weight`` with its transpose folded in (``W::Transpose``, optimize)."""
    return derived_name(weight, ["Transpose"])


def _delta(group: Group, dtype: torch.dtype) -> torch.Tensor:
    """Fold's delta of a group; A/B first rounded to their stored dtype, as a module holding them is."""
    site, brs, adapter = group
    return lora_delta.delta(brs, adapter.tensors, site, dtype, ab_dtype=adapter.tensors[brs[0].a].dtype)


def _by_initializer(adapter: Adapter, inits: dict, readers: Counter) -> dict[str, Group]:
    """Branches grouped by the initializer they adapt, with a Site describing its layout."""
    groups: dict[str, Group] = {}
    for br in adapter.branches.values():
        path = br.site.path or br.key
        names = [untied_name(path, br.site.weight, br.site.id), br.site.weight or f"{path}.weight"]
        # An optimized export (fold_and_export's default) folds x @ W.T's transpose into ``W::Transpose``.
        found = [(n, False) for n in names if n in inits] + [(n, True) for n in names if _transposed(n) in inits]
        name, flipped = (_transposed(found[0][0]) if found[0][1] else found[0][0], found[0][1]) if found else (None, False)
        if name is None:
            raise AdapterError(f"adapter {adapter.source}: branch {br.key} adapts {names[-1]}, which is not an "
                               f"initializer of the ONNX file (tried {names}); is this the export of the same model?")
        if readers[name] > 1:
            raise AdapterError(f"adapter {adapter.source}: initializer {name} (branch {br.key}) is read by "
                               f"{readers[name]} nodes; rewriting it would change all of them. Re-export "
                               "with lora_fx.fold_and_export, which unties it.")
        site = groups[name][0] if name in groups else _site(br, adapter, name, tuple(inits[name].dims), flipped)
        groups.setdefault(name, (site, [], adapter))[1].append(br)
    for _, brs, _ in groups.values():
        brs.sort(key=lambda b: b.slice or (0, 0))
    return groups


def _site(br: Branch, adapter: Adapter, name: str, shape: tuple[int, ...], flipped: bool = False) -> Site:
    """A Site for the initializer, in the branch's layout (or the one its A/B shapes fit); ``flipped``:
    the initializer is the weight transposed (``W::Transpose``), so out,in becomes in,out."""
    a, b = adapter.pair(br.key)
    ref = br.site
    rows = None if br.slice is None else br.slice[1] - br.slice[0]
    layout = {OUT_IN: IN_OUT, IN_OUT: OUT_IN}.get(ref.layout, ref.layout) if flipped else ref.layout
    layouts = [layout] if layout else ([EMBED] if ref.op == "embedding" else [OUT_IN, IN_OUT])
    for layout in layouts:
        layout = CONV if len(shape) > 2 else layout
        kind = kinds.kind_for_layout(layout)
        in_f, out_f = kind.features(shape, layout)
        site = Site(ref.id, ref.path, ref.op, kind.name, name, layout, shape, in_f, out_f, "")
        if b.shape[0] == (rows or out_f) and a[0].numel() == kind.lora_in(site):
            return site
    raise AdapterError(f"adapter {adapter.source}: branch {br.key} has A {tuple(a.shape)}, B {tuple(b.shape)}, "
                       f"which do not fit initializer {name} {shape}")


def _base_from_onnx(base_onnx, inits: dict, new: dict, folder: str) -> dict[str, np.ndarray]:
    """Base weights of the initializers to write: the new adapter's, and any other that differs."""
    base_model, base_folder = onnx_files.load(base_onnx, error=AdapterError)
    base_inits = {t.name: t for t in base_model.graph.initializer}
    out = {}
    with onnx_files.DataFiles(base_folder, error=AdapterError) as base_data, \
            onnx_files.DataFiles(folder, error=AdapterError) as task_data:
        for name, t in inits.items():
            src = base_inits.get(name)
            if src is None and name in new:
                src = base_inits.get(new[name][1][0].site.weight)
            if src is None:
                if name in new or is_untied_copy(name):
                    raise AdapterError(f"refold_onnx: {base_onnx} has no base weight for initializer {name} (an "
                                       "untied copy fold made, or another model's export); pass the base export "
                                       "of this model, or old_adapter= instead")
                continue
            if tuple(src.dims) != tuple(t.dims) or src.data_type != t.data_type:
                raise AdapterError(f"refold_onnx: {base_onnx}: {src.name} has type {src.data_type} shape "
                                   f"{tuple(src.dims)}, the task file's {name} has type {t.data_type} shape "
                                   f"{tuple(t.dims)}; pass the base export of the same model")
            if name not in new and _stored(src) and _stored(t) and base_data.read(src) == task_data.read(t):
                continue  # unchanged: a byte compare, no array conversion (most initializers)
            arr = _array(src, base_folder)
            if name in new or not np.array_equal(arr, _array(t, folder)):
                out[name] = arr
    return out


def _stored(t: onnx.TensorProto) -> bool:
    """Whether ``t``'s bytes are raw (external or raw_data), so comparing bytes compares values."""
    return onnx_files.is_external(t) or bool(t.raw_data)


def _array(t: onnx.TensorProto, folder: str) -> np.ndarray:
    return onnx_files.tensor_array(t, folder, error=AdapterError)


def _save_patched(model: onnx.ModelProto, folder: str, patches: dict[str, np.ndarray], path: str) -> None:
    """External data: copy the task's data file, overwrite only the patched tensors' byte ranges.

    No protobuf holds the weights, so the cost is one file copy plus the patched bytes (the reason
    refold is an order of magnitude faster than a re-export on external-data files).
    """
    sources = {onnx_files.external(t).location for t in model.graph.initializer if onnx_files.is_external(t)}
    if len(sources) != 1:
        raise AdapterError(f"refold_onnx: the task file's weights are spread over {sorted(sources)}; "
                           "refold handles one external data file (fold_and_export writes one)")
    (source,) = sources

    def write(staged: str) -> None:
        data = os.path.basename(staged) + ".data"
        shutil.copyfile(os.path.join(folder, source), staged + ".data")
        with open(staged + ".data", "r+b") as f:
            for t in model.graph.initializer:
                if t.name not in patches:
                    continue
                if not onnx_files.is_external(t):  # small tensors stay inline even in external-data files
                    t.CopyFrom(numpy_helper.from_array(patches[t.name], t.name))
                    continue
                raw = np.ascontiguousarray(patches[t.name]).tobytes()
                if len(raw) != onnx_files.stored_nbytes(t):
                    raise AdapterError(f"refold_onnx: initializer {t.name} holds {onnx_files.stored_nbytes(t)} "
                                       f"bytes in the data file, the new value {len(raw)}")
                f.seek(onnx_files.external(t).offset)
                f.write(raw)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = data
        onnx.save_model(model, staged)

    onnx_files.write_model(path, write)


def _adapter_name(adapter) -> str:
    return os.fspath(adapter) if isinstance(adapter, (str, os.PathLike)) else getattr(adapter, "source", "")


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
        report = prove(staged, task_onnx, cfg, info, list(ref.rewritten))
        report.underived = []  # the old adapter's weights differ too: only structure is the claim here
        if not report.structure_ok:
            raise VerifyError(f"refold of {task_onnx}: the new file is not structurally the old one "
                              f"({report.first_difference}); is {base_onnx} the base export of this model?")
        onnx_files.install(staged, out_path)
    return report
