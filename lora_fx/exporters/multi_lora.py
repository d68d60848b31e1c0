"""Multi-LoRA serving without folding: one ONNX file, many ``.onnx_adapter`` files, one session.

``export_multi_lora`` writes the UNFOLDED LoRA graph with every A/B tensor as an *overridable
initializer* (a graph input that also has an initializer) whose default is zero, so the file computes
the base model when no adapter is active::

    y = W x + s·B (A x)          # s = alpha / r baked in; A, B: graph inputs, default 0
    ort: RunOptions().add_active_adapter(LoraAdapter(file))  ->  A, B from the adapter file

``write_ort_adapter`` stores a trained module's A/B values under the initializer names, and
``load_ort_adapter`` checks a file against the export (names, shapes, dtypes) before ORT sees it.

Facts about onnxruntime 1.32 (CPU) measured here:

* An adapter parameter must name a graph *input*: a name that is only an initializer fails at
  ``run`` with ``Invalid input name``; so does a name the graph does not have. ORT warns once per
  overridable initializer at session creation ("will not be treated as constant") and never
  constant-folds them, so a zero default cannot be optimized away in the session either.
* A wrong shape fails only at ``run`` (``Got invalid dimensions for input: <name>``); an adapter may
  hold a subset of the parameters (the others keep their defaults).
* torch's dynamo exporter keeps parameter qualnames as initializer names; with ``optimize=False``
  nothing is constant-folded, so zero-valued B tensors keep their Gemm nodes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .._atomic import write_file_atomically
from ..adapters import Adapter, adapter_of
from ..capture import example_inputs
from ..dora import refuse_ort_adapters
from ..errors import AdapterError, ExportError
from ..graph_module import copy_module, lora_state, set_attr_path
from . import files
from .backends.torch_onnx.onnx_io import export_onnx
from .files import ExportInfo
from .format import MULTI_LORA_KEY
from .verify.ort import ort_session

__all__ = ["MultiLoraExport", "export_multi_lora", "load_ort_adapter", "run_multi_lora",
           "session_for", "write_ort_adapter"]



@dataclass
class MultiLoraExport:
    """What :func:`export_multi_lora` wrote; also read back from the file by :meth:`read`.

    Attributes:
        path: The ``.onnx`` file.
        names: LoRA parameter name (``<path>.lora_A.weight``) -> ONNX initializer name.
        branches: Branch key -> (A initializer, B initializer).
        scales: Branch key -> the scale ``alpha / r`` baked into the graph.
        shapes: Initializer name -> shape; dtypes: initializer name -> numpy dtype name.
        inputs: The model's own graph inputs (the LoRA inputs follow them).
        info: Node/initializer counts of the written file (None when read back).
    """

    path: str
    names: dict[str, str]
    branches: dict[str, tuple[str, str]]
    scales: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    inputs: list[str] = field(default_factory=list)
    info: ExportInfo | None = None

    def to_json(self) -> str:
        keep = ("names", "branches", "scales", "shapes", "dtypes", "inputs")
        return json.dumps({k: getattr(self, k) for k in keep}, sort_keys=True)

    @classmethod
    def read(cls, path: str | os.PathLike) -> MultiLoraExport:
        """The mapping stored in a file written by :func:`export_multi_lora`."""
        path = os.fspath(path)
        proto, _ = files.load(path)
        meta = {p.key: p.value for p in proto.metadata_props}
        if MULTI_LORA_KEY not in meta:
            raise ExportError(f"{path!r} was not written by export_multi_lora (no {MULTI_LORA_KEY!r} metadata)")
        d = json.loads(meta[MULTI_LORA_KEY])
        return cls(path, d["names"], {k: tuple(v) for k, v in d["branches"].items()}, d["scales"],
                   {k: tuple(v) for k, v in d["shapes"].items()}, d["dtypes"], d["inputs"])


def export_multi_lora(lgm: fx.GraphModule, path: str | os.PathLike, *, example_args: tuple | None = None,
                      example_kwargs: dict | None = None, dynamic: bool = True, opset: int | None = None,
                      external_data: bool | None = None, kv_cache: bool = False) -> MultiLoraExport:
    """Exports the unfolded LoRA graph with A/B as zero-default overridable initializers.

    Args:
        lgm: What :func:`lora_fx.lorafy` returned; its values are not exported (the file holds zeros
            there) and it is not modified.
        path: Target ``.onnx``; written atomically (temp folder beside it, then ``os.replace``).
        example_args, example_kwargs: Default: the inputs given to :func:`lora_fx.trace`.
        dynamic: Batch (and sequence, for token inputs) dynamic.
        opset, external_data: As for :func:`lora_fx.exporters.backends.torch_onnx.onnx_io.export_onnx`.
        kv_cache: a decoder LLM with past/present KV inputs/outputs for :class:`lora_fx.OnnxGenerator`
            (``generate(..., run_options=...)`` with an active adapter): the KV-cache graph
            (:func:`lora_fx.exporters.decoder.export.decoder_files`) with the decoder's canonical I/O
            names. Adapter files written from ``lgm`` with ``write_ort_adapter`` fit it: the parameter
            names are the same. The example inputs are built there: drop ``example_args``/``example_kwargs``.

    Returns:
        The mapping from LoRA parameters to initializer names, stored in the file's metadata too.

    Raises:
        ExportError: ``lgm`` has no LoRA, the export failed, or a LoRA tensor has no initializer (or no
            consumer node) in the exported graph.
    """
    refuse_ort_adapters(lora_state(lgm, "export_multi_lora").branches, ExportError, "export_multi_lora")
    path = os.path.abspath(os.fspath(path))
    if kv_cache:
        from .decoder.export import decoder_files

        if example_args is not None or example_kwargs:
            raise ExportError("kv_cache=True builds its own example inputs; drop example_args / example_kwargs")

        def write(kv, layout, raw: str) -> tuple[MultiLoraExport, str]:
            return _write(kv, raw, *example_inputs(kv, None, None, dynamic), opset, external_data, path), raw

        info = decoder_files(lgm, path, write).info
        out = MultiLoraExport.read(path)
    else:
        with files.staging(path) as staged:
            out = _write(lgm, staged, *example_inputs(lgm, example_args, example_kwargs, dynamic), opset,
                         external_data, path)
            files.install(staged, path)
        info = out.info
    out.info, info.path = info, path
    return out


def _write(lgm: fx.GraphModule, staged: str, args: tuple, kwargs: dict, shapes: Any, opset: int | None,
           external_data: bool | None, path: str) -> MultiLoraExport:
    """Writes the multi-LoRA file at ``staged`` (``path``: the final target, for messages)."""
    state = lora_state(lgm, "export_multi_lora")
    module = copy_module(lgm, freeze=False)
    for br in state.branches:  # new zero Parameters: the user's A/B are never touched
        for name in (br.a, br.b):
            set_attr_path(module, name, nn.Parameter(torch.zeros_like(lgm.get_parameter(name)), requires_grad=False))
    info = export_onnx(module.eval(), staged, args, kwargs, dynamic_shapes=shapes, opset=opset,
                       external_data=external_data, optimize=False)  # optimize would fold B=0 away
    proto, _ = files.load(staged)
    result = _make_overridable(proto, state.branches, path)
    result.info = info
    proto.metadata_props.add(key=MULTI_LORA_KEY, value=result.to_json())
    onnx.save(proto, staged)
    return result


def _make_overridable(proto: onnx.ModelProto, branches: list, path: str) -> MultiLoraExport:
    """Adds a graph input per LoRA initializer and checks that a node still reads each one."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    norm = {re.sub(r"\W", "_", n): n for n in inits}
    used = {i for n in graph.node for i in n.input}
    inputs = [i.name for i in graph.input]
    names, pairs, scales = {}, {}, {}
    for br in branches:
        for param in (br.a, br.b):
            init = param if param in inits else norm.get(re.sub(r"\W", "_", param))
            if init is None:
                near = sorted(n for n in inits if "lora" in n.lower())[:6]
                raise ExportError(f"{path}: LoRA parameter {param!r} has no initializer in the export "
                                  f"(LoRA-like initializers: {near}); was it constant-folded?")
            if init not in used:
                raise ExportError(f"{path}: initializer {init!r} ({param}) feeds no node: the exporter "
                                  "removed its LoRA branch")
            names[param] = init
        pairs[br.key] = (names[br.a], names[br.b])
        scales[br.key] = float(br.scale)
    for init in names.values():
        t = inits[init]
        graph.input.append(onnx.helper.make_tensor_value_info(init, t.data_type, list(t.dims)))
    shapes = {n: tuple(int(d) for d in inits[n].dims) for n in names.values()}
    dtypes = {n: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inits[n].data_type)).name for n in names.values()}
    return MultiLoraExport(path, names, pairs, scales, shapes, dtypes, inputs)


