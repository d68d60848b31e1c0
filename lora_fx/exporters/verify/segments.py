"""ONNX Runtime on a big file with bounded weight memory: the graph run as a chain of sub-models.

A session holds every weight of its file at once. For verification of a model whose weights are
already in memory on the torch side, that is a second full copy (a 1.1B bf16 model checked against
its fp16 file: 2.64x the weight bytes at peak). :class:`SegmentedSession` cuts the graph, in its
topological order, into segments whose initializers take at most ``budget`` bytes each, and runs
them one after another, each in its own session over the same external data, passing on only the
values later segments read. Every node runs with the same kernel as in one session over the whole
file (sessions are opened with :func:`~.ort.ort_session`'s ``low_memory`` options: no graph
optimizations), so the outputs are the file's outputs.

It quacks like an ``onnxruntime.InferenceSession`` where :func:`~.ort.run_onnx` needs one
(``get_inputs``, ``get_providers``, ``run``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, helper

from ...errors import ExportError
from .. import files

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["DEFAULT_BUDGET", "Segment", "SegmentedSession", "bounded_session", "plan"]

DEFAULT_BUDGET = 512 << 20  # bytes of weights one segment may hold
_GRAPH_BYTES = 64 << 20  # a bigger .onnx file holds its weights inline (a 70B model's graph takes ~2 MB)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive nodes: the values it reads from earlier segments (or the graph inputs),
    the initializers it holds, and the values it hands on (read later, or graph outputs)."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    initializers: tuple[str, ...]
    outputs: tuple[str, ...]
    nbytes: int


def _subgraph_reads(node: NodeProto) -> Iterator[str]:
    """Outer-scope names read inside a node's subgraphs (If/Loop/Scan bodies)."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                yield from (name for name in n.input if name and name not in inner)
                yield from (name for name in _subgraph_reads(n) if name not in inner)


def _reads(node: NodeProto) -> list[str]:
    return list(dict.fromkeys([n for n in node.input if n] + list(_subgraph_reads(node))))


def plan(graph: GraphProto, budget: int) -> list[Segment]:
    """Cuts ``graph`` (nodes in topological order) into segments of at most ``budget`` weight bytes.

    A node whose own weights exceed the budget gets a segment to itself; an initializer read in
    several segments (a tied embedding and head) is held by each of them in turn."""
    sizes = {t.name: files.stored_nbytes(t) for t in graph.initializer}
    reads_of = [_reads(node) for node in graph.node]
    groups: list[list[int]] = []
    held: set[str] = set()
    nbytes = 0
    for i, reads in enumerate(reads_of):
        weights = {n for n in reads if n in sizes}
        extra = sum(sizes[n] for n in weights - held)
        if not groups or groups[-1] and extra and nbytes + extra > budget:
            groups.append([])
            held, nbytes, extra = set(), 0, sum(sizes[n] for n in weights)
        groups[-1].append(i)
        held |= weights
        nbytes += extra
    producer = {o: s for s, group in enumerate(groups) for i in group for o in graph.node[i].output if o}
    last_read: dict[str, int] = {name.name: len(groups) for name in graph.output}  # graph outputs: kept to the end
    for s, group in enumerate(groups):
        for i in group:
            for name in reads_of[i]:
                last_read[name] = max(last_read.get(name, -1), s)
    segments = []
    for s, group in enumerate(groups):
        reads = list(dict.fromkeys(n for i in group for n in reads_of[i]))
        inits = tuple(n for n in reads if n in sizes)
        inputs = tuple(n for n in reads if n not in sizes and producer.get(n, -1) != s)
        outputs = tuple(o for i in group for o in graph.node[i].output if o and last_read.get(o, -1) > s)
        segments.append(Segment(tuple(group), inputs, inits, outputs, sum(sizes[n] for n in inits)))
    return segments


def _value_type(array: np.ndarray) -> onnx.TypeProto:
    return helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(array.dtype), None)


