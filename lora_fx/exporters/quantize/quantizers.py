"""Quantized deployment: fold in fp32, then quantize with ONNX Runtime's own tools, and prove it.

``fold_and_export(lgm, "task4.onnx", quantize="int4")`` writes and verifies the fp32 folded export
and the fp32 base export as usual, then quantizes both the same way:

* ``int4``: weight-only, ``MatMulNBits`` (``onnxruntime.quantization.matmul_nbits_quantizer``):
  per block of ``block_size`` input rows ``q = clamp(round(w / s) + z, 0, 15)``, ``w ~ s·(q - z)``,
  symmetric (``z = 8``, ``s = max|w| / 8``) or asymmetric (``s = (max - min) / 15``). By default the
  output heads (:func:`output_heads`, e.g. the LM head) get 8 bits (``head_bits``) and the embedding
  ``Gather`` becomes ``GatherBlockQuantized`` (4 bits, same blocks), so a tied embedding is stored
  as int4 rows for the lookup and 8-bit columns for the logits instead of fp32.
* ``int8``: ``quantize_dynamic`` (``MatMulInteger`` with weights quantized per output channel and
  activations quantized at run time), or ``int8_method="weight_only"``: ``MatMulNBits`` with 8 bits.

The quantizers convert a MatMul only when its weight is an initializer; the dynamo exporter's
unoptimized graph reads ``linear`` weights as ``MatMul(x, Transpose(W))`` and ``addmm`` as ``Gemm``.
:func:`prepare` rewrites those into ``MatMul(x, W')`` with ``W'`` a stored initializer, a rewrite
that depends on the graph only, never on weight values, so base and task stay structurally equal.

The proof: ``compare_structure(quantized base, quantized task)`` must pass, and every quantized
initializer that differs must be derived from an fp32 initializer the fold changed (``W_Q4``,
``W_scales``, ``W_zero_points``, ``W_quantized``...). The report gives, on the example inputs and a
larger batch, the error of the quantized task against the unmerged fp32 LoRA model and of the
quantized base against the fp32 base (relative RMS ``||y_q - y||_2 / ||y||_2`` and relative max), so the
fold's own cost is ``task_err / base_err``.
"""

from __future__ import annotations

import fnmatch
import logging
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import ExportError
from .. import files
from ..format import QUANTIZE_KEY  # the quantization settings, stored in the file for refold
from .config import QuantizeConfig, QuantizeInfo, as_config

__all__ = ["output_heads", "prepare", "quantize_file"]

def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Puts every weight that reaches a MatMul/Gemm through a Transpose, or a Gemm, in MatMul form.

    ``MatMul(x, Transpose(W, perm=[1, 0]))`` becomes ``MatMul(x, W_T)`` with ``W_T = Wᵀ`` stored
    (``W`` is dropped when nothing else reads it); ``Gemm(x, W, c)`` with
    ``alpha = beta = 1``, ``transA = 0`` becomes ``Add(MatMul(x, W or Wᵀ), c)``. Depends on the graph
    only, so two exports of one graph with different weights prepare to one graph. External data
    must be loaded. Returns a new model and the number of rewritten nodes.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    transposed: dict[str, str] = {}  # weight -> name of its stored transpose
    new_nodes, rewrites, dead = [], 0, set()

    def stored_transpose(w: str) -> str:
        if w not in transposed:
            name = f"{w}_T"
            if name in inits:
                raise ExportError(f"prepare: the graph already has an initializer {name!r}; cannot store {w}ᵀ")
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(), name))
            transposed[w] = name
        return transposed[w]

    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in producer:
            t = producer[node.input[1]]
            w = t.input[0] if t.op_type == "Transpose" else None
            attrs = {a.name: helper.get_attribute_value(a) for a in t.attribute}
            if w in inits and len(inits[w].dims) == 2 and list(attrs.get("perm", [1, 0])) == [1, 0] \
                    and readers.get(t.output[0]) == 1:
                node.input[1] = stored_transpose(w)
                dead.add(id(t))
                rewrites += 1
        if node.op_type == "Gemm" and node.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
                w = stored_transpose(node.input[1]) if attrs.get("transB", 0) else node.input[1]
                out = node.output[0]
                has_bias = len(node.input) > 2 and node.input[2]
                mm_out = f"{out}_matmul" if has_bias else out
                new_nodes.append(helper.make_node("MatMul", [node.input[0], w], [mm_out], name=node.name))
                if has_bias:
                    new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_bias"))
                rewrites += 1
                continue
        new_nodes.append(node)
    kept = [n for n in new_nodes if id(n) not in dead]
    del graph.value_info[:]  # stale for the rewritten weights; the quantizers infer shapes again
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return model, rewrites


