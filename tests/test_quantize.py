"""Quantized deployment: prepare, ORT's int4/int8 quantizers, the proof, the error report, refold."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from helpers import randomize_lora
from onnx import helper, numpy_helper

import lora_fx
from lora_fx.adapters import save_adapter
from lora_fx.errors import AdapterError, ExportError
from lora_fx.exporters.backends.torch_onnx.onnx_io import export_onnx
from lora_fx.exporters.format import QUANTIZE_KEY as META_KEY
from lora_fx.exporters.quantize import QuantizeConfig, as_config, quantize_file, read_config
from lora_fx.exporters.quantize.quantizers import output_heads, prepare
from lora_fx.exporters.quantize.step import prove as _prove
from lora_fx.exporters.quantize.step import quantize_step
from lora_fx.exporters.verify.numerics import variants as _variants
from lora_fx.exporters.verify.structure import compare_structure
from lora_fx.graph_module import capture_of
from lora_fx.switching import refold_onnx
from lora_fx.switching.refold import refold_quantized

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
TARGETS = ["*.c_attn", "*.mlp.c_fc"]  # Gemm weights [in, out]; the tied lm_head: test_quantize_slow


def make(gm, seed):
    lgm = lora_fx.lorafy(gm, TARGETS, rank=2, alpha=4)
    randomize_lora(lgm, std=0.05, seed=seed)
    return lgm


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """1-layer GPT-2 (vocab 128, dim 64): fp32 base and task exports, the int4 step, adapters a and b."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 128, (2, 8))
    gm = lora_fx.trace(transformers.GPT2LMHeadModel(cfg).eval(), (ids,))
    tmp = tmp_path_factory.mktemp("quant")
    a, b = make(gm, 1), make(gm, 2)
    save_adapter(a, tmp / "a")
    save_adapter(b, tmp / "b")
    export_onnx(gm, tmp / "base.onnx", (ids,), dynamic_shapes=capture_of(gm).dynamic_shapes)
    # the fp32 folded export of a, written the fast way (test_refold: equal to fold_and_export's)
    refold_onnx(tmp / "base.onnx", tmp / "a", tmp / "task.onnx", base_onnx=tmp / "base.onnx")
    changed = compare_structure(tmp / "base.onnx", tmp / "task.onnx").changed_initializers
    # fold_and_export(quantize="int4")'s step, on the files it verified (end to end: test_quantize_slow)
    out, report = quantize_step(str(tmp / "task.onnx"), str(tmp / "base.onnx"), as_config("int4"), changed,
                                lgm=a, variants=_variants((ids,), {}))
    os.replace(out, tmp / "task4.onnx")
    return gm, ids, a, b, tmp, report


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_prepare_puts_every_weight_matmul_in_initializer_form(gpt2):
    tmp = gpt2[4]
    base = onnx.load(str(tmp / "base.onnx"))
    prepared, rewrites = prepare(base)
    before, after = ops(tmp / "base.onnx"), [n.op_type for n in prepared.graph.node]
    # 4 Gemms (c_attn, attn.c_proj, c_fc, mlp.c_proj) become MatMul + Add; lm_head's Transpose goes
    assert (before.count("Gemm"), after.count("Gemm")) == (4, 0)
    assert rewrites == 5 and after.count("Transpose") == before.count("Transpose") - 1
    assert {"transformer.h.0.attn.c_attn.weight", "lm_head.weight_T"} <= {t.name for t in prepared.graph.initializer}
    assert after.count("MatMul") == before.count("MatMul") + 4
    inits = {t.name: t for t in prepared.graph.initializer}
    # the tied weight is also read by Gather (the embedding), so it stays beside its stored transpose
    w = numpy_helper.to_array(inits["lm_head.weight"])
    assert np.array_equal(numpy_helper.to_array(inits["lm_head.weight_T"]), w.T)
    assert prepare(base)[0].SerializeToString() == prepared.SerializeToString()  # deterministic
    assert base.graph.node[0].op_type == onnx.load(str(tmp / "base.onnx")).graph.node[0].op_type  # input untouched


