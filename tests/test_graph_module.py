"""graph_module.copy_module: a pass's working copy behaves like ``copy.deepcopy`` with shared weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.graph_module import copy_module


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.BatchNorm1d(8)  # buffers: running stats, copied (not shared) like deepcopy does
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids).transpose(1, 2)).transpose(1, 2))


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    return lora_fx.trace(_Tied().eval(), (torch.randint(0, 16, (2, 5)),))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))


@pytest.mark.parametrize("freeze", [False, True])
def test_copy_matches_deepcopy_and_shares_parameters(captured, freeze):
    ref = copy.deepcopy(captured)
    new = copy_module(captured, freeze=freeze)
    assert list(_state(new)) == list(_state(ref)) == list(_state(captured))
    assert [(n, type(m).__name__) for n, m in new.named_modules()] == [(n, type(m).__name__) for n, m in ref.named_modules()]
    params, buffers = dict(captured.named_parameters()), dict(captured.named_buffers())
    for name, p in new.named_parameters():
        assert p.data_ptr() == params[name].data_ptr()  # storage shared
        assert (p is params[name]) is not freeze and p.requires_grad is not freeze
    for name, b in new.named_buffers():
        assert b.data_ptr() != buffers[name].data_ptr() and torch.equal(b, buffers[name])
    ids = torch.randint(0, 16, (3, 4))
    # Like with like: torch's CPU matmul picks its kernel by requires_grad (it folds a 3-D input into
    # one mm only for autograd), and on Intel CPUs the two kernels differ in the last bit. The reference
    # is the deepcopy with the copy's requires_grad, so both run the same kernel: bit-exact.
    for p in ref.parameters():
        p.requires_grad_(not freeze)
    torch.testing.assert_close(new(ids), ref(ids), rtol=0, atol=0)


def test_copy_keeps_ties_and_never_touches_the_source(captured):
    new = copy_module(captured, freeze=True)
    assert len(list(new.parameters())) == len(list(captured.parameters()))  # one tensor, two names: still one
    for _, m in new.named_modules():
        assert all(m is not o for o in captured.modules())  # every container is new
    before = {n: p.requires_grad for n, p in captured.named_parameters()}
    next(iter(new.modules()))._modules.clear()
    assert {n: p.requires_grad for n, p in captured.named_parameters()} == before
    assert len(list(captured.named_modules())) > 1


def test_copy_keeps_hooks_of_modules_that_have_them(captured):
    src = copy.deepcopy(captured)
    child = next(m for n, m in src.named_modules() if n)
    calls = []
    child.register_forward_hook(lambda *_: calls.append(1))
    new = copy_module(src, freeze=False)
    copied = next(m for n, m in new.named_modules() if n)
    assert copied is not child and len(copied._forward_hooks) == 1  # deep-copied the usual way


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return lora_fx.trace(model, (torch.randn(3, 8),)), torch.randn(3, 8)


def test_fold_adopts_the_captured_code():
    """fold gives back the captured graph, so its module runs the captured module's code: the same
    source and the same compiled function, not generated and compiled again."""
    from helpers import randomize_lora

    captured, x = _mlp()
    lgm = lora_fx.lorafy(captured, ["0", "2"], rank=2)
    randomize_lora(lgm)
    folded = lora_fx.fold(lgm)
    assert folded.code == captured.code and type(folded).forward is type(captured).forward
    assert type(lgm).forward is not type(captured).forward
    torch.testing.assert_close(folded(x), lgm(x))
    assert not torch.allclose(folded(x), captured(x))  # the new weights, read through the same code
    assert lora_fx.strip(lgm).code == captured.code


def test_untied_fold_generates_its_own_code(captured):
    """A fold that unties a shared weight changes the graph: its code is generated for that graph."""
    from helpers import randomize_lora

    lgm = lora_fx.lorafy(captured, ["head"], rank=2)
    randomize_lora(lgm)
    folded = lora_fx.fold(lgm)
    assert folded.fold_report.untied and type(folded).forward is not type(captured).forward
    ids = torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(folded(ids), lgm(ids))


def test_generated_code_is_shared_by_copies_and_dropped_by_pickle():
    import pickle

    from lora_fx.graph_module import GeneratedCode, recompile_as

    captured, x = _mlp()
    code = GeneratedCode(captured)
    assert code.code is not None and code.code.src == captured.code and copy.deepcopy(code) is code
    assert pickle.loads(pickle.dumps(code)).code is None
    ckpt = lora_fx.checkpoint(lora_fx.lorafy(captured, ["0"], rank=2), "0")
    assert GeneratedCode(ckpt).code is None  # its forward is not the flat code fx generated
    empty = copy_module(captured, freeze=False)
    recompile_as(empty, GeneratedCode())  # nothing to adopt: generated as usual
    torch.testing.assert_close(empty(x), captured(x))


def _module_lookups(gm, *args) -> int:
    """How many ``nn.Module.__getattr__`` calls one forward of ``gm`` makes."""
    calls = 0
    lookup = nn.Module.__getattr__

    def counted(self, name):
        nonlocal calls
        calls += 1
        return lookup(self, name)

    nn.Module.__getattr__ = counted
    try:
        gm(*args)
    finally:
        nn.Module.__getattr__ = lookup
    return calls


@pytest.mark.parametrize("checkpointed", [False, True])
def test_generated_code_reads_each_module_once_per_call(checkpointed):
    """The forward resolves every module path its get_attr nodes share once, then reads the
    parameters from it: one ``Module.__getattr__`` per module and per parameter/buffer (fx alone
    walks the whole path from ``self`` for each), with the same outputs, also in a copy."""
    from lora_fx.codegen import share_attribute_prefixes
    from lora_fx.examples import zoo_models

    model, args, _ = zoo_models.llama()
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), ["*.q_proj", "*.v_proj", "*.down_proj"], rank=4)
    if checkpointed:
        lgm = lora_fx.checkpoint(lgm, "*.layers.*").train()
    reads = [n.target for n in lgm.graph.nodes if n.op == "get_attr"]
    modules = {".".join(t.split(".")[:k]) for t in reads for k in range(1, len(t.split(".")))}
    plain = lgm.graph.python_code(root_module="self")
    assert share_attribute_prefixes(plain, lgm.graph).src == lgm.code != plain.src
    flat_reads = sum(len(t.split(".")) for t in reads)  # one lookup per link of every path
    assert _module_lookups(lgm, *args) <= len(modules) + len(reads) < flat_reads / 2
    model.requires_grad_(False)  # like with like: lgm's base is frozen (torch's CPU kernels depend on it)
    ref = lora_fx.trace(model, args)(*args)  # the captured (unshared) code's outputs
    lgm.eval()
    torch.testing.assert_close(lgm(*args), ref, rtol=0, atol=0)  # B = 0: the captured function
    torch.testing.assert_close(copy.deepcopy(lgm)(*args), ref, rtol=0, atol=0)
