"""trace(): models torch.export needs help with (``*args`` forwards, train-only control flow)."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
from torch import nn

import lora_fx


class _VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *rest):
        return self.fc(x) + rest[0] * rest[1]


def test_var_positional_forward_traces_lorafies_and_exports():
    torch.manual_seed(0)
    args = (torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4))
    gm = lora_fx.trace(_VarArgs().eval(), args)
    lgm = lora_fx.lorafy(gm, "fc", rank=2)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_()
    bigger = tuple(torch.randn(5, 4) for _ in range(3))  # batch stayed dynamic
    torch.testing.assert_close(lora_fx.fold(lgm)(*bigger), lgm(*bigger))
    with tempfile.TemporaryDirectory() as d:
        rep = lora_fx.fold_and_export(lgm, os.path.join(d, "m.onnx"))
    assert rep.verification.ok and len(rep.verification.numerics) == 2


class _LayerDrop(nn.Module):
    """wav2vec2's LayerDrop: data-dependent Python control flow, only in train mode."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand([]) < 0.5:
                continue
            x = self.drop(layer(x))
        return x


def test_train_mode_capture_failure_falls_back_with_a_note():
    with pytest.warns(UserWarning, match="train-mode capture .* failed .*LayerDrop"):
        gm = lora_fx.trace(_LayerDrop().eval(), (torch.randn(2, 8),))
    assert any("train-mode capture" in n for n in gm.meta["lora_fx_capture"].mode_notes)
    lgm = lora_fx.lorafy(gm, "layers.*", rank=2)
    x = torch.randn(2, 8)
    lgm.train()  # the eval graph's dropout still follows .train()
    torch.manual_seed(0)
    a = lgm(x)
    lgm.eval()
    assert not torch.equal(a, lgm(x))


class _Branchy(nn.Module):
    """Python control flow on tensor values: torch.export cannot decide the branch."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_a_data_dependent_branch_is_captured_as_the_example_takes_it_and_asserted():
    x = torch.rand(2, 4)
    with pytest.warns(UserWarning, match=r"could not decide 1 data-dependent branch\(es\) \(Eq\(u0, 1\)\)"):
        gm = lora_fx.trace(_Branchy(), (x,), specialize_branches=True)
    torch.testing.assert_close(gm(x + 1), x + 1)
    with pytest.raises(RuntimeError):  # the other branch: the graph's runtime assertion fails, never a wrong value
        gm(-x - 1)


def test_capture_failure_names_the_source_line_and_the_guard(monkeypatch):
    from lora_fx import capture_retry

    def refuse(*args, **kwargs):
        raise RuntimeError("draft_export refused too")

    monkeypatch.setattr(capture_retry, "_draft", refuse)
    with pytest.raises(lora_fx.CaptureError, match=r"(?s)torch.where.*test_capture.py:\d+ in forward: return x if "
                                                   r"x.sum\(\) > 0 else -x\nguard torch could not decide: Eq\(u0, 1\)"):
        lora_fx.trace(_Branchy(), (torch.randn(2, 4),), specialize_branches=True)


class _StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: weight standardization through a batch norm without running stats."""

    def forward(self, x):
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                     training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return nn.functional.conv2d(x, w, self.bias)


def test_batch_norm_without_running_stats_keeps_its_batch_statistics():
    model = nn.Sequential(_StdConv(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = lora_fx.trace(model, (x,))
    lgm = lora_fx.lorafy(gm, "3", rank=2)
    torch.testing.assert_close(lora_fx.fold(lgm)(x), model(x))  # eval: was "running_mean must be defined"
    lgm.train()
    lgm(x)  # the real BatchNorm2d follows .train()


class _AttnDropout(nn.Module):
    """Attention dropout that only train mode shows (sdpa's dropout_p is 0 in eval)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.25 if self.training else 0.0)


def _exports(monkeypatch) -> list:
    from lora_fx import capture

    calls, export = [], capture._export
    monkeypatch.setattr(capture, "_export", lambda m, a, k, shapes: calls.append((m.training, shapes)) or
                        export(m, a, k, shapes))
    return calls


def test_train_rates_come_from_a_static_capture(monkeypatch):
    calls = _exports(monkeypatch)
    gm = lora_fx.trace(_AttnDropout().eval(), (torch.randn(2, 5, 8),))
    assert [training for training, _ in calls] == [False, True]
    assert calls[0][1] is not None and calls[1][1] is None  # eval graph dynamic, the rate reader static
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert [n.meta["lora_fx_mode"]["rate"] for n in sdpa] == [0.25]


def test_sites_only_capture_is_one_static_export(monkeypatch):
    calls = _exports(monkeypatch)
    gm = lora_fx.trace(_AttnDropout().eval(), (torch.randn(2, 5, 8),), dynamic=False, train_capture=False)
    assert calls == [(False, None)]
    assert [s.id for s in lora_fx.sites(gm)] == ["qkv"]


class _Scan(nn.Module):
    """A recurrence written as a Python loop over the sequence (like Mamba's slow path): torch.export
    unrolls it, which fixes the sequence length to the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        h, state, out = self.emb(ids), None, []
        for t in range(ids.shape[1]):
            step = self.proj(h[:, t])
            state = torch.tanh(step if state is None else step + state)
            out.append(state)
        return torch.stack(out, 1)


def test_a_size_fixed_by_the_model_code_is_reported_and_verification_keeps_it(tmp_path):
    ids = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"ids dim 1 \(size 6\): fixed to the example's size by the model's code"):
        gm = lora_fx.trace(_Scan(), (ids,))
    cap = lora_fx.graph_module.capture_of(gm)
    assert [n for n in cap.mode_notes if "ids dim 1 (size 6)" in n] == cap.static_notes
    assert cap.dims == {0: (0,)}
    lgm = lora_fx.lorafy(gm, "proj", rank=2)
    torch.nn.init.normal_(lora_fx.lora_parameters(lgm)[1])
    rep = lora_fx.fold_and_export(lgm, str(tmp_path / "scan.onnx"))
    assert rep.verification.ok
    # the batch grows (still dynamic), the sequence stays at 6 (the graph has 6 unrolled steps)
    assert [c.shapes for c in rep.verification.numerics] == ["(2, 6)", "(3, 6)"]


def test_dynamic_token_inputs_raise_no_fixed_size_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note would be a UserWarning
        gm = lora_fx.trace(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4)), (torch.randint(0, 10, (2, 5)),))
    assert not lora_fx.graph_module.capture_of(gm).mode_notes


def test_inputs_that_are_one_tensor_stay_two_graph_inputs():
    """``model(ids, labels=ids)``: torch.export would merge them into one input and read ids for labels."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10)

        def forward(self, ids, labels):
            return nn.functional.cross_entropy(self.head(self.emb(ids)).flatten(0, 1), labels.flatten())

    model, ids = LM(), torch.randint(0, 10, (2, 5))
    with pytest.warns(UserWarning, match=r"\['labels'\] shared memory with an earlier input and were cloned"):
        gm = lora_fx.trace(model, (ids,), {"labels": ids})
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["ids", "labels"]
    other = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(gm(ids, labels=other), model(ids, labels=other))
