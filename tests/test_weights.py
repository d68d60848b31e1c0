"""Meta-device capture and checkpoint loading (lora_fx/weights.py) on tiny Hugging Face Llamas."""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings

import pytest
import torch
from helpers import first_tensor, randomize_lora
from zoo import assert_close

import lora_fx
from lora_fx.weights import meta_tensors

ATTN = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj"]


def _config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied, use_cache=False)


def _checkpoint(tmp_path, tied: bool = False):
    """A real model saved as a sharded HF checkpoint (index + several safetensors files)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tied)).eval()
    folder = tmp_path / ("tied" if tied else "ckpt")
    model.save_pretrained(folder, max_shard_size="100KB")
    return model, folder


@functools.cache
def _meta_gm(tied: bool):
    """The meta-device capture from config.json alone (traced once per module; lorafy copies it)."""
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="lora_fx_test_cfg"))
    _config(tied).save_pretrained(folder)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model = lora_fx.from_config(folder / "config.json", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ids, lora_fx.trace(model, (ids,))


def _meta_lgm(tied: bool = False, rank: int = 4):
    ids, gm = _meta_gm(tied)
    return ids, gm, lora_fx.lorafy(gm, ATTN, rank=rank)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_capture_then_load_equals_the_real_model(tmp_path, tied):
    model, folder = _checkpoint(tmp_path, tied)
    assert os.path.isfile(folder / "model.safetensors.index.json")
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 3
    ids, gm, lgm = _meta_lgm(tied)
    assert all(p.is_meta for p in gm.parameters())
    assert len(lora_fx.sites(gm)) == 2 * 7 + 2  # 7 projections per layer, embedding, lm_head
    assert lgm.lora_report.trainable == 2 * 4 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64)  # r (in + out) per projection
    report = lora_fx.load_weights(lgm, folder)
    assert meta_tensors(lgm) == []
    assert report.lora_initialised == 2 * 4 * 2
    assert report.loaded == len(model.state_dict()) - (1 if tied else 0)
    assert (set(report.tied) == {"lm_head.weight"}) == tied
    if tied:
        assert lgm.get_parameter("lm_head.weight") is lgm.get_parameter("model.embed_tokens.weight")
    assert all(not p.requires_grad for n, p in lgm.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in lora_fx.lora_parameters(lgm))
    with torch.no_grad():  # B = 0: exactly the real model
        assert torch.equal(first_tensor(lgm(ids)), first_tensor(model(ids)))
        randomize_lora(lgm)
        folded = lora_fx.fold(lgm)
        assert_close(first_tensor(folded(ids)), first_tensor(lgm(ids)))


def test_meta_module_refuses_fold_and_export_naming_the_tensor(tmp_path):
    _, folder = _checkpoint(tmp_path)
    _, _, lgm = _meta_lgm()
    with pytest.raises(lora_fx.WeightsError, match=r"'model\.embed_tokens\.weight'.*meta.*load_weights"):
        lora_fx.fold(lgm)
    with pytest.raises(lora_fx.WeightsError, match=r"fold_and_export.*meta.*load_weights"):
        lora_fx.fold_and_export(lgm, str(tmp_path / "x.onnx"))
    assert not os.path.exists(tmp_path / "x.onnx")


def test_bad_checkpoints_are_named_before_anything_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = _checkpoint(tmp_path)
    _, _, lgm = _meta_lgm()
    with pytest.raises(lora_fx.WeightsError, match="neither model.safetensors.index.json nor model.safetensors"):
        lora_fx.load_weights(lgm, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(lora_fx.WeightsError, match=r"q_proj\.weight: .*shape \(3, 3\).*expects \(64, 64\)"):
        lora_fx.load_weights(lgm, folder)
    assert len(meta_tensors(lgm)) == len(list(lgm.parameters()))  # nothing was loaded
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(lora_fx.WeightsError, match=r"no tensor for 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        lora_fx.load_weights(lgm, folder)


def test_a_model_built_on_the_meta_device_names_the_lost_buffer(tmp_path):
    from transformers import LlamaForCausalLM

    _, folder = _checkpoint(tmp_path)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config()).eval()
    model.model.layers = model.model.layers[:1]  # one layer is enough here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (torch.randint(0, 128, (2, 8)),))
    with pytest.raises(lora_fx.WeightsError, match=r"inv_freq.*empty_weights"):
        lora_fx.load_weights(gm, folder)


def _inspect(capsys, config, *argv):
    from lora_fx.cli import main

    code = main(["inspect", str(config), *argv])
    out, _ = capsys.readouterr()
    assert code == 0
    return out


def test_inspect_a_config_json_alone(tmp_path, capsys):
    _config().save_pretrained(tmp_path)
    out = _inspect(capsys, tmp_path / "config.json", "--targets", "q_proj", "v_proj", "--rank", "16")
    assert "16 adaptable sites" in out
    assert "model.layers.1.self_attn.v_proj" in out
    # q: 16 * (64 + 64), v: 16 * (64 + 32), two layers
    assert f"trainable {2 * 16 * (128 + 96):,} / " in out


LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}


@pytest.mark.slow
def test_inspect_llama3_70b_from_its_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_70B))
    out = _inspect(capsys, tmp_path, "--targets", "q_proj", "v_proj", "--rank", "16")
    assert f"{80 * 7 + 2} adaptable sites; model parameters 70,553,706,496" in out
    assert f"trainable {80 * 16 * (8192 + 8192 + 8192 + 1024):,} / " in out
