"""LLM LoRA training on a GPU: lora-fx vs PEFT (eager, gradient checkpointing, torch.compile).

The GPU counterpart of :mod:`benchmarks.training_llm` (same models, variants and step, built by
:func:`benchmarks.llm_variants.setup` on the CUDA device). Two shapes:

* ``llama-8x512``: the issue's shape (8 layers, hidden 512, MLP 1376, vocab 32000), fp32, batch 4 x seq 512;
* ``llama-1.1b``: TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads / 4 KV heads, MLP 5632, vocab
  32000), bf16 base with fp32 LoRA A/B (PEFT's and lora-fx's default), batch 4 x seq 1024.

LoRA r=16, alpha=32 on all 7 projections, AdamW, causal-LM loss (:func:`benchmarks.common.lm_step`).
Variants: ``peft``, ``peft+ckpt`` (Hugging Face gradient checkpointing), ``lora-fx``, ``lora-fx+ckpt``
(``lora_fx.checkpoint``), ``lora-fx+compile``, the no-LoRA ``floor`` / ``floor+compile`` (see
training_llm) and ``peft#2``, a second identical PEFT model: the noise control (its ratio to ``peft``
is 1 up to the machine's noise).

* **Step time**: every variant of a shape lives in one process; after warm-up steps (compile happens
  there), steps run round-robin with the order rotated each round, ratios to PEFT paired per round.
  A step ends with ``loss.item()``, so the wall clock covers the GPU's work.
* **Peak memory**: one step per variant, ``torch.cuda.max_memory_allocated`` during the step minus what
  was allocated before it (activations, gradients and temporaries; the weights every variant holds are
  left out).

Goals (issue #11, measured here on the GPU): eager lora-fx / eager PEFT <= 0.95, compiled lora-fx /
eager PEFT <= 0.8, lora-fx+ckpt memory <= PEFT+ckpt and its step <= 1.05x PEFT+ckpt.
``--smoke`` runs the tiny shape on the CPU when there is no GPU (numbers meaningless).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from . import llm_variants
from . import training_llm as llm
from .common import (
    Stats,
    env_line,
    environment,
    interleaved,
    log,
    md_table,
    paired_ratios,
    verdict,
    write_outputs,
)

NAME = "training_gpu"
VARIANTS = ("peft", "peft#2", "peft+ckpt", "lora-fx", "lora-fx+ckpt", "lora-fx+compile", "floor", "floor+compile")
SHAPES = {
    "llama-8x512": ({"layers": 8, "hidden": 512, "heads": 8, "mlp": 1376, "vocab": 32000, "batch": 4, "seq": 512},
                    torch.float32),
    "llama-1.1b": ({"layers": 22, "hidden": 2048, "heads": 32, "kv_heads": 4, "mlp": 5632, "vocab": 32000,
                    "batch": 4, "seq": 1024}, torch.bfloat16),
}
GOALS = llm.GOALS
WARMUP, ROUNDS, INNER = 2, 10, 3


def _variant(v: str, dtype: torch.dtype) -> str:
    """training_llm's variant name: the control is a second PEFT model; bf16 names carry ``-bf16``."""
    base = "peft" if v == "peft#2" else v
    return base + ("-bf16" if dtype == torch.bfloat16 else "")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step_memory_mb(step: Callable[[], float], device: str) -> float | None:
    """Peak bytes allocated during one step beyond those allocated before it (None on the CPU)."""
    if device != "cuda":
        step()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _shape(label: str, c: dict[str, int], dtype: torch.dtype, variants: tuple[str, ...], device: str,
           warmup: int, rounds: int, inner: int) -> dict[str, Any]:
    shared: dict = {}
    steps: dict[str, Callable[[], float]] = {}
    failed: dict[str, str] = {}
    setup_s: dict[str, float] = {}
    for v in variants:
        t = time.perf_counter()
        try:
            steps[v] = llm_variants.setup(_variant(v, dtype), c, shared, device=device)
            for _ in range(warmup):
                steps[v]()
        except Exception as e:  # reported, not fatal: the other variants still run
            failed[v] = llm._error_line(f"{type(e).__name__}: {e}")
            steps.pop(v, None)
            log(f"{NAME}: {label} {v}: FAILED: {failed[v]}")
            continue
        setup_s[v] = time.perf_counter() - t
        log(f"{NAME}: {label} {v}: set up + {warmup} warm-up steps in {setup_s[v]:.1f} s")
    memory = {v: _step_memory_mb(s, device) for v, s in steps.items()}
    times = interleaved(steps, rounds, inner=inner)
    vs_peft = {v: Stats.of(paired_ratios(times[v], times["peft"])) for v in times} if "peft" in times else {}
    goals = {}
    for goal, (num, den, kind, hi) in GOALS.items():
        if kind == "time" and num in times and den in times:
            value = Stats.of(paired_ratios(times[num], times[den])).median
        elif kind == "memory" and memory.get(num) is not None and memory.get(den) is not None:
            value = memory[num] / memory[den]
        else:
            goals[goal] = {"value": None, "bound": hi, "verdict": "NOT MEASURED",
                           "error": failed.get(num, failed.get(den))}
            continue
        goals[goal] = {"value": value, "bound": hi, "verdict": verdict(value, None, hi)}
    result = {"config": {**c, "dtype": str(dtype).removeprefix("torch.")}, "failed": failed, "setup_s": setup_s,
              "trainable": {v: s.trainable for v, s in steps.items()},  # type: ignore[attr-defined]
              "step_s": {v: Stats.of(t) for v, t in times.items()}, "step_samples_s": times,
              "step_vs_peft": vs_peft, "memory_mb": memory, "goals": goals}
    del steps, shared
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run(out: str, smoke: bool = False, shapes: tuple[str, ...] | None = None,
        variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Runs the benchmark and writes ``training_gpu.{json,md,png}`` into ``out``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not smoke:
        raise SystemExit(f"{NAME}: needs a CUDA device (torch sees none); `--smoke` runs its tiny shape on the CPU")
    env, start = environment(), time.perf_counter()
    if device == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if smoke:
        todo = {"smoke": (llm_variants.config(True), torch.float32)}
        warmup, rounds, inner = 1, 2, 1
    else:
        todo = {k: SHAPES[k] for k in (shapes or tuple(SHAPES))}
        warmup, rounds, inner = WARMUP, ROUNDS, INNER
    data = {"benchmark": NAME, "smoke": smoke, "device": device, "env": env,
            "config": {"rank": llm_variants.RANK, "alpha": llm_variants.ALPHA, "targets": llm_variants.TARGETS,
                       "optimizer": "AdamW(lr=1e-4)", "warmup": warmup, "rounds": rounds, "inner": inner},
            "variants": list(variants), "shapes": {}}
    for label, (c, dtype) in todo.items():
        log(f"{NAME}: {label} on {device}: {', '.join(variants)}")
        data["shapes"][label] = _shape(label, c, dtype, variants, device, warmup, rounds, inner)
        data["seconds"] = time.perf_counter() - start
        # written after each shape: a run cut short (a lent GPU's time limit) keeps the shapes it finished
        paths = write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data))
    return paths | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    env = data["env"]
    gpu = (f"GPU: {env.get('gpu')}, CUDA {env.get('cuda')}, TF32 matmul {env.get('tf32_matmul')}."
           if data["device"] == "cuda" else "No GPU: a smoke run on the CPU.")
    parts = ["## LLM LoRA training on a GPU: lora-fx vs PEFT", "", f"{env_line(env)} {gpu}", "",
             f"LoRA r={c['rank']} alpha={c['alpha']} on all 7 projections, {c['optimizer']}. Step time: "
             f"{c['warmup']} warm-up steps, then {c['rounds']} interleaved rounds of {c['inner']} steps (order "
             "rotated), paired per-round ratios to PEFT; `peft#2` (a second identical PEFT model) is the noise "
             "control. Memory: peak `torch.cuda.max_memory_allocated` during one step minus what was allocated "
             "before it (activations, gradients, temporaries; not the weights)."]
    for label, r in data["shapes"].items():
        s = r["config"]
        rows = []
        for v in data["variants"]:
            if v in r["failed"]:
                rows.append([v, "-", f"FAILED: {r['failed'][v]}", "-", "-"])
                continue
            ratio = r["step_vs_peft"].get(v)
            mem = r["memory_mb"].get(v)
            rows.append([v, f"{r['trainable'][v]:,}", r["step_s"][v].fmt(4), ratio.fmt(3) if ratio else "-",
                         f"{mem:.0f}" if mem is not None else "-"])
        goal_rows = [[f"{g} <= {x['bound']}", "-" if x["value"] is None else f"{x['value']:.3f}", x["verdict"]]
                     for g, x in r["goals"].items()]
        parts += ["", f"### {label}: {s['layers']} layers x hidden {s['hidden']}, MLP {s['mlp']}, vocab {s['vocab']}, "
                  f"{s['dtype']} base, batch {s['batch']} x seq {s['seq']}", "",
                  md_table(["variant", "trainable params", "step s (median [IQR])", "step / PEFT (paired)",
                            "step peak MB over weights"], rows), "",
                  md_table(["goal", "measured (median paired ratio)", "verdict"], goal_rows)]
    return "\n".join(parts)


def _plot(fig, data: dict[str, Any]) -> None:
    shapes = data["shapes"]
    for i, (label, r) in enumerate(shapes.items()):
        ax = fig.add_subplot(1, len(shapes), i + 1)
        vs = [v for v in data["variants"] if v in r["step_vs_peft"]]
        ax.barh(vs, [r["step_vs_peft"][v].median for v in vs])
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("step time / PEFT (median)")
        ax.set_title(f"{label} ({r['config']['dtype']})")
        ax.invert_yaxis()
    fig.suptitle(f"LoRA training step on {data['env'].get('gpu', data['device'])}")
