"""refold_onnx: a folded export gets another adapter by rewriting only its adapted initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import randomize_lora
from onnx import numpy_helper

import lora_fx
from lora_fx.adapters import save_adapter
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.graph_module import capture_of
from lora_fx.switching import refold_onnx

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


def make(gm, targets, seed, rank=2):
    lgm = lora_fx.lorafy(gm, targets, rank=rank, alpha=2 * rank)
    randomize_lora(lgm, std=0.2, seed=seed)
    return lgm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = lora_fx.trace(model, (ids,))
    tmp = tmp_path_factory.mktemp("refold")
    # a: fused qkv + the tied embedding (fold unties it) + c_fc;  b: q/v slices + c_proj + embedding
    a = make(gm, ["*.c_attn", "transformer.wte", "*.mlp.c_fc"], seed=1)
    b = make(gm, [lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3), "*.attn.c_proj", "transformer.wte"], seed=2)
    save_adapter(a, tmp / "a")
    save_adapter(b, tmp / "b")
    lora_fx.fold_and_export(a, tmp / "task_a.onnx", verify=False, optimize=False)  # raw names: compared with parameters below
    export_onnx(gm, tmp / "base.onnx", (ids,), dynamic_shapes=capture_of(gm).dynamic_shapes)
    return gm, ids, a, b, tmp


def initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def ort_logits(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]


@pytest.mark.parametrize("source", ["base_onnx", "old_adapter"])
def test_refold_equals_folding_the_new_adapter(files, source):
    _, ids, _, b, tmp = files
    out = tmp / f"task_b_{source}.onnx"
    kwargs = {"base_onnx": tmp / "base.onnx"} if source == "base_onnx" else {"old_adapter": tmp / "a"}
    report = refold_onnx(tmp / "task_a.onnx", tmp / "b", out, **kwargs)
    assert set(report.rewritten) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                                     "transformer.wte.weight_folded"}
    assert set(report.restored) == {"transformer.h.0.mlp.c_fc.weight"}  # a's site that b lacks

    before, after = onnx.load(tmp / "task_a.onnx"), onnx.load(out)
    assert before.graph.node == after.graph.node  # the graph is untouched
    assert [t.name for t in before.graph.initializer] == [t.name for t in after.graph.initializer]
    got, want = initializers(out), lora_fx.fold(b)
    for name, value in got.items():
        ref = want.get_parameter(name).detach().numpy()
        if source == "base_onnx":  # exact base weights: byte-identical to folding b
            assert np.array_equal(value, ref), name
        else:  # recovered base: within 1 ulp of the larger magnitude
            big = np.maximum(np.abs(value), np.abs(initializers(tmp / "task_a.onnx")[name]))
            assert (np.abs(value - ref) <= np.spacing(np.maximum(big, np.abs(ref)))).all(), name
    with torch.no_grad():
        err = np.abs(ort_logits(out, ids) - b(ids).logits.numpy()).max()
    assert err <= 1e-5


def test_refold_errors(files):
    gm, _, a, _, tmp = files
    with pytest.raises(lora_fx.AdapterError, match="exactly one"):
        refold_onnx(tmp / "task_a.onnx", tmp / "b", tmp / "x.onnx")
    tied = make(gm, ["lm_head"], seed=3)  # base.onnx reads lm_head.weight in two nodes
    with pytest.raises(lora_fx.AdapterError, match="read by 2 nodes"):
        refold_onnx(tmp / "base.onnx", tied, tmp / "x.onnx", old_adapter=make(gm, ["*.c_fc"], seed=4))
    with pytest.raises(lora_fx.AdapterError, match="cannot read"):
        refold_onnx(tmp / "nope.onnx", tmp / "b", tmp / "x.onnx", old_adapter=tmp / "a")
    assert not (tmp / "x.onnx").exists()


@pytest.mark.parametrize("in_place", [False, True])
def test_refold_external_data_patches_the_data_file(files, in_place):
    """External-data exports: only the adapted byte ranges change; result == folding the new adapter."""
    gm, ids, a, b, tmp = files
    ext = tmp / f"ext_{in_place}"
    ext.mkdir()
    lora_fx.fold_and_export(a, ext / "task_a.onnx", external_data=True, verify=False, optimize=False)
    export_onnx(gm, ext / "base.onnx", (ids,), dynamic_shapes=capture_of(gm).dynamic_shapes, external_data=True)
    out = ext / ("task_a.onnx" if in_place else "task_b.onnx")
    report = refold_onnx(ext / "task_a.onnx", tmp / "b", out, base_onnx=ext / "base.onnx")
    assert set(report.restored) == {"transformer.h.0.mlp.c_fc.weight"}
    assert (ext / (out.name + ".data")).exists()
    model = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    got, want = initializers(out), lora_fx.fold(b)
    for name, value in got.items():
        assert np.array_equal(value, want.get_parameter(name).detach().numpy()), name
    with torch.no_grad():
        assert np.abs(ort_logits(out, ids) - b(ids).logits.numpy()).max() <= 1e-5
    assert sorted(p.name for p in ext.iterdir() if p.name.startswith(".")) == []  # no temp files
