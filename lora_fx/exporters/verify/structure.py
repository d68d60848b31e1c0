"""Prove that two ONNX graphs are the same graph, up to initializer values.

``compare_structure(base, task)`` checks, in this order: opset imports; graph inputs and outputs by
position (names, element types, shapes with symbolic dims read as ``dynamic``); every node (op type,
domain, attributes, and which value feeds each input); the initializer table (names, shapes,
dtypes); local functions. Values are compared under a canonical renaming, so exports that name
their intermediates differently still match: a graph input is its position, an initializer its name,
an intermediate value the (node index, output index) that produces it. Subgraphs of If/Loop/Scan are
compared the same way, recursively, with outer-scope names resolved through the enclosing graph.

Only initializer values may differ; those that do are listed in ``changed_initializers``. Bytes are
compared as stored (``raw_data`` or the external data file, read in chunks) so a 124M-parameter
graph is checked without building numpy copies of its weights.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import ChainMap
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from lora_fx._text import plural
from lora_fx.errors import VerifyError

from .. import files

__all__ = ["StructureReport", "compare_structure"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
Canon = tuple[Any, ...]


@dataclass
class StructureReport:
    """Outcome of :func:`compare_structure`.

    Attributes:
        ok: The graphs are identical except for initializer values.
        base_nodes: Nodes in the base main graph.
        task_nodes: Nodes in the task main graph.
        changed_initializers: Task initializers whose values differ from base (aliases included);
            complete only when ``ok`` (the scan stops at the first structural difference).
        added_initializers: Task initializers accepted through ``aliases``.
        first_difference: The first structural difference, or None when ``ok``.
        by_construction: ``ok`` was proven without a base file: the task was exported from a weightless
            skeleton equal to the base model's (``exporters.backends.torch_onnx.streaming.SkeletonSpec``), so a base export
            is this graph with the base weights; ``changed_initializers`` are then the adapted ones.
    """

    ok: bool
    base_nodes: int
    task_nodes: int
    changed_initializers: list[str] = field(default_factory=list)
    added_initializers: list[str] = field(default_factory=list)
    first_difference: str | None = None
    by_construction: bool = False
    unchanged: bool = False  # the adapted initializers hold their base values (every LoRA delta is zero)

    def __str__(self) -> str:
        if self.ok and self.by_construction:
            lines = [f"ONNX structure identical to the base export by construction: {self.base_nodes} nodes "
                     "(exported from a weightless skeleton equal to the base model's: same graph, same tensor "
                     "names, shapes and dtypes; no weight value reaches the exporter or the optimizer)"]
        elif self.ok:
            lines = [f"ONNX structure identical: {self.base_nodes} nodes"]
        else:
            lines = [f"ONNX structure differs (base {self.base_nodes} nodes, task {self.task_nodes} nodes): {self.first_difference}"]
        if self.added_initializers:
            lines.append(f"aliased initializers: {_short(self.added_initializers)}")
        changed = self.changed_initializers
        if self.ok:  # after a structural difference the value scan stopped early: do not print a count
            if self.by_construction and self.unchanged:
                what = f"{plural(len(changed), 'adapted initializer')} unchanged (the adapter is all zero)"
            else:
                what = f"{plural(len(changed), 'initializer')} {'adapted' if self.by_construction else 'changed'}"
            lines.append(what + (f": {_short(changed)}" if changed else ""))
        return "\n".join(lines)


def _short(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class _Differ(Exception):
    """Internal: carries the first difference out of the recursive walk."""


def compare_structure(
    base: str | os.PathLike[str] | onnx.ModelProto,
    task: str | os.PathLike[str] | onnx.ModelProto,
    *,
    aliases: dict[str, str] | None = None,
) -> StructureReport:
    """Compare two ONNX models: same graph, possibly different initializer values.

    Example::

        rep = compare_structure("base.onnx", "task.onnx", aliases={"lm_head.weight_folded": "lm_head.weight"})
        assert rep.ok, rep.first_difference

    Args:
        base: The reference model, a path or a ModelProto.
        task: The model to check, a path or a ModelProto. Pass paths for models with external data:
            a ModelProto does not know where its data file is.
        aliases: Task-only initializer name -> the base initializer it stands for (a tied weight
            split into its own copy). It matches the base name in topology, is reported in
            ``added_initializers``, and in ``changed_initializers`` when its value differs.

    Returns:
        A :class:`StructureReport`; a structural difference is a report with ``ok=False``.

    Raises:
        VerifyError: A file cannot be read, external data cannot be located, or an alias names an
            initializer that is not task-only or a base initializer that does not exist.
    """
    base_proto, base_dir = _load(base)
    task_proto, task_dir = _load(task)
    aliases = dict(aliases or {})
    base_inits = {t.name: t for t in base_proto.graph.initializer}
    task_inits = {t.name: t for t in task_proto.graph.initializer}
    for alias, target in aliases.items():
        if alias not in task_inits or alias in base_inits:
            raise VerifyError(f"alias {alias!r} must name an initializer present only in the task model; task-only initializers: {sorted(set(task_inits) - set(base_inits))[:10]}")
        if target not in base_inits:
            raise VerifyError(f"alias {alias!r} -> {target!r}: the base model has no initializer {target!r}")
    report = StructureReport(
        ok=True, base_nodes=len(base_proto.graph.node), task_nodes=len(task_proto.graph.node),
        added_initializers=[n for n in task_inits if n in aliases],
    )
    with files.DataFiles(base_dir, error=VerifyError) as base_data, \
            files.DataFiles(task_dir, error=VerifyError) as task_data:
        walker = _Walker(base_data, task_data, aliases)
        try:
            walker.opsets(base_proto, task_proto)
            walker.graph(base_proto.graph, task_proto.graph, {}, {}, "graph", top=True)
            walker.functions(base_proto, task_proto)
        except _Differ as diff:
            report.ok = False
            report.first_difference = str(diff)
        report.changed_initializers = walker.changed
    return report


def _load(source: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The ModelProto without external weights loaded, and the folder its data files live in."""
    if isinstance(source, onnx.ModelProto):
        return source, None
    return files.load(source, error=VerifyError)


