"""lora_fx.exporters.optimize: optimized exports as small as the plain export, structure independent of weights.

The default suite's other export tests (test_export, test_refold...) run the optimized default path;
the Llama exports here (two verified exports each) are marked slow."""

from __future__ import annotations

import collections
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import traced
from helpers import randomize_lora

import lora_fx
from lora_fx.errors import ExportError, VerifyError
from lora_fx.exporters.backends.torch_onnx import optimize as opt
from lora_fx.exporters.backends.torch_onnx import ort_fusions
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.exporters.verify.structure import compare_structure
from lora_fx.graph_module import capture_of

ort = pytest.importorskip("onnxruntime")


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _logits(path, args):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=False)})[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama (nn.Linear: x @ W.T) with q/v LoRA, exported folded + verified, default optimize."""
    model, args, kwargs, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=2)
    randomize_lora(lgm, std=0.2, seed=1)
    tmp = tmp_path_factory.mktemp("opt")
    report = lora_fx.fold_and_export(lgm, tmp / "task.onnx")
    return model, args, gm, lgm, tmp, report


@pytest.mark.slow
def test_default_export_is_optimized_verified_and_no_larger_than_plain(llama):
    model, args, gm, _, tmp, report = llama
    assert report.verification.ok and report.verification.structure.ok
    assert report.export.nodes == report.verification.structure.base_nodes == report.export.optimization.nodes_after
    assert report.export.optimization.nodes_before > 2 * report.export.nodes  # raw graph: ~3x the nodes
    plain = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=capture_of(gm).dynamic_shapes, verbose=False)
    plain.save(str(tmp / "plain.onnx"))  # what a user gets by default (optimize=True)
    ops = _ops(tmp / "task.onnx")
    assert sum(ops.values()) <= sum(_ops(tmp / "plain.onnx").values())
    assert ops["Constant"] == 0 and ops["SequenceAt"] == 0


@pytest.mark.slow
def test_weights_reach_matmul_as_initializers_with_recorded_layout(llama):
    _, _, _, _, tmp, report = llama
    proto = onnx.load(str(tmp / "task.onnx"))
    inits = {t.name for t in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert len(matmuls) == 15  # 2 layers x 7 projections + lm_head: every weight read directly
    derived = json.loads({p.key: p.value for p in proto.metadata_props}[opt.DERIVED_KEY])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert derived[f"{q}::Transpose"] == {"source": q, "ops": [["Transpose", {"perm": [1, 0]}, []]]}
    assert f"{q}::Transpose" in report.verification.structure.changed_initializers


def test_structure_does_not_depend_on_weight_values(tmp_path):
    """Zero biases and equal weights change torch's optimized graph, never ours."""
    _, args, kwargs, gm = traced("mlp")
    shapes = capture_of(gm).dynamic_shapes
    generic, special = copy.deepcopy(gm), copy.deepcopy(gm)  # own parameters: the traced gm is shared
    with torch.no_grad():
        for (name, p), q in zip(generic.named_parameters(), special.parameters(), strict=True):
            p.normal_()
            q.copy_(torch.zeros_like(q) if name.endswith("bias") else torch.full_like(q, 0.5))
    for mode in (True, "ort"):
        a = export_onnx(generic, tmp_path / f"a{mode}.onnx", args, kwargs, dynamic_shapes=shapes, optimize=mode)
        b = export_onnx(special, tmp_path / f"b{mode}.onnx", args, kwargs, dynamic_shapes=shapes, optimize=mode)
        result = compare_structure(a.path, b.path)
        assert result.ok, result.first_difference
        assert len(result.changed_initializers) == 6  # 3 weights + 3 biases, nothing merged or dropped
    # Control: torch's own optimizer drops the zero Gemm biases, so its two graphs differ.
    for m, name in ((generic, "c"), (special, "d")):
        torch.onnx.export(m, args, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes, verbose=False).save(
            str(tmp_path / f"{name}.onnx"))
    control = compare_structure(tmp_path / "c.onnx", tmp_path / "d.onnx")
    assert not control.ok and "Gemm" in control.first_difference


def test_ort_fusions_that_read_weights_are_refused(monkeypatch):
    """The generic-weights probe catches a fusion that looks at values (here: drop an all-zero Add)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    bias = onnx.numpy_helper.from_array(np.zeros(3, np.float32), "bias")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "bias"], ["y"])], "g", [x], [y], [bias])
    model = onnx.helper.make_model(graph)

    def value_dependent(proto, model_type):
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        if not onnx.numpy_helper.to_array(out.graph.initializer[0]).any():
            out.graph.node[0].op_type = "Sum"  # "fused" only because the bias is zero
        return out, {"Sum": 1}

    monkeypatch.setattr(ort_fusions, "_fuse", value_dependent)
    with pytest.raises(ExportError, match=r"optimize='ort' refused: .*depend on weight values.*node 0"):
        ort_fusions.ort_fusions(model, weights={"bias"})
    fused, _ = ort_fusions.ort_fusions(model, weights=set())  # a graph constant, not a weight: may be read
    assert fused.graph.node[0].op_type == "Sum"


def test_bad_mode_names_the_choices(tmp_path):
    lgm = lora_fx.lorafy(traced("mlp")[3], "fc1", rank=2)
    with pytest.raises(ExportError, match=r"optimize='fast' is not supported: use True .*'ort'.*False"):
        lora_fx.fold_and_export(lgm, tmp_path / "x.onnx", optimize="fast")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_ort_mode_fuses_and_verifies(llama):
    _, args, _, lgm, tmp, report = llama
    fused = lora_fx.fold_and_export(lgm, tmp / "task_ort.onnx", optimize="ort")
    assert fused.verification.ok
    assert fused.export.optimization.fusions["SkipSimplifiedLayerNormalization"] == 4
    assert fused.export.nodes < report.export.nodes
    np.testing.assert_allclose(_logits(tmp / "task_ort.onnx", args), _logits(tmp / "task.onnx", args), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_refold_rewrites_transposed_weights_of_optimized_files(llama):
    from lora_fx.switching import refold_onnx

    _, args, gm, _, tmp, _ = llama
    other = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=2)
    randomize_lora(other, std=0.2, seed=7)
    lora_fx.fold_and_export(other, tmp / "want.onnx", verify=False)
    export_onnx(gm, tmp / "base.onnx", args, dynamic_shapes=capture_of(gm).dynamic_shapes, optimize=True)
    report = refold_onnx(tmp / "task.onnx", other, tmp / "refolded.onnx", base_onnx=tmp / "base.onnx")
    assert sorted(report.rewritten) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight::Transpose"
                                              for i in range(2) for p in "qv")
    np.testing.assert_allclose(_logits(tmp / "refolded.onnx", args), _logits(tmp / "want.onnx", args), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_verify_error_hints_at_optimize_false(llama, monkeypatch):
    """A structural difference between optimized exports (verify="full" compares the files) fails, naming
    the way out."""
    from lora_fx.exporters.verify import proof as verify

    real = verify.compare_structure

    def differs(base, task, **kwargs):
        result = real(base, task, **kwargs)
        result.ok, result.first_difference = False, "forced difference"
        return result

    monkeypatch.setattr(verify, "compare_structure", differs)
    with pytest.raises(VerifyError, match="(?s)forced difference.*export with optimize=False"):
        lora_fx.fold_and_export(llama[3], llama[4] / "y.onnx", verify="full")
    assert not (llama[4] / "y.onnx").exists()


class _Tied(torch.nn.Module):
    """One square weight read by two linears (``lin2.weight is lin.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.lin2 = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
        self.lin2.weight = self.lin.weight

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin(x)))


