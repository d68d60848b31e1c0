"""DoRA (lora_fx/dora.py, passes/variants.py): PEFT parity unmerged and merged, both file directions, the
expanded norm, fused-qkv slices, QLoRA, swap/refold/combine, refusals, and the export's proof."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.dora import row_norms
from lora_fx.errors import AdapterError, SiteError
from lora_fx.switching import refold_onnx

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = 1e-5


def llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"], (torch.randint(0, 100, (2, 8)),)


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_fc"], (torch.randint(0, 100, (2, 8)),)


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False), ["query", "value"], (torch.randint(0, 100, (2, 8)),)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def conv():
    return ConvNet(), ["conv1", "conv2", "head"], (torch.randn(2, 3, 8, 8),)


def out(o) -> torch.Tensor:
    if hasattr(o, "logits"):
        return o.logits
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def trained_peft(model, targets, seed=1, **config):
    """A PEFT DoRA model whose A, B and m look trained (random, m off its initial norms)."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   use_dora=True, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


@pytest.mark.parametrize("build", [llama, pytest.param(gpt2, marks=pytest.mark.slow),
                                   pytest.param(bert, marks=pytest.mark.slow), conv], ids=["llama", "gpt2", "bert", "conv"])
def test_peft_dora_adapters_load_save_and_fold_as_peft(build, tmp_path):
    torch.manual_seed(0)
    model, targets, args = build()
    model.eval()
    pm = trained_peft(model, targets)
    pm.save_pretrained(tmp_path / "peft")
    lgm = lora_fx.load_adapter(lora_fx.trace(model, args), tmp_path / "peft")  # lorafies from the file
    branches = lgm.lora_report.branches
    assert len(branches) == len(targets) * (1 if build is conv else 2) and all(br.magnitude for br in branches)
    expected = out(pm(*args))
    assert rel(out(lgm(*args)), expected) < TOL
    lora_fx.save_adapter(lgm, tmp_path / "ours")  # ... and PEFT reads lora-fx's file
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert rel(out(back(*args)), expected) < TOL
    folded = lora_fx.fold(lgm)
    assert not any("lora_" in n for n, _ in folded.named_parameters())
    merged = pm.merge_and_unload()
    assert rel(out(folded(*args)), out(merged(*args))) < TOL
    for br in branches:  # the folded weight is PEFT's merged weight
        ours, theirs = folded.get_parameter(br.site.weight), merged.get_parameter(br.site.weight)
        assert rel(ours, theirs) < TOL


def test_gradients_and_dropout_match_peft():
    torch.manual_seed(0)
    model, targets, (ids,) = llama()
    pm = trained_peft(model.eval(), targets, lora_dropout=0.25)
    lgm = lora_fx.lorafy(lora_fx.trace(model, (ids,)), [f"*.{t}" for t in targets], rank=4, alpha=8, dropout=0.25,
                         dora=True)
    pairs = []
    with torch.no_grad():
        for br in lgm.lora_report.branches:
            layer = pm.base_model.model.get_submodule(br.key)
            for ours, theirs in zip(br.names, (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                               layer.lora_magnitude_vector["default"].weight), strict=True):
                lgm.get_parameter(ours).copy_(theirs)
                pairs.append((lgm.get_parameter(ours), theirs))
    assert len(lora_fx.lora_parameters(lgm)) == len(pairs) == 18  # A, B and m of 6 sites
    for mode in ("eval", "train"):  # train: PEFT's dropout form, same masks from the same seed
        getattr(lgm, mode)()
        getattr(pm, mode)()
        torch.manual_seed(5)
        ours = lgm(ids).logits
        torch.manual_seed(5)
        theirs = pm(ids).logits
        assert rel(ours, theirs) < TOL, mode
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    (ours * w).square().sum().backward()
    (theirs * w).square().sum().backward()
    for p, q in pairs:
        assert p.grad is not None and rel(p.grad, q.grad) < TOL


def test_expanded_row_norm_equals_the_direct_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    a, b = torch.randn(6, 40, generator=g) * 0.3, torch.randn(48, 6, generator=g) * 0.3
    direct = torch.linalg.vector_norm(w + 1.5 * b @ a, dim=1)
    assert rel(row_norms(w, a, b, 1.5), direct) < 1e-6
    assert rel(row_norms(w.T.contiguous().T, a, b, 1.5), direct) < 1e-6  # an (in, out) weight's view
    assert (row_norms(w, a, b, 1.5) - direct).abs().max() / direct.min() < 1e-6


@pytest.mark.slow
def test_fused_qkv_slices_take_dora_and_fold_exactly():
    torch.manual_seed(0)
    model, _, args = gpt2()
    model.eval()
    gm = lora_fx.trace(model, args)
    lgm = lora_fx.lorafy(gm, lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3, dora=True), rank=4)
    branches = lgm.lora_report.branches
    assert len(branches) == 4 and all(lgm.get_parameter(br.magnitude).shape == (32,) for br in branches)
    assert rel(out(lgm(*args)), out(model(*args))) < TOL  # fresh: B = 0, m = ||W|| -> the base model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    folded = lora_fx.fold(lgm)
    assert rel(out(folded(*args)), out(lgm(*args))) < TOL
    w0, w1 = gm.get_parameter(branches[0].site.weight), folded.get_parameter(branches[0].site.weight)
    assert torch.equal(w0[:, 32:64], w1[:, 32:64]) and not torch.equal(w0[:, :32], w1[:, :32])  # k untouched


