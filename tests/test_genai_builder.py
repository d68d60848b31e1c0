"""onnxruntime-genai's model builder as an export backend (lora_fx/exporters/backends/genai_builder.py):
support decided by the builder's own table, base and task built alike and proven structurally equal
with only the adapted weights' initializers changed; a stray change fails loudly."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from helpers import og_greedy

from lora_fx.errors import VerifyError
from lora_fx.exporters.backends import genai_builder as gb

genai = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                           reason="onnxruntime-genai not installed (pip install 'lora-fx[genai]')")


def tiny_llama(head_dim: int = 16, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, vocab_size=96, eos_token_id=3,
                      pad_token_id=0, bos_token_id=1, use_cache=False, **kw)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_explained_maps_builder_names_to_adapted_weights():
    adapted = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert gb.explained("model.layers.0.attn.qkv_proj.MatMul.weight", adapted)  # packed q/k/v
    assert gb.explained("model.layers.0.attn.qkv_proj.MatMul.weight_Q4", adapted)  # its quantized form
    assert gb.explained("model.layers.1.mlp.up_proj.MatMul.weight_scales", adapted)
    assert gb.explained("model.layers.1.mlp.gate_up_proj.MatMul.weight", adapted)
    assert not gb.explained("model.layers.1.attn.qkv_proj.MatMul.weight", adapted)  # another layer
    assert not gb.explained("model.layers.0.attn.o_proj.MatMul.weight", adapted)
    assert not gb.explained("model.layers.0.mlp.up_proj.MatMul.weight", adapted)
    assert not gb.explained("lm_head.MatMul.weight", adapted)


@genai
def test_support_follows_the_builders_table():
    from transformers import GPT2Config, GPT2LMHeadModel

    archs = gb.builder_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
            "GemmaForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "SmolLM3ForCausalLM"} <= archs
    assert gb.unsupported(tiny_llama()) is None
    assert gb.unsupported(tiny_llama(), quantize="int4") is None
    assert "head size 8" in gb.unsupported(tiny_llama(head_dim=8))
    assert "GPT2LMHeadModel" in gb.unsupported(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2)))
    assert "dtype" in gb.unsupported(tiny_llama(), dtype=torch.float16)
    assert "quantize='int8'" in gb.unsupported(tiny_llama(), quantize="int8")


def _tiny(family: str, **kw):
    """A tiny random Hugging Face causal LM of ``family`` (hidden 64, 4 heads of 16, 2 KV heads, vocab 160)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**_SIZES, **extra, **kw})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).eval()


_SIZES = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, vocab_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              use_cache=False)
# family -> (config class, model class, settings); the builder's routes measured on these (docs/llm_deploy.md)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # original_max_position_embeddings 4096 by default
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=128)),  # partial rotary 0.5: rotary size 16
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(hidden_size=128, head_dim=32)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(head_dim=16)),
    "hunyuan": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", dict(head_dim=16)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


@genai
def test_support_refuses_what_the_builder_builds_wrong():
    """Refused before building: a Linear as wide as the vocabulary (the builder takes it for the LM head:
    the zoo's Llama, vocab 128 = intermediate 128, came out 0.53 off), OLMo (its LayerNorm built as
    RMSNorm), a rotary size GroupQueryAttention refuses; a fitting config of the same family is built."""
    clash = _tiny("llama", vocab_size=128, intermediate_size=128)
    assert "model.layers.0.mlp.gate_proj (Linear) is as wide as the vocabulary (128)" in gb.unsupported(clash)
    assert "model.layers.0.self_attn.q_proj" in gb.unsupported(_tiny("llama", vocab_size=64))  # = hidden size
    assert gb.unsupported(_tiny("llama")) is None
    assert "LayerNorm as an RMSNorm" in gb.unsupported(_tiny("olmo"))
    assert "rotary size 8 (head size 16 x partial_rotary_factor 0.5)" in gb.unsupported(_tiny("phi", hidden_size=64))
    assert gb.unsupported(_tiny("phi")) is None and gb.unsupported(_tiny("nemotron")) is None
    assert "does not support Olmo2ForCausalLM" in gb.unsupported(_tiny("olmo2"))


def test_right_padded_moves_each_rows_tokens_to_its_front():
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 0, 12]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]])
    packed, front = gb.right_padded(ids, mask)
    assert packed.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10], [11, 12, 0, 0]]
    assert front.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]] and front.dtype == mask.dtype


def test_not_installed_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime_genai" else real(n, *a))
    assert 'pip install "lora-fx[genai]"' in gb.unsupported(tiny_llama())


