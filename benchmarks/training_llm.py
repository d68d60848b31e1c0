"""Training at LLM shape: checkpointing, compile and bf16 for lora-fx vs PEFT vs full fine-tuning.

Model: Llama-shaped (8 layers, hidden 512, 8 heads, MLP 1376, vocab 32000, random weights), batch 4 x
seq 512, train mode; LoRA r=16, alpha=32, dropout 0 on all 7 projections (q/k/v/o, gate/up/down); the
same causal-LM loss (cross entropy on shifted logits, computed outside the model) and
``AdamW(lr=1e-4)`` over the trainable parameters for every variant, 1 torch thread.

Variants: ``full`` (full fine-tuning), ``peft``, ``peft+ckpt`` (Hugging Face
``gradient_checkpointing_enable(use_reentrant=False)``), ``lora-fx``, ``lora-fx+ckpt``
(``lora_fx.checkpoint(lgm, "*.layers.*")``), ``lora-fx+sel`` (the selective policy), ``lora-fx+compile``
(``torch.compile(lgm)``), and bf16 bases (``*-bf16``: the model in bf16, LoRA A/B in fp32).

* **Step time**: one process holds every variant; after warm-up steps, steps are taken round-robin
  with the order rotated each round, so machine load hits all alike; ratios are per round (paired).
* **Peak memory**: one fresh subprocess per variant (see :mod:`benchmarks.training`): setup plus one
  warm-up step (compile happens there), then the kernel's peak-RSS mark is reset and 1 step runs;
  reported: peak ``VmHWM`` minus the RSS after the imports.

Goals: peak memory lora-fx+ckpt <= PEFT+ckpt and its step <= 1.05x PEFT+ckpt; eager lora-fx / eager
PEFT step <= 0.95 (never above 1.0); compiled lora-fx / eager PEFT <= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .common import (
    Stats,
    env_line,
    environment,
    log,
    md_table,
    paired_ratios,
    rotated,
    verdict,
    write_outputs,
)
from .training import _status_kb, _trim

NAME = "training_llm"
VARIANTS = ("full", "peft", "peft+ckpt", "lora-fx", "lora-fx+ckpt", "lora-fx+sel", "lora-fx+compile",
            "peft-bf16", "lora-fx-bf16", "lora-fx+ckpt-bf16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
GOALS = {  # name: (numerator, denominator, kind, upper bound)
    "memory lora-fx+ckpt / peft+ckpt": ("lora-fx+ckpt", "peft+ckpt", "memory", 1.0),
    "time lora-fx+ckpt / peft+ckpt": ("lora-fx+ckpt", "peft+ckpt", "time", 1.05),
    "time lora-fx / peft": ("lora-fx", "peft", "time", 0.95),
    "time lora-fx+compile / peft": ("lora-fx+compile", "peft", "time", 0.8),
}


def _config(smoke: bool) -> dict[str, int]:
    if smoke:
        return {"layers": 2, "hidden": 64, "heads": 4, "mlp": 128, "vocab": 256, "batch": 2, "seq": 16}
    return {"layers": 8, "hidden": 512, "heads": 8, "mlp": 1376, "vocab": 32000, "batch": 4, "seq": 512}


def _model(c: dict[str, int], dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["mlp"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                         num_key_value_heads=c["heads"], max_position_embeddings=max(1024, c["seq"]),
                         use_cache=False)
    return LlamaForCausalLM(config).to(dtype)


def _batch(c: dict[str, int]) -> torch.Tensor:
    return torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=torch.Generator().manual_seed(0))


def _setup(variant: str, c: dict[str, int], shared: dict | None = None) -> Callable[[], float]:
    """Builds the model for ``variant``; returns a function doing one training step (returns the loss).

    ``shared`` (timing process only): lora-fx variants of one dtype reuse one lorafied module (checkpoint
    and compile wrap it and share its parameters), which keeps the all-variants process under 4 GB.
    """
    dtype = torch.bfloat16 if variant.endswith("-bf16") else torch.float32
    kind = variant.removesuffix("-bf16")
    ids = _batch(c)
    cached = kind.startswith("lora-fx") and shared is not None and dtype in shared
    model = None if cached else _model(c, dtype)
    if kind == "full":
        net, params = model, list(model.parameters())
    elif kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        if kind == "peft+ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
        params = [p for p in net.parameters() if p.requires_grad]
    elif kind.startswith("lora-fx"):
        import lora_fx

        net = shared[dtype] if cached else lora_fx.lorafy(lora_fx.trace(model, (ids,)), TARGETS, rank=RANK, alpha=ALPHA)
        if shared is not None:
            shared[dtype] = net
        params = lora_fx.lora_parameters(net)
        if kind in ("lora-fx+ckpt", "lora-fx+sel"):
            net = lora_fx.checkpoint(net, "*.layers.*", policy="selective" if kind == "lora-fx+sel" else "full")
        elif kind == "lora-fx+compile":
            net = torch.compile(net)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    net.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = net(ids)
        logits = (out.logits if hasattr(out, "logits") else out["logits"]).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return float(loss)

    step.trainable = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def child(variant: str, smoke: bool, steps: int) -> dict[str, Any]:
    """Runs in a fresh process: peak memory of one variant (see module docstring)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lora_fx  # noqa: F401  (imports counted in the baseline for every variant)

    _trim()
    rss_imports = _status_kb("VmRSS")
    step = _setup(variant, _config(smoke))
    step()  # warm-up: optimizer state, compile
    _trim()
    rss_setup = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return {"variant": variant, "rss_imports_mb": rss_imports / 1024, "rss_setup_mb": rss_setup / 1024,
            "peak_mb": _status_kb("VmHWM") / 1024, "seconds": time.perf_counter() - t, "steps": steps}