def test_dora_on_sites_it_cannot_fold_is_refused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.w = nn.Parameter(torch.randn(8, 8))
            self.fc = nn.Linear(8, 8)

        def forward(self, ids):
            return self.fc(torch.einsum("bsi,oi->bso", self.emb(ids), self.w))

    gm = lora_fx.trace(Mixed().eval(), (torch.randint(0, 10, (2, 3)),))
    with pytest.raises(SiteError, match=r"site emb .*cannot take DoRA.*embedding"):
        lora_fx.lorafy(gm, "emb", dora=True)
    with pytest.raises(SiteError, match=r"cannot take DoRA: an einsum"):
        lora_fx.lorafy(gm, "w", dora=True)
    with pytest.raises(SiteError, match=r"DoRA with init='olora' is not supported"):
        lora_fx.lorafy(gm, "fc", dora=True, init="olora")
    lgm = lora_fx.lorafy(gm, ["emb", lora_fx.Target("fc", dora=True)])  # a Target's dora is per site
    assert [br.magnitude is not None for br in lgm.lora_report.branches] == [False, True]


@pytest.mark.slow
def test_qlora_base_trains_dora_and_folds(tmp_path):
    torch.manual_seed(0)
    model, targets, (ids,) = llama()
    lgm = lora_fx.lorafy(lora_fx.trace(model.eval(), (ids,)), [f"*.{t}" for t in targets], rank=4, dora=True)
    q = lora_fx.quantize_base(lgm, scheme="int8")
    names = [br.magnitude for br in q.lora_report.branches]
    before = [q.get_parameter(n).detach().clone() for n in names]
    opt = torch.optim.SGD(lora_fx.lora_parameters(q), lr=0.05)
    for _ in range(2):
        q(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(q.get_parameter(n), m) for n, m in zip(names, before, strict=True))  # m trains
    assert rel(lora_fx.fold(q)(ids).logits, q(ids).logits) < TOL  # folded into the int8 base it trained on


@pytest.mark.slow
def test_swap_and_combine_with_dora(tmp_path):
    torch.manual_seed(0)
    model, targets, (ids,) = llama()
    model.eval()
    gm = lora_fx.trace(model, (ids,))
    plain = lora_fx.lorafy(gm, "*.q_proj", rank=4)
    pm = trained_peft(model, ["q_proj"])
    pm.save_pretrained(tmp_path / "dora")
    dora = lora_fx.load_adapter(gm, tmp_path / "dora")
    folded = lora_fx.fold(plain)
    with pytest.raises(AdapterError, match="is DoRA.*pass base="):
        lora_fx.swap_adapter(folded, tmp_path / "dora", old=tmp_path / "dora")
    lora_fx.swap_adapter(folded, tmp_path / "dora", base=model)  # exact base: DoRA's fold from W
    assert rel(folded(ids).logits, pm(ids).logits) < TOL
    assert rel(folded(ids).logits, lora_fx.fold(dora)(ids).logits) < TOL
    with pytest.raises(AdapterError, match="DoRA adapter; a weighted sum"):
        lora_fx.combine_adapters(gm, [(tmp_path / "dora", 1.0)])


@pytest.mark.slow
def test_dora_export_is_proven_and_refolds(tmp_path):
    torch.manual_seed(0)
    model, targets, (ids,) = llama()
    model.eval()
    pm = trained_peft(model, targets)
    pm.save_pretrained(tmp_path / "dora")
    lgm = lora_fx.load_adapter(lora_fx.trace(model, (ids,)), tmp_path / "dora")
    report = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx")
    v = report.verification
    assert v.ok and v.graph_ok and v.structure.ok and report.lora_nodes_added == 0, str(v)
    base = lora_fx.fold_and_export(lora_fx.lorafy(lora_fx.trace(model, (ids,)), [f"*.{t}" for t in targets]),
                                   tmp_path / "base.onnx")
    assert base.verification.ok
    refold = refold_onnx(tmp_path / "base.onnx", tmp_path / "dora", tmp_path / "re.onnx",
                                 base_onnx=tmp_path / "base.onnx")
    assert len(refold.rewritten) == 6
    with pytest.raises(AdapterError, match="old adapter .* is DoRA"):
        refold_onnx(tmp_path / "task.onnx", tmp_path / "dora", tmp_path / "x.onnx", old_adapter=tmp_path / "dora")


def test_ort_multi_lora_adapters_refuse_dora(tmp_path):
    """ORT adapter files override A/B of an unfolded export; DoRA's m and norm cannot ride along: refused."""
    model, _, args = conv()
    lgm = lora_fx.lorafy(lora_fx.trace(model.eval(), args), ["conv1", "head"], rank=2, dora=True)
    with pytest.raises(lora_fx.ExportError, match=r"export_multi_lora: conv1 \(and 1 more\) are DoRA branches"):
        lora_fx.export_multi_lora(lgm, tmp_path / "multi.onnx")
    assert not (tmp_path / "multi.onnx").exists()
    with pytest.raises(AdapterError, match="write_ort_adapter: .* cannot express DoRA"):
        lora_fx.write_ort_adapter(lgm, tmp_path / "a.onnx_adapter", tmp_path / "multi.onnx")
