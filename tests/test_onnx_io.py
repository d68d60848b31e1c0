"""Tests for lora_fx.exporters.onnx_io: dynamic exports, atomic writes, external data, running."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch.export import Dim

from lora_fx.errors import ExportError
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.exporters.verify import ort
from lora_fx.exporters.verify.ort import available_providers, ort_session, run_onnx

ATOL = 1e-5


class MLP(torch.nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyAttention(torch.nn.Module):
    """Token model with self-attention; an optional mask and a bool flag exercise input matching."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.heads = heads

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = self.proj(y.transpose(1, 2).reshape(b, t, d))
        if mask is not None:
            y = y * mask[..., None]
        return self.head(x + y)


def traced(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None) -> torch.fx.GraphModule:
    return torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dynamic_shapes, strict=False).module()


@pytest.fixture(scope="module")
def mlp() -> tuple[torch.nn.Module, torch.fx.GraphModule, tuple]:
    torch.manual_seed(0)
    model = MLP().eval()
    shapes = ({0: Dim.AUTO},)
    return model, traced(model, (torch.randn(2, 8),), dynamic_shapes=shapes), shapes


def test_mlp_traced_module_has_dynamic_batch(tmp_path, mlp):
    model, gm, shapes = mlp
    info = export_onnx(gm, tmp_path / "mlp.onnx", (torch.randn(2, 8),), dynamic_shapes=shapes)
    assert info.path == str(tmp_path / "mlp.onnx") and not info.external_data
    assert info.initializers == 4 and info.initializer_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert sum(info.op_counts.values()) == info.nodes > 0 and info.opset >= 18
    session = ort_session(info.path, threads=1)
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic, not baked in
    for batch in (1, 7):
        x = torch.randn(batch, 8)
        (out,) = run_onnx(session, (x,))
        np.testing.assert_allclose(out, model(x).detach().numpy(), atol=ATOL)


def test_batch_one_example_warns(tmp_path, mlp):
    _, gm, shapes = mlp
    with pytest.warns(UserWarning, match=r"axes \[0\] are marked dynamic but have example size 1"):
        export_onnx(gm, tmp_path / "one.onnx", (torch.randn(1, 8),), dynamic_shapes=shapes)


def test_attention_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    ids, mask = torch.randint(0, 50, (2, 8)), torch.ones(2, 8)
    kwargs = {"mask": mask, "causal": True}
    shapes = ({0: Dim.AUTO, 1: Dim.AUTO}, {0: Dim.AUTO, 1: Dim.AUTO}, None)
    gm = traced(model, (ids,), kwargs, shapes)
    info = export_onnx(gm, tmp_path / "attn.onnx", (ids,), kwargs, dynamic_shapes=shapes)
    session = ort_session(info.path)
    # Torch's symbols (s23...) are renamed after the first input using them, shared axes stay shared.
    assert [i.shape for i in session.get_inputs()] == [["ids_dim0", "ids_dim1"]] * 2
    for batch in (1, 7):
        for seq in (5, 77):
            ids = torch.randint(0, 50, (batch, seq))
            mask = (torch.rand(batch, seq) > 0.3).float()
            (out,) = run_onnx(session, (ids,), {"mask": mask, "causal": True})
            np.testing.assert_allclose(out, model(ids, mask=mask).detach().numpy(), atol=ATOL)


