"""sites(): the specification of what lora-fx adapts, how each site is read, and how it is named.

Spec:
* every op of the op-kind registry is found: ``aten.linear``, ``addmm`` (GPT-2 Conv1D, weight
  (in, out)), ``matmul`` through a transpose (``x @ w.T``), 2-operand ``einsum``, ``conv1d/2d``,
  ``embedding``; ``symbolic_trace`` modules too;
* a site's (in, out) are the LoRA view: A (r, in), B (out, r), whatever the weight's layout;
* ids: the module path when the module makes one adaptable call; the weight's name when a module
  owns several weights; ``path:weight#k`` for the k-th call of one weight by one module;
* not sites: a weight that is not a parameter, a grouped conv, LoRA's own matmuls;
* graph facts: transposes are matched by op (never ``aten.tanh`` / ``aten.to``), a tied weight's
  reads are counted;
* the registry: a new op kind is one ``register`` call, and then sites, lorafy and fold handle it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from helpers import randomize_lora
from torch import nn

import lora_fx
from lora_fx import kinds
from lora_fx.graph_facts import is_transpose, weight_reads

# (id, op, kind, layout, in_features, out_features, transposed) of every site, in graph order.
EXPECTED = {
    "mlp": [("fc1", "linear", "linear", "out,in", 16, 32, False),
            ("fc2", "linear", "linear", "out,in", 32, 32, False),
            ("head", "linear", "linear", "out,in", 32, 4, False)],
    "functional": [(f"blocks.{i}.{w}", op, kind, "out,in", n_in, n_out, tr)
                   for i in range(2)
                   for w, op, kind, n_in, n_out, tr in (("w_in", "linear", "linear", 16, 32, False),
                                                        ("w_mid", "matmul", "linear", 32, 32, True),
                                                        ("w_out", "einsum", "einsum", 32, 16, False))],
    "convnet": [("conv1", "conv2d", "conv", "conv", 3, 8, False),
                ("conv2", "conv2d", "conv", "conv", 8, 16, False),
                ("seq_conv", "conv1d", "conv", "conv", 16, 16, False),
                ("head", "linear", "linear", "out,in", 32, 10, False)],
    "tied_lm": [("embed", "embedding", "embedding", "embedding", 50, 32, False),
                ("block1", "linear", "linear", "out,in", 32, 32, False),
                ("block2", "linear", "linear", "out,in", 32, 32, False),
                ("lm_head", "linear", "linear", "out,in", 32, 50, False)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_site_of_the_zoo_models(name):
    _, _, _, gm = traced(name)
    got = [(s.id, s.op, s.kind, s.layout, s.in_features, s.out_features, s.transposed) for s in lora_fx.sites(gm)]
    assert got == EXPECTED[name]


def test_gpt2_conv1d_is_addmm_with_an_in_out_weight():
    _, _, _, gm = traced("gpt2")
    found = {s.id: s for s in lora_fx.sites(gm)}
    assert len(found) == 11  # wte, wpe, 2 layers x (c_attn, c_proj, c_fc, mlp.c_proj), lm_head
    qkv = found["transformer.h.0.attn.c_attn"]
    assert (qkv.op, qkv.layout, qkv.shape, qkv.in_features, qkv.out_features) == ("addmm", "in,out", (64, 192), 64, 192)
    assert qkv.weight == "transformer.h.0.attn.c_attn.weight" and qkv.path == "transformer.h.0.attn.c_attn"
    assert found["transformer.wte"].kind == "embedding" and found["lm_head"].layout == "out,in"


def test_einsum_site_records_its_equation_and_weight_operand():
    _, _, _, gm = traced("functional")
    (site,) = [s for s in lora_fx.sites(gm) if s.id == "blocks.0.w_out"]
    assert (site.equation, site.w_operand, site.shape) == ("bsi,oi->bso", 1, (16, 32))


class _Twice(nn.Module):
    """One Linear called twice, with a tanh and a cast in between (not transposes)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x))).to(torch.float32)


def test_repeated_calls_of_one_module_are_numbered():
    gm = lora_fx.trace(_Twice().eval(), (torch.randn(2, 8),))
    assert [s.id for s in lora_fx.sites(gm)] == ["fc:fc.weight#0", "fc:fc.weight#1"]
    assert {s.path for s in lora_fx.sites(gm)} == {"fc"}
    # each call is adapted on its own: only the second one gets a branch
    lgm = lora_fx.lorafy(gm, "fc:fc.weight#1", rank=2)
    assert [br.site.id for br in lgm.lora_report.branches] == ["fc:fc.weight#1"]
    assert lgm.lora_report.branches[0].a == "fc.lora_A.weight_call1"


