"""Bounded-memory ONNX Runtime runs: a file run as a chain of sub-models gives the file's outputs,
each part holding at most the budget's weights, and verification uses it for big files."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import pytest
import torch
from conftest import traced
from helpers import randomize_lora
from onnx import TensorProto, helper, numpy_helper
from zoo import ZOO_BY_NAME

import lora_fx
from lora_fx.errors import ExportError
from lora_fx.exporters.files import stored_nbytes
from lora_fx.exporters.verify import segments
from lora_fx.exporters.verify.ort import ort_session, run_onnx
from lora_fx.exporters.verify.segments import SegmentedSession, bounded_session, plan


@functools.cache
def _export(name: str, optimize: bool = True):
    """(lgm, args, kwargs, path): the zoo model with random LoRA, folded and exported with external data."""
    _, args, kwargs, gm = traced(name)
    lgm = lora_fx.lorafy(gm, ZOO_BY_NAME[name].targets, rank=2)
    randomize_lora(lgm)
    path = os.path.join(tempfile.mkdtemp(prefix="lora_fx_segments_"), f"{name}.onnx")
    report = lora_fx.fold_and_export(lgm, path, verify=False, external_data=True, optimize=optimize)
    return lgm, args, kwargs, report.path


@pytest.mark.parametrize("name,optimize", [("llama", True), ("bert", False), ("tied_lm", True)])
def test_segmented_run_is_bitwise_the_one_session_run(name, optimize):
    """Cut at every weight (budget 1 byte), the chain of sessions computes exactly the file's outputs."""
    _, args, kwargs, path = _export(name, optimize)
    whole = run_onnx(ort_session(path, low_memory=True), args, kwargs)
    seg = SegmentedSession(path, budget=1)
    parts = run_onnx(seg, args, kwargs)
    assert len(parts) == len(whole) and all(np.array_equal(a, b) for a, b in zip(parts, whole, strict=True))
    graph = onnx.load(path, load_external_data=False).graph
    matrices = sum(len(t.dims) == 2 for t in graph.initializer)
    assert len(seg.segments) >= matrices >= 2  # a part per weight matrix at least


def test_plan_covers_every_node_once_in_order_and_respects_the_budget():
    _, _, _, path = _export("llama")
    graph = onnx.load(path, load_external_data=False).graph
    sizes = {t.name: stored_nbytes(t) for t in graph.initializer}
    total = sum(sizes.values())
    for budget in (1, total // 4, total):
        parts = plan(graph, budget)
        assert [i for s in parts for i in s.nodes] == list(range(len(graph.node)))
        biggest_node = max(sum(sizes.get(n, 0) for n in set(node.input)) for node in graph.node)
        assert all(s.nbytes <= max(budget, biggest_node) for s in parts)
        assert sum(s.nbytes for s in parts) >= total  # every weight is held somewhere (tied ones more than once)
        produced = {i.name for i in graph.input}
        for s in parts:  # a part reads only what earlier parts handed on, or the graph inputs
            assert set(s.inputs) <= produced, s.inputs
            produced |= set(s.outputs)
        assert {o.name for o in graph.output} <= produced
    assert len(plan(graph, total)) == 1
    assert 2 <= len(plan(graph, total // 4)) <= 8


def test_bounded_session_segments_only_files_over_the_budget():
    _, _, _, path = _export("llama")
    assert not isinstance(bounded_session(path, budget=1 << 40), SegmentedSession)
    assert isinstance(bounded_session(path, budget=4096), SegmentedSession)


def test_outer_scope_reads_of_subgraphs_are_handed_on(tmp_path):
    """An If branch reading a value from the outer graph gets it, though it is no input of the If node."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    then = helper.make_graph([helper.make_node("Relu", ["y"], ["r"])], "then", [],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["n"])], "else", [],
                              [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other),
             helper.make_node("MatMul", ["z", "W"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[w, numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "if.onnx"
    onnx.save(model, path, save_as_external_data=True, location="if.data", size_threshold=0)
    seg = SegmentedSession(path, budget=1)
    assert len(seg.segments) == 3 and "y" in seg.segments[1].inputs  # read inside the If's branches
    for x in (np.ones((1, 4), np.float32), -np.ones((1, 4), np.float32)):
        assert np.array_equal(run_onnx(seg, (x,))[0], run_onnx(ort_session(path), (x,))[0])


def test_verification_of_a_big_file_runs_in_parts_and_still_catches_a_wrong_file(tmp_path, monkeypatch):
    """With a small budget, fold_and_export's numeric check runs segment by segment: it passes on the
    right file and fails on a file folded from other LoRA weights."""
    monkeypatch.setattr(segments, "DEFAULT_BUDGET", 64 << 10)
    opened = []
    real = SegmentedSession.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        opened.append(len(self.segments))
    monkeypatch.setattr(SegmentedSession, "__init__", spy)
    _, args, kwargs, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=2)
    randomize_lora(lgm, std=0.2)
    report = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx", external_data=True)
    v = report.verification
    assert v.ok and len(v.numerics) == 2 and all(c.max_rel_err <= 1e-4 for c in v.numerics), str(v)
    assert opened and min(opened) > 4
    other = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=2)
    randomize_lora(other, std=0.2, seed=1)
    wrong = lora_fx.verify_fold(tmp_path / "task.onnx", tmp_path / "task.onnx", lgm=other)
    assert not wrong.ok and wrong.numerics and all(not c.ok for c in wrong.numerics)


def test_a_failing_part_names_its_first_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="first_matmul"),
             helper.make_node("Reshape", ["y", "bad"], ["out"], name="bad_reshape")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.ones((2, 2), np.float32), "W"),
                                           numpy_helper.from_array(np.array([3], np.int64), "bad")])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    seg = SegmentedSession(path, budget=1)
    with pytest.raises(ExportError, match="bad_reshape"):
        run_onnx(seg, (torch.ones(2),))


def test_a_part_whose_values_nobody_reads_is_skipped(tmp_path):
    """A raw export can leave dead nodes (a dropout mask nobody reads): their part has no outputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("MatMul", ["x", "V"], ["dead"]),
             helper.make_node("MatMul", ["y", "W"], ["out"])]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.eye(2, dtype=np.float32) * 2, "W"),
                                           numpy_helper.from_array(np.ones((2, 2), np.float32), "V")])
    path = tmp_path / "dead.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    seg = SegmentedSession(path, budget=1)
    assert [s.outputs for s in seg.segments] == [("y",), (), ("out",)]
    assert np.array_equal(run_onnx(seg, (np.ones((1, 2), np.float32),))[0], np.full((1, 2), 4, np.float32))