def _states(model, adapt=("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight")):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    task = dict(base)
    for name in adapt:
        task[name] = base[name] + 0.05 * torch.randn_like(base[name])
    return task, base, list(adapt)


@genai
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_build_pair_proof(tmp_path, precision):
    model = tiny_llama()
    task, base, adapted = _states(model)
    built = gb.build_pair(model, task, base, str(tmp_path), precision)
    s = gb.prove(built.base, built.task, adapted)
    ops = {n.op_type for n in onnx.load(built.task, load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and ("MatMulNBits" in ops) == (precision == "int4")
    assert s.ok and s.task_nodes == s.base_nodes
    suffix = (".MatMul.weight_Q4",) if precision == "int4" else (".MatMul.weight",)
    assert sorted(n for n in s.changed_initializers if n.endswith(suffix)) == [
        f"model.layers.{i}.attn.qkv_proj{suffix[0]}" for i in (0, 1)]
    assert built.genai_config["model"]["decoder"]["num_hidden_layers"] == 2


@genai
def test_prove_fails_on_a_stray_change_and_on_a_structural_difference(tmp_path):
    model = tiny_llama()
    task, base, adapted = _states(model)
    task["model.layers.1.mlp.down_proj.weight"] = base["model.layers.1.mlp.down_proj.weight"] * 1.5  # not adapted
    built = gb.build_pair(model, task, base, str(tmp_path), "fp32")
    with pytest.raises(VerifyError, match="down_proj"):
        gb.prove(built.base, built.task, adapted)
    proto = onnx.load(built.base, load_external_data=False)
    gqa = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    next(a for a in gqa.attribute if a.name == "do_rotary").i = 0  # a graph that read a value differently
    onnx.save(proto, built.base)
    with pytest.raises(VerifyError, match="GroupQueryAttention|node"):
        gb.prove(built.base, built.task, adapted)


def _lorafied(model, tmp_path, targets=("*.q_proj", "*.v_proj")):
    import lora_fx

    gb.byte_level_tokenizer(96).save_pretrained(tmp_path / "tok")
    model.name_or_path = str(tmp_path / "tok")
    ids = torch.randint(4, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    lgm = lora_fx.lorafy(lora_fx.trace(model, (ids,)), list(targets), rank=4)
    with torch.no_grad():
        for name, p in lgm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return lgm, ids


@genai
@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_kv_export_goes_through_the_builder(tmp_path, quantize):
    import lora_fx
    from lora_fx.exporters.decoder.capture import merged_model

    lgm, ids = _lorafied(tiny_llama(), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rep = lora_fx.fold_and_export(lgm, str(out / "model.onnx"), kv_cache=True, quantize=quantize)
    assert rep.backend == "genai_builder" and rep.verification.ok and rep.verification.structure.ok
    assert any("model builder" in n for n in rep.notes) and rep.seconds["builder"] > 0
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    if quantize is None:  # the decode checks ran (a left-padded batch, fed packed: GroupQueryAttention)
        assert [c.shapes.split(",")[0] for c in rep.verification.numerics][-4:] == [
            "prefill (2", "decode step 1", "decode step 2", "decode step 3"]
        assert all(c.ok for c in rep.verification.numerics if "step" in c.shapes or "prefill" in c.shapes)
    else:
        assert rep.quantized.ok and rep.quantized.info.quantized["MatMulNBits"] > 0
    prompt = ids[:1, :6]
    got = og_greedy(str(out), prompt, 10)
    gen = lora_fx.OnnxGenerator(out / "model.onnx")
    assert got == gen.generate(prompt, max_new_tokens=10, eos_token_id=[])[0].tolist()
    if quantize is None:
        merged = merged_model(lgm)
        assert got == merged.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0].tolist()
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding: OnnxGenerator feeds a builder file the rows packed to the front
        padded = ids.masked_fill(mask == 0, 0)
        assert torch.equal(gen.generate(padded, mask, max_new_tokens=6, eos_token_id=[]),
                           merged.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                           eos_token_id=None, pad_token_id=0))


@genai
@pytest.mark.slow
def test_builder_refusals_fall_back_and_a_structural_difference_installs_nothing(tmp_path, monkeypatch):
    import lora_fx

    lgm, _ = _lorafied(tiny_llama(), tmp_path)
    real = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime_genai" else real(n, *a))
        rep = lora_fx.fold_and_export(lgm, str(tmp_path / "a.onnx"), kv_cache=True, verify=False)
    assert rep.backend == "torch_onnx" and any('pip install "lora-fx[genai]"' in n for n in rep.notes)
    real_build = gb.build_pair

    def tampered(*args, **kwargs):  # a builder whose graph depended on weight values
        built = real_build(*args, **kwargs)
        proto = onnx.load(built.base, load_external_data=False)
        next(a for a in next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention").attribute
             if a.name == "do_rotary").i = 0
        onnx.save(proto, built.base)
        return built

    monkeypatch.setattr(gb, "build_pair", tampered)
    with pytest.raises(VerifyError, match="GroupQueryAttention"):
        lora_fx.fold_and_export(lgm, str(tmp_path / "b.onnx"), kv_cache=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "config.json", "genai_config.json",
                                                         "generation_config.json", "tok", "tokenizer.json",
                                                         "tokenizer_config.json"]


@genai
@pytest.mark.slow
def test_a_builder_file_failing_the_checks_falls_back_and_a_zero_adapter_changes_nothing(tmp_path, monkeypatch):
    import lora_fx
    from lora_fx.exporters.decoder import export as decoder_export
    from lora_fx.exporters.verify.numerics import NumericCheck

    lgm, _ = _lorafied(tiny_llama(), tmp_path)
    zero = lora_fx.lorafy(lora_fx.strip(lgm), ["*.q_proj", "*.v_proj"], rank=4)  # B = 0: the base weights
    rep = lora_fx.fold_and_export(zero, str(tmp_path / "z.onnx"), kv_cache=True)
    assert rep.backend == "genai_builder" and rep.verification.structure.ok
    assert not rep.verification.structure.changed_initializers
    real = decoder_export.decode_checks

    def wrong_on_builder_files(kv, named, *args, **kwargs):  # a builder graph that computes something else
        checks = real(kv, named, *args, **kwargs)
        if gb.right_padding_only(named):
            checks[0] = NumericCheck(checks[0].shapes, 1.0, 0.5, False)
        return checks

    monkeypatch.setattr(decoder_export, "decode_checks", wrong_on_builder_files)
    rep = lora_fx.fold_and_export(lgm, str(tmp_path / "f.onnx"), kv_cache=True)
    assert rep.backend == "torch_onnx" and rep.verification.ok
    assert any(n.startswith("backend genai_builder: its file failed verification") for n in rep.notes)
    with pytest.raises(VerifyError, match="FAILED verification"):  # a backend the user chose is not replaced
        lora_fx.fold_and_export(lgm, str(tmp_path / "g.onnx"), kv_cache=True, backend="genai_builder")


# the backend each tiny config takes with onnxruntime-genai 0.18 (measured: docs/llm_deploy.md); a refusal is
# decided before building (no builder time spent), and both paths match torch on a left-padded batch
ROUTES = {**{f: (f, {}, "genai_builder") for f in FAMILIES},
          "olmo": ("olmo", {}, "torch_onnx"),  # the builder's LayerNorm is an RMSNorm
          "olmo2": ("olmo2", {}, "torch_onnx"),  # not in the builder's table
          "llama-vocab128": ("llama", dict(vocab_size=128, intermediate_size=128), "torch_onnx"),  # vocab clash
          "phi-rotary8": ("phi", dict(hidden_size=64), "torch_onnx")}  # GroupQueryAttention refuses it


@genai
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ROUTES))
def test_every_builder_family_takes_its_route_and_matches_torch(tmp_path, case):
    import lora_fx
    from lora_fx.exporters.decoder.capture import merged_model

    family, settings, backend = ROUTES[case]
    lgm, ids = _lorafied(_tiny(family, **settings), tmp_path,
                         ["*.qkv_proj"] if family == "phi3" else ["*.q_proj", "*.v_proj"])
    out = tmp_path / "out"
    out.mkdir()
    rep = lora_fx.fold_and_export(lgm, str(out / "model.onnx"), kv_cache=True)
    assert rep.backend == backend and rep.verification.ok
    if backend == "torch_onnx":
        assert "builder" not in rep.seconds and any("'genai_builder' not used" in n for n in rep.notes)
    assert [c.shapes[:26] for c in rep.verification.numerics][-4:] == [
        "prefill (2, 7) left-padded", "decode step 1, past 7", "decode step 2, past 8", "decode step 3, past 9"]
    merged = merged_model(lgm)
    merged.generation_config.eos_token_id = None
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    padded = ids.masked_fill(mask == 0, 0)
    want = merged.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = lora_fx.OnnxGenerator(out / "model.onnx").generate(padded, mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(got, want)
    assert og_greedy(str(out), ids[1:], 6) == want[1].tolist()
