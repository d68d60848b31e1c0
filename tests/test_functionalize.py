"""passes/functionalize: a custom autograd Function whose forward writes its output in place (Hugging Face's
XSoftmax in SEW-D and DeBERTa) trains through the captured graph as eagerly through its own backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.passes.functionalize import functionalize, out_of_place

aten = torch.ops.aten
TOL = 1e-5


class XSoftmax(torch.autograd.Function):
    """DeBERTa's masked softmax: the forward zeroes masked probabilities in place; its own backward."""

    @staticmethod
    def forward(ctx, x, mask):
        rmask = ~mask.to(torch.bool)
        out = torch.softmax(x.masked_fill(rmask, torch.finfo(x.dtype).min), -1)
        out.masked_fill_(rmask, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, -1, out.dtype), None


class XAttention(nn.Module):
    """DeBERTa-style attention: query/key/value projections, XSoftmax over a padding mask, output projection."""

    def __init__(self, dim: int = 8, relu: bool = False) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x, mask):
        scores = self.query(x) @ self.key(x).transpose(-1, -2) / 8**0.5
        probs = XSoftmax.apply(scores, mask[:, None, :].expand_as(scores))
        return self.act(self.out(probs @ self.value(x)))


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # a padded row: the masked fill matters
    return (torch.randn(2, 5, 8, generator=g), mask)


def _first(out) -> torch.Tensor:
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    return out[0] if isinstance(out, (tuple, list)) else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1.0))


def assert_trains_like_peft(model: nn.Module, args: tuple, kwargs: dict, targets: list[str]) -> int:
    """lorafy(trace(model)) and PEFT on the eager model (the Function's own backward), same A/B (B != 0):
    outputs and every A/B gradient agree within 1e-5. Returns how many LoRA pairs were compared."""
    peft = pytest.importorskip("peft")
    lgm = lora_fx.lorafy(lora_fx.trace(model, args, kwargs), targets, rank=2, alpha=4)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    gen, pairs = torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for br in lgm.lora_report.branches:
            layer = pm.base_model.model.get_submodule(br.key)
            for ours, theirs in ((br.a, layer.lora_A["default"].weight), (br.b, layer.lora_B["default"].weight)):
                p = lgm.get_parameter(ours)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                theirs.copy_(p)
                pairs.append((p, theirs))
    lgm.train(), pm.train()  # dropout-free models: train mode runs the same ops, with autograd
    w = torch.randn(_first(pm(*args, **kwargs)).shape, generator=gen)
    ours, theirs = _first(lgm(*args, **kwargs)), _first(pm(*args, **kwargs))
    assert _rel(ours, theirs) <= TOL
    ((w * ours) ** 2).sum().backward()  # "modified by an inplace operation" before functionalize
    ((w * theirs) ** 2).sum().backward()
    for p, q in pairs:
        assert q.grad.abs().max() > 0 and _rel(p.grad, q.grad) <= TOL
    return len(pairs) // 2


def test_out_of_place_forms():
    assert out_of_place(aten.masked_fill_.Scalar) is aten.masked_fill.Scalar
    assert out_of_place(aten.add_.Tensor) is aten.add.Tensor
    assert out_of_place(aten.masked_fill.Scalar) is None  # not in place
    assert out_of_place(aten.detach_.default) is None  # its twin is a view: no out-of-place form


def test_custom_function_mutating_its_output_trains_like_eager():
    model = XAttention(relu=True).eval()
    args = _inputs()
    gm = lora_fx.trace(model, args)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # the softmax output's masked fill is out of place; ReLU(inplace) on a linear's output stays in place
    assert targets.count(aten.masked_fill.Scalar) == 2 and aten.masked_fill_.Scalar not in targets
    assert targets.count(aten.relu_.default) == 1
    torch.testing.assert_close(gm(*args), model(*args), rtol=TOL, atol=TOL)
    assert assert_trains_like_peft(model, args, {}, ["query", "value", "out"]) == 3
    lgm = lora_fx.lorafy(gm, ["query"], rank=2)
    torch.testing.assert_close(lora_fx.fold(lgm)(*args), model(*args), rtol=TOL, atol=TOL)  # fold proves its graph


def test_a_write_into_an_input_or_a_view_stays_in_place():
    def f(x, y):
        s = torch.softmax(x, -1)
        v = s.view(-1)  # s is viewed: writing s writes v too
        s.mul_(2)
        y.add_(1)  # an input: the caller sees the write
        return v + y.sum()

    gm = torch.fx.symbolic_trace(f)
    ep = torch.export.export(gm, (torch.randn(3, 4), torch.randn(3)), strict=False)
    graph = ep.module().graph
    assert functionalize(graph) == 0


def _sewd():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SEWDConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                  num_conv_pos_embedding_groups=2, vocab_size=32, squeeze_factor=2,
                                  hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                  feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    torch.manual_seed(0)
    return transformers.SEWDModel(cfg).eval(), (torch.randn(2, 1600, generator=torch.Generator().manual_seed(0)),), {}


def _deberta_v2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DebertaV2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                       pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return transformers.DebertaV2Model(cfg).eval(), (ids,), {"attention_mask": mask}


@pytest.mark.slow
@pytest.mark.parametrize("build, targets", [(_sewd, ["value_proj", "dense"]),  # SEW-D calls query_proj twice
                                            (_deberta_v2, ["query_proj", "value_proj"])], ids=["sew-d", "deberta-v2"])
def test_hf_xsoftmax_attention_trains_like_peft(build, targets):
    model, args, kwargs = build()
    assert assert_trains_like_peft(model, args, kwargs, targets) >= 4
