"""dynamic_dims: the dims an export declares dynamic are those the captured graph was proven to run at."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.dynamic_dims import dynamic_dims, grow, grown, input_names, symbols
from lora_fx.graph_module import capture_of


class _Blocks(nn.Module):
    """PEGASUS-X's block attention in small: the sequence reshaped into blocks of 4, padded only when the
    length needs it. An example of length 8 needs no padding, so the capture drops it: its graph keeps the
    sequence symbolic yet fails at any length that is not a multiple of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids, mask):
        h = self.proj(self.emb(ids)) * mask[..., None]
        pad = (-h.shape[1]) % 4
        if pad:  # a Python branch on the example's size: not in the graph when the example needs no padding
            h = nn.functional.pad(h, (0, 0, 0, pad))
        blocks = h.reshape(h.shape[0], -1, 4, 8)
        return blocks.softmax(2).reshape(h.shape)[:, : ids.shape[1]]


def _example(seq: int = 8):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, -2:] = 0
    return torch.randint(0, 20, (2, seq), generator=g), mask


def _onnx_dims(path) -> list[list]:
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input]


def test_grow_repeats_entries_so_ids_and_masks_stay_valid():
    ids, mask = _example(4)
    big = grow(mask, 1, 7)
    assert big.shape == (2, 7) and set(big.unique().tolist()) <= {0, 1}
    assert torch.equal(grow(ids, 1, 7)[:, 4:], ids[:, :3])


def test_symbols_group_the_dims_one_size_shares():
    ids, mask = _example()
    gm = lora_fx.trace(nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 4)), (ids,), train_capture=False)
    syms = symbols(gm.graph, ((ids,), {}))
    assert sorted(len(s.dims) for s in syms) == [1, 1] and sorted(s.value for s in syms) == [2, 8]
    (a,), _ = grown(((ids,), {}), syms, {s.name: 3 for s in syms})
    assert a.shape == (5, 11)


def test_a_symbolic_dim_the_graph_fixed_inside_is_static_with_a_note(tmp_path):
    ids, mask = _example()
    with pytest.warns(UserWarning, match=r"ids dim 1 \(size 8\), mask dim 1 \(size 8\): static .* at size 9: the "
                                         r"captured graph fails there \(RuntimeError"):
        gm = lora_fx.trace(_Blocks(), (ids, mask))
    cap = capture_of(gm)
    assert cap.dims == {0: (0,), 1: (0,)}  # batch proven; the sequence (one symbol for ids and mask) static
    assert dynamic_dims(gm, ((ids, mask), {})) == {0: {0}, 1: {0}}
    assert [n for n in cap.static_notes if "ids dim 1 (size 8)" in n]
    lgm = lora_fx.lorafy(gm, "proj", rank=2)
    torch.nn.init.normal_(lora_fx.lora_parameters(lgm)[1])
    assert any("ids dim 1 (size 8)" in n for n in lgm.lora_report.notes)
    rep = lora_fx.fold_and_export(lgm, tmp_path / "blocks.onnx")
    assert _onnx_dims(tmp_path / "blocks.onnx") == [["ids_dim0", 8], ["ids_dim0", 8]]  # was: symbolic sequence
    assert [c.shapes for c in rep.verification.numerics] == ["(2, 8), (2, 8)", "(3, 8), (3, 8)"]
    assert rep.verification.ok and any("ids dim 1 (size 8)" in n for n in rep.notes)


def test_proven_dims_stay_dynamic():
    ids, _ = _example(6)  # no blocks: every dim proven, no note
    gm = lora_fx.trace(nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4)), (ids,), train_capture=False)
    cap = capture_of(gm)
    assert cap.dims == {0: (0, 1)} and not cap.static_notes
    assert list(cap.dynamic_shapes[0]) == [0, 1]  # what the export declares dynamic


def test_static_trace_ships_a_static_file(tmp_path):
    ids, _ = _example(6)
    gm = lora_fx.trace(nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4)), (ids,), dynamic=False)
    assert capture_of(gm).dims == {}
    rep = lora_fx.fold_and_export(lora_fx.lorafy(gm, "1", rank=2), tmp_path / "s.onnx")
    assert _onnx_dims(tmp_path / "s.onnx") == [[2, 6]]
    assert [c.shapes for c in rep.verification.numerics] == ["(2, 6)"]


def test_input_names_follow_the_forward_signature():
    def names(*args, **kwargs):
        return input_names(_Blocks(), args, kwargs)

    ids, mask = _example()
    assert names(ids, mask) == ["ids", "mask"]
    assert names(ids, mask=mask) == ["ids", "mask"]
    assert input_names(None, ((ids, mask),), {}) == ["args[0][0]", "args[0][1]"]


def _funnel():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FunnelConfig(vocab_size=128, block_sizes=[1, 1], d_model=32, n_head=4, d_head=8, d_inner=64,
                                    num_decoder_layers=1)
    torch.manual_seed(0)
    return transformers.FunnelModel(cfg).eval(), (_example()[0] + 3,), {}, "input_ids dim 1 (size 8)"


def _pegasus_x():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.PegasusXConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64, num_global_tokens=4, block_size=4,
                                      use_cache=False, pad_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    ids = _example()[0] + 3
    return (transformers.PegasusXForConditionalGeneration(cfg).eval(), (ids,), {"decoder_input_ids": ids[:, :6]},
            "input_ids dim 1 (size 8)")


@pytest.mark.slow
@pytest.mark.parametrize("build", [_funnel, _pegasus_x], ids=["funnel", "pegasus-x"])
def test_hf_models_whose_capture_fixes_the_sequence_ship_it_static(build, tmp_path):
    model, args, kwargs, culprit = build()
    with pytest.warns(UserWarning, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        gm = lora_fx.trace(model, args, kwargs)
    lgm = lora_fx.lorafy(gm, [s.id for s in lora_fx.sites(gm) if "linear" in s.op][:2], rank=2)
    torch.nn.init.normal_(lora_fx.lora_parameters(lgm)[1])
    rep = lora_fx.fold_and_export(lgm, tmp_path / "m.onnx")  # PEGASUS-X: was a bare RuntimeError here
    dims = _onnx_dims(tmp_path / "m.onnx")
    assert dims[0][1] == 8 and isinstance(dims[0][0], str)  # sequence static, batch dynamic
    assert rep.verification.ok and len(rep.verification.numerics) == 2
    assert any(culprit in n for n in rep.notes)