class SegmentedSession:
    """Runs the ONNX file at ``path`` segment by segment (see the module docstring).

    Raises:
        ExportError: the file cannot be read, or a segment cannot be loaded or run; the message names
            the segment's first node.
    """

    def __init__(self, path: str | os.PathLike[str], *, budget: int = DEFAULT_BUDGET,
                 providers: list[str] | None = None) -> None:
        self._path = os.fspath(path)
        self._proto, self._folder = files.load(self._path)
        self._providers = providers
        graph = self._proto.graph
        self.segments = plan(graph, budget)
        self._last_read = {n: k for k, s in enumerate(self.segments) for n in s.inputs}  # values dropped after it
        initializers = {t.name for t in graph.initializer}
        self._inputs = [i for i in graph.input if i.name not in initializers]

    def get_providers(self) -> list[str]:
        from .ort import available_providers

        return self._providers or available_providers()

    def get_inputs(self) -> list[SimpleNamespace]:
        """Graph inputs in the form ``run_onnx`` matches against (``name``, ``type``, ``shape``)."""
        from .ort import ort_type

        out = []
        for i in self._inputs:
            t = i.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            out.append(SimpleNamespace(name=i.name, type=ort_type(helper.tensor_dtype_to_np_dtype(t.elem_type)),
                                       shape=shape))
        return out

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        graph = self._proto.graph
        wanted = list(output_names) if output_names else [o.name for o in graph.output]
        values: dict[str, np.ndarray] = dict(feeds)
        initializers = {t.name: t for t in graph.initializer}
        for k, segment in enumerate(self.segments):
            if not segment.outputs:  # nothing later or outside reads what it computes
                continue
            outs = self._run_segment(segment, values, initializers)
            values.update(zip(segment.outputs, outs, strict=True))
            values = {name: v for name, v in values.items() if self._last_read.get(name, -1) > k or name in wanted}
        missing = [n for n in wanted if n not in values and n not in initializers]
        if missing:
            raise ExportError(f"segmented run of {self._path!r} did not produce outputs {missing}")
        return [values[n] if n in values else files.tensor_array(initializers[n], self._folder) for n in wanted]

    def _run_segment(self, segment: Segment, values: dict[str, np.ndarray],
                     initializers: dict[str, onnx.TensorProto]) -> list[np.ndarray]:
        from ...errors import short_message
        from .ort import ort_session

        graph = self._proto.graph
        first = graph.node[segment.nodes[0]]
        absent = [n for n in segment.inputs if n not in values]
        if absent:
            raise ExportError(f"segment at node {first.name or first.op_type!r} of {self._path!r} reads {absent}, "
                              "which no earlier node produced; is the graph topologically sorted?")
        sub = helper.make_graph(
            [graph.node[i] for i in segment.nodes], f"segment_{segment.nodes[0]}",
            [helper.make_value_info(n, _value_type(values[n])) for n in segment.inputs],
            [onnx.ValueInfoProto(name=n) for n in segment.outputs],
            initializer=[initializers[n] for n in segment.initializers])
        model = helper.make_model(sub, opset_imports=self._proto.opset_import, ir_version=self._proto.ir_version)
        model.functions.extend(self._proto.functions)
        where = f"segment at node {first.name or first.op_type!r} of {self._path!r}"
        session = ort_session(model.SerializeToString(), data_folder=self._folder, providers=self._providers,
                              low_memory=True, what=where)
        try:
            return session.run(list(segment.outputs), {n: values[n] for n in segment.inputs})
        except Exception as exc:
            raise ExportError(f"onnxruntime run of the {where} failed: {short_message(exc)}") from exc


def bounded_session(path: str | os.PathLike[str], *, providers: list[str] | None = None,
                    budget: int | None = None) -> onnxruntime.InferenceSession | SegmentedSession:
    """A session on ``path`` that holds at most about ``budget`` bytes of its weights at once
    (default :data:`DEFAULT_BUDGET`): one ``low_memory`` session when the weights fit, or when a big
    .onnx file holds them inline (under protobuf's 2 GB; reading it to plan would cost as much), else
    a :class:`SegmentedSession`."""
    from .ort import ort_session

    budget = DEFAULT_BUDGET if budget is None else int(budget)
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) <= max(budget, _GRAPH_BYTES):
        proto, _ = files.load(path)
        if sum(files.stored_nbytes(t) for t in proto.graph.initializer) > budget:
            return SegmentedSession(path, budget=budget, providers=providers)
    # log_severity 4: a run ORT refuses raises with its message, which the caller notes or raises;
    # ORT's own ERROR log line would print it a second time (e.g. a builder file refusing a batch-2
    # prefill with past, which the decode checks cover)
    return ort_session(path, providers=providers, low_memory=True, log_severity=4)
