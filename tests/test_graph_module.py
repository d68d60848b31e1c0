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
    torch.testing.assert_close(new(ids), captured(ids), rtol=0, atol=0)


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
