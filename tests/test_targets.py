"""The pattern language (targets.py): owner-module names, globs, rank limits, and which pattern is blamed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import traced
from torch import nn

import lora_fx


class _FunctionalAttention(nn.Module):
    """timm-style: the attention module calls F.linear with its children's weights (qkv, proj)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.q_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return F.linear(a, self.proj.weight, self.proj.bias)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": _FunctionalAttention()}) for _ in range(2)])
        self.fc = nn.Linear(16, 5)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = x + b["attn"](x)
        return self.fc(x.mean(1))


@pytest.fixture(scope="module")
def net_gm():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.trace(_Net().eval(), (torch.randn(2, 3, 16, 16),))


def test_functional_use_of_a_child_weight_matches_the_child_path(net_gm):
    lgm = lora_fx.lorafy(net_gm, ["*.attn.qkv", "*.attn.proj"], rank=2)
    weights = sorted(s.weight for s in lgm.lora_report.sites)
    assert weights == [f"blocks.{i}.attn.{n}.weight" for i in (0, 1) for n in ("proj", "qkv")]
    # and the LoRA is live: a random B changes the output (PEFT's LoRA on these modules does nothing)
    x = torch.randn(2, 3, 16, 16)
    base = lgm(x)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_()
    assert (lgm(x) - base).abs().max() > 1e-3


def test_tied_weight_read_by_another_module_is_not_matched_by_its_owner():
    gm = traced("gpt2")[3]
    lgm = lora_fx.lorafy(gm, "*.wte", rank=2)
    assert [s.op for s in lgm.lora_report.sites] == ["embedding"]  # not lm_head's linear


def test_star_dot_glob_matches_a_top_level_module(net_gm):
    lgm = lora_fx.lorafy(net_gm, ["*.fc", "*.stem"], rank=2)
    assert sorted(s.path for s in lgm.lora_report.sites) == ["fc", "stem"]


def test_conv_rank_uses_fan_in_and_large_ranks_are_a_note(net_gm):
    # 3 input channels x 4 x 4 kernel: fan-in 48, so rank 8 is fine (it was refused as > 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lgm = lora_fx.lorafy(net_gm, "stem", rank=8)
    assert lgm.lora_report.notes == []
    a = lgm.get_parameter(lgm.lora_report.branches[0].a)
    assert tuple(a.shape) == (8, 3, 4, 4)
    # above min(fan-in, out) PEFT still trains; lora-fx does too, and says the extra rank adds nothing
    with pytest.warns(UserWarning, match=r"rank 20 exceeds min\(fan-in, out\) = 16"):
        lgm = lora_fx.lorafy(net_gm, "stem", rank=20)
    assert "rank <= 16 suffices" in str(lgm.lora_report)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_(std=0.1)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(lora_fx.fold(lgm)(x), lgm(x), rtol=1e-4, atol=1e-5)


class _BufferWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x @ self.w)


def test_the_pattern_that_matches_nothing_is_blamed_not_another():
    gm = lora_fx.trace(_BufferWeight(), (torch.randn(2, 4),))
    with pytest.raises(lora_fx.PatternError, match="'nope' matches no adaptable site"):
        lora_fx.lorafy(gm, ["lin", "nope", "w"], rank=2)  # "w" names a buffer's matmul, but "nope" is the culprit
    with pytest.raises(lora_fx.SiteError, match="not a parameter"):
        lora_fx.lorafy(gm, ["lin", "w"], rank=2)


class _StdLinear(nn.Linear):
    """Weight standardization (timm's ScaledStdConv2d does this for convs): W is computed in forward."""

    def forward(self, x):
        w = (self.weight - self.weight.mean(1, keepdim=True)) / (self.weight.std(1, keepdim=True) + 1e-5)
        return F.linear(x, w, self.bias)


def test_a_weight_computed_from_a_parameter_names_the_parameter():
    gm = lora_fx.trace(nn.Sequential(_StdLinear(4, 4), nn.Linear(4, 2)).eval(), (torch.randn(2, 4),))
    assert [s.path for s in lora_fx.sites(gm)] == ["1"]
    with pytest.raises(lora_fx.SiteError, match="computed from the parameter 0.weight .* target another site"):
        lora_fx.lorafy(gm, "0", rank=2)
