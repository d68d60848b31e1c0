"""Weight-independent ONNX optimization: the plain export's speed, with the structural proof intact.

``torch.onnx.export(..., dynamo=True)`` optimizes by default with onnxscript (constant folding, rewrite
rules, initializer deduplication, CSE, renaming). Measured on GPT-2 6L/512 (torch 2.13, onnxscript
0.7.2): the raw graph has 1000 nodes (284 ``Constant``, 234 ``Reshape``, 100 ``Concat``, 29 ``Cast``,
18 ``SplitToSequence``/``SequenceAt`` ...), the optimized one 357; lora-fx's captured GraphModule
exports to exactly the raw graph of the eager model (same 1000 nodes, same op counts), so the gap is
the optimizer alone, not the capture. But three of its steps read weight *values*:

* rewrite rules ``x + 0``, ``x * 1`` and "Gemm/Conv bias all zeros" delete nodes or inputs when a
  weight happens to be 0 or 1 (a freshly initialised GPT-2 has all-zero biases);
* ``DeduplicateInitializersPass`` merges initializers with equal bytes (<= 1024 elements: every fresh
  LayerNorm shares one weight/bias pair), so tensors LoRA adapts differently would split again;
* constant folding evaluates any op whose inputs are all constant, weights included.

So the structure of an optimized export would depend on its weights. :func:`optimize_model` runs
the same passes with the weights **opaque**: every initializer the exporter wrote (parameters,
buffers, lifted tensor constants) has its value hidden (``const_value = None``) while the folding,
rewriting and deduplication passes run, so no rule can read it. Those passes then see exactly the
same graph for any weights, and decide the same. Afterwards one value-agnostic step folds layout ops
applied to weights (``Transpose``, ``Cast``, ``Reshape``, ``Unsqueeze``, ``Squeeze``, ``Flatten``,
``Identity``, and ``Expand`` when it adds no elements: BERT's ``token_type_ids`` buffer) into new
initializers, regardless of values, when nothing but layout ops reads the weight or it is small
(<= 8192 elements: torch's default optimizer's rule), so weights reach ``MatMul``/``Gemm`` directly;
a big weight also read as is (a tied embedding's ``Gather``) keeps its ``Transpose`` node, as in the
plain export, instead of being stored twice. The new initializer is named
``<weight>::<Op>`` (e.g. ``h.0.attn.c_proj.weight::Transpose``) and the chain of ops is recorded in the
model's metadata (:data:`DERIVED_KEY`), so tools that rewrite weights in the file (refold, the
quantizer) can find them. Result on GPT-2 6L/512: 357 nodes, the plain optimized export's count.

``mode="ort"`` then runs ONNX Runtime's transformer fusions (``onnxruntime.transformers.optimizer``,
python fusions only: ``opt_level=0``, so nothing is pre-optimized for one provider): ``SkipLayerNorm``,
``FastGelu``/``BiasGelu``, ``SimplifiedLayerNorm``, ``Attention`` where the pattern matches. Those
fusions read constants by pattern, so :func:`.ort_fusions.ort_fusions` checks weight independence directly: it
fuses the model once more with every weight replaced by generic values (seeded normal, no zeros, no
equal tensors) and refuses (:class:`~lora_fx.errors.ExportError` naming the first difference) when
the two results differ.

Contract used by quantization (``MatMulNBitsQuantizer`` converts a ``MatMul`` whose B is an
initializer): after :func:`optimize_model` every ``MatMul``/``Gemm`` weight operand that came from a
parameter is an initializer, except a big tied weight's ``Transpose`` (``quantize.prepare`` stores its
transpose), and that holds for any weight values.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...._text import plural
from ....errors import ExportError
from ...files import ORT_ONNX_DOMAIN_OPS
from ...format import DERIVED_KEY, derived_name

__all__ = ["DERIVED_KEY", "LAYOUT_OPS", "ORT_ONNX_DOMAIN_OPS", "MODES", "OptimizeReport", "check_mode",
           "optimize_model"]

MODES = (False, True, "ort")
LAYOUT_OPS = frozenset({"Transpose", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"})

# The dedup pass logs a warning for every initializer it skips: here that is every hidden weight.
logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)


@dataclass
class OptimizeReport:
    """What :func:`optimize_model` did."""

    mode: Any
    nodes_before: int
    nodes_after: int
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)  # new initializer -> source + ops
    fusions: dict[str, int] = field(default_factory=dict)  # mode="ort": fused op -> count
    seconds: float = 0.0

    def __str__(self) -> str:
        text = (f"optimize={self.mode!r}: {self.nodes_before} -> {self.nodes_after} nodes, "
                f"{plural(len(self.derived), 'weight')} folded through layout ops")
        fused = {k: v for k, v in self.fusions.items() if v}
        return text + (f", ORT fusions {fused}" if fused else "")


def check_mode(mode: Any) -> Any:
    """Returns ``mode`` if it is one of :data:`MODES`; else raises ExportError listing them."""
    if isinstance(mode, str) and mode.lower() == "ort":
        return "ort"
    if mode is True or mode is False:
        return mode
    raise ExportError(f"optimize={mode!r} is not supported: use True (weight-independent onnxscript optimization, "
                      "the default), 'ort' (plus ONNX Runtime's transformer fusions) or False (the exporter's raw graph)")


def optimize_model(model: Any, mode: Any = True, *, model_type: str = "bert",
                   ties: dict[str, str] | None = None, decoder: bool = False) -> tuple[Any, OptimizeReport]:
    """Optimizes an ``onnx_ir.Model`` without letting any decision depend on weight values.

    Steps (onnxscript's default optimizer, reordered so that weights are opaque where it matters):

    1. inline functions; hide every initializer's value;
    2. constant folding + onnxscript's default rewrite rules + unused-node removal, twice;
    3. restore the values; fold layout ops on weights (``W' = Transpose(W)``) into initializers,
       for weights read only through layout ops (a tied embedding keeps its Transpose node: one
       copy in the file, as in a plain export);
    4. lift ``Constant`` nodes to initializers, deduplicate *non-weight* initializers, CSE, fix names;
    5. ``decoder``: :func:`.llm_fusions.fuse_decoder` (attention, rotary, RMSNorm), weights hidden;
    6. ``mode="ort"``: :func:`.ort_fusions.ort_fusions`.

    Args:
        model: an ``onnx_ir.Model`` (``ONNXProgram.model``), changed in place, or an
            ``onnx.ModelProto`` (not changed; an optimized ModelProto is returned).
        mode: ``True`` or ``"ort"`` (``False`` returns at once).
        model_type: for ``"ort"``: ``onnxruntime.transformers`` model type (``bert``, ``gpt2``...).
        ties: ``{untied copy: weight}`` (a fold report's ``untied``): a weight and its untied copies
            count as one weight when deciding what to fold, so a folded export folds what its base
            export folds.
        decoder: a KV-cache decoder LLM: fuse its layers (:mod:`.llm_fusions`; best at opset >= 23).

    Returns:
        (the optimized model: ``model`` itself, or a new one for ``"ort"`` or a ModelProto input,
        an :class:`OptimizeReport`);
        ``report.derived`` is also stored in the model's metadata under :data:`DERIVED_KEY`.

    Raises:
        ExportError: ``mode`` is not one of :data:`MODES`, or ``"ort"`` fusions read weight values.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding as folding

    mode = check_mode(mode)
    if not isinstance(model, ir.Model):  # an onnx.ModelProto: same steps, a ModelProto back
        optimized, report = optimize_model(ir.serde.deserialize_model(model), mode, model_type=model_type, ties=ties,
                                           decoder=decoder)
        return ir.serde.serialize_model(optimized), report
    start = time.perf_counter()
    report = OptimizeReport(mode, _count(model), _count(model))
    if mode is False:
        return model, report
    common.InlinePass()(model)
    weights = {v for g in model.graphs() for v in g.initializers.values()}
    with _hidden(weights):
        ir.passes.PassManager([
            folding.FoldConstantsPass(shape_inference=True,
                                      input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                      output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
            rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
            common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        ], steps=2, early_stop=True)(model)
    weights = {v for g in model.graphs() for v in g.initializers.values() if v in weights}
    report.derived = _fold_layout(model, weights, ties or {})
    weights |= {v for g in model.graphs() for v in g.initializers.values() if v.name in report.derived}
    common.RemoveUnusedNodesPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.LiftSubgraphInitializersToMainGraphPass()(model)
    with _hidden(weights):
        common.DeduplicateInitializersPass()(model)
    common.CommonSubexpressionEliminationPass()(model)
    common.OutputFixPass()(model)
    common.NameFixPass()(model)
    if report.derived:
        model.metadata_props[DERIVED_KEY] = json.dumps(report.derived, sort_keys=True)
    if decoder:
        from .llm_fusions import fuse_decoder

        with _hidden(weights):  # the rules read op types, shapes and graph constants, never a weight
            report.fusions.update(fuse_decoder(model))
    if mode == "ort":
        names = {v.name for v in weights}
        from .ort_fusions import ort_fusions

        proto, fused = ort_fusions(ir.serde.serialize_model(model), weights=names, model_type=model_type)
        report.fusions.update(fused)
        model = ir.serde.deserialize_model(proto)
    report.nodes_after = _count(model)
    report.seconds = time.perf_counter() - start
    return model, report


class _hidden:
    """Context: the values of ``weights`` are invisible (``const_value is None``) inside the block."""

    def __init__(self, weights: set) -> None:
        self.saved = {v: v.const_value for v in weights}

    def __enter__(self) -> None:
        for v in self.saved:
            v.const_value = None

    def __exit__(self, *exc: object) -> None:
        for v, t in self.saved.items():
            v.const_value = t


def _fold_layout(model: Any, weights: set, ties: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Folds chains of layout ops applied to weights into new initializers named ``<weight>::<Op>``.

    Which weights, as torch's default optimizer decides (onnxscript constant folding): those that
    nothing but layout ops reads, and small ones (<= 8192 elements). A big weight also read as is (a
    tied embedding's Gather) keeps its Transpose node, else the file would hold it twice. The decision
    depends only on op types, shapes and which inputs are weights, a weight and its untied copies
    (``ties``) counted as one, never on values, so base and folded exports fold the same nodes.
    """
    import onnx_ir as ir

    derived: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[Any]] = {}
    for v in weights:
        groups.setdefault(_tied_name(v.name, ties), []).append(v)
    from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT as small

    foldable = {v for vs in groups.values()
                if all(_is_layout(use.node) and use.idx == 0 for v in vs for use in v.uses())
                or all(_numel(v) <= small for v in vs) for v in vs}
    origin = {v: (v.name, []) for v in foldable}  # value -> (source weight, ops applied)
    done: dict[tuple[int, str], Any] = {}  # (value, op) -> the initializer it folded into
    for node in list(model.graph):  # topological order: a chain folds link by link
        if not _is_layout(node) or not node.inputs:
            continue
        data, rest = node.inputs[0], [x for x in node.inputs[1:] if x is not None]
        if data not in origin or any(x.const_value is None for x in rest) or len(node.outputs) != 1:
            continue
        source, ops = origin[data]
        step = [node.op_type, {a.name: _attr(a) for a in node.attributes.values()},
                [x.const_value.numpy().tolist() for x in rest]]
        key = (id(data), json.dumps(step, sort_keys=True))
        if key in done:  # the same op on the same weight twice (a tied weight): one initializer
            node.outputs[0].replace_all_uses_with(done[key], replace_graph_outputs=True)
            continue
        op, attrs = node.op_type, {a.name: a.value for a in node.attributes.values()}
        args = [x.const_value.numpy() for x in rest]
        like = _evaluate(op, attrs, _stand_in(data.const_value), args)  # shape and dtype, no weight bytes
        if like is None:
            continue
        ops = [*ops, step]
        name = derived_name(source, [op[0] for op in ops])
        while name in model.graph.initializers:
            name += "'"
        dtype = ir.DataType.from_numpy(like.dtype)
        # Lazy, like the streamed weights it reads: computed when the file is written, one at a time.
        lazy = ir.LazyTensor(functools.partial(_derive, op, attrs, data.const_value, args, name), dtype=dtype,
                             shape=ir.Shape(like.shape), name=name)
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(like.shape), const_value=lazy)
        model.graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)
        origin[value] = (source, ops)
        done[key] = value
        derived[name] = {"source": source, "ops": ops}
    # Drop chain links nobody reads any more (a weight read only through its transpose, say).
    return {k: v for k, v in derived.items() if model.graph.initializers[k].uses()}


def _is_layout(node: Any) -> bool:
    return node.op_type in LAYOUT_OPS and node.domain in ("", "ai.onnx")


def _numel(v: Any) -> int:
    return int(np.prod([int(d) for d in v.shape])) if v.shape is not None else 0


def _tied_name(name: str, ties: dict[str, str]) -> str:
    """The weight an initializer is an untied copy of (``ties``: parameter or module names)."""
    for new, old in ties.items():
        if name == new or name.startswith(new + "."):
            return old + name[len(new):]
    return name


def _attr(attr: Any) -> Any:
    value = attr.value
    return list(value) if isinstance(value, (tuple, list)) else (int(value) if hasattr(value, "__index__") else value)


def _stand_in(tensor: Any) -> np.ndarray:
    """A zero-strided array with ``tensor``'s shape and dtype (one element of memory)."""
    return np.broadcast_to(np.zeros((), dtype=tensor.dtype.numpy()), tuple(tensor.shape))


def _derive(op: str, attrs: dict[str, Any], source: Any, rest: list[np.ndarray], name: str) -> Any:
    import onnx_ir as ir

    return ir.tensor(_evaluate(op, attrs, source.numpy(), rest), name=name)


def _evaluate(op: str, attrs: dict[str, Any], x: np.ndarray, rest: list[np.ndarray]) -> np.ndarray | None:
    """One layout op in numpy (the ONNX reference semantics for these ops); None if unsupported."""
    if op == "Identity":
        return x
    if op == "Transpose":
        perm = attrs.get("perm")
        return np.ascontiguousarray(np.transpose(x, list(perm) if perm is not None else None))
    if op == "Cast":
        import onnx_ir as ir

        return x.astype(ir.DataType(int(attrs["to"])).numpy())
    if op == "Reshape":
        if not rest or attrs.get("allowzero", 0):
            return None
        shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(rest[0].tolist())]
        return x.reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = rest[0].tolist() if rest else attrs.get("axes")
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
        out = x
        for a in sorted(int(a) % (x.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Expand":  # folded only when it adds no elements (a broadcast that would grow the file stays)
        shape = np.broadcast_shapes(x.shape, tuple(int(d) for d in rest[0].tolist())) if rest else None
        return None if shape is None or int(np.prod(shape)) != x.size else np.broadcast_to(x, shape).copy()
    if op == "Flatten":
        axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    return None


def _count(model: Any) -> int:
    return sum(1 for _ in model.graph)
