"""capture_retry: models torch.export refuses, captured by the retry ladder and shipped like any other."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import first_tensor, randomize_lora
from torch import nn

import lora_fx
from lora_fx.capture_retry import noop_casts, where
from lora_fx.graph_module import capture_of


class _Experts(nn.Module):
    """A mixture of experts written as most Hugging Face MoE layers are: a Python loop over the experts that
    skips an expert without tokens (a data-dependent guard torch.export cannot decide)."""

    def __init__(self, n: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, n)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = torch.where(choice == e)[0]
            if rows.numel() == 0:
                continue
            out = out.index_add(0, rows, expert(flat[rows]))
        return out.reshape(x.shape)


def _experts_example():
    torch.manual_seed(2)
    model = _Experts().eval()
    x = torch.randn(2, 6, 8)
    assert len(set(model.gate(x.reshape(-1, 8)).argmax(-1).tolist())) == 3  # every expert gets tokens
    return model, x


class _Branchy(nn.Module):
    """A branch on a tensor value (no index op): only draft_export (specialize_branches=True) gets past it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:
            return y.relu()
        return -y


class _CountingRows(nn.Module):
    """Selected rows whose mean depends on how many were selected: dense routing is not exact here."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        rows = torch.where(x[:, 0] > 0)[0]
        if rows.numel() == 0:
            return x.sum(0) * 0
        return self.proj(x[rows]).mean(0)


class _PaddedSum(nn.Module):
    """Sums the rows a padding mask keeps: dense routing equals it only while the mask is all ones."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, attention_mask):
        rows = torch.where(attention_mask.reshape(-1))[0]
        if rows.numel() == 0:
            return x.sum((0, 1)) * 0
        return self.proj(x.reshape(-1, 4)[rows]).sum(0)


def _specialized_trace(model, x, tries: int = 3):
    """torch 2.13's draft_export is not deterministic: about half its graphs fail their own assertions on the
    example (capture_retry drafts again, 4 times, then tries static shapes), so a whole trace can still fail
    now and then. Then the test is an expected failure of torch's, never a pass: what a captured graph does is
    asserted whenever one is captured."""
    for _ in range(tries):
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                gm = lora_fx.trace(model, (x,), specialize_branches=True)
        except lora_fx.CaptureError as e:
            failure = e
            continue
        assert any(re.search(r"could not decide \d+ data-dependent branch", str(w.message)) for w in said)
        return gm
    pytest.xfail(f"torch.export.draft_export failed {tries} traces in a row (not deterministic): {str(failure)[:200]}")


def _dense_trace(model, *args):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        gm = lora_fx.trace(model, args)
    assert sum("captured densely" in str(w.message) for w in said) == 1
    return gm


def test_an_expert_loop_is_captured_densely_by_default_exact_at_other_routing_and_trains():
    model, x = _experts_example()
    gm = _dense_trace(model, x)
    assert not any(n.op == "call_function" and "nonzero" in str(n.target) for n in gm.graph.nodes)
    for seed in range(3):  # other inputs route other tokens to other experts; a token may go to none of them
        y = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(gm(y), model(y), rtol=1e-5, atol=1e-6)
    lgm = lora_fx.lorafy(gm, "experts.*", rank=2)
    assert len(lgm.lora_report.sites) == 3  # every expert's linear is a site
    randomize_lora(lgm)
    lgm.train()
    lgm(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora_fx.lora_parameters(lgm))


def test_an_expert_loop_on_the_meta_device_is_captured_densely_for_the_export_to_prove():
    with torch.device("meta"):
        model = _Experts().eval()
    gm = _dense_trace(model, torch.randn(2, 6, 8, device="meta"))  # nothing to run: no proof at capture
    assert sum(n.target is torch.ops.aten.index_add.default for n in gm.graph.nodes) == 3  # one per expert
    assert len(lora_fx.sites(gm)) == 4  # the gate and the 3 experts


@pytest.mark.slow
def test_an_expert_loop_ships_verified_at_other_routing(tmp_path):
    model, x = _experts_example()
    lgm = lora_fx.lorafy(_dense_trace(model, x), "experts.*", rank=2)
    randomize_lora(lgm)
    rep = lora_fx.fold_and_export(lgm, tmp_path / "moe.onnx")
    assert rep.verification.ok and len(rep.verification.numerics) == 2  # example + batch 3 of random values


def test_dense_routing_that_changes_the_function_is_refused_naming_the_line():
    model = _CountingRows()
    with pytest.raises(lora_fx.CaptureError, match=r"(?s)in forward: if rows.numel\(\) == 0.*"
                       r"dense routing \(rung 2\) was refused: its graph differs from the model"):
        lora_fx.trace(model, (torch.randn(6, 4),))


def test_dense_routing_is_proven_on_padded_masks_too():
    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(lora_fx.CaptureError, match=r"(?s)dense routing \(rung 2\) was refused: its graph differs"):
        lora_fx.trace(_PaddedSum(), (x, mask))


