"""ONNX Runtime against torch: the one comparison every numeric check of lora-fx uses.

:func:`output_errors` compares outputs (max absolute, max relative, relative RMS error);
:func:`check_numerics` runs a file and a torch model on the example inputs and their grown
:func:`variants`, on a :func:`.segments.bounded_session` (a file whose weights exceed
:data:`.segments.DEFAULT_BUDGET` runs as a chain of parts, so the check holds a bounded share of them
next to the model's own), and passes when::

    max |ort - torch| / max |torch|  <=  1e-4 (fp32), 1e-8 (fp64), 1e-2 (fp16), 5e-2 (bf16)

(:func:`tolerance`: the looser of the model's and the file's precision). The decoder's prefill/decode
checks and the quantized files' error measurement use the same comparison.

**A model's own error.** Some graphs differ between ORT and torch by more than that with no LoRA at all:
Longformer's and LED's sliding-window attention (long sums, chunked matmuls) come out at 1.1-1.3e-4 relative
in fp32, for the base model's file as for the folded one. Such a file is judged against what the base model's
file achieves: when a check misses the tolerance by at most :data:`NEAR_MISS` x, the task file with every LoRA
initializer set to the model's own base weight (the same graph with the base weights: the base model's file;
never weights recovered from the file, which would carry a wrong fold into the reference) is run against torch
on the base model (``strip``) at the same inputs, and the check passes when the task's error
is at most :data:`BASE_FACTOR` x the base's (a note says so). The fold then adds no error of its own beyond the
model's; a file that is wrong (a fold error, a broken graph) is off by orders of magnitude, not by 1.5x. The
global tolerance is unchanged: every other model still meets it outright.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from ...capture import auto_dims
from ...dynamic_dims import asserts_values, dynamic_dims, grow_to, grown_failure, redraw
from ...errors import ExportError, LoraFxError, VerifyError
from ...graph_module import copy_module
from ...passes.dtype import cast_inputs, float_dtype
from .ort import available_providers, run_onnx
from .segments import bounded_session

__all__ = ["BASE_FACTOR", "NEAR_MISS", "RTOL", "Errors", "NumericCheck", "check_numerics", "output_errors", "tolerance", "torch_outputs",
           "variants"]

RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}
NEAR_MISS = 10.0  # a check up to this many tolerances off is compared with the base model's file (module doc)
BASE_FACTOR = 1.5  # ... and passes within this factor of the base file's own error at the same inputs


def tolerance(model_dtype: torch.dtype, export_dtype: torch.dtype | None = None) -> float:
    """Max relative error allowed between ORT on the file and torch on the model: the looser of the
    two precisions (a bf16 model exported to fp16 is checked against a bf16 reference)."""
    dtypes = [model_dtype] if export_dtype is None else [model_dtype, export_dtype]
    return max(RTOL.get(d, 1e-4) for d in dtypes)


@dataclass
class NumericCheck:
    """ORT on the file vs torch on the LoRA model, for one input shape."""

    shapes: str
    max_abs_err: float
    max_rel_err: float  # max |ort - torch| / max |torch|
    ok: bool
    base_rel_err: float | None = None  # the base model's file at the same inputs (measured on a near miss only)


@dataclass(frozen=True)
class Errors:
    """How far ``got`` is from ``expected``, over all outputs together."""

    max_abs: float  # max |got - expected|
    max_rel: float  # max_abs / max |expected|
    rms_rel: float  # ||got - expected||_2 / ||expected||_2


def output_errors(got: Sequence, expected: Sequence) -> Errors:
    """Compares output arrays pairwise (numpy arrays or tensors, compared in float64 on the host)."""
    diff, ref = [], []
    for g, e in zip(got, expected, strict=False):
        e = e.detach().cpu().double().numpy() if isinstance(e, torch.Tensor) else np.asarray(e, np.float64)
        g = g.detach().cpu().double().numpy() if isinstance(g, torch.Tensor) else np.asarray(g, np.float64)
        diff.append((g - e).ravel())
        ref.append(e.ravel())
    d = np.concatenate(diff) if diff else np.zeros(0)
    r = np.concatenate(ref) if ref else np.zeros(0)
    err = float(np.abs(d).max(initial=0.0))
    return Errors(err, err / max(float(np.abs(r).max(initial=0.0)), 1e-12),
                  float(np.linalg.norm(d) / max(float(np.linalg.norm(r)), 1e-30)))


def torch_outputs(model, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor leaves of ``model(*args, **kwargs)``, without gradients."""
    with torch.no_grad():
        return [t.detach() for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def check_numerics(lgm: fx.GraphModule, task: str, args: tuple, kwargs: dict, dtype: torch.dtype | None,
                   providers: list[str] | None, notes: list[str]) -> tuple[str | None, list[NumericCheck]]:
    """ORT on ``task`` vs torch on ``lgm`` (unfolded) on :func:`variants` of the inputs; returns the
    provider used and a check per input shape. A file ORT cannot load or run is noted, not failed."""
    providers = providers or available_providers()
    ref_model = copy_module(lgm, freeze=False).eval()
    # torch first, then ORT: the session is the only other holder of the weights while it runs, and
    # it holds them once (low_memory: no constant-folded casts, no pre-packed copies) or, for a big
    # file, a bounded share at a time (segments.bounded_session: the graph run as a chain of parts).
    cases = []
    for a, k in variants(args, kwargs, lgm):
        try:
            cases.append((a, k, torch_outputs(ref_model, a, k)))
        except Exception as e:  # a size the graph cannot take: named, never a bare RuntimeError
            raise VerifyError(grown_failure(lgm, (args, kwargs), (a, k), "the torch model", e)) from e
    del ref_model
    checks = []
    try:
        session = bounded_session(task, providers=providers)
    except ExportError as e:
        notes.append(f"numeric check skipped: {e}")
        return None, []
    provider = session.get_providers()[0]
    rtol = tolerance(float_dtype(lgm), dtype)
    if len(cases) > 1 and all(isinstance(d, int) for i in session.get_inputs() for d in i.shape):
        notes.append("numeric check at the example's sizes only: the file declares every input dimension static "
                     "(dynamic=False, or the static fallback of a failed dynamic export)")
        cases = cases[:1]
    for a, k, expected in cases:
        try:
            got = run_onnx(session, *cast_inputs((a, k), dtype))
        except ExportError as e:
            if checks:  # ran at the example's sizes, fails at grown ones: the file's dynamic dims are wrong
                raise VerifyError(grown_failure(lgm, (args, kwargs), (a, k), f"ONNX Runtime ({provider})", e)) from e
            notes.append(f"numeric check on {provider} skipped: {e}")
            return provider, checks
        err = output_errors(got, expected)
        shapes = ", ".join(str(tuple(t.shape)) for t in pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor))
        checks.append(NumericCheck(shapes, err.max_abs, err.max_rel,
                                   err.max_rel <= rtol and len(got) == len(expected)))
    near = [i for i, c in enumerate(checks) if not c.ok and rtol < c.max_rel_err <= NEAR_MISS * rtol]
    if near and all(c.ok or i in near for i, c in enumerate(checks)):
        del session  # the base file's session replaces it
        _judge_by_base(lgm, task, [cases[i] for i in near], [checks[i] for i in near], dtype, providers, notes)
    return provider, checks


