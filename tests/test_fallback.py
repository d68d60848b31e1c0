"""exporters/fallback.py: the fixes past torch's exporter failures, the errors when none applies, and the
export report's wording (what was written, its size on disk)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import traced
from torch import nn

import lora_fx
from lora_fx.errors import ExportError
from lora_fx.exporters.backends.torch_onnx import fallback
from lora_fx.exporters.backends.torch_onnx.fallback import Fallbacks, explain, views_as_reshapes

aten = torch.ops.aten


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.fc(x).view(b, s, 2, 4).transpose(1, 2).contiguous()
        return h.view(b, 2, s * 4)


def _gm():
    return lora_fx.trace(_Heads().eval(), (torch.randn(2, 5, 8),))


def _views(gm):
    return sum(n.target is aten.view.default for n in gm.graph.nodes)


def test_views_as_reshapes_keeps_values_and_leaves_the_input_alone():
    gm = _gm()
    n = _views(gm)
    assert n >= 2
    out = views_as_reshapes(gm)
    assert _views(out) == 0 and _views(gm) == n
    assert sum(node.target is aten.reshape.default for node in out.graph.nodes) >= n
    x = torch.randn(3, 5, 8)  # batch is dynamic (float inputs: dim 0 only)
    torch.testing.assert_close(out(x), gm(x), rtol=0, atol=0)


def test_a_known_failure_is_retried_with_its_fix_and_the_next_export_reuses_it(tmp_path, monkeypatch):
    calls = []
    real = fallback.export_onnx

    def flaky(module, path, *args, **kwargs):
        calls.append(_views(module))
        if _views(module):  # what torch says on T5 / HF Swin / timm BEiT with dynamic shapes
            raise ExportError("torch.onnx.export failed: Cannot view a tensor with shape torch.Size([s11, 8, 4, 8]) "
                              "and strides (256, 8, 64, 1) as a tensor with shape (s11, 8, 32)!")
        return real(module, path, *args, **kwargs)

    monkeypatch.setattr(fallback, "export_onnx", flaky)
    fb = Fallbacks()
    gm = _gm()
    args = (torch.randn(2, 5, 8),)
    info = fb.export(gm, str(tmp_path / "a.onnx"), args, {}, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    assert info.nodes > 0 and fb.applied == ["views"] and "aten.reshape" in fb.notes[0]
    assert calls[0] > 0 and calls[1] == 0
    fb.export(gm, str(tmp_path / "b.onnx"), args, {})
    assert calls[2] == 0 and len(fb.notes) == 1  # fixed up front for the base export, noted once


def test_an_unknown_failure_is_an_error_naming_the_node(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ExportError("torch.onnx.export failed: RuntimeError: something new\n"
                          "While executing %linear_3 : [num_users=1] = call_function[target=torch.ops.aten.foo.default]")

    monkeypatch.setattr(fallback, "export_onnx", broken)
    with pytest.raises(ExportError, match=r"something new at node linear_3 \(torch.ops.aten.foo.default\)"):
        Fallbacks().export(_gm(), str(tmp_path / "a.onnx"), (torch.randn(2, 5, 8),), {})


def test_explanations_name_the_op_and_what_to_do():
    text = ("No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback', overload='default')>\n"
            "While executing %grouped_mm_fallback : [num_users=1] = call_function[target=torch.ops.transformers."
            "grouped_mm_fallback.default]")
    msg = explain(text, "torch.onnx.export failed")
    assert "no translation for the op transformers.grouped_mm_fallback" in msg
    assert "custom_translation_table" in msg and "_experts_implementation" in msg
    msg = explain("Cannot view a tensor with shape torch.Size([s1, 4]) and strides (1, 2) as a tensor with shape "
                  "(s1*4,)!", "failed")
    assert "cannot view a tensor of shape torch.Size([s1, 4])" in msg and "dynamic=False" in msg


def test_export_report_says_base_weights_and_file_size(tmp_path):
    gm = traced("mlp")[3]
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    path = str(tmp_path / "base.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # none leaks from torch's exporter
        rep = lora_fx.fold_and_export(lgm, path)
    text = str(rep)
    assert "every LoRA delta is zero" in text and "folded LoRA" not in text
    assert f"{os.path.getsize(path) / 2**20:.1f} MiB on disk" in text
    with torch.no_grad():
        lora_fx.lora_parameters(lgm)[1].fill_(0.1)
    assert "(folded LoRA)" in str(lora_fx.fold_and_export(lgm, path, verify=False))


class _ComplexRotary(nn.Module):
    """Rotary embedding in complex form (torch.polar + view_as_complex), as Llama 4's code computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.register_buffer("freqs", torch.polar(torch.ones(4), torch.arange(4.0)), persistent=False)

    def forward(self, x):
        q = torch.view_as_complex(self.q(x).float().reshape(*x.shape[:-1], 4, 2))
        return torch.view_as_real(q * self.freqs.unsqueeze(0)).flatten(-2)


def test_complex_valued_model_is_refused_naming_the_cause(tmp_path):
    lgm = lora_fx.lorafy(lora_fx.trace(_ComplexRotary(), (torch.randn(2, 5, 8),)), "q", rank=2)
    with pytest.raises(ExportError, match=r"complex tensors \(the op aten\.\w+ reads one\).*cos/sin form"):
        lora_fx.fold_and_export(lgm, str(tmp_path / "a.onnx"))
    assert os.listdir(tmp_path) == []  # nothing half-written


def _input_dims(path: str) -> list[list]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]


