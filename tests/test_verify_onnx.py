"""Tests for lora_fx.exporters.verify_onnx.compare_structure."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.export import Dim

from lora_fx.errors import VerifyError
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.exporters.verify.structure import StructureReport, compare_structure

SHAPES = ({0: Dim.AUTO},)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MLPWithBranch(MLP):
    """The MLP plus an unfolded low-rank branch on fc2: the graph an unfolded LoRA would export."""

    def __init__(self) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(2, 16))
        self.B = torch.nn.Parameter(torch.randn(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h @ self.A.T @ self.B.T


class TiedLM(torch.nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.emb(ids))))


class SplitTiedLM(TiedLM):
    """TiedLM after folding LoRA into lm_head only: the head got its own copy of the tied weight."""

    def __init__(self, tied: TiedLM) -> None:
        super().__init__()
        self.load_state_dict(tied.state_dict())
        self.head_folded = torch.nn.Parameter(tied.emb.weight.detach() + 0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.tanh(self.mix(self.emb(ids))), self.head_folded)


def export(model: torch.nn.Module, path, args: tuple, shapes=SHAPES, **kw) -> str:
    gm = torch.export.export(model.eval(), args, dynamic_shapes=shapes, strict=False).module()
    return export_onnx(gm, path, args, dynamic_shapes=shapes, **kw).path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[MLP, str]:
    torch.manual_seed(0)
    model = MLP()
    return model, export(model, tmp_path_factory.mktemp("base") / "base.onnx", (torch.randn(2, 8),))


def test_same_module_twice_is_identical(tmp_path, base):
    model, base_path = base
    again = export(model, tmp_path / "again.onnx", (torch.randn(2, 8),))
    report = compare_structure(base_path, again)
    assert report.ok and report.first_difference is None and report.changed_initializers == []
    assert report.base_nodes == report.task_nodes > 0
    with open(base_path, "rb") as f1, open(again, "rb") as f2:
        assert f1.read() == f2.read()  # export is deterministic down to the bytes
    assert "identical" in str(report) and "0 initializers changed" in str(report)


def test_one_changed_weight_is_reported(tmp_path, base):
    model, base_path = base
    task = copy.deepcopy(model)
    with torch.no_grad():
        task.fc2.weight[0, 0] += 0.5
    report = compare_structure(base_path, export(task, tmp_path / "task.onnx", (torch.randn(2, 8),)))
    assert report.ok and report.changed_initializers == ["fc2.weight"] and report.added_initializers == []
    assert "1 initializer changed: fc2.weight" in str(report)
    # proven from the skeletons with an all-zero adapter: the adapted initializers are named, and unchanged
    zero = dataclasses.replace(report, by_construction=True, unchanged=True)
    assert str(zero).endswith("1 adapted initializer unchanged (the adapter is all zero): fc2.weight")


def test_extra_branch_is_a_structural_difference(tmp_path, base):
    model, base_path = base
    task = MLPWithBranch()
    task.load_state_dict(model.state_dict(), strict=False)
    report = compare_structure(base_path, export(task, tmp_path / "task.onnx", (torch.randn(2, 8),)))
    assert not report.ok and report.task_nodes > report.base_nodes
    assert report.first_difference == (f"graph has {report.base_nodes} nodes in base but {report.task_nodes} in "
                                       "task; first extra node 3 in task: Transpose 'node_permute'")
    assert f"base {report.base_nodes} nodes, task {report.task_nodes} nodes" in str(report)


def test_static_vs_dynamic_input_differs(tmp_path, base):
    model, base_path = base
    static = export(model, tmp_path / "static.onnx", (torch.randn(2, 8),), shapes=None)
    report = compare_structure(base_path, static)
    assert not report.ok and "input 0 differs" in report.first_difference
    assert "FLOAT[dynamic, 8]" in report.first_difference and "FLOAT[2, 8]" in report.first_difference


def test_split_tied_weight_with_alias(tmp_path):
    torch.manual_seed(0)
    tied = TiedLM()
    ids = torch.randint(0, 40, (2, 5))
    shapes = ({0: Dim.AUTO, 1: Dim.AUTO},)
    base_path = export(tied, tmp_path / "base.onnx", (ids,), shapes)
    task_path = export(SplitTiedLM(tied), tmp_path / "task.onnx", (ids,), shapes)
    # The exporter keeps one initializer for a tied parameter (named lm_head.weight here, not emb.weight).
    assert [t.name for t in onnx.load(base_path).graph.initializer] == ["mix.weight", "mix.bias", "lm_head.weight"]
    plain = compare_structure(base_path, task_path)
    assert not plain.ok and "head_folded" in plain.first_difference
    report = compare_structure(base_path, task_path, aliases={"head_folded": "lm_head.weight"})
    assert report.ok, report.first_difference
    assert report.added_initializers == ["head_folded"] and report.changed_initializers == ["head_folded"]
    with pytest.raises(VerifyError, match="present only in the task"):
        compare_structure(base_path, task_path, aliases={"lm_head.weight": "lm_head.weight"})
    with pytest.raises(VerifyError, match="no initializer 'nope'"):
        compare_structure(base_path, task_path, aliases={"head_folded": "nope"})


def test_external_data_values_are_compared(tmp_path, base):
    model, base_path = base
    ext_base = export(model, tmp_path / "b.onnx", (torch.randn(2, 8),), external_data=True)
    task = copy.deepcopy(model)
    with torch.no_grad():
        task.fc1.weight.mul_(2)
    ext_task = export(task, tmp_path / "t.onnx", (torch.randn(2, 8),), external_data=True)
    assert compare_structure(ext_base, base_path).ok  # external vs inline storage of equal values
    report = compare_structure(ext_base, ext_task)
    assert report.ok and report.changed_initializers == ["fc1.weight"]
    with pytest.raises(VerifyError, match="pass the .onnx path"):
        compare_structure(onnx.load(ext_base, load_external_data=False), ext_task)


# Hand-built graphs: attributes, subgraphs, typed vs raw storage, renamed intermediates.

def _model(weight: np.ndarray, *, then_value: float = 1.0, alpha: float = 0.5, raw: bool = True,
           rename: str = "h", extra_init: bool = False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    w = numpy_helper.from_array(weight, "w")
    if not raw:
        w = helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel().tolist(), raw=False)
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)

    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(value)))
        return helper.make_graph([const, helper.make_node("Mul", [rename, "k"], ["b"])], name, [], [branch_out])

    nodes = [
        helper.make_node("MatMul", ["x", "w"], [rename]),
        helper.make_node("If", ["c"], ["z"], then_branch=branch("then", then_value), else_branch=branch("else", 2.0)),
        helper.make_node("LeakyRelu", ["z"], ["y"], alpha=alpha),
    ]
    inits = [w] + ([numpy_helper.from_array(weight, "w2")] if extra_init else [])
    graph = helper.make_graph(nodes, "g", [x, cond], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_hand_built_graphs():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    base = _model(w)
    onnx.checker.check_model(base, full_check=True)
    assert compare_structure(base, _model(w)).ok
    # Intermediate names and value storage (raw_data vs float_data) do not matter.
    same = compare_structure(base, _model(w, raw=False, rename="renamed"))
    assert same.ok and same.changed_initializers == []
    assert compare_structure(base, _model(w + 1)).changed_initializers == ["w"]
    diff = compare_structure(base, _model(w, alpha=0.25))
    assert not diff.ok and "node 2" in diff.first_difference and "'alpha'" in diff.first_difference
    diff = compare_structure(base, _model(w, then_value=3.0))  # a Constant inside an If branch
    assert not diff.ok and "then_branch" in diff.first_difference and "'value'" in diff.first_difference
    diff = compare_structure(base, _model(w, extra_init=True))
    assert not diff.ok and "extra initializer 'w2'" in diff.first_difference
    newer = _model(w)
    newer.opset_import[0].version = 18
    assert "opset" in compare_structure(base, newer).first_difference
    swapped = _model(w)
    swapped.graph.node[0].input[:] = ["w", "x"]
    diff = compare_structure(base, swapped)
    assert "node 0" in diff.first_difference and "input 0 is input 0 of graph" in diff.first_difference


def test_report_str_and_missing_file(tmp_path):
    report = StructureReport(ok=False, base_nodes=3, task_nodes=4, first_difference="graph node 1: op type differs")
    assert str(report).startswith("ONNX structure differs (base 3 nodes, task 4 nodes): graph node 1")
    with pytest.raises(VerifyError, match="does not exist"):
        compare_structure(tmp_path / "missing.onnx", tmp_path / "missing.onnx")
