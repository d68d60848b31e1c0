"""The pattern language, as a specification (pure: hand-made Sites, no tracing).

* a pattern is tried against a site's id, module path and weight name;
* a plain name matches exactly or as a dotted suffix (PEFT's rule), never a partial word;
* a glob (``*``, ``?``, ``[``) must match a whole name; a compiled regex must full-match;
* patterns are applied in order and the first one that selects a site sets its settings;
* ``exclude`` removes sites; a list is an error only when no pattern selects a site (PEFT's rule: the
  others are returned as unmatched, and lorafy warns and reports them);
* ``"all-linear"`` (any case) selects the linear-like sites, minus the ``heads`` given;
* ``path:weight#k`` ids address one call of a module that reads a weight several times;
* ``Target(ops=...)`` restricts to op names or kinds; settings are validated per site (a rank above
  min(fan-in, out) is a note, as PEFT accepts it);
* on traced models: a child's weight used functionally matches the child's path, ``"*.fc"`` also
  matches a top-level ``fc``, and a pattern naming an unadaptable matmul is blamed even in a list.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import traced
from torch import nn

import lora_fx
from lora_fx.sites import Site
from lora_fx.targets import Target, as_targets, matches, parse_patterns, resolve, select


def _site(sid: str, *, path: str | None = None, weight: str | None = None, op: str = "linear",
          kind: str = "linear", in_f: int = 16, out_f: int = 48) -> Site:
    path = sid.split(":")[0].split("#")[0] if path is None else path
    weight = f"{path}.weight" if weight is None else weight
    return Site(sid, path, op, kind, weight, "out,in", (out_f, in_f), in_f, out_f, f"n_{len(sid)}")


SITES = [
    _site("model.layers.0.attn.q_proj"),
    _site("model.layers.0.attn.v_proj"),
    _site("model.layers.1.attn.q_proj"),
    _site("model.layers.1.attn.v_proj"),
    _site("model.layers.1.xq_proj"),  # "q_proj" is not a dotted suffix of this one
    _site("blocks.0.w_in", path="blocks.0", weight="blocks.0.w_in", op="matmul"),  # a raw parameter
    _site("conv", op="conv2d", kind="conv"),
    _site("fc:fc.weight#0", path="fc", weight="fc.weight"),
    _site("fc:fc.weight#1", path="fc", weight="fc.weight"),
]


def _ids(patterns, **kw) -> list[str]:
    return [sel.site.id for sel in select(SITES, patterns, rank=kw.pop("rank", 4), alpha=None, dropout=0.0, **kw)]


def test_plain_name_is_a_dotted_suffix():
    assert _ids("q_proj") == ["model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj"]
    assert _ids("attn.v_proj") == ["model.layers.0.attn.v_proj", "model.layers.1.attn.v_proj"]
    assert _ids("model.layers.1.xq_proj") == ["model.layers.1.xq_proj"]  # exact name
    assert not matches("proj", SITES[0])  # a partial word is not a suffix


def test_glob_matches_whole_names():
    assert _ids("*.q_proj") == ["model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj"]
    assert _ids("model.layers.1.*") == ["model.layers.1.attn.q_proj", "model.layers.1.attn.v_proj",
                                        "model.layers.1.xq_proj"]
    assert not matches("layers.1.*", SITES[2])  # a glob is anchored at both ends
    assert _ids("model.layers.[01].attn.v_proj") == ["model.layers.0.attn.v_proj", "model.layers.1.attn.v_proj"]


def test_regex_must_full_match():
    with pytest.raises(lora_fx.PatternError, match="matches no adaptable site"):
        _ids(re.compile("q_proj"))  # a search would match; a full match does not
    assert _ids(re.compile(r".*\.layers\.0\..*")) == ["model.layers.0.attn.q_proj", "model.layers.0.attn.v_proj"]


def test_patterns_match_the_weight_name_of_raw_parameters():
    assert _ids("blocks.0.w_in") == ["blocks.0.w_in"]
    assert _ids("w_in") == ["blocks.0.w_in"]


def test_first_matching_pattern_sets_the_settings():
    sels = select(SITES, [Target("*.layers.0.*", rank=2, alpha=8), Target("*.q_proj", rank=8)],
                  rank=4, alpha=None, dropout=0.1)
    got = {s.site.id: (s.rank, s.alpha, s.dropout) for s in sels}
    assert got == {"model.layers.0.attn.q_proj": (2, 8.0, 0.1), "model.layers.0.attn.v_proj": (2, 8.0, 0.1),
                   "model.layers.1.attn.q_proj": (8, 8.0, 0.1)}  # alpha defaults to the rank
    assert [s.site.id for s in sels] == [s.id for s in SITES if s.id in got]  # graph order, not pattern order


def test_exclude_removes_sites_and_cannot_remove_all():
    assert _ids("*_proj", exclude="*.layers.1.*") == ["model.layers.0.attn.q_proj", "model.layers.0.attn.v_proj"]
    with pytest.raises(lora_fx.PatternError, match="excluded"):
        _ids("*.q_proj", exclude="*.attn.*")


def test_a_list_is_an_error_only_when_no_pattern_selects_a_site():
    sels, unmatched = resolve(SITES, ["*.q_proj", "*.k_proj", "nope"], rank=4, alpha=None, dropout=0.0)
    assert [s.site.id for s in sels] == ["model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj"]
    assert [t.pattern for t in unmatched] == ["*.k_proj", "nope"]  # PEFT accepts the list; lorafy warns
    with pytest.raises(lora_fx.PatternError) as err:
        _ids(["*.k_proj", "*.o_proj"])
    msg = str(err.value)
    assert msg.startswith("none of the 2 patterns selects a site")
    assert "'*.k_proj' matches no adaptable site among 9" in msg and "'*.o_proj' matches no" in msg
    assert "model.layers.0.attn.q_proj" in msg.split("closest:")[1]  # the nearest names are listed
    with pytest.raises(lora_fx.PatternError, match=r"^pattern '\*.k_proj' matches no adaptable site"):
        _ids("*.k_proj")  # one pattern: its own message


def test_all_linear_selects_linear_kinds_minus_the_heads():
    linear = [s.id for s in SITES if s.kind == "linear"]
    assert _ids("all-linear") == linear and _ids("ALL-LINEAR") == linear  # PEFT lower-cases it
    assert _ids("all-linear", heads={"fc"}) == [i for i in linear if not i.startswith("fc:")]
    assert _ids(["conv", "all-linear"], heads={"fc"})[-1] == "conv"
    sels = select(SITES, [Target("*.q_proj", rank=8), Target("all-linear", rank=2)], rank=4, alpha=None,
                  dropout=0.0)
    assert {s.site.id: s.rank for s in sels}["model.layers.1.attn.q_proj"] == 8  # first match wins
    assert {s.rank for s in sels if "q_proj" not in s.site.id} == {2}
    with pytest.raises(lora_fx.PatternError, match="'all-linear' selects no linear site other than the output"):
        select(SITES[6:7], "all-linear", rank=4, alpha=None, dropout=0.0)  # a conv-only model


def test_call_ids_address_one_call():
    assert _ids("fc:fc.weight#1") == ["fc:fc.weight#1"]
    assert _ids("fc") == ["fc:fc.weight#0", "fc:fc.weight#1"]  # the module path selects both calls
    assert _ids("fc:*#0") == ["fc:fc.weight#0"]


def test_ops_restrict_by_op_name_or_kind():
    assert _ids(Target("*", ops=("conv",))) == ["conv"]
    assert _ids(Target("*", ops=("matmul",))) == ["blocks.0.w_in"]
    with pytest.raises(lora_fx.PatternError, match=r"unknown op\(s\) \['gemm'\]"):
        as_targets(Target("*", ops=("gemm",)))


@pytest.mark.parametrize("target, message", [
    (Target("*.layers.0.attn.q_proj", rank=0), "rank must be a positive int"),
    (Target("*.layers.0.attn.q_proj", alpha=-1.0), "alpha must be a finite number"),
    (Target("*.layers.0.attn.q_proj", dropout=1.0), r"dropout must be in \[0, 1\)"),
    (Target("conv", slices=[(0, 8)]), "slices work on linear-like ops"),
    (Target("*.layers.0.attn.q_proj", chunks=3), "needs slices"),
    (Target("*.layers.0.attn.q_proj", slices=[(0, 20), (10, 30)]), "overlap"),
    (Target("*.layers.0.attn.q_proj", slices=[0], chunks=5), "not divisible into 5 chunks"),
])
def test_settings_are_validated_per_site(target, message):
    with pytest.raises(lora_fx.SiteError, match=message):
        _ids(target)


def test_rank_above_min_in_out_is_a_note_not_an_error():
    (sel,) = select(SITES, Target("*.layers.0.attn.q_proj", rank=17), rank=4, alpha=None, dropout=0.0)
    assert sel.rank == 17 and "rank 17 exceeds min(fan-in, out) = 16" in sel.note
    (sel,) = select(SITES, "*.layers.0.attn.q_proj", rank=16, alpha=None, dropout=0.0)
    assert sel.note is None


def test_chunks_pick_equal_parts_of_a_fused_weight():
    (sel,) = select(SITES, Target("*.layers.0.attn.q_proj", slices=[0, 2], chunks=3), rank=4, alpha=None,
                    dropout=0.0)
    assert sel.slices == ((0, 16), (32, 48))


def test_bad_pattern_types_are_errors():
    for bad, message in ((3, "got int"), ([], "no patterns given"), ([""], "empty pattern"),
                         ([3], "is a int")):
        with pytest.raises(lora_fx.PatternError, match=message):
            as_targets(bad)


def test_text_patterns():
    glob, target, regex = parse_patterns(["*.query", "head@4", r"re:.*\.(query|value)"])
    assert glob == "*.query"
    assert target == Target("head", rank=4)
    assert isinstance(regex, re.Pattern) and regex.fullmatch("a.value")
    with pytest.raises(lora_fx.PatternError, match="invalid regular expression"):
        parse_patterns(["re:("])


# -- on traced models ---------------------------------------------------------------------------------

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
        lora_fx.lorafy(gm, ["nope"], rank=2)
    with pytest.raises(lora_fx.SiteError, match="not a parameter"):  # even beside patterns that match
        lora_fx.lorafy(gm, ["lin", "nope", "w"], rank=2)
    with pytest.warns(UserWarning, match="'nope' matches no adaptable site .* as in PEFT"):
        lgm = lora_fx.lorafy(gm, ["lin", "nope"], rank=2)
    assert [s.id for s in lgm.lora_report.sites] == ["lin"] and lgm.lora_report.unmatched == ["nope"]
    assert "note: pattern 'nope' matches no adaptable site" in str(lgm.lora_report)


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