def test_fold_and_export_int4_is_the_quantized_base_with_new_values(gpt2):
    gm, ids, a, _, tmp, report = gpt2
    q = report
    assert q.ok and q.structure_ok and not q.underived
    # 4 Gemms (c_attn, c_proj x2, c_fc) + lm_head; the wte and wpe embedding gathers (int4's default ops)
    assert q.info.quantized == {"MatMulNBits": 5, "GatherBlockQuantized": 2}
    assert ops(tmp / "task4.onnx").count("MatMulNBits") == 5
    # the output head (lm_head, tied to wte) is quantized with 8 bits by default, the rest with 4
    assert len(q.info.heads) == 1
    bits = {n.name: helper.get_node_attr_value(n, "bits") for n in onnx.load(str(tmp / "task4.onnx")).graph.node
            if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()) == [4, 4, 4, 4, 8] and bits[q.info.heads[0] + "_Q8"] == 8
    # every adapted fp32 weight changed exactly its quantized values and scales (symmetric: no zero points)
    assert sorted(q.changed) == sorted(f"{w}_{s}" for w in ["transformer.h.0.attn.c_attn.weight",
                                                             "transformer.h.0.mlp.c_fc.weight"] for s in ("Q4", "scales"))
    assert 0 < q.task_err["rms"] < 0.2 and 0 < q.base_err["rms"] < 0.2
    assert q.fold_cost == pytest.approx(q.task_err["rms"] / q.base_err["rms"]) and q.fold_cost < 1.5
    assert read_config(onnx.load(str(tmp / "task4.onnx"))) == as_config("int4")
    # ORT runs it, within the reported error of the unmerged fp32 LoRA model
    sess = ort.InferenceSession(str(tmp / "task4.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    want = a(ids).logits.detach().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= q.task_err["rms"] * 1.0001
    assert "fold cost 0." in str(report) and "5 MatMulNBits" in str(report) and "1 output head(s) 8-bit" in str(report)


@pytest.mark.parametrize("cfg, op, count, n_changed", [
    (QuantizeConfig("int8"), "MatMulInteger", 5, 2 * 2),  # values, scales (symmetric: zero points all 0)
    (QuantizeConfig("int8", int8_method="weight_only"), "MatMulNBits", 5, 2 * 2),  # Q8 values, scales
    (QuantizeConfig("int4", symmetric=False, block_size=16, exclude=("*.c_fc.*",)), "MatMulNBits", 4, 1 * 3 + 1),
    (QuantizeConfig("int4", ops=("MatMul", "Gather")), "GatherBlockQuantized", 2, 2 * 2),  # wte, wpe gathers
    (QuantizeConfig("int4", algorithm="hqq"), "MatMulNBits", 5, 2 * 3),  # HQQ: asymmetric, zero points
])
def test_quantize_file_schemes(gpt2, tmp_path, cfg, op, count, n_changed):
    gm, ids, a, _, tmp, _ = gpt2
    fp32_changed = compare_structure(tmp / "base.onnx", tmp / "task.onnx").changed_initializers
    infos = [quantize_file(str(tmp / "base.onnx"), str(tmp_path / "qbase.onnx"), cfg),
             quantize_file(str(tmp / "task.onnx"), str(tmp_path / "qtask.onnx"), cfg)]
    assert infos[1].quantized[op] == count and infos[1].bytes < infos[1].fp32_bytes
    rep = _prove(str(tmp_path / "qtask.onnx"), str(tmp_path / "qbase.onnx"), cfg, infos[1], fp32_changed)
    assert rep.ok and len(rep.changed) == n_changed
    sess = ort.InferenceSession(str(tmp_path / "qtask.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]).all()


def test_output_heads_are_the_matmuls_that_make_a_graph_output(gpt2):
    prepared = prepare(onnx.load(str(gpt2[4] / "base.onnx")))[0]
    heads = output_heads(prepared)
    assert [n.input[1] for n in prepared.graph.node if n.name in heads] == ["lm_head.weight_T"]
    # through a bias Add and a soft-cap (Div, Tanh, Mul by constants); never through a residual Add
    f = onnx.TensorProto.FLOAT
    w = [numpy_helper.from_array(np.ones((4, 4), np.float32), n) for n in ("w1", "w2", "w3")]
    c = [numpy_helper.from_array(np.ones(4, np.float32), "b"), numpy_helper.from_array(np.float32(30.0), "cap")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="body"),
             helper.make_node("MatMul", ["h", "w2"], ["r"], name="resid"),
             helper.make_node("Add", ["h", "r"], ["hidden"], name="add"),  # residual: two data inputs
             helper.make_node("MatMul", ["hidden", "w3"], ["m"], name="head"),
             helper.make_node("Add", ["m", "b"], ["mb"], name="bias"),
             helper.make_node("Div", ["mb", "cap"], ["d"], name="div"),
             helper.make_node("Tanh", ["d"], ["t"], name="tanh"),
             helper.make_node("Mul", ["t", "cap"], ["logits"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 4])],
                          [helper.make_tensor_value_info("logits", f, [1, 4]),
                           helper.make_tensor_value_info("hidden", f, [1, 4])], initializer=w + c)
    assert output_heads(helper.make_model(g)) == ["head"]


@pytest.mark.parametrize("head_bits, bits", [(4, [4] * 5), (8, [4] * 4 + [8]), (32, [4] * 4)])
def test_head_bits(gpt2, tmp_path, head_bits, bits):
    tmp, ids = gpt2[4], gpt2[1]
    cfg = as_config("int4", head_bits=head_bits)
    info = quantize_file(str(tmp / "task.onnx"), str(tmp_path / "q.onnx"), cfg)
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert sorted(helper.get_node_attr_value(n, "bits") for n in model.graph.node if n.op_type == "MatMulNBits") == bits
    matmuls = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
    assert ("lm_head.weight_T" in matmuls) == (head_bits == 32) and read_config(model).head_bits == head_bits
    assert info.heads and info.quantized["GatherBlockQuantized"] == 2
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]).all()


