"""OnnxGenerator (lora_fx/generation.py): bad input gets a clear error; the cache stays in ORT memory."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_kv_cache import exported

import lora_fx
from lora_fx.errors import ExportError
from lora_fx.examples.decoders import build
from lora_fx.generation import _sample


def test_model_without_cache_support_is_refused(zoo_traced, tmp_path):
    _, _, _, gm = zoo_traced("mlp")
    lgm = lora_fx.lorafy(gm, ["fc1"], rank=2)
    with pytest.raises(ExportError, match="no KV-cache support.*without kv_cache"):
        lora_fx.fold_and_export(lgm, tmp_path / "x.onnx", kv_cache=True)
    assert not os.listdir(tmp_path)


def test_file_without_kv_inputs_is_refused(tmp_path):
    node = helper.make_node("Identity", ["input_ids"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    path = str(tmp_path / "plain.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(lora_fx.GenerationError, match="no KV-cache inputs.*kv_cache=True"):
        lora_fx.OnnxGenerator(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive int"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), r"attention_mask has shape \[2, 5\] but input_ids has \[2, 8\]"),
    (dict(max_new_tokens=125), "exceeds the model's 128 positions.*lower max_new_tokens to 120"),
    (dict(do_sample=True, temperature=0.0), "temperature > 0"),
    (dict(do_sample=True, top_p=1.5), "0 < top_p <= 1"),
])
def test_bad_generate_arguments(kwargs, match):
    _, path, _ = exported()
    _, ids, _ = build("llama")
    with pytest.raises(lora_fx.GenerationError, match=match):
        lora_fx.OnnxGenerator(path).generate(ids, **kwargs)


def test_prompt_longer_than_positions():
    _, path, _ = exported()
    with pytest.raises(lora_fx.GenerationError, match="prompt of 200 tokens.*128 positions"):
        lora_fx.OnnxGenerator(path).generate(torch.ones(1, 200, dtype=torch.long), max_new_tokens=1)


def test_token_ids_out_of_vocabulary():
    _, path, _ = exported()
    with pytest.raises(lora_fx.GenerationError, match=r"input_ids must lie in \[0, 96\)"):
        lora_fx.OnnxGenerator(path).generate(torch.full((1, 4), 500), max_new_tokens=1)


def test_cache_is_fed_back_as_ort_values(monkeypatch):
    import onnxruntime as ort

    _, path, _ = exported()
    gen = lora_fx.OnnxGenerator(path)
    seen: list[type] = []
    original = gen._step

    def spy(binding, ids, mask, past, *rest):
        seen.append(type(past[0]))
        return original(binding, ids, mask, past, *rest)

    monkeypatch.setattr(gen, "_step", spy)
    gen.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
    assert seen[0] is np.ndarray and all(t is ort.OrtValue for t in seen[1:]) and len(seen) == 4


def test_sampler_respects_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    rng = np.random.default_rng(0)
    top2 = _sample(logits, 1.0, 2, None, rng)
    assert set(top2) == {0, 1} and abs((top2 == 0).mean() - 0.5 / 0.8) < 0.03
    nucleus = _sample(logits, 1.0, None, 0.7, rng)  # 0.5 + 0.3 >= 0.7: tokens 0 and 1
    assert set(nucleus) == {0, 1}
    assert set(_sample(logits, 1.0, None, 0.4, rng)) == {0}


def test_cli_generate_without_tokenizer_is_a_clear_error(capsys):
    from lora_fx.cli import main

    _, path, _ = exported()
    assert main(["generate", path, "--prompt", "hello"]) == 2
    assert "no tokenizer in" in capsys.readouterr().err