def quantize_file(src: str, dst: str, cfg: QuantizeConfig, *, external_data: bool = False) -> QuantizeInfo:
    """Quantizes the fp32 ONNX file ``src`` into ``dst`` with ONNX Runtime's quantizers (see module doc).

    Raises:
        ExportError: the quantizer failed, or quantized nothing (names the ops it looked for).
    """
    cfg = as_config(cfg)  # resolves ops=None to the scheme's default
    model, rewrites = prepare(onnx.load(src))
    exclude = _excluded_nodes(model, cfg)
    heads = [h for h in output_heads(model) if h not in exclude] if "MatMul" in cfg.ops else []
    # the quantizers log one INFO line per node (quantize_dynamic on the root logger)
    quiet = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer", "")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        if cfg.nbits:
            with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero embedding block: scale 0, q 0
                out = _nbits_passes(model, cfg, exclude, heads)
        else:
            out = _dynamic_int8(model, dst, cfg, exclude + (heads if cfg.head_bits == 32 else []))
    except ExportError:
        raise
    except Exception as e:  # the quantizers raise assorted errors on graphs they do not expect
        raise ExportError(f"ONNX Runtime's {cfg.scheme} quantizer failed on {src}: {type(e).__name__}: {e}") from e
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    counts: dict[str, int] = {}
    for n in out.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    if not counts:
        raise ExportError(f"{cfg.scheme}: no {list(cfg.ops)} node of {src} has an initializer weight to quantize "
                          f"(after excluding {list(cfg.exclude)}); nothing would change")
    del out.metadata_props[:]
    out.metadata_props.add(key=QUANTIZE_KEY, value=cfg.to_json())
    if external_data:
        onnx.save_model(out, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(dst) + ".data", size_threshold=1024)
    else:
        onnx.save_model(out, dst)
    return QuantizeInfo(dst, cfg, rewrites, counts, files.file_bytes(src), files.file_bytes(dst), heads)


def _nbits_passes(model: onnx.ModelProto, cfg: QuantizeConfig, exclude: list[str],
                  heads: list[str]) -> onnx.ModelProto:
    """MatMulNBits / GatherBlockQuantized, one ORT quantizer pass per bit width and algorithm.

    8-bit heads first (int4 with ``head_bits=8``), then the embedding Gathers (always round to
    nearest: ORT's HQQ does not take Gather), then every other MatMul with ``cfg.algorithm``. A
    node quantized once is no MatMul/Gather any more, so later passes leave it alone.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = 4 if cfg.scheme == "int4" else 8

    def run(m: onnx.ModelProto, nbits: int, ops: tuple[str, ...], skip: list[str], algo=None) -> onnx.ModelProto:
        q = MatMulNBitsQuantizer(m, bits=nbits, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=skip,
                                 op_types_to_quantize=ops, algo_config=algo)
        q.process()
        return q.model.model

    if heads and cfg.scheme == "int4" and cfg.head_bits == 8:
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in heads]
        model = run(model, 8, ("MatMul",), others)
    if "Gather" in cfg.ops:
        gathers = [n.name for n in model.graph.node if n.op_type == "Gather"]
        skip = set(exclude) | set(gathers) - set(_quantizable_gathers(model))
        if len(skip & set(gathers)) < len(gathers):
            model = run(model, 4, ("Gather",), sorted(skip))
    if "MatMul" in cfg.ops:
        algo = HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4) if cfg.algorithm == "hqq" else None
        model = run(model, bits, ("MatMul",), exclude + (heads if cfg.head_bits == 32 else []), algo)
    return model


def _quantizable_gathers(model: onnx.ModelProto) -> list[str]:
    """Gathers of a 2-D float initializer (embeddings); ORT's Gather quantizer asserts on others."""
    floats = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type in
              (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in floats]


_THROUGH = {"Reshape", "Cast", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Tanh"}
_WITH_CONSTANT = {"Add", "Sub", "Mul", "Div"}


def output_heads(model: onnx.ModelProto) -> list[str]:
    """Names of the output heads: MatMul nodes with an initializer weight whose result reaches a graph
    output through layout ops and elementwise ops with a constant (a bias ``Add``, a soft-cap
    ``Div/Tanh/Mul``) only: an LM head's logits, a classifier. Graph-only, in graph order."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    heads, seen, todo = set(), set(), [o.name for o in graph.output]
    while todo:
        value = todo.pop()
        if value in seen or value not in producer:
            continue
        seen.add(value)
        node = producer[value]
        if node.op_type == "MatMul" and node.input[1] in constants:
            heads.add(node.name)
        elif node.op_type in _THROUGH:
            todo.append(node.input[0])
        elif node.op_type in _WITH_CONSTANT:
            data = [i for i in node.input if i not in constants]
            todo += data if len(data) == 1 else []
    return [n.name for n in graph.node if n.name in heads]


def _dynamic_int8(model: onnx.ModelProto, dst: str, cfg: QuantizeConfig, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst + ".prepared.onnx"
    onnx.save_model(model, tmp)
    try:
        quantize_dynamic(tmp, dst, op_types_to_quantize=list(cfg.ops), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
        return onnx.load(dst)
    finally:
        os.remove(tmp)


def _excluded_nodes(model: onnx.ModelProto, cfg: QuantizeConfig) -> list[str]:
    """Names of the nodes whose weight matches an ``exclude`` pattern (the quantizers exclude by node)."""
    if not cfg.exclude:
        return []
    out = [n.name for n in model.graph.node for i in n.input[:2]
           if any(fnmatch.fnmatchcase(i, p) or fnmatch.fnmatchcase(i.removesuffix("_T"), p) for p in cfg.exclude)]
    if not out:
        names = sorted({t.name for t in model.graph.initializer if len(t.dims) == 2})[:8]
        raise ExportError(f"exclude={list(cfg.exclude)} matches no weight read by a node; 2-D weights are e.g. {names}")
    return out