def write_ort_adapter(source: fx.GraphModule | Adapter, path: str | os.PathLike,
                      mapping: MultiLoraExport | str | os.PathLike, *, adapter_version: int = 1,
                      model_version: int = 1) -> str:
    """Writes an ONNX Runtime adapter file holding ``source``'s A/B under the initializer names.

    A branch whose scale differs from the one baked into the export gets ``B·s/s_export``, so the
    served delta is still ``s·B@A``.

    Args:
        source: A lorafied module (its current A/B) or an :class:`~lora_fx.adapters.Adapter`.
        path: Target ``.onnx_adapter`` file, written atomically.
        mapping: What :func:`export_multi_lora` returned, or the path of the file it wrote.
        adapter_version, model_version: Stored in the file header (ORT does not check them).

    Returns:
        The absolute path written.

    Raises:
        AdapterError: ``source`` has a branch the export lacks or lacks one it has, or a shape differs.
    """
    import onnxruntime as ort

    adapter = source if isinstance(source, Adapter) else adapter_of(source)
    refuse_ort_adapters(adapter.branches.values(), AdapterError, "write_ort_adapter")
    exp = mapping if isinstance(mapping, MultiLoraExport) else MultiLoraExport.read(mapping)
    missing = sorted(set(exp.branches) - set(adapter.branches))
    extra = sorted(set(adapter.branches) - set(exp.branches))
    if missing or extra:
        raise AdapterError(f"adapter {adapter.source} does not fit {exp.path}: branches missing {missing}, "
                           f"not in the export {extra}")
    values: dict[str, np.ndarray] = {}
    for key, br in adapter.branches.items():
        ratio = br.scale / exp.scales[key]
        a, b = adapter.pair(key)
        for init, t in zip(exp.branches[key], (a, b * ratio if ratio != 1.0 else b), strict=True):
            values[init] = t.detach().cpu().to(torch.float32).numpy().astype(exp.dtypes[init])
    _check(values, exp, f"adapter {adapter.source}")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in values.items()})
    path = os.path.abspath(os.fspath(path))
    write_file_atomically(path, fmt.export_adapter)
    return path


