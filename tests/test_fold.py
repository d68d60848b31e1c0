"""fold over the zoo: same graph as captured, same numbers as the LoRA model, correct rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from helpers import first_tensor, lora_node_count, randomize_lora
from zoo import assert_close, zoo_params

import lora_fx
from lora_fx.delta import delta
from lora_fx.examples import zoo_models
from lora_fx.graph_module import graph_signature


@pytest.mark.parametrize("case", zoo_params(include_slow=False))
def test_zoo_fold_equals_lora_model_and_captured_graph(case):
    model, args, kwargs, gm = traced(case.name)
    eager = {n: p.detach().clone() for n, p in model.state_dict().items()}
    lgm = lora_fx.lorafy(gm, case.targets, rank=2)
    randomize_lora(lgm)
    lgm.eval()
    expected = lgm(*args, **kwargs)
    folded = lora_fx.fold(lgm)

    assert lora_node_count(folded) == 0
    assert not [n for n, _ in folded.named_parameters() if "lora_" in n]
    report = folded.fold_report
    assert len(report.folded) == case.n_sites
    rename = dict(report.untied)
    assert graph_signature(folded.graph, rename=rename) == graph_signature(gm.graph)
    assert_close(first_tensor(folded(*args, **kwargs)), first_tensor(expected), dtype=torch.float32)
    # neither the LoRA module nor the user's model changed
    assert_close(first_tensor(lgm(*args, **kwargs)), first_tensor(expected))
    assert all(torch.equal(p, eager[n]) for n, p in model.state_dict().items())


def test_tied_weight_keeps_its_other_use():
    model, args, kwargs, gm = traced("tied_lm")
    lgm = lora_fx.lorafy(gm, "lm_head", rank=2)
    randomize_lora(lgm, std=0.2)
    lgm.eval()
    folded = lora_fx.fold(lgm)
    report = folded.fold_report
    (new, old), = report.untied.items()
    assert old in ("lm_head.weight", "embed.weight") and "folded" in new
    lines = str(report).splitlines()
    assert lines[0] == "folded 1 site" and lines[1].startswith("  lm_head: max |dW| = ")
    assert lines[2] == f"  untied {new} (copy of {old}, which other uses still read)"
    assert torch.equal(folded.get_parameter(old), gm.get_parameter(old))  # the embedding reads this
    assert not torch.equal(folded.get_parameter(new), gm.get_parameter(old))
    assert_close(folded(*args, **kwargs), lgm(*args, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_rounds_once_from_fp32(dtype):
    model, args, _ = zoo_models.mlp()
    model = model.to(dtype)
    args = tuple(a.to(dtype) for a in args)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), ["fc1", "fc2"], rank=4)
    randomize_lora(lgm, std=0.02)
    folded = lora_fx.fold(lgm)
    for br in lgm.lora_report.branches:
        w = lgm.get_parameter(br.site.weight)
        d = delta([br], lgm.get_parameter, br.site, torch.float32)
        expected = (w.float() + d).to(dtype)
        got = folded.get_parameter(br.site.weight)
        assert got.dtype == dtype
        assert torch.equal(got, expected), "every entry must be round(fp32(W) + fp32 delta)"
        naive = w + (br.scale * (lgm.get_parameter(br.b) @ lgm.get_parameter(br.a))).to(dtype)
        assert (naive != expected).any(), "the naive low-precision merge should differ somewhere"
    assert_close(folded(*args), lgm(*args), dtype=dtype)


def test_fp64_stays_fp64():
    model, args, _ = zoo_models.mlp()
    model, args = model.double(), tuple(a.double() for a in args)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), "*", rank=2)
    assert all(p.dtype == torch.float64 for p in lora_fx.lora_parameters(lgm))
    randomize_lora(lgm)
    folded = lora_fx.fold(lgm)
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    assert_close(folded(*args), lgm(*args))


def test_non_finite_delta_is_an_error_and_changes_nothing():
    _, args, _, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, "fc2", rank=2)
    with torch.no_grad():
        lora_fx.lora_parameters(lgm)[1][0, 0] = float("nan")
    with pytest.raises(lora_fx.FoldError, match=r"fc2.*NaN"):
        lora_fx.fold(lgm)
    assert lora_node_count(lgm) > 0


def test_fold_without_lora_is_an_error():
    _, _, _, gm = traced("mlp")
    with pytest.raises(lora_fx.FoldError, match="no LoRA"):
        lora_fx.fold(gm)


def test_strip_gives_the_base_model():
    _, args, kwargs, gm = traced("gpt2")
    lgm = lora_fx.lorafy(gm, "*.c_attn", rank=2)
    randomize_lora(lgm)
    base = lora_fx.strip(lgm)
    assert graph_signature(base.graph) == graph_signature(gm.graph)
    assert_close(base(*args).logits, gm(*args).logits)


def test_symbolic_trace_module_called_three_times_two_calls_adapted():
    """Each adapted call of a shared module gets its own folded copy (named by its call number)."""

    class Thrice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(torch.relu(self.lin(x)))))

    gm = torch.fx.symbolic_trace(Thrice().eval())
    ids = [s.id for s in lora_fx.sites(gm)]
    lgm = lora_fx.lorafy(gm, ids[:2], rank=2)
    randomize_lora(lgm, std=0.3)
    folded = lora_fx.fold(lgm).eval()
    x = torch.randn(3, 4)
    assert_close(folded(x), lgm.eval()(x))
    assert sorted(folded.fold_report.untied) == ["lin_folded_call0", "lin_folded_call1"]
