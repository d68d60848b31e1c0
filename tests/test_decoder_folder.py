"""A decoder export folder that runs as is (lora_fx/exporters/decoder/folder.py): genai_config.json,
config.json, generation_config.json and the tokenizer beside model.onnx; og.Model runs it with the
same greedy tokens as Hugging Face generate and lora_fx.OnnxGenerator, in fp32 and int4."""

from __future__ import annotations

import json
import os
import types
import warnings

import numpy as np
import pytest
from helpers import og_greedy, randomize_lora

import lora_fx
from lora_fx.errors import ExportError
from lora_fx.examples.decoders import build
from lora_fx.exporters.backends.genai_builder import byte_level_tokenizer
from lora_fx.exporters.decoder.folder import folder_files

LAYOUT = types.SimpleNamespace(kv=(((2, 16), (2, 16)),) * 2, max_positions=128, vocab_size=96, eos_token_id=[3],
                               pad_token_id=0)


def _model_with_tokenizer(tmp_path, name="llama"):
    model, ids, targets = build(name)
    tok_dir = tmp_path / "hf"
    byte_level_tokenizer(96).save_pretrained(tok_dir)
    model.name_or_path = str(tok_dir)
    return model, ids, targets


def test_folder_files_genai_config_and_tokenizer_from_model_folder(tmp_path):
    model, _, _ = _model_with_tokenizer(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    files = folder_files(model, LAYOUT, str(out / "chat.onnx"))
    assert files.tokenizer == str(tmp_path / "hf") and not files.notes
    assert {"genai_config.json", "config.json", "generation_config.json", "tokenizer.json"} <= set(files.files)
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["search"]["past_present_share_buffer"] is False  # lora-fx's cache grows by Concat
    assert dec["filename"] == "chat.onnx" and dec["num_hidden_layers"] == 2
    assert (dec["num_key_value_heads"], dec["head_size"], dec["num_attention_heads"]) == (2, 16, 4)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert cfg["model"]["eos_token_id"] == 3 and cfg["model"]["type"] == "llama" and cfg["model"]["context_length"] == 128
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    assert config.use_cache is True and config.architectures == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"]


def test_folder_files_tokenizer_option_and_missing_tokenizer(tmp_path):
    model, _, _ = build("llama")
    model.name_or_path = ""
    (tmp_path / "a").mkdir()
    files = folder_files(model, LAYOUT, str(tmp_path / "a" / "model.onnx"))
    assert files.tokenizer is None and "tokenizer.json" not in files.files
    assert len(files.notes) == 1 and "tokenizer.save_pretrained" in files.notes[0]
    (tmp_path / "b").mkdir()
    files = folder_files(model, LAYOUT, str(tmp_path / "b" / "model.onnx"), tokenizer=byte_level_tokenizer(96))
    assert "tokenizer.json" in files.files and files.tokenizer.startswith("the given")
    with pytest.raises(ExportError, match="tokenizer="):
        folder_files(model, LAYOUT, str(tmp_path / "b" / "model.onnx"), tokenizer=str(tmp_path / "a"))


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_exported_folder_runs_in_genai(tmp_path, quantize):
    pytest.importorskip("onnxruntime_genai")
    from lora_fx.exporters.decoder.capture import merged_model

    model, ids, targets = _model_with_tokenizer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (ids,))
    lgm = lora_fx.lorafy(gm, targets, rank=4, alpha=8)
    randomize_lora(lgm, std=0.3)
    out = tmp_path / "out"
    out.mkdir()
    rep = lora_fx.fold_and_export(lgm, str(out / "model.onnx"), kv_cache=True, quantize=quantize)
    assert rep.verification.ok
    assert {"model.onnx", "genai_config.json", "config.json", "generation_config.json", "tokenizer.json"} <= set(
        os.listdir(out))
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no staging left behind
    prompt = ids[:1, :6]
    got = og_greedy(str(out), prompt, 12)
    onnx = lora_fx.OnnxGenerator(str(out / "model.onnx")).generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert got == onnx[0].tolist()
    if quantize is None:
        ref = merged_model(lgm).generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == ref[0].tolist()
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(out)))
    assert np.asarray(tok.encode("ab")).size >= 1


