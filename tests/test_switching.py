"""Task switching on folded models (swap_adapter) and weighted combinations (combine_adapters)."""

from __future__ import annotations

import pytest
import torch

import lora_fx
from lora_fx.adapters import adapter_of, load_adapter, save_adapter
from lora_fx.switching import SWAP_KEY, combine_adapters, swap_adapter

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    return model, ids, lora_fx.trace(model, (ids,))


def make(gm, targets, seed, rank=4, alpha=8, std=0.3):
    lgm = lora_fx.lorafy(gm, targets, rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return lgm


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two fp32 tensors."""
    ia, ib = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # sign-magnitude -> ordered integers
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


def max_ulps(x, y) -> int:
    assert dict(x.named_parameters()).keys() == dict(y.named_parameters()).keys()
    return max(ulps(p, y.get_parameter(n)) for n, p in x.named_parameters())


@pytest.fixture(scope="module")
def two(gpt2, tmp_path_factory):
    _, _, gm = gpt2
    a = make(gm, ["*.c_attn", "*.mlp.c_fc"], seed=1)
    b = make(gm, [lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3), "*.mlp.c_fc"], seed=2, rank=2, alpha=6)
    path = tmp_path_factory.mktemp("b")
    save_adapter(b, path)
    return a, b, path


def ulp_of_larger(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    big = torch.maximum(x.abs(), y.abs())
    return torch.nextafter(big, torch.full_like(big, float("inf"))) - big


@pytest.mark.parametrize("mode", ["base", "old"])
def test_hundred_swaps_equal_a_fresh_fold(gpt2, two, mode):
    model, ids, gm = gpt2
    a, b, b_dir = two
    start, folded = lora_fx.fold(a), lora_fx.fold(a)
    first = {"base": gm} if mode == "base" else {"old": a}
    ad_a, ad_b = adapter_of(a), b_dir  # an in-memory snapshot and a folder
    after_one = None
    for i in range(100):  # 100 swaps: a -> a -> b -> a -> ... -> b
        swap_adapter(folded, ad_b if i % 2 else ad_a, **(first if i == 0 else {}))
        if i == 1:
            after_one = {n: p.clone() for n, p in folded.named_parameters()}
    assert all(torch.equal(p, after_one[n]) for n, p in folded.named_parameters())  # no drift at all
    fresh = lora_fx.fold(b)
    drift = max_ulps(folded, fresh)
    if mode == "base":  # the true base weights: bit-identical to a fresh fold
        assert drift == 0, f"{drift} ulp from a fresh fold"
    else:  # base recovered once from W' - delta_old: exact where the rounding is invertible, else
        for n, p in folded.named_parameters():  # within 1 ulp of the larger of |W'_old|, |W_new|
            q = fresh.get_parameter(n)
            assert ((p - q).abs() <= ulp_of_larger(q, start.get_parameter(n))).all(), n
    with torch.no_grad():
        err = (folded(ids).logits - b(ids).logits).abs().max().item()
    assert err <= 1e-5
    assert folded.fold_report.folded.keys() == {br.site.id for br in b.lora_report.branches}


def test_swap_to_new_sites_and_back_to_base(gpt2, two):
    _, ids, gm = gpt2
    a, _, _ = two
    folded = lora_fx.fold(a)
    c = make(gm, ["*.attn.c_proj"], seed=5)  # sites a did not touch
    swap_adapter(folded, c, base=gm)
    assert max_ulps(folded, lora_fx.fold(c)) == 0
    swap_adapter(folded, a)  # c's sites go back to their base weights
    assert max_ulps(folded, lora_fx.fold(a)) == 0
    assert torch.equal(folded.get_parameter("transformer.h.0.attn.c_proj.weight"),
                       gm.get_parameter("transformer.h.0.attn.c_proj.weight"))


def test_swap_errors(gpt2, two):
    _, _, gm = gpt2
    a, b, _ = two
    with pytest.raises(lora_fx.AdapterError, match="not a folded module"):
        swap_adapter(a, b)
    folded = lora_fx.fold(a)
    before = {n: p.clone() for n, p in folded.named_parameters()}
    with pytest.raises(lora_fx.AdapterError, match="needs old="):
        swap_adapter(folded, b)
    with pytest.raises(lora_fx.AdapterError, match="covers sites"):
        swap_adapter(folded, b, old=make(gm, ["*.c_attn"], seed=1))
    with pytest.raises(lora_fx.AdapterError, match="does not match what was folded"):
        swap_adapter(folded, b, old=make(gm, ["*.c_attn", "*.mlp.c_fc"], seed=7))
    with pytest.raises(lora_fx.AdapterError, match="tied weight"):  # lm_head shares wte's weight
        swap_adapter(folded, make(gm, ["lm_head"], seed=3), old=a)
    assert SWAP_KEY not in folded.meta
    assert all(torch.equal(p, before[n]) for n, p in folded.named_parameters())


def direct_delta(lgm, scale_by: float) -> dict[str, torch.Tensor]:
    """scale * B @ A per weight, placed in the weight's own layout, computed without lora-fx helpers."""
    out: dict[str, torch.Tensor] = {}
    for br in lgm.lora_report.branches:
        a, b = lgm.get_parameter(br.a).double(), lgm.get_parameter(br.b).double()
        site = br.site
        full = torch.zeros(site.out_features, site.in_features, dtype=torch.float64)
        rows = slice(None) if br.slice is None else slice(*br.slice)
        full[rows] = br.scale * scale_by * (b @ a)
        full = full.T if site.layout in ("in,out", "embedding") else full
        out[site.weight] = out.get(site.weight, 0) + full
    return out


def test_combine_is_the_weighted_sum_of_deltas(gpt2, two):
    _, _, gm = gpt2
    a, b, b_dir = two
    c = make(gm, ["*.mlp.c_fc"], seed=4, rank=30, alpha=10, std=0.1)  # 4 + 2 + 30 > 32: dense fallback
    weights = [(a, 0.7), (b_dir, -0.3), (c, 0.25)]
    combined = combine_adapters(gm, weights)
    want: dict[str, torch.Tensor] = {}
    for src, w in ((a, 0.7), (b, -0.3), (c, 0.25)):
        for name, d in direct_delta(src, w).items():
            want[name] = want.get(name, 0) + d
    for name, d in want.items():
        got = combined.get_parameter(name).double() - gm.get_parameter(name).double()
        err = (got - d).abs().max().item()
        assert err <= 1e-6, f"{name}: combined delta off by {err:.3g}"
    untouched = "transformer.h.0.attn.c_proj.weight"
    assert torch.equal(combined.get_parameter(untouched), gm.get_parameter(untouched))


def test_combine_one_adapter_equals_its_fold(gpt2, two, tmp_path):
    _, ids, gm = gpt2
    a, _, _ = two
    save_adapter(a, tmp_path)
    one = combine_adapters(gm, [(tmp_path, 1.0)])
    with torch.no_grad():
        assert (one(ids).logits - a(ids).logits).abs().max().item() <= 1e-5
    assert load_adapter(gm, tmp_path) is not gm
