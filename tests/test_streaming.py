"""The streamed export (lora_fx/exporters/streaming.py): same files as a plain export, no weight copies."""

from __future__ import annotations

import filecmp

import onnx
import pytest
import torch
from conftest import traced
from helpers import randomize_lora

import lora_fx
from lora_fx.capture import dynamic_shapes_for
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.exporters.backends.torch_onnx.streaming import export_streaming, skeleton


def _plain(module, dtype):
    """What fold_and_export exported before streaming: a converted copy, then a plain export."""
    from lora_fx.graph_module import copy_module
    from lora_fx.passes.dtype import float_dtype as _float_dtype
    from lora_fx.passes.dtype import retype as _retype

    module = copy_module(module, freeze=False)
    old = _float_dtype(module)
    if dtype is None or dtype == old:
        return module
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is not None and t.is_floating_point():
                    data = t.detach().to(dtype)
                    store[k] = torch.nn.Parameter(data, requires_grad=False) if store is mod._parameters else data
    return _retype(module, old, dtype)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_streamed_files_are_byte_identical_to_a_plain_export(tmp_path, dtype):
    _, args, kwargs, gm = traced("llama")
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=4)
    randomize_lora(lgm)
    folded = lora_fx.fold(lgm)
    shapes = dynamic_shapes_for(args, kwargs)
    cast = [a.to(dtype) if (dtype and a.is_floating_point()) else a for a in args]
    a = export_onnx(_plain(folded, dtype).eval(), tmp_path / "a.onnx", cast, kwargs, dynamic_shapes=shapes,
                    external_data=True)
    b = export_streaming(folded.eval(), tmp_path / "b.onnx", cast, kwargs, dtype=dtype, dynamic_shapes=shapes,
                         external_data=True)
    assert a.nodes == b.nodes and a.initializers == b.initializers
    pa, pb = (onnx.load(tmp_path / f"{x}.onnx", load_external_data=False) for x in "ab")
    for t in pb.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "a.onnx.data"
    assert pa.SerializeToString() == pb.SerializeToString()
    assert filecmp.cmp(tmp_path / "a.onnx.data", tmp_path / "b.onnx.data", shallow=False)


def test_skeleton_holds_no_weights_and_leaves_the_source_alone():
    from torch._subclasses.fake_tensor import FakeTensor

    _, _, _, gm = traced("llama")
    before = {n: p.data_ptr() for n, p in gm.named_parameters()}
    skel, sources = skeleton(gm, torch.float16)
    assert all(isinstance(p, FakeTensor) and p.dtype == torch.float16 for p in skel.parameters())
    assert {n: sources[n].data_ptr() for n in before} == before  # the sources are the module's own tensors
    assert all(p.dtype == torch.float32 and not isinstance(p, FakeTensor) for p in gm.parameters())
    assert "model.rotary_emb.inv_freq" in sources