def test_failed_write_keeps_previous_files(tmp_path, mlp, monkeypatch):
    _, gm, shapes = mlp
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous model")
    (tmp_path / "m.onnx.data").write_bytes(b"previous data")
    import onnx_ir

    def broken_save(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_ir, "save", broken_save)
    for external in (False, True):
        with pytest.raises(ExportError, match="disk full") as err:
            export_onnx(gm, target, (torch.randn(2, 8),), dynamic_shapes=shapes, external_data=external)
        assert str(target) in str(err.value)
        assert target.read_bytes() == b"previous model"
        assert (tmp_path / "m.onnx.data").read_bytes() == b"previous data"
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_exporter_failure_is_reported_with_path(tmp_path, mlp):
    _, gm, _ = mlp
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous model")
    with pytest.raises(ExportError, match="torch.onnx.export failed") as err:
        export_onnx(gm, target, ())  # the graph wants one input
    assert str(target) in str(err.value)
    assert target.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_missing_directory_fails_before_exporting(tmp_path, mlp, monkeypatch):
    _, gm, _ = mlp

    def never(*args, **kwargs):
        raise AssertionError("export must not start")

    monkeypatch.setattr(torch.onnx, "export", never)
    missing = tmp_path / "no" / "such"
    with pytest.raises(ExportError, match="does not exist") as err:
        export_onnx(gm, missing / "m.onnx", (torch.randn(2, 8),))
    assert str(missing) in str(err.value)
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(gm, tmp_path, (torch.randn(2, 8),))


def test_external_data(tmp_path):
    torch.manual_seed(0)
    model = MLP(64, 256, 64).eval()
    gm = traced(model, (torch.randn(2, 64),), dynamic_shapes=({0: Dim.AUTO},))
    target = tmp_path / "big.onnx"
    info = export_onnx(gm, target, (torch.randn(2, 64),), dynamic_shapes=({0: Dim.AUTO},), external_data=True)
    data = tmp_path / "big.onnx.data"
    assert info.external_data and data.is_file() and sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert info.initializer_bytes == sum(p.numel() * 4 for p in model.parameters())
    # onnx-ir keeps tensors under 256 bytes (one bias here) inline; the rest is in the data file.
    assert target.stat().st_size < 8_000 < info.initializer_bytes - 256 <= data.stat().st_size
    proto = onnx.load(target, load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}  # relative: the pair can be moved together
    x = torch.randn(3, 64)
    (out,) = run_onnx(target, (x,))
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=ATOL)
    # Re-exporting inline removes the now stale data file.
    info = export_onnx(gm, target, (torch.randn(2, 64),), dynamic_shapes=({0: Dim.AUTO},))
    assert not info.external_data and os.listdir(tmp_path) == ["big.onnx"]
    np.testing.assert_allclose(run_onnx(target, (x,))[0], out, atol=ATOL)


def _two_input_model(path, inputs: list[tuple[str, int]]) -> str:
    """Sum of float inputs (int inputs only declared): a graph whose inputs we control by hand."""
    values = [helper.make_tensor_value_info(n, t, ["batch", 3]) for n, t in inputs]
    floats = [n for n, t in inputs if t == TensorProto.FLOAT]
    node = helper.make_node("Sum", floats, ["y"])
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return str(path)


def test_run_onnx_matches_inputs_the_exporter_dropped(tmp_path):
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    path = _two_input_model(tmp_path / "m.onnx", [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)])
    # Equal counts: positional, like torch's ONNXProgram.__call__. None and Python scalars are skipped.
    assert run_onnx(path, (a, None), {"b": b, "flag": True})[0].tolist() == [[3.0] * 3] * 2
    # A dropped int input is skipped by dtype; a kwarg matching a graph input name feeds it.
    assert run_onnx(path, (ids, a), {"unused": ids, "b": b})[0].tolist() == [[3.0] * 3] * 2
    assert run_onnx(path, (a.numpy(),), {"b": b * 2})[0].tolist() == [[5.0] * 3] * 2
    with pytest.raises(ExportError, match="cannot match inputs to graph input 'b'"):
        run_onnx(path, (a, ids, ids))


def test_session_options_and_providers(tmp_path, monkeypatch):
    path = _two_input_model(tmp_path / "m.onnx", [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)])
    options = ort_session(path, threads=1).get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert available_providers()[-1] == "CPUExecutionProvider"
    assert available_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="does not exist"):
        ort_session(tmp_path / "missing.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ExportError, match="pip install onnxruntime"):
        ort_session(path)
    assert ort._NO_ORT.startswith("onnxruntime is not installed")
