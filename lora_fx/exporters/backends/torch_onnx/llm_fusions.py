"""Decoder fusions: a KV-cache LLM's attention, rotary and RMSNorm as single ONNX Runtime ops.

The dynamo export spells a Llama-style layer out in about 80 nodes (RMSNorm as Pow/ReduceMean/Add/Sqrt/
Reciprocal/Mul/Mul, rotary as Mul/Slice/Slice/Neg/Concat/Mul/Add per q and k, grouped-query keys and
values repeated by Unsqueeze/Expand/Reshape before attention); at batch 1 decode ONNX Runtime's cost per
node is most of a step. :func:`fuse_decoder` rewrites, on a graph exported at opset >= 23 (where torch's
exporter writes ``scaled_dot_product_attention`` as the ONNX ``Attention`` op):

* RMSNorm -> ``SimplifiedLayerNormalization``, residual add + RMSNorm -> ``SkipSimplifiedLayerNormalization``
  (onnxscript's ORT fusions, ``rms_normalization`` / ``skip_normalization``);
* ``x * cos + rotate_half(x) * sin`` with Hugging Face's ``cos = Unsqueeze(Cos(Concat(f, f)))`` -> the ONNX
  ``RotaryEmbedding`` op on ``Cos(f)`` / ``Sin(f)`` (the caches per batch row and position, so positions
  from a left-padded mask stay the model's own);
* ``Attention(q, repeat_kv(k), repeat_kv(v), mask)`` -> ``Attention(q, k, v, mask)``: the op groups query
  heads over key/value heads itself (head ``h`` reads key/value head ``h // (Hq / Hkv)``, as ``repeat_kv``).

Left padding keeps working: the mask still reaches ``Attention`` as the boolean ``[B, 1, S, T]`` tensor the
model built, unlike ``GroupQueryAttention``, which reads a mask as row lengths (right padding only).

The rules match op types, constant attributes and static shapes only; :func:`fuse_decoder` runs with the
weights' values hidden (``optimize._hidden``), so base and folded exports fuse alike and the structural
proof holds. A pattern that does not match (partial rotary, a scaled rotary table, MHA without
repetition) stays as exported.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["DECODER_OPSET", "fuse_decoder"]

DECODER_OPSET = 23  # ONNX Attention / RotaryEmbedding / RMSNormalization


def fuse_decoder(model: Any) -> dict[str, int]:
    """Rewrites the decoder patterns above in an ``onnx_ir.Model`` in place; returns counts per fusion."""
    import onnx_ir.passes.common as common
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    counts = {"SimplifiedLayerNormalization": fuse_rms_normalization(model)}
    counts["SkipSimplifiedLayerNormalization"] = fuse_skip_rms_normalization(model)
    if model.opset_imports.get("", 0) >= DECODER_OPSET:
        rules = _rules()
        counts["RotaryEmbedding"] = rules["rotary"].apply_to_model(model)
        counts["Attention (grouped kv)"] = rules["gqa"].apply_to_model(model)
        counts["Attention (3-D, past inside)"] = _attention_3d(model)
    if any(counts.values()):
        if "com.microsoft" not in model.opset_imports and any(n.domain == "com.microsoft" for n in model.graph):
            model.opset_imports["com.microsoft"] = 1
        removal = logging.getLogger("onnx_ir.passes.common.unused_removal")
        level = removal.level
        removal.setLevel(logging.WARNING)  # it logs each ORT op it has no schema for, with a stack, at INFO
        try:
            common.RemoveUnusedNodesPass()(model)
        finally:
            removal.setLevel(level)
        common.CommonSubexpressionEliminationPass()(model)  # one Cos(f) / Sin(f) for every layer
    return counts


def _attention_3d(model: Any) -> int:
    """``Attention`` on ``[B, S, H*D]`` projections with the cache concatenated inside (ONNX Attention's
    ``past_key`` / ``past_value`` inputs and ``present`` outputs): the per-head Reshape/Transpose of q, k, v
    and of the output, and the cache's Concat, go (8 to 10 nodes per layer). Applied where every piece has
    the exported form: ``Transpose(Reshape(x))`` (optionally through a RotaryEmbedding, rewritten to its
    3-D form), keys/values ``Concat(past, new, axis=2)``, the output ``Reshape(Transpose(y))`` to 3-D."""
    import onnx_ir as ir

    done = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 4 \
                or "q_num_heads" in node.attributes or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            continue
        q, (past_k, k), (past_v, v) = _heads(node.inputs[0]), _cached(node.inputs[1]), _cached(node.inputs[2])
        out = _merged(node.outputs[0])
        if q is None or k is None or v is None or out is None or v[3] is not None or q[2] != k[2] or k[1] != v[1]:
            continue
        if out.shape is None or out.shape[-1] != q[1] * q[2]:
            continue
        new: list = []
        attrs = {a.name: a.value for a in node.attributes.values()} | {"q_num_heads": q[1], "kv_num_heads": k[1]}
        fused = ir.node("Attention", [_flat(q, new), _flat(k, new), v[0], node.inputs[3], past_k, past_v], attrs,
                        num_outputs=3)
        model.graph.insert_before(node, [*new, fused])
        for old, value in zip((out, node.inputs[1], node.inputs[2]), fused.outputs, strict=True):
            name, old.name = old.name, None
            old.replace_all_uses_with(value, replace_graph_outputs=True)
            value.name, value.shape, value.type = name, old.shape, old.type
        done += 1
    return done


def _flat(heads: tuple, new: list) -> Any:
    """The 3-D input of ``heads`` (``_heads``' tuple): its source, or a 3-D RotaryEmbedding of it (appended
    to ``new``)."""
    import onnx_ir as ir

    source, n, _, rotary = heads
    if rotary is None:
        return source
    attrs = {a.name: a.value for a in rotary.attributes.values()} | {"num_heads": n}
    new.append(ir.node("RotaryEmbedding", [source, *rotary.inputs[1:]], attrs))
    return new[-1].outputs[0]


def _heads(value: Any) -> tuple | None:
    """``(x, heads, head_dim, rotary node or None)`` when ``value`` is ``[RotaryEmbedding](Transpose(Reshape(x),
    perm=[0, 2, 1, 3]))`` with ``x`` ``[B, S, heads * head_dim]``, read only by this chain; else None."""
    node = value.producer()
    rotary = None
    if node is not None and node.op_type == "RotaryEmbedding" and "num_heads" not in node.attributes \
            and len(node.inputs) == 3 and len(value.uses()) == 1:
        rotary, value = node, node.inputs[0]
        node = value.producer()
    if node is None or node.op_type != "Transpose" or len(value.uses()) != 1 \
            or list(node.attributes["perm"].value) != [0, 2, 1, 3]:
        return None
    split = node.inputs[0]
    reshape = split.producer()
    if reshape is None or reshape.op_type != "Reshape" or len(split.uses()) != 1:
        return None
    x, shape = reshape.inputs[0], split.shape
    if x.shape is None or len(x.shape) != 3 or shape is None or len(shape) != 4 \
            or not all(isinstance(d, int) for d in (shape[2], shape[3], x.shape[2])) or shape[2] * shape[3] != x.shape[2]:
        return None
    return x, shape[2], shape[3], rotary


def _cached(value: Any) -> tuple[Any, tuple | None]:
    """``(past, _heads(new))`` when ``value`` is ``Concat(past, new, axis=2)`` read only by this attention."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or len(value.uses()) != 1 \
            or node.attributes["axis"].value not in (2, -2):
        return None, None
    return node.inputs[0], _heads(node.inputs[1])


