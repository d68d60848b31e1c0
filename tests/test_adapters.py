"""Adapters on disk: PEFT <-> lora-fx round trips, lora-fx-only branches, validation, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fx
from lora_fx.adapters import CONFIG, TENSORS, adapter_of, load_adapter, read_adapter, save_adapter
from lora_fx.examples import zoo_models

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = 1e-5


MODELS = {"gpt2": (zoo_models.gpt2, ["c_attn"]), "llama": (zoo_models.llama, ["q_proj", "v_proj"])}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, targets = MODELS[request.param]
    model, (ids,), _ = build()
    return request.param, model, ids, lora_fx.trace(model, (ids,)), targets


def logits(module, ids):
    with torch.no_grad():
        return module(ids).logits


def randomize(lgm, seed=0, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return lgm


def snapshot(lgm):
    return {n: p.detach().clone() for n, p in lgm.named_parameters()}


def unchanged(lgm, before):
    return all(torch.equal(p, before[n]) for n, p in lgm.named_parameters())


def test_peft_trained_adapter_loads_into_graph(case, tmp_path):
    name, model, ids, gm, targets = case
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        pm(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path)
    assert all(p.abs().max() > 0 for n, p in pm.named_parameters() if "lora_B" in n)  # trained: B != 0

    lgm = load_adapter(lora_fx.lorafy(gm, [f"*.{t}" for t in targets], rank=4, alpha=8).eval(), tmp_path)
    err = (logits(lgm, ids) - logits(pm, ids)).abs().max().item()
    assert err <= TOL, f"{name}: PEFT adapter in lora-fx graph differs by {err:.3g}"
    auto = load_adapter(gm, tmp_path)  # no LoRA yet: lorafied from the file
    assert [br.key for br in auto.lora_report.branches] == [br.key for br in lgm.lora_report.branches]
    assert (logits(auto, ids) - logits(pm, ids)).abs().max().item() <= TOL


def test_lora_fx_adapter_loads_in_peft(case, tmp_path):
    name, model, ids, gm, targets = case
    lgm = randomize(lora_fx.lorafy(gm, [f"*.{t}" for t in targets], rank=4, alpha=8))
    save_adapter(lgm, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    err = (logits(lgm, ids) - logits(pm, ids)).abs().max().item()
    assert err <= TOL, f"{name}: lora-fx adapter in PEFT differs by {err:.3g}"

    config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] is (name == "gpt2")  # GPT-2's Conv1D stores (in, out)
    assert config["bias"] == "none" and config["use_rslora"] is False and config["task_type"] is None
    # exactly the tensor names PEFT itself writes for these targets
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    theirs.save_pretrained(tmp_path / "theirs")
    assert load_file(tmp_path / "ours" / TENSORS).keys() == load_file(tmp_path / "theirs" / TENSORS).keys()


@pytest.fixture(scope="module")
def gpt2_case():
    model, (ids,), _ = zoo_models.gpt2()
    return model, ids, lora_fx.trace(model, (ids,))


def test_lora_fx_only_branches_round_trip(gpt2_case, tmp_path):
    model, ids, gm = gpt2_case
    targets = [lora_fx.Target("*.c_attn", slices=[0, 2], chunks=3, rank=2),  # q and v of fused qkv
               lora_fx.Target("*.mlp.c_fc", rank=4, alpha=16), "transformer.wte"]
    lgm = randomize(lora_fx.lorafy(gm, targets, rank=4, alpha=8), seed=3)
    save_adapter(lgm, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    keys = load_file(tmp_path / TENSORS).keys()
    assert "lora_fx.transformer.h.0.attn.c_attn.weight_slice0_64.lora_A.weight" in keys  # hidden 64: q is 0:64
    assert "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight" in keys
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    assert config["target_modules"] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.wte"]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 16, {})
    assert config["alpha_pattern"] == {"transformer.wte": 8}  # the most common alpha is the default
    fx_section = {b["key"]: b for b in config["lora_fx"]["branches"]}
    assert fx_section["transformer.h.1.attn.c_attn.weight_slice128_192"]["slice"] == [128, 192]
    assert len(fx_section) == len(keys) // 2 == 7

    fresh = load_adapter(lora_fx.lorafy(gm, targets, rank=4, alpha=8), tmp_path)
    assert (logits(fresh, ids) - logits(lgm, ids)).abs().max().item() == 0.0
    auto = load_adapter(gm, tmp_path)
    assert (logits(auto, ids) - logits(lgm, ids)).abs().max().item() == 0.0
    # PEFT reads the part it can express and leaves the lora_fx.* tensors alone
    with pytest.warns(UserWarning, match="lora_fx"):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    ours = lgm.get_parameter("transformer.h.1.mlp.c_fc.lora_B.weight")
    assert torch.equal(pm.base_model.model.transformer.h[1].mlp.c_fc.lora_B["default"].weight, ours)


class Functional(torch.nn.Module):
    """A raw parameter used by ``x @ w.T`` and one module called twice: both PEFT-inexpressible."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x @ self.w.T)))


