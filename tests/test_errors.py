"""The bad-input catalogue: one case per row, each asserting the exception type and that the message
names the culprit and a fix. No case may end in a bare KeyError/AttributeError/IndexError."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import traced
from torch import nn

import lora_fx


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    error: type[Exception]
    says: list[str]  # regexes the message must contain: the culprit and the fix


class _BufferWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x @ self.w)


class _GroupedConv(nn.Module):
    """SqueezeBERT's attention projections: Conv1d with groups=4, then an ordinary one."""

    def __init__(self):
        super().__init__()
        self.query = nn.Conv1d(8, 8, 1, groups=4)
        self.out = nn.Conv1d(8, 8, 1)

    def forward(self, x):
        return self.out(self.query(x))


class _ValueBranch(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def _lorafied_mlp():
    return lora_fx.lorafy(_mlp()[3], "fc1", rank=2)


def _export_to(path):
    return lambda: lora_fx.fold_and_export(_lorafied_mlp(), path)


def _without_onnxruntime():
    from unittest import mock

    from lora_fx.exporters.verify.ort import ort_session

    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    lora_fx.fold_and_export(_lorafied_mlp(), path, verify=False)
    with mock.patch.dict(sys.modules, {"onnxruntime": None}):
        ort_session(path)


def _saved_adapter(mutate=None) -> str:
    """An adapter folder saved from the lorafied MLP, optionally damaged by ``mutate(file)``."""
    d = tempfile.mkdtemp()
    lgm = _lorafied_mlp()
    lora_fx.save_adapter(lgm, d)
    if mutate is not None:
        mutate(os.path.join(d, "adapter_model.safetensors"))
    return d


def _corrupt(f):
    with open(f, "wb") as fh:
        fh.write(os.urandom(256))


def _truncate(f):
    data = open(f, "rb").read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])


def _nan_adapter() -> str:
    d = tempfile.mkdtemp()
    lgm = _lorafied_mlp()
    with torch.no_grad():
        lora_fx.lora_parameters(lgm)[1][0, 0] = float("nan")
    lora_fx.save_adapter(lgm, d)
    return d


def _gpt2():
    return traced("gpt2")[3]


def _mlp():
    return traced("mlp")


def _meta_mlp():
    from lora_fx.examples import zoo_models

    model, args, _ = zoo_models.mlp()
    return lora_fx.trace(model.to("meta"), tuple(a.to("meta") for a in args))