@pytest.mark.slow
def test_multi_lora_folder_switches_adapters_in_genai(tmp_path):
    """export_multi_lora(kv_cache=True) writes a folder og.Model loads; og.Adapters switches per request and
    each adapter's greedy tokens equal those of that adapter's fold (HF generate on the merged model)."""
    og = pytest.importorskip("onnxruntime_genai")
    from lora_fx.exporters.decoder.capture import merged_model
    from lora_fx.exporters.multi_lora import export_multi_lora, write_ort_adapter

    model, ids, targets = _model_with_tokenizer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (ids,))
    lgm = lora_fx.lorafy(gm, targets, rank=4, alpha=8)
    out = tmp_path / "multi"
    out.mkdir()
    mapping = export_multi_lora(lgm, out / "model.onnx", kv_cache=True)
    assert {"genai_config.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    prompt = ids[:1, :6]
    merged = {}
    for seed in (1, 2):
        randomize_lora(lgm, std=0.3, seed=seed)
        write_ort_adapter(lgm, out / f"a{seed}.onnx_adapter", mapping)
        merged[seed] = merged_model(lgm).generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                                  pad_token_id=0)[0].tolist()
    assert merged[1] != merged[2]
    og_model = og.Model(str(out))
    adapters = og.Adapters(og_model)
    for seed in (1, 2):
        adapters.load(str(out / f"a{seed}.onnx_adapter"), f"a{seed}")
    for seed in (2, 1):  # switched per request, in either order
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=prompt.shape[1] + 10, do_sample=False)
        gen = og.Generator(og_model, params)
        gen.set_active_adapter(adapters, f"a{seed}")
        gen.append_tokens(prompt.numpy())
        while not gen.is_done():
            gen.generate_next_token()
        assert [int(t) for t in gen.get_sequence(0)] == merged[seed]


OPTIMUM_PYTHON = os.environ.get("LORA_FX_OPTIMUM_PYTHON", "/work/venv-optimum/bin/python")
_OPTIMUM_RUN = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
folder, ids, mask = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), torch.tensor(json.loads(sys.argv[3]))
m = ORTModelForCausalLM.from_pretrained(folder)
kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
print(json.dumps([m.generate(ids[1:], **kw).tolist(), m.generate(ids, attention_mask=mask, **kw).tolist()]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(OPTIMUM_PYTHON), reason=f"no Optimum venv at {OPTIMUM_PYTHON} (optimum-onnx "
                    "needs transformers < 4.58; docs/llm_deploy.md says how to make one, or set LORA_FX_OPTIMUM_PYTHON)")
@pytest.mark.parametrize("backend", ["torch_onnx", "genai_builder"])
def test_optimum_runs_the_folder_unchanged(tmp_path, backend):
    """Optimum's ORTModelForCausalLM.from_pretrained(folder) (another venv) generates Hugging Face's greedy tokens
    on one prompt from either backend's folder; on a left-padded batch only lora-fx's own graph does (the builder's
    GroupQueryAttention reads the mask as row lengths, and Optimum pads on the left)."""
    import subprocess

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_fx.exporters.decoder.capture import merged_model

    pytest.importorskip("onnxruntime_genai")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=96, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, use_cache=False)).eval()
    byte_level_tokenizer(96).save_pretrained(tmp_path / "hf")
    model.name_or_path = str(tmp_path / "hf")
    ids = torch.randint(4, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    lgm = lora_fx.lorafy(lora_fx.trace(model, (ids,)), ["*.q_proj", "*.v_proj"], rank=4)
    randomize_lora(lgm, std=0.3)
    (tmp_path / "out").mkdir()
    rep = lora_fx.fold_and_export(lgm, str(tmp_path / "out" / "model.onnx"), kv_cache=True, backend=backend)
    assert rep.backend == backend
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    padded = ids.masked_fill(mask == 0, 0)
    run = subprocess.run([OPTIMUM_PYTHON, "-c", _OPTIMUM_RUN, str(tmp_path / "out"), json.dumps(padded.tolist()),
                          json.dumps(mask.tolist())], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    single, batch = json.loads(run.stdout.strip().splitlines()[-1])
    merged = merged_model(lgm)
    merged.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert single == merged.generate(padded[1:], **kw).tolist()
    if backend == "torch_onnx":  # (the builder's file gives wrong tokens on Optimum's left-padded rows)
        assert batch == merged.generate(padded, attention_mask=mask, **kw).tolist()
