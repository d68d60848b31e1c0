"""Inference benchmark: ONNX Runtime CPU latency of the base, folded and unfolded LoRA exports.

For each model: trace, lorafy (GPT-2: ``*.c_attn``; MiniLM: ``*.query`` + ``*.value``, r=8) with a
non-zero random B (so folding really changes the weights), then write three ONNX files with the
project's own exporter: the base model (``strip``), the folded model (``fold_and_export``) and the
unfolded LoRA graph (``fold_and_export(folded=False)``). ``verify_fold`` (the check
``fold_and_export(verify=True)`` runs) proves the folded file is the base file's graph with new
weights. Latency: one ORT session per file (``threads`` intra-op threads, spinning off so an idle
session does not steal a core), many rounds round-robin with the order rotated each round; the
ratios are taken per round (paired) and summarised by median and IQR. A second session on the base
file (``base_again``) is timed like the others: base_again/base is the noise floor of every ratio.

Goal: folded/base latency within [0.98, 1.02]; unfolded/base is reported.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

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

NAME = "inference"
GOAL = (0.98, 1.02)
VARIANTS = ("base", "folded", "unfolded")
CONTROL = "base_again"  # a second session on the base file: the noise floor of the ratios


def _models(smoke: bool) -> list[tuple[str, Any, tuple, dict, list[str]]]:
    """(label, model, export example args, kwargs, LoRA patterns) per model."""
    from lora_fx.examples import zoo_models as zm

    gen = torch.Generator().manual_seed(0)
    seq = 16 if smoke else 128
    out = []
    if smoke:
        model, _, _ = zm.gpt2()
        out.append(("gpt2-tiny", model, (torch.randint(4, 128, (2, seq), generator=gen),), {}, ["*.c_attn"]))
        return out  # one tiny model: the smoke run checks the plumbing, not the numbers
    model, _, _ = zm.gpt2_small_sized()
    vocab = model.config.vocab_size
    out.append(("gpt2-small-sized (124M)", model, (torch.randint(0, vocab, (2, seq), generator=gen),), {},
                ["*.c_attn"]))
    model, _, _ = zm.minilm()
    vocab = model.encoder.config.vocab_size
    ids = torch.randint(1000, vocab, (2, seq), generator=gen)
    out.append(("all-MiniLM-L6-v2 (22.7M)", model, (ids,), {"attention_mask": torch.ones_like(ids)},
                ["*.query", "*.value"]))
    return out


def _export_all(model, args, kwargs, patterns, folder) -> dict[str, Any]:
    """Writes base/folded/unfolded files; returns paths, node counts, verification, times."""
    import lora_fx
    from lora_fx.capture import dynamic_shapes_for
    from lora_fx.exporters.onnx_io import export_onnx

    t = time.perf_counter()
    gm = lora_fx.trace(model, args, kwargs)
    lgm = lora_fx.lorafy(gm, patterns, rank=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm)[1::2]:  # A then B per branch: give every B values
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    paths = {v: os.path.join(folder, f"{v}.onnx") for v in VARIANTS}
    base = export_onnx(lora_fx.strip(lgm), paths["base"], args, kwargs, dynamic_shapes=dynamic_shapes_for(args, kwargs))
    folded = lora_fx.fold_and_export(lgm, paths["folded"], folded=True, verify=False)
    unfolded = lora_fx.fold_and_export(lgm, paths["unfolded"], folded=False, verify=False)
    check = lora_fx.verify_fold(paths["base"], paths["folded"], lgm=lgm, fold_report=folded.fold)
    numerics = [{"shapes": c.shapes, "max_rel_err": c.max_rel_err, "ok": c.ok} for c in check.numerics]
    return {
        "paths": paths,
        "nodes": {"base": base.nodes, "folded": folded.export.nodes, "unfolded": unfolded.export.nodes},
        "verified": check.ok,
        "structure_identical": check.structure.ok,
        "numerics": numerics,
        "verification_text": str(check),
        "branches": len(lora_fx.lora_parameters(lgm)) // 2,
        "setup_seconds": time.perf_counter() - t,
    }


def _latency(paths: dict[str, str], args: tuple, kwargs: dict, rounds: int, threads: int,
             round_s: float) -> dict[str, list[float]]:
    from lora_fx.exporters.onnx_io import ort_session, run_onnx

    sessions = {v: ort_session(paths[v], threads=threads, spinning=False) for v in VARIANTS}
    sessions[CONTROL] = ort_session(paths["base"], threads=threads, spinning=False)
    fns = {v: (lambda s=s: run_onnx(s, args, kwargs)) for v, s in sessions.items()}
    for fn in fns.values():  # warm up: first runs allocate arenas and pick kernels
        for _ in range(3):
            fn()
    one = interleaved(fns, rounds=1, inner=3)
    per_call = max(min(v) for v in one.values())
    inner = max(1, round(round_s / per_call))
    samples = interleaved(fns, rounds=rounds, inner=inner)
    samples["_inner"] = [float(inner)]
    return samples


def run(out: str, smoke: bool = False, threads: tuple[int, ...] = (2, 1), rounds: int | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``inference.{json,md,png}`` into ``out`` (one row per model and thread count)."""
    rounds = rounds or (3 if smoke else 60)
    threads = threads[:1] if smoke else threads
    env = environment()
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for label, model, args, kwargs, patterns in _models(smoke):
        log(f"{NAME}: {label}: exporting base/folded/unfolded")
        with tempfile.TemporaryDirectory() as folder:
            info = _export_all(model, args, kwargs, patterns, folder)
            paths = info.pop("paths")
            # Measure at batch 1 (the files have a dynamic batch axis; the export example had 2).
            a1 = tuple(a[:1] for a in args)
            k1 = {k: v[:1] for k, v in kwargs.items()}
            for th in threads:
                log(f"{NAME}: {label}: {rounds} interleaved rounds, {th} thread(s)")
                samples = _latency(paths, a1, k1, rounds, th, 0.01 if smoke else 0.1)
                results.append(_row(label, patterns, args, info, rounds, th, samples))
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "threads": list(threads), "spinning": False,
            "providers": ["CPUExecutionProvider"], "seconds": time.perf_counter() - start, "models": results}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _row(label: str, patterns: list[str], args: tuple, info: dict[str, Any], rounds: int, threads: int,
         samples: dict[str, list[float]]) -> dict[str, Any]:
    inner = int(samples.pop("_inner")[0])
    ratios = {f"{v}/base": paired_ratios(samples[v], samples["base"]) for v in ("folded", "unfolded", CONTROL)}
    fb = Stats.of(ratios["folded/base"])
    return {
        "model": label, "threads": threads, "patterns": patterns, "rank": 8,
        "input": f"batch 1, seq {args[0].shape[1]}", **info, "rounds": rounds, "calls_per_round": inner,
        "latency_ms": {v: Stats.of([x * 1e3 for x in s]) for v, s in samples.items()},
        "ratio": {k: Stats.of(r) for k, r in ratios.items()},
        "samples_s": samples, "ratio_samples": ratios,
        "goal_folded_over_base": {"range": GOAL, "median": fb.median,
                                  "verdict": verdict(fb.median, *GOAL) if info["verified"] else "MISSED"},
        "noise_floor_base_again_over_base": Stats.of(ratios[f"{CONTROL}/base"]),
    }


