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

import dataclasses
import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..._text import plural
from ...errors import ExportError
from .. import files
from ..format import QUANTIZE_KEY  # the quantization settings, stored in the file for refold

__all__ = ["QuantizeConfig", "QuantizeReport", "as_config", "output_heads", "prepare", "quantize_file",
           "read_config"]

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
    allowed = {"MatMul", "Gather"} if _nbits(cfg) else {"MatMul"}
    if not cfg.ops or set(cfg.ops) - allowed:
        raise ExportError(f"ops={cfg.ops} for {cfg.scheme} ({cfg.int8_method if cfg.scheme == 'int8' else 'MatMulNBits'}): "
                          f"quantizable op types are {sorted(allowed)}")
    return cfg


def _nbits(cfg: QuantizeConfig) -> bool:
    return cfg.scheme == "int4" or cfg.int8_method == "weight_only"


def read_config(model: onnx.ModelProto) -> QuantizeConfig | None:
    """The settings a file was quantized with (stored by :func:`quantize_file`), or None."""
    for p in model.metadata_props:
        if p.key == QUANTIZE_KEY:
            stored = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(p.value).items()}
            stored.setdefault("head_bits", 4 if stored.get("scheme") == "int4" else 8)  # files from before head_bits
            return QuantizeConfig(**stored)
    return None


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
        if _nbits(cfg):
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
        how = (f"block {c.block_size}, {'symmetric' if c.symmetric else 'asymmetric'}" if _nbits(c)
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