def _trained_heads():
    lgm = lora_fx.lorafy(_gm(), "fc", rank=2)
    with torch.no_grad():
        lora_fx.lora_parameters(lgm)[1].normal_(std=0.1)
    return lgm


@pytest.mark.parametrize("verify", [True, "full"])
def test_an_optimizer_failure_ships_the_unoptimized_dynamic_file(tmp_path, monkeypatch, verify):
    from lora_fx.exporters.backends.torch_onnx import optimize

    def failing(*a, **k):  # what onnxscript's constant folding raised on ProphetNet's SplitToSequence
        raise RuntimeError("PassError: An error occurred at step 0")

    monkeypatch.setattr(optimize, "optimize_model", failing)
    rep = lora_fx.fold_and_export(_trained_heads(), str(tmp_path / "a.onnx"), verify=verify)
    assert [n for n in rep.notes if n.startswith("unoptimized: ")] == [rep.notes[-1]]
    assert "PassError: An error occurred at step 0" in rep.notes[-1] and rep.export.optimization is None
    assert isinstance(_input_dims(rep.export.path)[0][0], str)  # the batch stays dynamic
    assert rep.verification.ok and len(rep.verification.numerics) == 2  # checked at a grown batch too
    if verify == "full":  # the base export for the proof is unoptimized alike
        assert rep.base.optimization is None and rep.verification.structure.ok


def test_a_dynamic_export_failure_ships_a_static_file(tmp_path, monkeypatch):
    real, seen = fallback.export_onnx, []

    def no_dynamic(module, path, *args, **kwargs):
        seen.append(kwargs.get("dynamic_shapes"))
        if kwargs.get("dynamic_shapes") is not None:
            raise ExportError("torch.onnx.export failed: RuntimeError: Constraints violated (s0)! guard s0 % 4 == 0")
        return real(module, path, *args, **kwargs)

    monkeypatch.setattr(fallback, "export_onnx", no_dynamic)
    rep = lora_fx.fold_and_export(_trained_heads(), str(tmp_path / "a.onnx"), verify="full")
    assert rep.notes[-1].startswith("static: the dynamic export failed inside torch.onnx")
    assert "Constraints violated" in rep.notes[-1] and "(2, 5, 8)" in rep.notes[-1]
    assert seen[0] is not None and seen[1:] == [None, None]  # task retried static; the base static at once
    assert _input_dims(rep.export.path) == [[2, 5, 8]] and rep.base.nodes == rep.export.nodes
    assert rep.verification.ok and rep.verification.structure.ok and len(rep.verification.numerics) == 1
    assert any("example's sizes only: the file declares every input dimension static" in n
               for n in rep.verification.notes)


def test_an_export_failing_at_the_opset_the_backend_chose_is_retried_at_torchs_default(tmp_path, monkeypatch):
    real, seen = fallback.export_onnx, []

    def no_opset_23(module, path, *args, **kwargs):
        seen.append(kwargs.get("opset"))
        if kwargs.get("opset") == 23:
            raise ExportError("torch.onnx.export failed: AssertionError: only 4D query, key, and value are supported")
        return real(module, path, *args, **kwargs)

    monkeypatch.setattr(fallback, "export_onnx", no_opset_23)
    fb = Fallbacks(default_opset=23)
    args, shapes = (torch.randn(2, 5, 8),), ({0: torch.export.Dim.AUTO},)
    info = fb.export(_gm(), str(tmp_path / "a.onnx"), args, {}, dynamic_shapes=shapes, opset=23)
    assert fb.applied == ["opset"] and fb.notes[0].startswith("opset: the export at opset 23")
    assert seen == [23, None] and info.nodes > 0 and info.opset != 23  # dynamic kept: no static retry
    fb.settled = True
    fb.export(_gm(), str(tmp_path / "b.onnx"), args, {}, dynamic_shapes=shapes, opset=23)
    assert seen[2:] == [None]  # the base export repeats it at once
    with pytest.raises(ExportError, match="only 4D"):  # an opset the user asked for is not dropped
        Fallbacks().export(_gm(), str(tmp_path / "c.onnx"), args, {}, opset=23)


def test_when_the_retries_fail_too_the_error_explains_the_first_failure(tmp_path, monkeypatch):
    def broken(module, path, *args, **kwargs):
        if kwargs.get("dynamic_shapes") is not None:
            raise ExportError("torch.onnx.export failed: RuntimeError: Constraints violated (s0)! guard s0 < 5")
        raise ExportError("torch.onnx.export failed: RuntimeError: something else")

    monkeypatch.setattr(fallback, "export_onnx", broken)
    with pytest.raises(ExportError, match=r"a dynamic dimension cannot stay dynamic.*What to do.*"
                                          r"\(retried \['static'\]: .*something else\)"):
        Fallbacks().export(_gm(), str(tmp_path / "a.onnx"), (torch.randn(2, 5, 8),), {},
                           dynamic_shapes=({0: torch.export.Dim.AUTO},))


@pytest.mark.slow
def test_prophetnet_ships_unoptimized_where_the_optimizer_fails(tmp_path):
    from sweep_models import SWEEP

    model, args, kwargs = next(m for m in SWEEP if m.name == "prophetnet").build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lgm = lora_fx.lorafy(lora_fx.trace(model, args, kwargs), ["query_proj", "value_proj"], rank=2)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_(std=0.02)
    rep = lora_fx.fold_and_export(lgm, str(tmp_path / "pn.onnx"))
    assert any(n.startswith("unoptimized: ") and "PassError" in n for n in rep.notes)
    assert rep.verification.ok and len(rep.verification.numerics) == 2