def _judge_by_base(lgm: fx.GraphModule, task: str, cases: list, checks: list[NumericCheck], dtype: torch.dtype | None,
                   providers: list[str], notes: list[str]) -> None:
    """Near-miss ``checks`` pass when within :data:`BASE_FACTOR` x the base model's file (module doc)."""
    errors = _base_errors(lgm, task, [(a, k) for a, k, _ in cases], dtype, providers)
    if errors is None:
        notes.append("near miss of the tolerance: the base model's file could not be made from this one to compare "
                     "(external data, an untied copy, or a weight layout other than W and W.T)")
        return
    for check, base in zip(checks, errors, strict=True):
        check.base_rel_err = base
        check.ok = check.max_rel_err <= BASE_FACTOR * base
        notes.append(f"at {check.shapes}: max rel err {check.max_rel_err:.2e} is over the tolerance; the base "
                     f"model's file (same graph, base weights) has {base:.2e} against torch at the same inputs: "
                     + (f"accepted (within {BASE_FACTOR}x: the model's own ORT-vs-torch error, not the fold's)"
                        if check.ok else f"refused (over {BASE_FACTOR}x the base's)"))


def _base_errors(lgm: fx.GraphModule, task: str, inputs: list[tuple[tuple, dict]], dtype: torch.dtype | None,
                 providers: list[str]) -> list[float] | None:
    """Max rel err, per input, of the base model's file (``task`` with each adapted initializer set to the
    model's own base weight, not one recovered from the file) against torch on the base model (``strip``);
    None when that file cannot be made here (external data, an untied copy, a layout other than W or W.T)."""
    import onnx
    from onnx import numpy_helper

    from ...graph_module import lora_state
    from ...passes.fold import strip
    from ..format import derived_source

    weights = {br.site.weight for br in lora_state(lgm, "verify").branches}
    model = onnx.load(task, load_external_data=False)
    for t in model.graph.initializer:
        source, ops = derived_source(t.name)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        if source not in weights:
            if any(w in source for w in weights):  # fold's untied copy of an adapted weight
                return None
            continue
        if ops not in ((), ("Transpose",)):
            return None
        w = lgm.get_parameter(source).detach().float().cpu().numpy()
        t.CopyFrom(numpy_helper.from_array((w.T if ops else w).astype(numpy_helper.to_array(t).dtype), t.name))
    folder = tempfile.mkdtemp(prefix="base-", dir=os.path.dirname(os.path.abspath(task)))
    try:
        base_file = os.path.join(folder, "base.onnx")
        onnx.save_model(model, base_file)
        del model
        base = strip(lgm).eval()
        expected = [torch_outputs(base, a, k) for a, k in inputs]
        del base
        session = bounded_session(base_file, providers=providers)
        return [output_errors(run_onnx(session, *cast_inputs((a, k), dtype)), e).max_rel
                for (a, k), e in zip(inputs, expected, strict=True)]
    except (LoraFxError, RuntimeError, ValueError):
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def variants(args: tuple, kwargs: dict, gm: fx.GraphModule | None = None) -> list[tuple[tuple, dict]]:
    """The example inputs, and the same with batch + 1 and (token inputs) sequence + 3.

    With ``gm`` (the captured module) a dimension grows only where its graph keeps it symbolic: a
    model whose capture specialised a size (e.g. Mamba's sequence loop unrolled to the example length)
    is checked on the sizes its graph, and so its ONNX file, accepts. No dimension left to grow: the
    example inputs only."""
    gen = torch.Generator().manual_seed(0)
    dynamic = None if gm is None else dynamic_dims(gm, (args, kwargs))  # the dims the file declares dynamic
    repeat = gm is not None and asserts_values(gm)

    def grow(k, t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        shape = list(t.shape)
        for d in auto_dims(t):  # batch + 1, token sequence + 3: the dims trace makes dynamic
            if dynamic is None or d in dynamic.get(k, ()):
                shape[d] += 1 if d == 0 else 3
        if repeat:  # the graph asserts the example's data-dependent branches: keep its values
            return grow_to(t, shape)
        return redraw(t, shape, gen)

    flat, spec = pytree.tree_flatten((args, kwargs))
    grown = [grow(k, t) for k, t in enumerate(flat)]
    if all(not isinstance(a, torch.Tensor) or a.shape == b.shape for a, b in zip(flat, grown, strict=True)):
        return [(args, kwargs)]  # nothing the graph lets grow
    return [(args, kwargs), pytree.tree_unflatten(grown, spec)]