def _merged(value: Any) -> Any:
    """The ``[B, S, heads * head_dim]`` value when ``value`` ``[B, H, S, D]`` is only read by
    ``Reshape(Transpose(value, perm=[0, 2, 1, 3]))`` to 3-D; else None."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != "Transpose" or list(node.attributes["perm"].value) != [0, 2, 1, 3]:
        return None
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Reshape" or node.outputs[0].is_graph_output():
        return None
    out = uses[0].node.outputs[0]
    return out if out.shape is not None and len(out.shape) == 3 and isinstance(out.shape[2], int) else None


def _ints(value: Any) -> list[int] | None:
    """The constant int tensor behind ``value`` as a list, or None."""
    const = None if value is None else value.const_value
    if const is None:
        return None
    return [int(v) for v in const.numpy().reshape(-1).tolist()]


_RULES: dict[str, Any] = {}


def _rules() -> dict[str, Any]:
    """The two rewrite rule sets, built once (onnxscript imported on first use)."""
    if _RULES:
        return _RULES
    from onnxscript.rewriter import pattern

    class Rotary(pattern.RewriteRuleClassBase):
        """``x * Unsqueeze(Cos(cat(f, f))) + cat(-x2, x1) * Unsqueeze(Sin(cat(f, f)))``, ``x`` [B, H, S, D]."""

        def __init__(self) -> None:
            super().__init__("Rotary", remove_nodes=False)  # the cos/sin tables are shared by every layer

        def pattern(self, op, x, freqs, axes_c, axes_s, start1, end1, start2, end2, axis1, axis2, step1, step2):
            emb = op.Concat(freqs, freqs, axis=-1)
            cos = op.Unsqueeze(op.Cos(emb), axes_c)
            sin = op.Unsqueeze(op.Sin(emb), axes_s)
            x1 = op.Slice(x, start1, end1, axis1, step1)
            x2 = op.Slice(x, start2, end2, axis2, step2)
            return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(x2), x1, axis=-1), sin))

        def check(self, context, x, freqs, axes_c, axes_s, start1, end1, start2, end2, axis1, axis2, step1,
                  step2, **_) -> Any:
            result = pattern.MatchResult()
            shape = x.shape
            if shape is None or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] % 2:
                return result.fail("x is not [B, H, S, D] with a static even D", x)
            half = shape[3] // 2
            fshape = freqs.shape
            if fshape is None or len(fshape) != 3 or fshape[2] != half:
                return result.fail("the rotary angles are not [B, S, D/2]", freqs)
            if _ints(axes_c) != [1] or _ints(axes_s) != [1]:
                return result.fail("cos/sin are not unsqueezed at the head axis", axes_c)
            ends = _ints(end2)
            if (_ints(start1), _ints(end1), _ints(start2)) != ([0], [half], [half]) or not ends or ends[0] < 2 * half:
                return result.fail("x is not split into two halves", x)
            if _ints(axis1) not in ([3], [-1]) or _ints(axis2) not in ([3], [-1]) \
                    or _ints(step1) != [1] or _ints(step2) != [1]:
                return result.fail("the halves are not sliced along the head dim", x)
            return result

        def rewrite(self, op, x, freqs, **_):
            return op.RotaryEmbedding(x, op.Cos(freqs), op.Sin(freqs), interleaved=0)

    class UnrepeatedKV(pattern.RewriteRuleClassBase):
        """``Attention(q, repeat_kv(k), repeat_kv(v), mask)``: repeat_kv = Reshape(Expand(Unsqueeze(., 2)))."""

        def pattern(self, op, q, k, v, mask, ak, av, ek, ev, rk, rv):
            kr = op.Reshape(op.Expand(op.Unsqueeze(k, ak), ek), rk, _allow_other_attributes=True)
            vr = op.Reshape(op.Expand(op.Unsqueeze(v, av), ev), rv, _allow_other_attributes=True)
            return op.Attention(q, kr, vr, mask, _allow_other_attributes=True, _outputs=["y"])

        def check(self, context, q, k, v, ak, av, y, **_) -> Any:
            result = pattern.MatchResult()
            if _ints(ak) != [2] or _ints(av) != [2]:
                return result.fail("not a repetition at the head axis", k)
            shapes = [t.shape for t in (q, k, v)]
            if any(s is None or len(s) != 4 or not isinstance(s[1], int) for s in shapes):
                return result.fail("q, k, v are not [B, H, S, D] with static heads", q)
            node = y.producer()
            repeated = [node.inputs[1].shape, node.inputs[2].shape]
            hq, hk, hv = (s[1] for s in shapes)
            if hk != hv or hq % hk or any(s is None or len(s) != 4 or s[1] != hq for s in repeated):
                return result.fail("keys/values are not repeated to the query heads", k)
            if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
                return result.fail("Attention's present/qk outputs are read", y)
            if any(a in node.attributes for a in ("q_num_heads", "kv_num_heads")):
                return result.fail("Attention with 3-D inputs", y)
            return result

        def rewrite(self, op, q, k, v, mask, y, **_):
            attrs = {name: a.value for name, a in y.producer().attributes.items()}
            return op.Attention(q, k, v, mask, **attrs)

    _RULES["rotary"] = pattern.RewriteRuleSet([Rotary.rule()], commute=True)
    _RULES["gqa"] = pattern.RewriteRuleSet([UnrepeatedKV.rule()])
    return _RULES
