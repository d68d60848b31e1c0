"""lorafy over the zoo: match counts, structure, B=0 equality, training, and its guarantees."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from helpers import first_tensor, lora_node_count, randomize_lora
from zoo import ZOO_BY_NAME, assert_close, zoo_params

import lora_fx
from lora_fx.graph_module import graph_signature


@pytest.mark.parametrize("case", zoo_params(include_slow=False))
def test_zoo_lorafy_then_train(case):
    model, args, kwargs, gm = traced(case.name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before_sig = graph_signature(gm.graph)
    lgm = lora_fx.lorafy(gm, case.targets, rank=2, alpha=4, dropout=0.1)

    # how many sites matched, and the structure of what was added
    report = lgm.lora_report
    assert len(report.sites) == case.n_sites
    params = dict(lgm.named_parameters())
    for br in report.branches:
        a, b = params[br.a], params[br.b]
        assert "lora_A" in br.a and "lora_B" in br.b
        assert a.shape[0] == 2 and b.shape[1] == 2 and torch.count_nonzero(b) == 0
        assert a.requires_grad and b.requires_grad
    assert report.trainable == sum(p.numel() for p in lora_fx.lora_parameters(lgm))
    assert lora_node_count(lgm) > 0
    assert graph_signature(gm.graph) == before_sig, "lorafy modified its input graph"

    # B = 0: the branches add exactly nothing (bit for bit against the same graph without them);
    # against the captured graph and the eager model, equal up to kernel choice (frozen weights can
    # pick another matmul path)
    lgm.eval()
    ref = model(*args, **kwargs)
    out = first_tensor(lgm(*args, **kwargs))
    assert torch.equal(out, first_tensor(lora_fx.strip(lgm)(*args, **kwargs)))
    assert_close(out, first_tensor(gm(*args, **kwargs)))
    assert_close(first_tensor(gm(*args, **kwargs)), first_tensor(ref))

    # train: only A/B get gradients, the base stays bit-identical, the loss goes down
    base = {n: p.detach().clone() for n, p in lgm.named_parameters() if not p.requires_grad}
    lgm.train()
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-2)
    target = first_tensor(ref).detach().float().roll(1, dims=-1)  # reachable even after a norm
    losses = []
    torch.manual_seed(0)
    for _ in range(8):
        opt.zero_grad()
        loss = (first_tensor(lgm(*args, **kwargs)).float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in lgm.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_lorafied_graph_relorafy_never_adapts_lora_matmuls():
    _, args, kwargs, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    assert [s.id for s in lora_fx.sites(lgm)] == [s.id for s in lora_fx.sites(gm)]
    again = lora_fx.lorafy(lgm, "*", exclude="fc1", rank=2)
    assert {br.site.id for br in again.lora_report.branches} == {"fc1", "fc2", "head"}
    with pytest.raises(lora_fx.SiteError, match="already carries LoRA"):
        lora_fx.lorafy(lgm, "fc1", rank=2)


def test_per_target_settings_rslora_and_report():
    _, args, kwargs, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, [lora_fx.Target("*.q_proj", rank=4, alpha=8), "*.v_proj"], rank=2,
                         use_rslora=True)
    by_op = {br.site.id.rsplit(".", 1)[1]: br for br in lgm.lora_report.branches}
    assert by_op["q_proj"].rank == 4 and by_op["q_proj"].scale == pytest.approx(8 / 2.0)
    assert by_op["v_proj"].rank == 2 and by_op["v_proj"].scale == pytest.approx(2 / 2 ** 0.5)
    lines = str(lgm.lora_report).splitlines()
    assert lines[0].split() == ["site", "op", "weight", "shape", "rank", "scale", "slice"]
    assert len(lines) == 2 + 4  # header, 2 layers x (q, v), summary
    q0 = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj "))
    assert q0.split()[1:] == ["linear", "64x64", "4", "4"]
    r = lgm.lora_report
    assert lines[-1] == (f"4 sites, 4 LoRA pairs; trainable {r.trainable:,} / {r.total:,} parameters "
                         f"({100 * r.trainable / r.total:.3f}%)")


def test_fused_qkv_slices_adapt_only_q_and_v():
    _, args, kwargs, gm = traced("gpt2")
    lgm = lora_fx.lorafy(gm, lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3), rank=2)
    assert len(lgm.lora_report.branches) == 4  # 2 layers x (q, v)
    randomize_lora(lgm)
    folded = lora_fx.fold(lgm)
    for layer in range(2):
        name = f"transformer.h.{layer}.attn.c_attn.weight"
        w0, w1 = gm.get_parameter(name), folded.get_parameter(name)
        k = slice(64, 128)  # GPT-2 Conv1D stores [in, out]: k is the middle third of columns
        assert torch.equal(w0[:, k], w1[:, k])
        assert not torch.equal(w0[:, :64], w1[:, :64]) and not torch.equal(w0[:, 128:], w1[:, 128:])


def test_one_call_site_of_a_shared_weight():
    model, args, kwargs, gm = traced("tied_lm")
    ids = [s.id for s in lora_fx.sites(gm)]
    assert "embed" in ids and "lm_head" in ids
    lgm = lora_fx.lorafy(gm, "lm_head", rank=2)
    assert [br.site.id for br in lgm.lora_report.branches] == ["lm_head"]


def test_conv_and_embedding_branch_shapes():
    _, _, _, gm = traced("convnet")
    lgm = lora_fx.lorafy(gm, "conv1", rank=2)
    (br,) = lgm.lora_report.branches
    w = gm.get_parameter(br.site.weight)
    assert lgm.get_parameter(br.a).shape == (2, w.shape[1], *w.shape[2:])
    assert lgm.get_parameter(br.b).shape == (w.shape[0], 2, 1, 1)
    _, _, _, gm = traced("tied_lm")
    lgm = lora_fx.lorafy(gm, "embed", rank=2)
    (br,) = lgm.lora_report.branches
    num, dim = gm.get_parameter(br.site.weight).shape
    assert lgm.get_parameter(br.a).shape == (2, num) and lgm.get_parameter(br.b).shape == (dim, 2)


def test_train_eval_switch_dropout_and_lora_dropout():
    model, args, kwargs, gm = traced("gpt2")
    lgm = lora_fx.lorafy(gm, "*.c_attn", rank=2, dropout=0.5)
    randomize_lora(lgm)
    lgm.eval()
    a, b = lgm(*args), lgm(*args)
    assert torch.equal(a.logits, b.logits)
    lgm.train()
    assert lgm.training and not torch.equal(lgm(*args).logits, a.logits)
    # the model's own dropout follows the mode too, exactly as in eager
    g = lora_fx.trace(model, args, kwargs)
    g.train()
    model.train()
    try:
        torch.manual_seed(1)
        eager = model(*args).logits
        torch.manual_seed(1)
        assert torch.equal(g(*args).logits, eager)
    finally:
        model.eval()


def test_torch_compile_matches_eager():
    _, args, kwargs, gm = traced("functional")
    lgm = lora_fx.lorafy(gm, ZOO_BY_NAME["functional"].targets, rank=2)
    randomize_lora(lgm)
    lgm.eval()
    eager = lgm(*args, **kwargs)
    eager.pow(2).sum().backward()
    grads = [p.grad.clone() for p in lora_fx.lora_parameters(lgm)]
    for p in lora_fx.lora_parameters(lgm):
        p.grad = None
    compiled = torch.compile(lgm)
    out = compiled(*args, **kwargs)
    out.pow(2).sum().backward()
    assert_close(out, eager)
    for g, p in zip(grads, lora_fx.lora_parameters(lgm), strict=True):
        assert_close(p.grad, g)


def test_symbolic_trace_graph_modules_are_accepted():
    model, args, kwargs, _ = traced("mlp")
    gm = torch.fx.symbolic_trace(model)
    assert {s.op for s in lora_fx.sites(gm)} == {"Linear"}
    lgm = lora_fx.lorafy(gm, ["fc1", "head"], rank=2)
    randomize_lora(lgm)
    out = lgm(*args)
    assert not torch.equal(out, model(*args))
    assert_close(lora_fx.fold(lgm)(*args), out)


class _CausalAttention(torch.nn.Module):
    """sdpa with dropout_p and is_causal given positionally (the rewiring must keep is_causal)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, None, 0.3 if self.training else 0.0,
                                                                True)


def test_attention_dropout_rewiring_keeps_positional_arguments():
    model, x = _CausalAttention().eval(), torch.randn(2, 5, 8)
    gm = lora_fx.trace(model, (x,))
    assert torch.equal(gm(x), model(x))
    gm.train()
    model.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(0)
    assert torch.equal(a, model(x))