def test_untied_weight_of_an_optimized_export_verifies(tmp_path):
    """Fold unties ``lin`` from ``lin2``; both transposes fold, and the alias follows them."""
    torch.manual_seed(0)
    lgm = lora_fx.lorafy(lora_fx.trace(_Tied().eval(), (torch.randn(2, 3, 4),)), "lin", rank=2)
    randomize_lora(lgm, std=0.2, seed=3)
    report = lora_fx.fold_and_export(lgm, tmp_path / "t.onnx")
    assert report.verification.ok, report
    assert report.verification.structure.added_initializers == ["lin.weight_folded::Transpose"]
    assert sorted(report.export.optimization.derived) == ["lin.weight_folded::Transpose", "lin2.weight::Transpose"]


@pytest.mark.parametrize("vocab", [50, 1000], ids=["small", "big"])
@pytest.mark.parametrize("targets", [["block1"], ["block1", "lm_head"]], ids=["tie-kept", "tie-untied"])
def test_a_tied_embedding_is_stored_as_the_plain_export_stores_it(targets, vocab, tmp_path):
    """Like torch's default optimizer: a big embedding also read as the head's transposed weight keeps
    its Transpose node (stored once: a folded ``::Transpose`` copy would store it twice); a small one
    (<= 8192 elements) is folded. With the head adapted, fold's untied copy counts as the same weight,
    so the folded file is still its base export's structure."""
    from lora_fx.examples.zoo_models import TiedLM

    torch.manual_seed(0)
    model, args = TiedLM(vocab=vocab).eval(), (torch.randint(0, vocab, (2, 7)),)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), targets, rank=2)
    randomize_lora(lgm, std=0.2, seed=2)
    report = lora_fx.fold_and_export(lgm, tmp_path / "t.onnx", verify="full")
    assert report.verification.ok, str(report.verification)
    big = model.embed.weight.numel() > 8192
    assert big != any(n.startswith(("embed.weight", "lm_head")) for n in report.export.optimization.derived)
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(tmp_path / "t.onnx")).graph.initializer)
    params = sum(p.numel() for p in model.parameters())  # tied: counted once
    copies = 1 if big and "lm_head" not in targets else 2  # + the folded transpose, or the head's own copy
    assert params + (copies - 1) * model.embed.weight.numel() <= stored < params + copies * model.embed.weight.numel()
    if "lm_head" not in targets:  # the same graph and bytes as the plain export
        plain = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=capture_of(lgm).dynamic_shapes,
                                  verbose=False)
        plain.save(str(tmp_path / "plain.onnx"))
        assert _ops(tmp_path / "t.onnx") == _ops(tmp_path / "plain.onnx")
        assert stored == sum(int(np.prod(t.dims)) for t in onnx.load(str(tmp_path / "plain.onnx")).graph.initializer)