CASES = [
    Case("uncapturable model", lambda: lora_fx.trace(_ValueBranch(), (torch.randn(2, 4),)),
         lora_fx.CaptureError, ["_ValueBranch", "torch.where|torch.cond"]),
    Case("example inputs that do not fit", lambda: lora_fx.trace(_mlp()[0], (torch.randn(2, 7),)),
         lora_fx.CaptureError, ["could not capture", "example args/kwargs fit"]),
    Case("not a module", lambda: lora_fx.trace("gpt2", ()), lora_fx.CaptureError, ["nn.Module", "str"]),
    Case("pattern matches nothing", lambda: lora_fx.lorafy(_gpt2(), "*.q_proj"),
         lora_fx.PatternError, [r"\*\.q_proj", "closest: .*c_proj", "lora_fx.sites"]),
    Case("pattern of the wrong type", lambda: lora_fx.lorafy(_gpt2(), 42), lora_fx.PatternError,
         ["int", "glob string"]),
    Case("empty pattern", lambda: lora_fx.lorafy(_gpt2(), ""), lora_fx.PatternError, ["empty", "'\\*'"]),
    Case("rank 0", lambda: lora_fx.lorafy(_gpt2(), "*.c_attn", rank=0), lora_fx.SiteError,
         ["c_attn", "positive int"]),
    Case("fold on the meta device", lambda: lora_fx.fold(lora_fx.lorafy(_meta_mlp(), "fc1", rank=2)),
         lora_fx.WeightsError, ["fc1", "meta device", "lora_fx.load_weights"]),
    Case("alpha <= 0", lambda: lora_fx.lorafy(_gpt2(), "*.c_attn", alpha=-1), lora_fx.SiteError,
         ["c_attn", "alpha must be"]),
    Case("dropout 1", lambda: lora_fx.lorafy(_gpt2(), "*.c_attn", dropout=1.0), lora_fx.SiteError,
         ["c_attn", r"\[0, 1\)"]),
    Case("unknown init", lambda: lora_fx.lorafy(_gpt2(), "*.c_attn", init="xavier"), lora_fx.SiteError,
         ["xavier", "kaiming"]),
    Case("unknown op", lambda: lora_fx.lorafy(_gpt2(), lora_fx.Target("*.c_attn", ops=("conv3d",))),
         lora_fx.PatternError, ["conv3d", "supported"]),
    Case("slice out of range", lambda: lora_fx.lorafy(_gpt2(), lora_fx.Target("*.c_attn", slices=[(0, 500)])),
         lora_fx.SiteError, ["c_attn", "out of range", "192"]),
    Case("chunk out of range", lambda: lora_fx.lorafy(_gpt2(), lora_fx.Target("*.c_attn", slices=[3], chunks=3)),
         lora_fx.SiteError, ["c_attn", "chunk 3", "0..2"]),
    Case("overlapping slices", lambda: lora_fx.lorafy(_gpt2(), lora_fx.Target("*.c_attn", slices=[(0, 10), (5, 20)])),
         lora_fx.SiteError, ["c_attn", "overlap"]),
    Case("slices on an embedding", lambda: lora_fx.lorafy(_gpt2(), lora_fx.Target("transformer.wpe", slices=[(0, 8)])),
         lora_fx.SiteError, ["wpe", "linear-like"]),
    Case("weight that is not a parameter",
         lambda: lora_fx.lorafy(lora_fx.trace(_BufferWeight(), (torch.randn(2, 4),)), "w"),
         lora_fx.SiteError, ["get_attr w", "not a parameter", "nn.Parameter"]),
    Case("grouped convolution", lambda: lora_fx.lorafy(lora_fx.trace(_GroupedConv(), (torch.randn(2, 8, 5),)), "query"),
         lora_fx.SiteError, ["site query", "grouped convolution \\(groups=4\\)", "fold", "ungrouped"]),
    Case("lorafy twice on the same sites",
         lambda: lora_fx.lorafy(lora_fx.lorafy(_gpt2(), "*.c_attn"), "*.c_attn"),
         lora_fx.SiteError, ["c_attn", "already carries LoRA", "fold"]),
    Case("lorafy of a plain module", lambda: lora_fx.lorafy(_mlp()[0], "fc1"), TypeError,
         ["GraphModule", "lora_fx.trace"]),
    Case("fold of a module with no LoRA", lambda: lora_fx.fold(_gpt2()), lora_fx.FoldError,
         ["no LoRA", "lorafy"]),
    Case("lora_parameters of a module with no LoRA", lambda: lora_fx.lora_parameters(_gpt2()),
         lora_fx.SiteError, ["no LoRA", "lorafy"]),
    Case("export to a missing directory", _export_to("/nonexistent-dir/task.onnx"), lora_fx.ExportError,
         ["/nonexistent-dir", "does not exist", "create it"]),
    Case("export to a path that is a directory", _export_to(tempfile.gettempdir()), lora_fx.ExportError,
         ["is a directory", "model.onnx"]),
    Case("export of a module without LoRA", lambda: lora_fx.fold_and_export(_mlp()[3], "x.onnx"),
         lora_fx.ExportError, ["no LoRA", "lorafy"]),
    Case("corrupt adapter file", lambda: lora_fx.load_adapter(_lorafied_mlp(), _saved_adapter(_corrupt)),
         lora_fx.AdapterError, ["adapter_model.safetensors"]),
    Case("truncated adapter file", lambda: lora_fx.load_adapter(_lorafied_mlp(), _saved_adapter(_truncate)),
         lora_fx.AdapterError, ["adapter_model.safetensors"]),
    Case("adapter of another model", lambda: lora_fx.load_adapter(lora_fx.lorafy(_gpt2(), "*.c_attn"), _saved_adapter()),
         lora_fx.AdapterError, ["fc1", "c_attn"]),
    Case("adapter loaded into another model", lambda: lora_fx.load_adapter(_gpt2(), _saved_adapter()),
         lora_fx.AdapterError, ["fc1", "not in this model", r"GPT2LMHeadModel", "made for MLP"]),
    Case("separate q/k/v names on a fused qkv model", lambda: lora_fx.lorafy(_gpt2(), "q_proj"),
         lora_fx.PatternError, ["'q_proj'", "fuses q, k and v", "c_attn", "slices=\\[0, 2\\], chunks=3"]),
    Case("adapter with NaN", lambda: lora_fx.load_adapter(_lorafied_mlp(), _nan_adapter()),
         lora_fx.AdapterError, ["fc1", "NaN|nan|finite"]),
    Case("adapter folder missing", lambda: lora_fx.load_adapter(_lorafied_mlp(), "/nonexistent-adapter"),
         lora_fx.AdapterError, ["/nonexistent-adapter"]),
    Case("onnxruntime missing", _without_onnxruntime, lora_fx.ExportError,
         ["onnxruntime is not installed", "pip install onnxruntime"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case):
    with pytest.raises(Exception) as info:
        case.call()
    err = info.value
    assert type(err) not in (KeyError, AttributeError, IndexError), f"bare {type(err).__name__}: {err}"
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    for pattern in case.says:
        assert re.search(pattern, str(err)), f"{pattern!r} not in: {err}"