def _same_bytes(a: bytes | Iterator[bytes], b: bytes | Iterator[bytes]) -> bool:
    """Compare stored bytes; external data streams of equal length arrive in equal chunks."""
    if isinstance(a, bytes) or isinstance(b, bytes):
        return _whole(a) == _whole(b)
    return all(x == y for x, y in itertools.zip_longest(a, b))


def _whole(data: bytes | Iterator[bytes]) -> bytes:
    return data if isinstance(data, bytes) else b"".join(data)


def _type_desc(value: onnx.ValueInfoProto) -> str:
    """Element type and shape of a graph input/output, symbolic dims read as 'dynamic'."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return f"{kind}: {value.type.SerializeToString(deterministic=True).hex()}"
    tensor_type = value.type.tensor_type
    elem = TensorProto.DataType.Name(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return f"{elem}[unknown rank]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else "dynamic" for d in tensor_type.shape.dim]
    return f"{elem}[{', '.join(dims)}]"


def _spec(tensor: TensorProto) -> str:
    return f"{TensorProto.DataType.Name(tensor.data_type)}{list(tensor.dims)}"


def _describe(canon: Canon) -> str:
    kind = canon[0]
    if kind == "init":
        return f"initializer {canon[1]!r}"
    if kind == "input":
        return f"input {canon[2]} of {canon[1]}"
    if kind == "node":
        return f"output {canon[3]} of {canon[1]} node {canon[2]}"
    if kind == "none":
        return "no value (optional input left empty)"
    return f"undefined name {canon[1]!r}"


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


class _Walker:
    """Walks both models in lockstep; raises _Differ at the first difference."""

    def __init__(self, base_bytes: files.DataFiles, task_bytes: files.DataFiles, aliases: dict[str, str]) -> None:
        self.base_bytes = base_bytes
        self.task_bytes = task_bytes
        self.aliases = aliases
        self.changed: list[str] = []

    def opsets(self, base: onnx.ModelProto, task: onnx.ModelProto) -> None:
        b = sorted((o.domain or "ai.onnx", o.version) for o in base.opset_import)
        t = sorted((o.domain or "ai.onnx", o.version) for o in task.opset_import)
        if b != t:
            raise _Differ(f"opset imports differ: base {b}, task {t}")

    def graph(self, base: onnx.GraphProto, task: onnx.GraphProto, base_outer: MutableMapping[str, Canon],
              task_outer: MutableMapping[str, Canon], where: str, top: bool = False) -> None:
        """Compare two graphs; ``*_outer`` resolve names of enclosing graphs (subgraphs only)."""
        self._io("input", base.input, task.input, where, names=top)
        # Output names come from the producing nodes: check them after the nodes, so that a changed
        # topology is reported at its first differing node rather than as a renamed output.
        self._io("output", base.output, task.output, where, names=False)
        base_env: MutableMapping[str, Canon] = ChainMap({}, base_outer)
        task_env: MutableMapping[str, Canon] = ChainMap({}, task_outer)
        aliases = self.aliases if top else {}
        for t in base.initializer:
            base_env[t.name] = ("init", t.name)
        for t in task.initializer:
            task_env[t.name] = ("init", aliases.get(t.name, t.name))
        # Graph inputs shadow initializers of the same name (IR < 4 models list weights as inputs).
        for i, (b, t) in enumerate(zip(base.input, task.input, strict=True)):
            base_env[b.name] = task_env[t.name] = ("input", where, i)
        self.nodes(base.node, task.node, base_env, task_env, where)
        for i, (b, t) in enumerate(zip(base.output, task.output, strict=True)):
            cb, ct = self._canon(base_env, b.name), self._canon(task_env, t.name)
            if cb != ct:
                raise _Differ(f"{where} output {i} ({b.name!r}) is {_describe(cb)} in base but {_describe(ct)} in task")
            if top and b.name != t.name:
                raise _Differ(f"{where} output {i} is named {b.name!r} in base but {t.name!r} in task (same producer)")
        self._initializers(base, task, aliases, where)

    def _io(self, kind: str, base: Any, task: Any, where: str, names: bool) -> None:
        """Inputs/outputs by position; names count only for the main graph (subgraph names are internal)."""
        if len(base) != len(task):
            raise _Differ(f"{where} has {len(base)} {kind}s in base but {len(task)} in task: {[v.name for v in base]} vs {[v.name for v in task]}")
        for i, (b, t) in enumerate(zip(base, task, strict=True)):
            if (names and b.name != t.name) or _type_desc(b) != _type_desc(t):
                raise _Differ(f"{where} {kind} {i} differs: base {b.name!r} {_type_desc(b)}, task {t.name!r} {_type_desc(t)}")

    @staticmethod
    def _canon(env: MutableMapping[str, Canon], name: str) -> Canon:
        if not name:
            return ("none",)
        return env.get(name, ("free", name))

    def nodes(self, base: Any, task: Any, base_env: MutableMapping[str, Canon],
              task_env: MutableMapping[str, Canon], where: str) -> None:
        for idx, (b, t) in enumerate(zip(base, task, strict=False)):
            at = f"{where} node {idx}: base {b.op_type} {b.name!r} vs task {t.op_type} {t.name!r}"
            if (b.op_type, b.overload) != (t.op_type, t.overload):
                raise _Differ(f"{at}: op type differs")
            if (b.domain or "ai.onnx") != (t.domain or "ai.onnx"):
                raise _Differ(f"{at}: domain {b.domain!r} in base vs {t.domain!r} in task")
            if len(b.input) != len(t.input) or len(b.output) != len(t.output):
                raise _Differ(f"{at}: {len(b.input)} inputs/{len(b.output)} outputs in base, {len(t.input)}/{len(t.output)} in task")
            for k, (bi, ti) in enumerate(zip(b.input, t.input, strict=True)):
                cb, ct = self._canon(base_env, bi), self._canon(task_env, ti)
                if cb != ct:
                    raise _Differ(f"{at}: input {k} is {_describe(cb)} in base but {_describe(ct)} in task")
            self._attributes(b, t, base_env, task_env, at, f"{where} node {idx} ({b.op_type})")
            for k, (bo, to) in enumerate(zip(b.output, t.output, strict=True)):
                if bo:
                    base_env[bo] = ("node", where, idx, k)
                if to:
                    task_env[to] = ("node", where, idx, k)
        if len(base) != len(task):
            idx = min(len(base), len(task))
            extra, side = (base[idx], "base") if len(base) > len(task) else (task[idx], "task")
            raise _Differ(f"{where} has {len(base)} nodes in base but {len(task)} in task; first extra node {idx} in {side}: {extra.op_type} {extra.name!r}")

    def _attributes(self, b: onnx.NodeProto, t: onnx.NodeProto, base_env: MutableMapping[str, Canon],
                    task_env: MutableMapping[str, Canon], at: str, where: str) -> None:
        b_attrs = {a.name: a for a in b.attribute}
        t_attrs = {a.name: a for a in t.attribute}
        if set(b_attrs) != set(t_attrs):
            raise _Differ(f"{at}: attributes {sorted(b_attrs)} in base vs {sorted(t_attrs)} in task")
        for name in sorted(b_attrs):
            ba, ta = b_attrs[name], t_attrs[name]
            if ba.type != ta.type or ba.ref_attr_name != ta.ref_attr_name:
                raise _Differ(f"{at}: attribute {name!r} has a different type or reference")
            if ba.type == AttributeProto.GRAPH:
                self.graph(ba.g, ta.g, base_env, task_env, f"{where} attribute {name!r}")
            elif ba.type == AttributeProto.GRAPHS:
                if len(ba.graphs) != len(ta.graphs):
                    raise _Differ(f"{at}: attribute {name!r} holds {len(ba.graphs)} vs {len(ta.graphs)} graphs")
                for j, (bg, tg) in enumerate(zip(ba.graphs, ta.graphs, strict=True)):
                    self.graph(bg, tg, base_env, task_env, f"{where} attribute {name!r}[{j}]")
            elif not self._same_attr_value(ba, ta):
                raise _Differ(f"{at}: attribute {name!r} differs: base {_attr_text(ba)}, task {_attr_text(ta)}")

    def _same_attr_value(self, b: AttributeProto, t: AttributeProto) -> bool:
        kind = b.type
        if kind == AttributeProto.FLOAT:
            return _same_float(b.f, t.f)
        if kind == AttributeProto.FLOATS:
            return len(b.floats) == len(t.floats) and all(map(_same_float, b.floats, t.floats))
        if kind == AttributeProto.TENSOR:
            return self._same_tensor(b.t, t.t)
        if kind == AttributeProto.TENSORS:
            return len(b.tensors) == len(t.tensors) and all(map(self._same_tensor, b.tensors, t.tensors))
        # ints, strings, sparse tensors, type protos: plain message equality is exact.
        return onnx.helper.get_attribute_value(b) == onnx.helper.get_attribute_value(t)

    def _same_tensor(self, b: TensorProto, t: TensorProto) -> bool:
        return _spec(b) == _spec(t) and _same_bytes(self.base_bytes.chunks(b), self.task_bytes.chunks(t))

    def _initializers(self, base: onnx.GraphProto, task: onnx.GraphProto, aliases: dict[str, str], where: str) -> None:
        """Check the initializer tables and record which values changed."""
        b_inits = {t.name: t for t in base.initializer}
        for t in task.initializer:
            b = b_inits.get(aliases.get(t.name, t.name))
            if b is None:
                raise _Differ(f"{where}: task has extra initializer {t.name!r} {_spec(t)}; if it is a split tied weight pass aliases={{{t.name!r}: <base name>}}")
            if _spec(b) != _spec(t):
                raise _Differ(f"{where}: initializer {t.name!r} is {_spec(b)} in base but {_spec(t)} in task")
            if not _same_bytes(self.base_bytes.chunks(b), self.task_bytes.chunks(t)):
                self.changed.append(t.name)
        # A base weight whose every use moved to its alias is renamed, not missing.
        missing = sorted(set(b_inits) - {t.name for t in task.initializer} - set(aliases.values()))
        if missing:
            raise _Differ(f"{where}: base initializer(s) missing from task: {_short(missing)}")

    def functions(self, base: onnx.ModelProto, task: onnx.ModelProto) -> None:
        if len(base.functions) != len(task.functions):
            raise _Differ(f"model has {len(base.functions)} local functions in base but {len(task.functions)} in task")
        for b, t in zip(base.functions, task.functions, strict=True):
            where = f"function {b.domain}::{b.name}"
            if (b.domain, b.name, b.overload, list(b.attribute)) != (t.domain, t.name, t.overload, list(t.attribute)):
                raise _Differ(f"{where}: signature differs from task function {t.domain}::{t.name}")
            if len(b.input) != len(t.input) or len(b.output) != len(t.output):
                raise _Differ(f"{where}: input/output counts differ")
            base_env: dict[str, Canon] = {n: ("input", where, i) for i, n in enumerate(b.input)}
            task_env: dict[str, Canon] = {n: ("input", where, i) for i, n in enumerate(t.input)}
            self.nodes(b.node, t.node, base_env, task_env, where)
            for i, (bo, to) in enumerate(zip(b.output, t.output, strict=True)):
                if self._canon(base_env, bo) != self._canon(task_env, to):
                    raise _Differ(f"{where}: output {i} is computed differently")


def _attr_text(attr: AttributeProto, limit: int = 80) -> str:
    if attr.type in (AttributeProto.TENSOR, AttributeProto.TENSORS):
        tensors = [attr.t] if attr.type == AttributeProto.TENSOR else list(attr.tensors)
        return "tensor " + ", ".join(_spec(t) + _small_values(t) for t in tensors)
    text = repr(onnx.helper.get_attribute_value(attr))
    return text if len(text) <= limit else text[:limit] + "..."


def _small_values(tensor: TensorProto, limit: int = 8) -> str:
    """Values of a small inline tensor (shape constants, scalars) for a readable message."""
    if tensor.data_location == TensorProto.EXTERNAL or math.prod(tensor.dims) > limit:
        return ""
    return f" = {numpy_helper.to_array(tensor).tolist()}"