class _CallAndReach(nn.Module):
    """ProphetNet's decoder: a child embedding called as a module and its weight read by the parent."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(16, 8)

    def forward(self, ids):
        return self.pos(ids) + nn.functional.embedding(ids + 1, self.pos.weight)


def test_sites_of_one_owner_and_weight_are_numbered_so_their_lora_names_differ():
    gm = lora_fx.trace(_CallAndReach().eval(), (torch.randint(0, 14, (2, 5)),))
    assert [(s.id, s.path, s.owner) for s in lora_fx.sites(gm)] == [
        ("pos:pos.weight#0", "pos", "pos"), ("pos:pos.weight#1", "", "pos")]
    lgm = lora_fx.lorafy(gm, "*", rank=2)  # raised "already carries LoRA" when both were named pos.lora_A.weight
    assert [br.a for br in lgm.lora_report.branches] == ["pos.lora_A.weight_call0", "pos.lora_A.weight_call1"]
    randomize_lora(lgm)
    ids = torch.randint(0, 14, (3, 4))
    torch.testing.assert_close(lora_fx.fold(lgm)(ids), lgm(ids), rtol=1e-5, atol=1e-6)


def test_transposes_are_matched_by_op_not_by_name():
    gm = lora_fx.trace(_Twice().eval(), (torch.randn(2, 8),))
    ops = {str(n.target): is_transpose(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert ops["aten.tanh.default"] is False and ops["aten.to.dtype"] is False
    _, _, _, fgm = traced("functional")
    assert [str(n.target) for n in fgm.graph.nodes if is_transpose(n)] == ["aten.numpy_T.default"] * 2


def test_reads_of_a_tied_weight_are_counted():
    _, _, _, gm = traced("tied_lm")
    found = {s.id: s for s in lora_fx.sites(gm)}
    assert found["lm_head"].weight == found["embed"].weight  # one parameter, two sites
    reads = weight_reads(gm.graph)
    assert reads[found["lm_head"].weight] == 2
    assert reads[found["block1"].weight] == 1


class _NotSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(8, 8))  # a buffer, not a parameter
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(8, 8)

    def forward(self, x, img):
        return torch.nn.functional.linear(x, self.w), self.grouped(img), self.fc(x)


def test_buffers_grouped_convs_and_lora_branches_are_not_sites():
    gm = lora_fx.trace(_NotSites().eval(), (torch.randn(2, 8), torch.randn(2, 4, 6, 6)))
    assert [s.id for s in lora_fx.sites(gm)] == ["fc"]
    lgm = lora_fx.lorafy(gm, "fc", rank=2)
    assert [s.id for s in lora_fx.sites(lgm)] == ["fc"]  # the branch's own linears are not sites


def test_symbolic_trace_modules_are_sites():
    model, _, _, _ = traced("mlp")
    found = lora_fx.sites(torch.fx.symbolic_trace(model))
    assert [(s.id, s.op, s.kind, s.weight) for s in found] == [
        ("fc1", "Linear", "linear", "fc1.weight"), ("fc2", "Linear", "linear", "fc2.weight"),
        ("head", "Linear", "linear", "head.weight")]


def test_registry_defines_each_kind_once():
    assert set(kinds.KINDS) == {"linear", "conv", "embedding", "einsum", "experts"}
    for target, spec in kinds.FUNCTIONS.items():
        assert spec.kind in kinds.KINDS, target
    assert {kinds.kind_for_layout(layout).name for layout in kinds.LAYOUTS} == {"linear", "conv", "embedding", "experts"}
    assert kinds.kind_of("addmm", "").name == "linear" and kinds.kind_of("", "conv").name == "conv"
    assert kinds.kind_of("grouped_mm_fallback", "experts:out,in").name == "experts"
    assert kinds.op_names() >= {"linear", "addmm", "mm", "matmul", "einsum", "conv1d", "conv2d", "embedding"}
    with pytest.raises(ValueError, match="registered already"):
        kinds.register(kinds.KINDS["linear"])


class _MatVec(kinds.OpKind):
    """A toy kind for ``torch.mv(W, x)``: everything a new kind needs, in one class."""

    name = "mv"
    functions = {torch.ops.aten.mv.default: kinds.OpSpec("mv", x=1, w=0, layout=kinds.OUT_IN)}

    def build(self, emit, gm, node, site, x, a, b):
        mv = torch.ops.aten.mv.default
        return emit("call_function", mv, (b, emit("call_function", mv, (a, x))))


class _MV(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return torch.mv(self.w, x).relu()


def test_a_new_kind_is_one_registration():
    saved = {id(t): dict(t) for t in (kinds.KINDS, kinds.FUNCTIONS)}  # _MatVec adds to these two only
    x = torch.randn(6)
    gm = lora_fx.trace(_MV().eval(), (x,), dynamic=False)
    assert lora_fx.sites(gm) == []  # unknown op: no site
    kinds.register(_MatVec())
    try:
        (site,) = lora_fx.sites(gm)
        assert (site.id, site.op, site.kind, site.in_features, site.out_features) == ("w", "mv", "mv", 6, 8)
        lgm = lora_fx.lorafy(gm, lora_fx.Target("w", ops=("mv",)), rank=2)
        randomize_lora(lgm, std=0.3)
        folded = lora_fx.fold(lgm)
        assert torch.allclose(folded(x), lgm(x), atol=1e-5) and not torch.allclose(folded(x), gm(x))
        assert folded.fold_report.folded.keys() == {"w"}
    finally:
        for table in (kinds.KINDS, kinds.FUNCTIONS):
            table.clear()
            table.update(saved[id(table)])
    assert lora_fx.sites(gm) == []
