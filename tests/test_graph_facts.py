"""graph_facts: the sizes of a captured graph's inputs and which of them it keeps symbolic."""

from __future__ import annotations

import torch
from torch import nn

from lora_fx.graph_facts import input_sizes, symbolic_dims


def _captured(dynamic: bool):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    ids = torch.randint(0, 10, (2, 5))
    shapes = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) if dynamic else None
    return torch.export.export(model, (ids,), strict=False, dynamic_shapes=shapes).module().graph, ids


def test_input_sizes_and_symbolic_dims_of_a_dynamic_capture():
    graph, ids = _captured(True)
    sizes = input_sizes(graph, ((ids,), {}))
    assert list(sizes) == [0] and all(isinstance(s, torch.SymInt) for s in sizes[0])
    assert symbolic_dims(graph, ((ids,), {})) == {0: {0, 1}}


def test_a_static_capture_has_no_symbolic_dims():
    graph, ids = _captured(False)
    assert input_sizes(graph, ((ids,), {})) == {0: (2, 5)}
    assert symbolic_dims(graph, ((ids,), {})) == {0: set()}


def test_inputs_that_do_not_pair_with_the_placeholders_are_unknown():
    graph, ids = _captured(True)
    assert input_sizes(graph, ((ids, ids), {})) is None  # two tensors, one placeholder
    assert symbolic_dims(torch.fx.symbolic_trace(nn.Linear(2, 2)).graph, ((torch.randn(1, 2),), {})) is None
