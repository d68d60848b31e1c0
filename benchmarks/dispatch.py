"""Host time of an eager LoRA training step where every op is dispatch-bound: lora-fx vs PEFT.

On a GPU an eager step of a small or medium LLM is bound by the host launching kernels, not by the
GPU (a Llama-1.1B step on an H200: ~4500 launches, the GPU busy ~117 of PEFT's 174 ms), so the Python
and dispatcher work per op decides the step time there. This benchmark measures that work on the CPU,
where it can run in CI: TinyLlama-1.1B's structure (22 layers, 4 query heads per key/value head, all 7
projections adapted, r=16) at widths so small (hidden 64, sequence 16, batch 1) that each op's compute
is negligible and the step is all dispatch. Same models, step and variants as
:mod:`benchmarks.training_llm` (:func:`benchmarks.llm_variants.setup`), fp32, 1 torch thread.

Variants: ``peft``, ``peft#2`` (a second identical PEFT model: the noise control), ``lora-fx``,
``peft+ckpt`` (Hugging Face gradient checkpointing), ``lora-fx+ckpt`` (``lora_fx.checkpoint``). After
warm-up steps, rounds of steps run round-robin with the order rotated (:func:`benchmarks.common.interleaved`);
ratios are paired per round: eager to ``peft``, checkpointed to ``peft+ckpt``.

Goal (issue #11's, read here as host time): eager lora-fx / eager PEFT <= 1.0 and lora-fx+ckpt /
PEFT+ckpt <= 1.05. A CPU proxy: the GPU's own launch costs and synchronizations are not in it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import training_gpu
from .common import env_line, environment, log, md_table, verdict, write_outputs

NAME = "dispatch"
CONFIG = {"layers": 22, "hidden": 64, "heads": 8, "kv_heads": 2, "mlp": 128, "vocab": 256, "batch": 1, "seq": 16}
SMOKE = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "mlp": 64, "vocab": 64, "batch": 1, "seq": 8}
VARIANTS = ("peft", "peft#2", "lora-fx", "peft+ckpt", "lora-fx+ckpt")
GOALS = {  # name: (numerator, denominator, upper bound)
    "host time lora-fx / peft": ("lora-fx", "peft", 1.0),
    "host time lora-fx+ckpt / peft+ckpt": ("lora-fx+ckpt", "peft+ckpt", 1.05),
    "noise control peft#2 / peft": ("peft#2", "peft", None),
}
WARMUP, ROUNDS, INNER = 3, 30, 5


def run(out: str, smoke: bool = False) -> dict[str, Any]:
    """Runs the benchmark and writes ``dispatch.{json,md,png}`` into ``out``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c, (warmup, rounds, inner) = (SMOKE, (1, 2, 1)) if smoke else (CONFIG, (WARMUP, ROUNDS, INNER))
        env, start = environment(), time.perf_counter()
        log(f"{NAME}: {', '.join(VARIANTS)} at {c}")
        shape = training_gpu._shape(NAME, dict(c), torch.float32, VARIANTS, "cpu", warmup, rounds, inner)
    finally:
        torch.set_num_threads(threads)
    samples = shape["step_samples_s"]
    goals = {}
    for goal, (num, den, hi) in GOALS.items():
        if num in samples and den in samples:
            ratios = [a / b for a, b in zip(samples[num], samples[den], strict=True)]
            value = sorted(ratios)[len(ratios) // 2]
            goals[goal] = {"value": value, "bound": hi, "verdict": verdict(value, None, hi) if hi else "control"}
        else:
            goals[goal] = {"value": None, "bound": hi, "verdict": "FAILED",
                           "error": shape["failed"].get(num, shape["failed"].get(den))}
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "seconds": time.perf_counter() - start,
            "config": {**c, "warmup": warmup, "rounds": rounds, "inner": inner, "torch_threads": 1},
            "variants": list(VARIANTS), "shape": shape, "goals": goals}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    c, r = data["config"], data["shape"]
    rows = []
    for v in data["variants"]:
        if v in r["failed"]:
            rows.append([v, f"FAILED: {r['failed'][v]}", "-"])
            continue
        ratio = r["step_vs_peft"].get(v)
        rows.append([v, f"{r['step_s'][v].median * 1000:.1f}", ratio.fmt(3) if ratio else "-"])
    goal_rows = [[f"{g}" + (f" <= {x['bound']}" if x["bound"] else ""),
                  "-" if x["value"] is None else f"{x['value']:.3f}", x["verdict"]] for g, x in data["goals"].items()]
    return "\n".join([
        "## Host time of a dispatch-bound LoRA training step (the CPU proxy of a host-bound GPU step)", "",
        env_line(data["env"]), "",
        f"Llama with TinyLlama-1.1B's structure ({c['layers']} layers, {c['heads']} query / {c['kv_heads']} key-value "
        f"heads, all 7 projections, r=16) at hidden {c['hidden']}, MLP {c['mlp']}, vocab {c['vocab']}, batch "
        f"{c['batch']} x seq {c['seq']}, fp32, 1 torch thread: each op's compute is negligible, the step is Python "
        f"and dispatcher work. {c['warmup']} warm-up steps, then {c['rounds']} interleaved rounds of {c['inner']} "
        "steps (order rotated); ratios are medians of per-round paired ratios.", "",
        md_table(["variant", "ms per step (median)", "step / PEFT (paired, median [IQR])"], rows), "",
        md_table(["goal", "measured (median paired ratio)", "verdict"], goal_rows)])


def _plot(fig, data: dict[str, Any]) -> None:
    r = data["shape"]
    vs = [v for v in data["variants"] if v in r["step_vs_peft"]]
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(vs, [r["step_s"][v].median * 1000 for v in vs])
    ax.set_xlabel("ms per training step (median), dispatch-bound shape")
    ax.invert_yaxis()
    fig.suptitle("Host time per eager LoRA step: 22 layers at hidden 64")