def _memory(variants: tuple[str, ...], smoke: bool, threads: int) -> dict[str, dict[str, Any]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for v in variants:  # one at a time: concurrent children would share the machine's memory bandwidth
        proc = subprocess.run([sys.executable, "-m", "benchmarks.training_llm", "--child", v, "--threads",
                               str(threads), *(["--smoke"] if smoke else [])], cwd=root, capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {v} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"{NAME}: {v}: peak {results[v]['peak_mb'] - results[v]['rss_imports_mb']:.0f} MB over imports")
    return results


def run(out: str, smoke: bool = False, torch_threads: int = 1, variants: tuple[str, ...] = VARIANTS,
        rounds: int | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``training_llm.{json,md,png}`` into ``out``."""
    old = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return _run(out, smoke, torch_threads, variants, rounds)
    finally:
        torch.set_num_threads(old)


def _run(out: str, smoke: bool, threads: int, variants: tuple[str, ...], rounds: int | None) -> dict[str, Any]:
    warmup, rounds = (1, 2) if smoke else (1, rounds or 2)
    c, env, start = _config(smoke), environment(), time.perf_counter()
    log(f"{NAME}: peak memory, one fresh subprocess per variant")
    memory = _memory(variants, smoke, threads)
    log(f"{NAME}: step time, {warmup} warm-up + {rounds} interleaved rounds")
    shared: dict = {}
    steps = {v: _setup(v, c, shared) for v in variants}
    for v in variants:
        for _ in range(warmup):
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in rotated(variants, r):
            t = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t)
    used = {v: memory[v]["peak_mb"] - memory[v]["rss_imports_mb"] for v in variants}
    ratios, goals = {}, {}
    for goal, (num, den, kind, hi) in GOALS.items():
        if num not in variants or den not in variants:
            continue
        if kind == "time":
            ratios[goal] = paired_ratios(times[num], times[den])
            value = Stats.of(ratios[goal]).median
        else:
            value = used[num] / used[den]
        goals[goal] = {"value": value, "bound": hi, "verdict": verdict(value, None, hi)}
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "seconds": time.perf_counter() - start,
            "config": {**c, "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "optimizer": "AdamW(lr=1e-4)",
                       "warmup": warmup, "rounds": rounds, "torch_threads": threads},
            "variants": list(variants), "trainable": {v: steps[v].trainable for v in variants},  # type: ignore[attr-defined]
            "step_s": {v: Stats.of(t) for v, t in times.items()}, "step_samples_s": times,
            "ratios": {k: Stats.of(r) for k, r in ratios.items()}, "ratio_samples": ratios,
            "memory": memory, "memory_used_mb": used, "goals": goals}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    c, variants = data["config"], data["variants"]
    base = data["step_s"]["peft"].median if "peft" in variants else None
    rows = [[v, f"{data['trainable'][v]:,}", data["step_s"][v].fmt(3),
             f"{data['step_s'][v].median / base:.3f}" if base else "-", f"{data['memory_used_mb'][v]:.0f}"]
            for v in variants]
    table = md_table(["variant", "trainable params", "step s (median [IQR])", "step / PEFT", "peak MB over imports"],
                     rows)
    goal_rows = []
    for goal, g in data["goals"].items():
        spread = data["ratios"][goal].fmt(3) if goal in data["ratios"] else f"{g['value']:.3f}"
        goal_rows.append([f"{goal} <= {g['bound']}", spread, g["verdict"]])
    goals = md_table(["goal", "measured (time: median [IQR] of paired ratios)", "verdict"], goal_rows)
    return "\n".join([
        "## Training at LLM shape: checkpointing, compile, bf16", "", env_line(data["env"]), "",
        f"Llama-shaped ({c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, MLP {c['mlp']}, vocab "
        f"{c['vocab']}, random weights), batch {c['batch']} x seq {c['seq']}, LoRA r={c['rank']} alpha={c['alpha']} "
        f"on all 7 projections, {c['optimizer']}, {c['torch_threads']} torch thread(s). Step time: {c['warmup']} "
        f"warm-up steps, then {c['rounds']} interleaved rounds (order rotated), paired ratios. Peak memory: a fresh "
        "subprocess per variant, kernel peak RSS over 1 step after a warm-up step, minus the RSS after imports.",
        "", table, "", goals])


def _plot(fig, data: dict[str, Any]) -> None:
    variants = data["variants"]
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.barh(variants, [data["step_s"][v].median for v in variants])
    ax1.set_xlabel("seconds per training step (median)")
    ax1.invert_yaxis()
    ax2.barh(variants, [data["memory_used_mb"][v] for v in variants], color="tab:orange")
    ax2.set_xlabel("peak RSS over imports (MB)")
    ax2.invert_yaxis()
    ax2.set_yticks(range(len(variants)), [""] * len(variants))
    fig.suptitle(f"Llama-shaped training step, batch {data['config']['batch']} x seq {data['config']['seq']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="memory child of the LLM training benchmark")
    parser.add_argument("--child", choices=VARIANTS, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    from .common import quiet

    quiet()
    print(json.dumps(child(ns.child, ns.smoke, steps=1)), flush=True)
