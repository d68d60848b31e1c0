"""The passes stay linear in model size: counted, never timed (issue #12).

Every whole-graph scan goes through ``fx.Graph.nodes``; a pass that scans the graph once per site
visits ``sites x nodes`` nodes. These tests count the nodes each pass visits on a 2-block and an
8-block model and require the visits per graph node not to grow with depth (a quadratic pass
quadruples them), so they cannot flake on a loaded machine.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import fx, nn
from torch.fx import graph as fx_graph

import lora_fx
from lora_fx import capture
from lora_fx.adapters import adapter_of
from lora_fx.switching import swap_adapter


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(0.1)
        self.shared = nn.Linear(d, d)  # called twice: two sites of one module (call_module graphs)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        x = x + self.drop(self.o(a))
        return x + self.shared(torch.relu(self.shared(x)))


class Stack(nn.Module):
    """A decoder-like stack with a tied lm_head (one weight, two readers: fold unties it)."""

    def __init__(self, depth: int, d: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


TARGETS = ["*.q", "*.v", "*.o", "*.shared*", "lm_head"]


@contextlib.contextmanager
def node_visits():
    """Counts the nodes every ``for node in graph.nodes`` (either direction) yields inside."""
    count = [0]
    original_iter, original_rev = fx_graph._node_list.__iter__, fx_graph._node_list.__reversed__

    def counted(it):
        for node in it:
            count[0] += 1
            yield node

    fx_graph._node_list.__iter__ = lambda self: counted(original_iter(self))
    fx_graph._node_list.__reversed__ = lambda self: counted(original_rev(self))
    try:
        yield count
    finally:
        fx_graph._node_list.__iter__, fx_graph._node_list.__reversed__ = original_iter, original_rev


def _per_node(fn, gm: fx.GraphModule) -> float:
    with node_visits() as count:
        fn()
    return count[0] / len(gm.graph.nodes)


def _passes(gm: fx.GraphModule, swap: bool = True) -> dict[str, float]:
    """Visits per graph node of each pass on ``gm``."""
    ids = torch.randint(0, 16, (2, 5))
    out: dict[str, float] = {}
    out["sites"] = _per_node(lambda: lora_fx.sites(gm), gm)
    lgm = None

    def lorafy():
        nonlocal lgm
        lgm = lora_fx.lorafy(gm, TARGETS, rank=2, dropout=0.1)

    out["lorafy"] = _per_node(lorafy, gm)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.normal_(0, 0.1)
    folded = None

    def fold():
        nonlocal folded
        folded = lora_fx.fold(lgm)

    out["fold"] = _per_node(fold, gm)
    out["strip"] = _per_node(lambda: lora_fx.strip(lgm), gm)
    out["adapter_of"] = _per_node(lambda: adapter_of(lgm), gm)
    torch.testing.assert_close(folded.eval()(ids), lgm.eval()(ids), rtol=1e-4, atol=1e-4)
    if swap:  # swap_adapter refuses sites of shared weights: an adapter of untied sites
        plain = lora_fx.lorafy(gm, ["*.q", "*.v"], rank=2)
        adapter, base = adapter_of(plain), lora_fx.fold(plain)
        out["swap_adapter"] = _per_node(lambda: swap_adapter(base, adapter, base=gm), gm)
    return out


def _compare(small: dict[str, float], big: dict[str, float]) -> None:
    # linear: visits per node are a constant (small differences: fixed-size parts of the graph)
    grown = {k: round(big[k] / small[k], 2) for k in small if big[k] > 1.25 * small[k]}
    assert not grown, f"visits per graph node grew with depth 2 -> 8 (x{grown}): a per-site graph scan"


def test_passes_on_symbolic_trace_graphs_are_linear():
    small = _passes(fx.symbolic_trace(Stack(2).eval()), swap=False)
    big = _passes(fx.symbolic_trace(Stack(8).eval()), swap=False)
    _compare(small, big)


def _traced(depth: int) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.trace(Stack(depth), (torch.randint(0, 16, (2, 5)),))


@pytest.fixture(scope="module")
def exported():
    return _traced(2), _traced(8)


def test_passes_on_exported_graphs_are_linear(exported):
    small, big = exported
    _compare(_passes(small), _passes(big))


def test_capture_rewiring_is_linear(exported):
    """trace's own work after torch.export (mode rewiring, training flag) visits each node a few times."""

    def rewire(gm):
        graph = gm.graph
        rates = capture._mode_rates(graph)
        return _per_node(lambda: (capture._has_mode_ops(graph), capture._rewire_modes(graph, rates)), gm)

    small, big = (lora_fx.strip(lora_fx.lorafy(g, "*.q")) for g in exported)  # fresh copies to rewire again
    _compare({"rewire": rewire(small)}, {"rewire": rewire(big)})
