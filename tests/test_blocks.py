"""split_blocks (lora_fx/blocks.py): the captured graph split back into its transformer blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from helpers import first_tensor, randomize_lora

import lora_fx
from lora_fx.blocks import blocks_of, split_blocks, split_name


def test_each_block_owns_its_weights_and_lora_and_computes_the_same():
    _, args, kwargs, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj", "*.down_proj"], rank=4, dropout=0.1)
    randomize_lora(lgm)
    split = split_blocks(lgm)
    assert [n for n, _ in split.named_children()] == ["pre", "blocks", "post"]
    blocks = blocks_of(split)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        names = [n for n, _ in block.named_parameters()]
        assert names and all(n.startswith(f"model.layers.{i}.") for n in names)
        assert sum("lora_" in n for n in names) == 6  # A and B of q, v, down
    assert [n for n, _ in split.pre.named_parameters()] == ["model.embed_tokens.weight"]
    assert sorted(n for n, _ in split.post.named_parameters()) == ["lm_head.weight", "model.norm.weight"]
    # shared, not copied: the split module's parameters are lgm's own objects
    mine = dict(lgm.named_parameters())
    assert all(p is mine[split_name(n)] for n, p in split.named_parameters())
    with torch.no_grad():
        lgm.eval()
        split.eval()
        assert torch.equal(first_tensor(split(*args, **kwargs)), first_tensor(lgm(*args, **kwargs)))
        split.train()  # LoRA dropout follows the mode in every block
        torch.manual_seed(0)
        a = first_tensor(split(*args, **kwargs))
        assert not torch.equal(a, first_tensor(lgm.eval()(*args, **kwargs)))


def test_a_prefix_that_matches_nothing_names_the_paths():
    _, _, _, gm = traced("llama")
    with pytest.raises(lora_fx.SiteError, match=r"no node lies under 'transformer\.h'.*model"):
        split_blocks(gm, "transformer.h")
