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
    with torch.no_grad():  # B = 0: the real model (the eager model is another code path: a tolerance)
        assert_close(first_tensor(lgm(ids)), first_tensor(model(ids)))
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


# A 1.06B-parameter Llama (3 wide layers, vocab 64000; bf16: 2.1 GB): wide rather than deep so that the
# whole path runs in ~3 min on 2 cores. The 22-layer TinyLlama shape is benchmarks/scale.py's job.
BILLION = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 3, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 64000, "max_position_embeddings": 256,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _random_checkpoint(gm, folder, shard_bytes: int = 600 * 2**20) -> dict[str, torch.Tensor]:
    """Writes random weights for every meta parameter of ``gm`` as a sharded checkpoint, one shard in
    memory at a time; returns the first rows of each shard's first tensor, to compare after loading."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weight_map, samples, shard, size = {}, {}, {}, 0

    def flush():
        file = f"model-{len(samples) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(shard, file))
        key = next(iter(shard))
        samples[key] = shard[key][:2].clone()
        shard.clear()

    for name, p in gm.named_parameters():
        shard[name] = torch.empty(p.shape, dtype=p.dtype).normal_(0, 0.02, generator=gen)
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            flush()
            size = 0
    if shard:
        flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return samples


@pytest.mark.slow  # ~5 min at load 5 on 2 cores (~3 idle); peak RSS 9.6 GiB: hold /tmp/lorafx-bigmem.lock
def test_one_billion_parameters_meta_capture_load_train_fold_and_export(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BILLION))
    model = lora_fx.from_config(tmp_path / "config.json")
    # 2 x 2 tokens: a bf16 matmul whose weight is row-major (linear's input gradient, grad @ W) takes
    # torch's slow CPU path on a CPU without avx512_bf16 (~0.15 GFLOP/s: 1 step of 8 tokens ~100 s)
    ids = torch.randint(0, BILLION["vocab_size"], (2, 2), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (ids,))
    total = sum(p.numel() for p in gm.parameters())
    assert total >= 1_000_000_000 and all(p.is_meta and p.dtype == torch.bfloat16 for p in gm.parameters())
    lgm = lora_fx.lorafy(gm, ATTN, rank=16, alpha=32)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    samples = _random_checkpoint(gm, ckpt)
    del model, gm
    report = lora_fx.load_weights(lgm, ckpt)
    assert report.loaded == len(list(lgm.parameters())) - 2 * len(lgm.lora_report.branches)
    assert not meta_tensors(lgm)
    for name, value in samples.items():
        assert torch.equal(lgm.get_parameter(name)[:2], value)
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-3)
    lgm.train()
    loss = lgm(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    lgm.eval()
    assert torch.isfinite(loss)
    out = tmp_path / "model.onnx"
    rep = lora_fx.fold_and_export(lgm, str(out), external_data=True, dtype=torch.float16)
    assert rep.verification.ok, rep.verification
    assert os.path.getsize(str(out) + ".data") >= 2 * total  # fp16 weights in the external data file