def _check(values: dict[str, Any], exp: MultiLoraExport, what: str) -> None:
    """AdapterError naming the first initializer whose name, shape or dtype does not fit ``exp``."""
    for name, v in values.items():
        shape, dtype = tuple(v.shape), np.dtype(v.dtype).name
        if name not in exp.shapes:
            raise AdapterError(f"{what}: parameter {name!r} is not a LoRA input of {exp.path}; "
                               f"it has e.g. {sorted(exp.shapes)[:4]} (adapter written for another model?)")
        if shape != exp.shapes[name] or dtype != exp.dtypes[name]:
            raise AdapterError(f"{what}: initializer {name!r} is {dtype}{list(shape)} but {exp.path} expects "
                               f"{exp.dtypes[name]}{list(exp.shapes[name])} (adapter for another model or rank?)")


def load_ort_adapter(path: str | os.PathLike, mapping: MultiLoraExport | str | os.PathLike) -> Any:
    """Reads an ``.onnx_adapter`` file, checks it against the export, returns an ``ort.LoraAdapter``.

    Raises:
        AdapterError: The file is unreadable, or names/shapes/dtypes do not fit (the message names
            the initializer), so the error comes before ORT's run-time one.
    """
    import onnxruntime as ort

    exp = mapping if isinstance(mapping, MultiLoraExport) else MultiLoraExport.read(mapping)
    path = os.fspath(path)
    try:
        params = ort.AdapterFormat.read_adapter(path).get_parameters()
    except Exception as e:
        raise AdapterError(f"cannot read ONNX Runtime adapter {path!r}: {type(e).__name__}: {e}") from e
    _check({n: v.numpy() for n, v in params.items()}, exp, f"adapter file {path!r}")
    adapter = ort.LoraAdapter()
    adapter.Load(path)
    return adapter


def session_for(path: str | os.PathLike, *, providers: list[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session on a multi-LoRA export (CPU by default), without ORT's per-input
    warnings ("initializer appears in graph inputs" is the point here)."""
    return ort_session(path, providers=providers or ["CPUExecutionProvider"], threads=threads, log_severity=3)


def run_multi_lora(session: Any, exp: MultiLoraExport, args: tuple, kwargs: dict | None = None, *,
                   adapter: Any = None) -> list[np.ndarray]:
    """Runs the model inputs (tensor leaves of ``args``/``kwargs`` in order) with ``adapter`` active.

    Args:
        adapter: An ``ort.LoraAdapter`` (see :func:`load_ort_adapter`), or None for the base model.
    """
    import onnxruntime as ort

    leaves = [t for t in pytree.tree_leaves((tuple(args), dict(kwargs or {}))) if isinstance(t, (torch.Tensor, np.ndarray))]
    if len(leaves) != len(exp.inputs):
        raise ExportError(f"{exp.path} takes inputs {exp.inputs}; got {len(leaves)} tensors")
    feeds = {n: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t) for n, t in zip(exp.inputs, leaves, strict=True)}
    options = ort.RunOptions()
    if adapter is not None:
        options.add_active_adapter(adapter)
    return [np.asarray(o) for o in session.run(None, feeds, options)]