def test_raw_parameter_and_repeated_call_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    gm = lora_fx.trace(Functional(), (x,))
    lgm = randomize(lora_fx.lorafy(gm, "*", rank=2))
    save_adapter(lgm, tmp_path)
    keys = sorted(load_file(tmp_path / TENSORS))
    assert all(k.startswith("lora_fx.") for k in keys), keys
    assert json.loads((tmp_path / CONFIG).read_text())["target_modules"] == []
    auto = load_adapter(gm, tmp_path)
    torch.testing.assert_close(auto(x), lgm(x), rtol=0, atol=0)


# -- validation: every failure is an AdapterError naming the culprit, and changes nothing ------------

@pytest.fixture()
def saved(gpt2_case, tmp_path):
    _, _, gm = gpt2_case
    lgm = randomize(lora_fx.lorafy(gm, ["*.c_attn", "*.attn.c_proj"], rank=4, alpha=8))
    save_adapter(lgm, tmp_path)
    return gm, tmp_path


def test_mismatches_are_named_and_change_nothing(saved):
    gm, path = saved
    lgm = lora_fx.lorafy(gm, ["*.c_attn"], rank=4, alpha=8)  # file has c_proj too: unexpected
    before = snapshot(lgm)
    with pytest.raises(lora_fx.AdapterError, match=r"unexpected base_model\.model\.transformer\.h\.0\.attn\.c_proj") as e:
        load_adapter(lgm, path)
    assert str(path) in str(e.value) and unchanged(lgm, before)

    lgm = lora_fx.lorafy(gm, ["*.c_attn", "*.attn.c_proj", "*.c_fc"], rank=4, alpha=8)
    with pytest.raises(lora_fx.AdapterError, match=r"missing transformer\.h\.1\.mlp\.c_fc.*nearest"):
        load_adapter(lgm, path)
    lgm = lora_fx.lorafy(gm, ["*.c_attn", "*.attn.c_proj"], rank=8, alpha=16)
    before = snapshot(lgm)
    with pytest.raises(lora_fx.AdapterError, match=r"shape transformer\.h\.0\.attn\.c_attn\.lora_A: file \(4, 64\) vs module \(8, 64\)"):
        load_adapter(lgm, path)
    assert unchanged(lgm, before)
    with pytest.raises(lora_fx.AdapterError, match=r"scale .*lorafy with alpha=8"):
        load_adapter(lora_fx.lorafy(gm, ["*.c_attn", "*.attn.c_proj"], rank=4, alpha=4), path)