def test_files_from_before_head_bits_read_as_4_bit_heads(gpt2):
    model = onnx.load(str(gpt2[4] / "task4.onnx"))
    del model.metadata_props[:]
    model.metadata_props.add(key=META_KEY, value='{"scheme": "int4", "block_size": 32, "symmetric": true, '
                             '"ops": ["MatMul"], "exclude": [], "int8_method": "dynamic", "accuracy_level": null, '
                             '"algorithm": "rtn"}')
    old = dataclasses.replace(as_config("int4", ops=("MatMul",), head_bits=4), accuracy_level=None)
    assert read_config(model) == old  # what those files hold (ORT's default accuracy level then)


def test_external_data_installs_under_the_final_name(gpt2, tmp_path):
    from lora_fx.exporters.files import install
    from lora_fx.exporters.quantize.step import quantized_path as _quantized_path

    tmp, ids = gpt2[4], gpt2[1]
    shutil.copy(tmp / "task.onnx", tmp_path / "task4.onnx")  # fold_and_export stages under the final name
    staged = _quantized_path(str(tmp_path / "task4.onnx"))
    assert staged == str(tmp_path / "quantized" / "task4.onnx")
    quantize_file(str(tmp_path / "task4.onnx"), staged, as_config("int4"), external_data=True)
    os.makedirs(tmp_path / "deploy")
    install(staged, str(tmp_path / "deploy" / "task4.onnx"))
    assert sorted(os.listdir(tmp_path / "deploy")) == ["task4.onnx", "task4.onnx.data"]
    sess = ort.InferenceSession(str(tmp_path / "deploy" / "task4.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]).all()


def test_proof_catches_differences(gpt2, tmp_path):
    tmp, info = gpt2[4], gpt2[5].info
    quantize_file(str(tmp / "base.onnx"), str(tmp_path / "b32.onnx"), as_config("int4"))
    quantize_file(str(tmp / "base.onnx"), str(tmp_path / "b16.onnx"), as_config("int4", block_size=16))
    rep = _prove(str(tmp_path / "b16.onnx"), str(tmp_path / "b32.onnx"), as_config("int4"), info, [])
    assert not rep.ok and "block_size" in rep.first_difference
    # a value change outside the adapted weights is refused
    rep = _prove(str(tmp / "task4.onnx"), str(tmp_path / "b32.onnx"), as_config("int4"), info,
                 ["transformer.h.0.attn.c_attn.weight"])
    assert rep.structure_ok and not rep.ok and "transformer.h.0.mlp.c_fc.weight_Q4" in rep.underived


def test_refold_quantized_equals_a_fresh_quantized_export(gpt2, tmp_path):
    gm, ids, _, b, tmp, _ = gpt2
    rep = refold_quantized(tmp / "task4.onnx", tmp / "b", tmp_path / "task4_b.onnx", base_onnx=tmp / "base.onnx")
    assert rep.ok and rep.info.quantized == {"MatMulNBits": 5, "GatherBlockQuantized": 2}
    # a's and b's adapted weights differ (b has the same targets): exactly their Q4 values and scales
    assert sorted(compare_structure(tmp / "task4.onnx", tmp_path / "task4_b.onnx").changed_initializers) == \
        sorted(gpt2[5].changed)
    # the file now serves b: within int4 error of the unmerged fp32 model b, and far from a
    sess = ort.InferenceSession(str(tmp_path / "task4_b.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    err = {n: np.linalg.norm(got - m(ids).logits.detach().numpy()) / np.linalg.norm(m(ids).logits.detach().numpy())
           for n, m in (("a", gpt2[2]), ("b", b))}
    assert err["b"] <= 1.5 * gpt2[5].base_err["rms"] < err["a"]
    with pytest.raises(AdapterError, match="fp32 base export"):
        refold_quantized(tmp / "task4.onnx", tmp / "b", tmp_path / "x.onnx", base_onnx=tmp / "task4.onnx")
    with pytest.raises(AdapterError, match="no lora-fx quantization"):
        refold_quantized(tmp / "base.onnx", tmp / "b", tmp_path / "x.onnx", base_onnx=tmp / "base.onnx")


def test_bad_settings_name_what_works(gpt2, tmp_path):
    a = gpt2[2]
    with pytest.raises(ExportError, match="int4"):
        as_config("int3")
    with pytest.raises(ExportError, match="power of 2"):
        as_config("int4", block_size=48)
    with pytest.raises(ExportError, match="Gather"):
        as_config("int8", ops=("Gather",))
    with pytest.raises(ExportError, match="hqq"):
        as_config("int8", algorithm="hqq")
    with pytest.raises(ExportError, match="head_bits=16 for int4: use 8, 32"):
        as_config("int4", head_bits=16)
    with pytest.raises(ExportError, match="head_bits=4 for int8"):
        as_config("int8", head_bits=4)
    with pytest.raises(ExportError, match="dtype float32"):
        lora_fx.fold_and_export(a, tmp_path / "t.onnx", quantize="int4", dtype=torch.float16)
    with pytest.raises(ExportError, match="matches no weight"):
        quantize_file(str(gpt2[4] / "base.onnx"), str(tmp_path / "q.onnx"), as_config("int4", exclude=("nope.*",)))
    assert not (tmp_path / "t.onnx").exists()


def test_cli_export_quantize_and_refold(tmp_path, capsys, zoo_traced):
    from lora_fx.cli import main

    assert main(["export", "mlp", "--targets", "fc1", "fc2", "-o", str(tmp_path / "base.onnx"), "--no-verify"]) == 0
    assert main(["export", "mlp", "--targets", "fc1", "fc2", "-o", str(tmp_path / "t8.onnx"), "--quantize", "int8",
                 "--quantize-exclude", "fc1.*", "--head-bits", "32"]) == 0
    out = capsys.readouterr().out
    assert "quantized int8 (1 MatMulInteger" in out and "fold cost 1.00x" in out  # no adapter: B = 0
    assert "1 output head(s) fp32" in out  # head stays fp32: only fc2 is quantized
    assert read_config(onnx.load(str(tmp_path / "t8.onnx"))) == as_config("int8", exclude=("fc1.*",), head_bits=32)
    lgm = lora_fx.lorafy(zoo_traced("mlp")[3], ["fc1", "fc2"], rank=2)
    randomize_lora(lgm)
    save_adapter(lgm, tmp_path / "ad")
    shutil.copy(tmp_path / "t8.onnx", tmp_path / "t8_b0.onnx")
    assert main(["refold", str(tmp_path / "t8.onnx"), "--adapter", str(tmp_path / "ad"), "--base",
                 str(tmp_path / "base.onnx"), "-o", str(tmp_path / "t8.onnx")]) == 0
    assert "structure identical" in capsys.readouterr().out
    changed = compare_structure(tmp_path / "t8_b0.onnx", tmp_path / "t8.onnx").changed_initializers
    assert sorted(changed) == ["fc1.weight_T", "fc2.weight_T_quantized", "fc2.weight_T_scale"]  # fc1: fp32
    x = zoo_traced("mlp")[1][0]

    def rel_err(path, model):  # int8 file vs the fp32 torch model it stands for
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got, want = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], model(x).detach().numpy()
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    task_err, base_err = rel_err(tmp_path / "t8.onnx", lgm), rel_err(tmp_path / "t8_b0.onnx", zoo_traced("mlp")[3])
    assert task_err <= 1.5 * base_err + 0.005, (task_err, base_err)  # the fold adds little to int8's own error
    with pytest.raises(AdapterError, match="base_onnx="):
        refold_onnx(tmp_path / "t8.onnx", tmp_path / "ad", tmp_path / "x.onnx", old_adapter=tmp_path / "ad")


@pytest.mark.slow
@pytest.mark.parametrize("name, targets", [
    ("llama", ["*.q_proj", "*.v_proj", "*.down_proj"]),
    ("gpt2", ["*.c_attn", "lm_head"]),  # lm_head is tied to wte: fold unties it, the proof aliases it
])
def test_fold_and_export_quantized_end_to_end(name, targets, zoo_traced, tmp_path):
    _, args, kwargs, gm = zoo_traced(name)
    lgm = lora_fx.lorafy(gm, targets, rank=4)
    randomize_lora(lgm, std=0.02)
    for q in ("int4", "int8"):
        report = lora_fx.fold_and_export(lgm, tmp_path / f"{q}.onnx", quantize=q)
        assert report.verification.ok and report.quantized.ok, report
        assert report.quantized.fold_cost < 1.5, report
        assert read_config(onnx.load(str(tmp_path / f"{q}.onnx"), load_external_data=False)).scheme == q
        assert not (tmp_path / f"{q}.q.onnx").exists() and sorted(os.listdir(tmp_path))[-1] == f"{q}.onnx"