def test_a_data_dependent_branch_is_refused_by_default_with_what_to_do():
    with pytest.raises(lora_fx.CaptureError, match=r"(?s)data-dependent.*if y.sum\(\) > 0.*specialize_branches=True"):
        lora_fx.trace(_Branchy(), (torch.randn(2, 4),))


def test_specialize_branches_captures_the_example_branch_with_a_note():
    torch.manual_seed(0)
    model, x = _Branchy(), torch.randn(2, 4)
    gm = _specialized_trace(model, x)
    torch.testing.assert_close(gm(x), model(x))


def test_noop_casts_skip_a_cast_that_changes_nothing():
    layer = nn.Linear(2, 2)
    with noop_casts():
        assert layer.to(torch.float32) is layer
        assert layer.to(torch.float64).weight.dtype == torch.float64  # a real cast still casts
    assert nn.Module.to.__name__ == "to" and "noop" not in nn.Module.to.__qualname__


def test_where_names_the_innermost_frame_outside_torch():
    def model_code():
        raise RuntimeError("Could not guard on data-dependent expression Eq(u0, 1) (unhinted: Eq(u0, 1))")

    try:
        model_code()
    except RuntimeError as e:
        text = where(e)
    assert "test_capture_retry.py:" in text and "in model_code: raise RuntimeError" in text
    assert text.endswith("guard torch could not decide: Eq(u0, 1)")


# Hugging Face models torch.export refuses (tiny configs): (model type, head, inputs, config overrides).
REFUSED = {
    "fsmt": ("s2s", "s2s", dict(src_vocab_size=128, tgt_vocab_size=128, langs=["en", "de"])),
    "led": ("s2s", "s2s", dict(attention_window=[4, 4], max_encoder_position_embeddings=64,
                               max_decoder_position_embeddings=64)),
    "longformer": ("base", "ids", dict(attention_window=[4, 4])),
    "longt5": ("s2s", "s2s", dict(local_radius=2, global_block_size=4)),
    "switch_transformers": ("s2s", "s2s", dict(num_experts=4, expert_capacity=8, num_sparse_encoder_layers=1,
                                               num_sparse_decoder_layers=1)),
    "nllb-moe": ("s2s", "s2s", dict(num_experts=4, expert_capacity=8, encoder_sparse_step=1, decoder_sparse_step=1)),
    "dbrx": ("lm", "ids", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                               ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
                               attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0})),
    "nystromformer": ("base", "ids", dict(num_landmarks=4, segment_means_seq_len=8, conv_kernel_size=3)),
}
BY_DEFAULT = {"longt5", "switch_transformers", "nllb-moe"}  # attention_mask=ones; dense routing (exact, proven)
WITH_FLAG = {"fsmt", "led", "longformer"}  # draft_export: branches specialised to the example (specialize_branches)
NEAR_MISS = {"led", "longformer"}  # ORT vs torch 1.1-1.3e-4 for the base model's file too: judged against it


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hf_models_torch_export_refuses(name, tmp_path):
    from sweep_models import hf

    head, inputs, overrides = REFUSED[name]
    model, args, kwargs = hf(name, head, inputs, **overrides)()
    if name not in BY_DEFAULT:  # a CaptureError naming the model's line (and the flag where draft_export applies)
        pattern = r"(?s)\nat .+:\d+ in \w+: .*specialize_branches=True" if name in WITH_FLAG else r"(?s)\nat .+:\d+ in \w+: "
        with pytest.raises(lora_fx.CaptureError, match=pattern):
            lora_fx.trace(model, args, kwargs)
        if name not in WITH_FLAG:
            return
    try:
        gm = lora_fx.trace(model, args, kwargs, specialize_branches=name in WITH_FLAG)
    except lora_fx.CaptureError as e:
        if name in BY_DEFAULT:
            raise
        pytest.xfail(f"torch.export.draft_export failed (not deterministic): {str(e)[:200]}")
    kwargs = capture_of(gm).kwargs  # LongT5, Switch: the ladder added attention_mask
    experts = [s.id for s in lora_fx.sites(gm) if ".experts." in s.id]
    assert bool(experts) == (name in ("switch_transformers", "nllb-moe"))  # the experts' linears are sites
    lgm = lora_fx.lorafy(gm, experts or [s.id for s in lora_fx.sites(gm) if "linear" in s.op][:3], rank=2)
    randomize_lora(lgm)
    lgm.train()
    first_tensor(lgm(*args, **kwargs)).pow(2).mean().backward()
    rep = lora_fx.fold_and_export(lgm.eval(), tmp_path / "m.onnx")
    assert rep.verification.ok and rep.verification.numerics
    for c in rep.verification.numerics:  # within fp32's tolerance, or (a near miss) within 1.5x the base model's file
        assert c.max_rel_err <= 1e-4 or (name in NEAR_MISS and c.max_rel_err <= 1.5 * c.base_rel_err)