def _rewrite_config(path, **changes):
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def test_bad_files_raise_adapter_error(saved, monkeypatch):
    gm, path = saved
    lgm = lora_fx.lorafy(gm, ["*.c_attn", "*.attn.c_proj"], rank=4, alpha=8)
    before = snapshot(lgm)
    good = (path / TENSORS).read_bytes()

    def boom(*a, **k):
        raise AssertionError("an adapter load must never unpickle")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    (path / TENSORS).write_bytes(good[: len(good) // 2])  # truncated, sha256 recorded
    with pytest.raises(lora_fx.AdapterError, match="sha256"):
        load_adapter(lgm, path)
    _rewrite_config(path, lora_fx=None)  # as PEFT writes it: no sha256 to compare
    with pytest.raises(lora_fx.AdapterError, match="corrupt or truncated"):
        load_adapter(lgm, path)
    (path / TENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    with pytest.raises(lora_fx.AdapterError, match=str(path / TENSORS).replace("\\", "\\\\")):
        load_adapter(lgm, path)
    (path / TENSORS).write_bytes(good)
    t = read_adapter(path)
    t.pair("transformer.h.1.attn.c_attn")[1][0, 0] = float("nan")
    with pytest.raises(lora_fx.AdapterError, match=r"transformer\.h\.1\.attn\.c_attn\.lora_B holds NaN"):
        save_and_read(t, path.parent / "nan")
    (path / CONFIG).write_text("{oops")
    with pytest.raises(lora_fx.AdapterError, match="not valid JSON"):
        load_adapter(lgm, path)
    (path / TENSORS).unlink()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(lora_fx.AdapterError, match="pickle"):
        load_adapter(lgm, path)
    with pytest.raises(lora_fx.AdapterError, match="not a folder"):
        load_adapter(lgm, path / "nope")
    assert unchanged(lgm, before)


def save_and_read(adapter, path):
    save_adapter(adapter, path)
    return read_adapter(path)


def test_unknown_or_path_like_tensor_names(saved):
    gm, path = saved
    tensors = load_file(path / TENSORS)
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] = torch.ones(96)
    save_file(tensors, path / TENSORS)
    _rewrite_config(path, lora_fx=None)
    with pytest.raises(lora_fx.AdapterError, match="lora_magnitude_vector"):
        read_adapter(path)
    del tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"]
    tensors["base_model.model.../../evil.lora_A.weight"] = torch.ones(4, 32)
    tensors["base_model.model.../../evil.lora_B.weight"] = torch.ones(96, 4)
    save_file(tensors, path / TENSORS)
    with pytest.raises(lora_fx.AdapterError, match=r"unexpected base_model\.model\.\.\./\.\./evil"):
        load_adapter(lora_fx.lorafy(gm, ["*.c_attn", "*.attn.c_proj"], rank=4, alpha=8), path)
    assert sorted(os.listdir(path)) == [CONFIG, TENSORS]


def test_save_is_atomic(saved, monkeypatch):
    gm, path = saved
    old = {n: (path / n).read_bytes() for n in (CONFIG, TENSORS)}
    lgm = randomize(lora_fx.lorafy(gm, ["*.c_attn"], rank=2), seed=9)
    calls = []
    real_replace = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the tensors are in place, the config fails
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(lgm, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {n: (path / n).read_bytes() for n in (CONFIG, TENSORS)} == old
    assert sorted(os.listdir(path)) == [CONFIG, TENSORS]  # no stray temp or backup files

    import lora_fx.adapters.peft_format as mod

    monkeypatch.setattr(mod, "st_save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(RuntimeError):
        save_adapter(lgm, path)
    assert {n: (path / n).read_bytes() for n in (CONFIG, TENSORS)} == old
    monkeypatch.undo()
    save_adapter(lgm, path)
    assert sorted(os.listdir(path)) == [CONFIG, TENSORS]
    assert read_adapter(path).branches.keys() == adapter_of(lgm).branches.keys()


def test_rank_pattern_and_rslora_read_from_peft_config(gpt2_case, tmp_path: Path):
    model, ids, gm = gpt2_case
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_rslora=True,
                             rank_pattern={"transformer.h.1.attn.c_attn": 2}, alpha_pattern={"h.1.attn.c_attn": 3})
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.eval().save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    assert adapter.use_rslora and adapter.branches["transformer.h.1.attn.c_attn"].scale == pytest.approx(3 / 2 ** 0.5)
    auto = load_adapter(gm, tmp_path)
    assert (logits(auto, ids) - logits(pm, ids)).abs().max().item() <= TOL


def _tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["LoHaConfig", "LoKrConfig", "VeraConfig", "IA3Config", "AdaLoraConfig"])
def test_other_peft_methods_are_refused_by_name(method, tmp_path):
    """A PEFT adapter of another method (real folders PEFT wrote) is an error naming it, never a plain load."""
    peft = pytest.importorskip("peft")
    extra = {"total_step": 10} if method == "AdaLoraConfig" else {}
    config = getattr(peft, method)(target_modules=["q_proj", "v_proj"], **extra)
    peft.get_peft_model(_tiny_llama(), config).save_pretrained(tmp_path)
    kind = json.loads((tmp_path / CONFIG).read_text())["peft_type"]
    with pytest.raises(lora_fx.AdapterError, match=f"peft_type is '{kind}', a PEFT method other than LoRA"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("flag, value, what", [("lora_bias", True, "LoRA bias terms"),
                                               ("use_qalora", True, "QA-LoRA"),
                                               ("layer_replication", [[0, 1]], "layer replication"),
                                               ("init_lora_weights", "corda", "changes the base weights")])
def test_lora_flags_lora_fx_does_not_support_are_refused(flag, value, what, tmp_path):
    peft = pytest.importorskip("peft")
    peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    read_adapter(tmp_path)  # as PEFT wrote it: a plain LoRA adapter
    _rewrite_config(tmp_path, **{flag: value})
    with pytest.raises(lora_fx.AdapterError, match=what):
        read_adapter(tmp_path)  # load_adapter reads first: nothing is lorafied or loaded
