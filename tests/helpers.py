"""Small helpers shared by tests (kept out of conftest so tests can import them explicitly)."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

import lora_fx


def first_tensor(out) -> torch.Tensor:
    """The first floating tensor of a model output (tensor, tuple, ModelOutput)."""
    for leaf in pytree.tree_leaves(out if not hasattr(out, "to_tuple") else out.to_tuple()):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise AssertionError(f"no floating tensor in output of type {type(out).__name__}")


def randomize_lora(lgm, std: float = 0.05, seed: int = 0) -> None:
    """Gives every A and B random values (B != 0), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def lora_node_count(gm) -> int:
    from lora_fx.graph_module import NODE_LORA

    return sum(NODE_LORA in n.meta for n in gm.graph.nodes)


def og_greedy(folder: str, prompt: torch.Tensor, new: int) -> list[int]:
    """onnxruntime-genai's greedy tokens (prompt included) for one prompt row on a model folder."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt.numpy())
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]
