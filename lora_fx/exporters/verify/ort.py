"""ONNX Runtime sessions and runs: providers that really work, no spinning when timing, input matching."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_fx.errors import ExportError, short_message

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["available_providers", "ort_session", "run_onnx"]

_NO_ORT = "onnxruntime is not installed: pip install onnxruntime (CPU) or lora-fx[gpu]"


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(_NO_ORT) from exc
    return onnxruntime


def available_providers(preferred: list[str] | None = None) -> list[str]:
    """Execution providers to use, best first, always ending with CPU.

    Args:
        preferred: Providers in order of preference; default CUDA then CPU. Each one is kept only
            if onnxruntime was built with it and a session can actually use it.

    Returns:
        E.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` or ``["CPUExecutionProvider"]``.
    """
    ort = _import_ort()
    built = set(ort.get_available_providers())
    order = list(preferred) if preferred else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in order if p in built and _usable(p)]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


@functools.cache
def _usable(provider: str) -> bool:
    """Whether a session really runs on ``provider``.

    onnxruntime-gpu lists CUDA even when libcudart/cuDNN cannot be loaded, and then silently falls
    back to CPU; a one-node probe session tells the truth once per process.
    """
    if provider == "CPUExecutionProvider":
        return True
    from onnx import TensorProto, helper

    ort = _import_ort()
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the failed CUDA load is the expected answer, not an error
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider, "CPUExecutionProvider"])
    except Exception:
        return False
    return provider in session.get_providers()


def ort_session(path: str | os.PathLike[str] | bytes, *, providers: list[str] | None = None, threads: int | None = None,
                spinning: bool = False, low_memory: bool = False, log_severity: int | None = None,
                data_folder: str | None = None, what: str | None = None) -> onnxruntime.InferenceSession:
    """Open an ONNX Runtime session on ``path``.

    Args:
        path: The ``.onnx`` file (its external data is found beside it), or a serialized model whose
            external data lives in ``data_folder``.
        providers: Execution providers; default :func:`available_providers`.
        threads: ``intra_op_num_threads``; ``None`` lets ORT use all cores.
        spinning: Let idle intra-op threads spin. Off by default: a spinning idle session steals a
            core from the one being timed (identical files measured 0.98-1.08x apart with spinning).
        low_memory: Hold the weights once: no graph optimizations (constant folding would store an
            fp32 copy of every fp16 weight the CPU kernels need cast), no pre-packed weight copies,
            no memory arena (transient buffers go back to the system), and priority-based execution
            order (in the default order the casts of fp16 weights, which depend on nothing, all run
            first and hold an fp32 copy of every weight at once: measured on a 6-layer fp16
            TinyLlama file, a run's peak over the session's weights 0.92 GiB -> 0.26 GiB). For
            verification runs, never for timing.
        log_severity: ORT's ``log_severity_level`` (3: errors only); None keeps ORT's default.
        data_folder: Where a serialized model's external data files are.
        what: How error messages name a serialized model.

    Raises:
        ExportError: onnxruntime is missing, the file does not exist or cannot be loaded.
    """
    ort = _import_ort()
    if not isinstance(path, bytes):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ExportError(f"ONNX file {path!r} does not exist; write it first with export_onnx()")
    options = ort.SessionOptions()
    if data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", data_folder)
    if log_severity is not None:
        options.log_severity_level = int(log_severity)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers or available_providers())
    except Exception as exc:
        name = what or (repr(path) if isinstance(path, str) else "a serialized model")
        raise ExportError(f"onnxruntime could not load {name}: {short_message(exc)}") from exc


def run_onnx(session_or_path: onnxruntime.InferenceSession | str | os.PathLike[str], args: tuple[Any, ...],
             kwargs: dict[str, Any] | None = None, *, providers: list[str] | None = None) -> list[np.ndarray]:
    """Run an exported model on the inputs the torch module would take.

    Inputs are matched to graph inputs by this rule:

    1. The tensor leaves of ``(args, kwargs)`` are taken in pytree order (positional, then kwarg
       values); ``None`` and Python scalars are skipped because the exporter bakes them in.
    2. If there are as many leaves as graph inputs, they are fed in order (what torch's own
       ``ONNXProgram.__call__`` does).
    3. Otherwise a top-level tensor kwarg whose name is a graph input feeds that input, a top-level
       kwarg with another name is taken as dropped by the exporter, and the remaining graph inputs
       take the remaining leaves in order, skipping leaves whose dtype or rank/static dims do not
       fit. An input left without a leaf is an :class:`ExportError` listing both sides.

    Args:
        session_or_path: A session from :func:`ort_session` or an ``.onnx`` path.
        args: Positional inputs (torch tensors or numpy arrays, possibly nested).
        kwargs: Keyword inputs.
        providers: Used only when a path is given.

    Returns:
        The graph outputs as numpy arrays, in graph order.
    """
    is_path = isinstance(session_or_path, (str, os.PathLike))
    session = ort_session(session_or_path, providers=providers) if is_path else session_or_path
    feeds = _match_inputs(session.get_inputs(), _tensor_leaves(args, kwargs or {}))
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:
        fed = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in feeds.items())
        raise ExportError(f"onnxruntime run failed with inputs {{{fed}}}: {short_message(exc)}") from exc
    return [np.asarray(o) for o in outputs]


def _tensor_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str | None, np.ndarray]]:
    """(kwarg name or None, array) for each tensor leaf, in the exporter's input order."""
    import torch
    from torch.utils import _pytree

    def arrays(tree: Any) -> list[np.ndarray]:
        out = []
        for leaf in _pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                if leaf.dtype == torch.bfloat16:
                    raise ExportError("run_onnx cannot feed bfloat16 tensors (numpy has no bfloat16); cast the input to float32")
                out.append(leaf.detach().cpu().numpy())
            elif isinstance(leaf, np.ndarray):
                out.append(leaf)
        return out

    leaves: list[tuple[str | None, np.ndarray]] = [(None, a) for a in arrays(tuple(args))]
    for key, value in kwargs.items():
        named = isinstance(value, (torch.Tensor, np.ndarray))  # nested kwargs get exporter-made names
        leaves.extend((key if named else None, a) for a in arrays(value))
    return leaves


def ort_type(dtype: Any) -> str:
    """ONNX Runtime's type string of a numpy dtype, as ``NodeArg.type`` reads (``tensor(float)``)."""
    name = np.dtype(dtype).name
    return f"tensor({ {'float32': 'float', 'float64': 'double'}.get(name, name) })"


def _fits(node_arg: Any, array: np.ndarray) -> bool:
    """Whether ``array`` can feed ``node_arg``: ORT type string, rank and static dims agree."""
    shape = node_arg.shape
    if node_arg.type != ort_type(array.dtype) or len(shape) != array.ndim:
        return False
    return all(not isinstance(d, int) or d == n for d, n in zip(shape, array.shape, strict=True))


def _match_inputs(inputs: list[Any], leaves: list[tuple[str | None, np.ndarray]]) -> dict[str, np.ndarray]:
    """Apply the matching rule documented in :func:`run_onnx`."""
    if len(leaves) == len(inputs):
        return {i.name: a for i, (_, a) in zip(inputs, leaves, strict=True)}
    names = {i.name for i in inputs}
    feeds: dict[str, np.ndarray] = {}
    rest: list[np.ndarray] = []
    for key, array in leaves:
        if key is None:
            rest.append(array)
        elif key in names and key not in feeds:
            feeds[key] = array
    remaining = iter(rest)
    for node_arg in inputs:
        if node_arg.name in feeds:
            continue
        for array in remaining:
            if _fits(node_arg, array):
                feeds[node_arg.name] = array
                break
        else:
            want = ", ".join(f"{i.name}: {i.type}{i.shape}" for i in inputs)
            have = ", ".join(f"{k or '<positional>'}: {a.dtype}{list(a.shape)}" for k, a in leaves)
            raise ExportError(f"cannot match inputs to graph input {node_arg.name!r}: graph wants ({want}); got ({have})")
    return {i.name: feeds[i.name] for i in inputs}