def _markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in data["models"]:
        lat, rat = r["latency_ms"], r["ratio"]
        rows.append([r["model"], r["threads"], r["input"], r["branches"],
                     *(lat[v].fmt(2) for v in VARIANTS), rat["folded/base"].fmt(3), rat["unfolded/base"].fmt(3),
                     rat[f"{CONTROL}/base"].fmt(3),
                     f"{r['nodes']['base']} / {r['nodes']['folded']} / {r['nodes']['unfolded']}",
                     "yes" if r["structure_identical"] else "NO", r["goal_folded_over_base"]["verdict"]])
    table = md_table(["model", "ORT threads", "input", "LoRA branches", "base ms", "folded ms", "unfolded ms", "folded/base",
                      "unfolded/base", "base again/base (noise)", "ONNX nodes b/f/u", "folded == base graph",
                      "goal [0.98, 1.02]"], rows)
    notes = ["## Inference latency: ONNX Runtime CPU (spinning off)", "",
             env_line(data["env"]), "",
             "Cells: median [IQR] over interleaved rounds (order rotated each round); ratios are per-round "
             "paired ratios; `base again` is a second session on the base file (noise floor). "
             "`folded == base graph` is `lora_fx.verify_fold` (the check "
             "`fold_and_export(verify=True)` runs): same ops, topology, attributes and initializer "
             "names/shapes, plus ORT-vs-torch numerics on two shapes.", "", table, ""]
    for r in data["models"]:
        g = r["goal_folded_over_base"]
        rat = r["ratio"]["folded/base"]
        notes.append(f"- {r['model']}, {r['threads']} thread(s): folded/base = {rat.median:.3f} (IQR {rat.q1:.3f}-{rat.q3:.3f}, "
                     f"min/max {rat.min:.3f}/{rat.max:.3f}, {r['rounds']} rounds x {r['calls_per_round']} calls): "
                     f"goal {g['verdict']}; unfolded/base = {r['ratio']['unfolded/base'].median:.3f}; "
                     f"ratio of fastest calls (min/min) {_min_ratio(r, 'folded')}; "
                     f"verification {'PASSED' if r['verified'] else 'FAILED'}; noise floor base-again/base IQR "
                     f"{r['ratio'][f'{CONTROL}/base'].q1:.3f}-{r['ratio'][f'{CONTROL}/base'].q3:.3f}.")
    return "\n".join(notes)


def _min_ratio(r: dict[str, Any], variant: str) -> str:
    """Ratio of the fastest rounds: under heavy machine load the least-disturbed call is a robust estimate."""
    return f"{r['latency_ms'][variant].min / r['latency_ms']['base'].min:.3f}"


def _plot(fig, data: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    series, labels = [], []
    for r in data["models"]:
        for key, short in (("folded/base", "folded"), ("unfolded/base", "unfolded"), (f"{CONTROL}/base", "noise")):
            series.append(r["ratio_samples"][key])
            name = "MiniLM" if "MiniLM" in r["model"] else "GPT-2" if "gpt2" in r["model"] else r["model"].split(" ")[0]
            labels.append(f"{name} t{r['threads']}\n{short}")
    ax.boxplot(series, showfliers=False)  # outliers (contended rounds) are in the JSON, not drawn
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=6)
    ax.axhspan(*GOAL, color="tab:green", alpha=0.15, label="goal for folded/base [0.98, 1.02]")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("latency ratio to base export (per round)")
    ax.set_title("ONNX Runtime CPU latency / base latency, batch 1, t = threads (boxes: IQR, whiskers 1.5 IQR)",
                 fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
