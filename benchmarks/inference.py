"""Inference benchmark: lora-fx's exports against the exports users would make themselves.

Per model (GPT-2 6L/512, Llama 4L/512, the real all-MiniLM-L6-v2), LoRA r=8 with a non-zero random
B (so folding really changes the weights), ONNX Runtime CPU latency of:

* ``plain``: ``torch.onnx.export(model, dynamo=True)`` of the eager model, torch's defaults
  (``optimize=True``): what a user ships without lora-fx. Every ratio is taken against it.
* ``peft``: PEFT ``get_peft_model`` + the same adapter (lora-fx saves PEFT's layout) +
  ``merge_and_unload()`` + the same plain export.
* ``lorafx``: ``fold_and_export(lgm)``, the default (weight-independent optimization), verified.
* ``lorafx_ort``: ``fold_and_export(lgm, optimize="ort")`` (ONNX Runtime's transformer fusions), verified.
* ``unfolded``: ``fold_and_export(lgm, folded=False)``: the LoRA branches kept.
* ``plain_again``: a second session on the plain file: plain_again/plain is the noise floor.

One ORT session per file (1 intra-op thread, spinning off so an idle session does not steal a core),
rounds round-robin with the order rotated each round; ratios are per round (paired), summarised by
median and IQR, at batch 1 and batch 8 (seq 128; the files have dynamic batch and sequence axes).

Goals (issue #10): lorafx/plain <= 1.00 within the noise floor (median <= max(1, q3 of
plain_again/plain)) and lora-fx nodes <= plain nodes.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Any

import torch

from .common import Stats, env_line, environment, interleaved, log, md_table, paired_ratios, write_outputs

NAME = "inference"
VARIANTS = ("plain", "peft", "lorafx", "lorafx_ort", "unfolded")
CONTROL = "plain_again"  # a second session on the plain file: the noise floor of the ratios
BASELINE = "plain"


def _models(smoke: bool) -> list[tuple[str, Any, tuple, dict, list[str]]]:
    """(label, eager model, export example args, kwargs, LoRA patterns) per model."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lora_fx.examples import zoo_models as zm

    gen = torch.Generator().manual_seed(0)
    seq = 16 if smoke else 128
    if smoke:
        model, _, _ = zm.gpt2()
        _trained_like(model, gen)
        return [("gpt2-tiny", model, (torch.randint(4, 128, (2, seq), generator=gen),), {}, ["*.c_attn"])]
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, use_cache=False)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                         use_cache=False)).eval()
    for m in (gpt2, llama):
        _trained_like(m, gen)
    minilm, _, _ = zm.minilm()
    ids = torch.randint(1000, minilm.encoder.config.vocab_size, (2, seq), generator=gen)
    return [
        ("GPT-2 6L/512", gpt2, (torch.randint(0, 50257, (2, seq), generator=gen),), {}, ["*.c_attn"]),
        ("Llama 4L/512", llama, (torch.randint(0, 32000, (2, seq), generator=gen),), {}, ["*.q_proj", "*.v_proj"]),
        ("all-MiniLM-L6-v2", minilm, (ids,), {"attention_mask": torch.ones_like(ids)}, ["*.query", "*.value"]),
    ]


def _trained_like(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Gives every constant-valued parameter of a randomly initialised model (zero biases, unit norm
    scales) small random values, as a trained checkpoint has: torch's default optimizer reads weight
    values and drops a Gemm's all-zero bias, which a real checkpoint never lets it do."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _layout(path: str) -> list[tuple]:
    """The file's graph with names and weight values left out: per node in order, its operator, attributes
    and inputs (an initializer's shape and dtype, or a computed value's producer position). Two files
    with the same layout make ONNX Runtime run the same kernels on the same shapes."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    inits = {t.name: (tuple(t.dims), t.data_type) for t in graph.initializer}
    made = {name: i for i, n in enumerate(graph.node) for name in n.output}
    inputs = {v.name: ("input", k) for k, v in enumerate(graph.input)}
    return [(n.domain, n.op_type, tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)),
             tuple(inits.get(x) or inputs.get(x) or made.get(x) for x in n.input), len(n.output))
            for n in graph.node]


def _plain(model, args, kwargs, path: str) -> float:
    from lora_fx.capture import dynamic_shapes_for

    t = time.perf_counter()
    torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes_for(args, kwargs),
                      verbose=False).save(path)
    return time.perf_counter() - t


def _peft_merged(model, lgm, folder: str):
    """PEFT on a copy of the eager model with lora-fx's adapter loaded, merged and unloaded."""
    from peft import PeftModel

    import lora_fx

    lora_fx.save_adapter(lgm, os.path.join(folder, "adapter"))
    return PeftModel.from_pretrained(copy.deepcopy(model), os.path.join(folder, "adapter")).merge_and_unload().eval()


def _export_all(model, args, kwargs, patterns, folder) -> dict[str, Any]:
    """Writes every variant's file; returns paths, node counts, verification and export times."""

    import lora_fx

    gm = lora_fx.trace(model, args, kwargs)
    lgm = lora_fx.lorafy(gm, patterns, rank=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm)[1::2]:  # A then B per branch: give every B values
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    paths = {v: os.path.join(folder, f"{v}.onnx") for v in VARIANTS}
    seconds = {"plain": _plain(model, args, kwargs, paths["plain"]),
               "peft": _plain(_peft_merged(model, lgm, folder), args, kwargs, paths["peft"])}
    default = lora_fx.fold_and_export(lgm, paths["lorafx"])
    fused = lora_fx.fold_and_export(lgm, paths["lorafx_ort"], optimize="ort")
    unfolded = lora_fx.fold_and_export(lgm, paths["unfolded"], folded=False, verify=False)
    for name, rep in (("lorafx", default), ("lorafx_ort", fused), ("unfolded", unfolded)):
        seconds[name] = sum(rep.seconds.values())
    layouts = {v: _layout(p) for v, p in paths.items()}  # each file read once
    return {
        "paths": paths,
        "nodes": {v: len(layout) for v, layout in layouts.items()},
        "same_graph_as_plain": {v: layouts[v] == layouts["plain"] for v in paths if v != "plain"},
        "verified": {"lorafx": default.verification.ok, "lorafx_ort": fused.verification.ok},
        "structure_identical": {"lorafx": default.verification.structure.ok,
                                "lorafx_ort": fused.verification.structure.ok},
        "fusions": {k: v for k, v in fused.export.optimization.fusions.items() if v},
        "verification_text": str(default.verification),
        "branches": len(lora_fx.lora_parameters(lgm)) // 2,
        "export_seconds": seconds,
    }


def _latency(paths: dict[str, str], args: tuple, kwargs: dict, rounds: int, threads: int,
             round_s: float) -> dict[str, list[float]]:
    from lora_fx.exporters.verify.ort import ort_session, run_onnx

    sessions = {v: ort_session(paths[v], threads=threads, spinning=False) for v in VARIANTS}
    sessions[CONTROL] = ort_session(paths[BASELINE], threads=threads, spinning=False)
    fns = {v: (lambda s=s: run_onnx(s, args, kwargs)) for v, s in sessions.items()}
    for fn in fns.values():  # warm up: first runs allocate arenas and pick kernels
        for _ in range(2):
            fn()
    one = interleaved(fns, rounds=1, inner=1)
    per_call = max(min(v) for v in one.values())
    inner = max(1, round(round_s / per_call))
    samples = interleaved(fns, rounds=rounds, inner=inner)
    samples["_inner"] = [float(inner)]
    return samples


def run(out: str, smoke: bool = False, threads: int = 1, batches: tuple[int, ...] = (1, 8),
        rounds: int | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``inference.{json,md,png}`` into ``out`` (one row per model and batch)."""
    rounds = rounds or (3 if smoke else 25)
    batches = batches[:1] if smoke else batches
    env = environment()
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for label, model, args, kwargs, patterns in _models(smoke):
        log(f"{NAME}: {label}: exporting {', '.join(VARIANTS)}")
        with tempfile.TemporaryDirectory() as folder:
            info = _export_all(model, args, kwargs, patterns, folder)
            paths = info.pop("paths")
            for batch in batches:
                a = tuple(_batch(x, batch) for x in args)
                k = {n: _batch(v, batch) for n, v in kwargs.items()}
                log(f"{NAME}: {label}: batch {batch}, {rounds} interleaved rounds, {threads} thread(s)")
                samples = _latency(paths, a, k, rounds, threads, 0.01 if smoke else 0.15)
                results.append(_row(label, patterns, args, batch, info, rounds, threads, samples))
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "threads": threads, "spinning": False,
            "providers": ["CPUExecutionProvider"], "seconds": time.perf_counter() - start, "models": results}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with ``batch`` rows (its first row repeated)."""
    return t[:1].expand(batch, *t.shape[1:]).contiguous()


def _row(label: str, patterns: list[str], args: tuple, batch: int, info: dict[str, Any], rounds: int,
         threads: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    inner = int(samples.pop("_inner")[0])
    ratios = {f"{v}/{BASELINE}": paired_ratios(samples[v], samples[BASELINE]) for v in (*VARIANTS[1:], CONTROL)}
    ratio = {k: Stats.of(r) for k, r in ratios.items()}
    noise = ratio[f"{CONTROL}/{BASELINE}"]
    limit = max(1.0, noise.q3)
    goal = ratio[f"lorafx/{BASELINE}"].median <= limit and info["nodes"]["lorafx"] <= info["nodes"]["plain"]
    return {
        "model": label, "batch": batch, "threads": threads, "patterns": patterns, "rank": 8,
        "input": f"batch {batch}, seq {args[0].shape[1]}", **info, "rounds": rounds, "calls_per_round": inner,
        "latency_ms": {v: Stats.of([x * 1e3 for x in s]) for v, s in samples.items()},
        "ratio": ratio, "samples_s": samples, "ratio_samples": ratios,
        "goal": {"lorafx/plain <= max(1, noise q3) and nodes <= plain": limit,
                 "verdict": "MET" if goal and info["verified"]["lorafx"] else "MISSED"},
    }


def _markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in data["models"]:
        lat, rat, n = r["latency_ms"], r["ratio"], r["nodes"]
        rows.append([r["model"], r["batch"], lat[BASELINE].fmt(2),
                     *(rat[f"{v}/{BASELINE}"].fmt(3) for v in (*VARIANTS[1:], CONTROL)),
                     " / ".join(str(n[v]) for v in VARIANTS),
                     "yes" if r.get("same_graph_as_plain", {}).get("lorafx") else "no", r["goal"]["verdict"]])
    table = md_table(["model", "batch", "plain ms", "peft/plain", "lorafx/plain", "lorafx_ort/plain", "unfolded/plain",
                      "plain again/plain (noise)", "nodes plain / peft / lorafx / ort / unfolded",
                      "lorafx graph = plain", "goal lorafx <= plain"], rows)
    lines = [f"## Inference latency against the plain export: ONNX Runtime CPU, {data['threads']} thread(s), spinning off",
             "", env_line(data["env"]), "",
             "Ratios to `plain` (= `torch.onnx.export(model, dynamo=True)` with torch's default optimizer), median "
             "[IQR] of per-round paired ratios (order rotated each round); `plain again` is a second session on "
             "the plain file (noise floor). `peft` = PEFT merge_and_unload + the same plain export; `lorafx` = "
             "`fold_and_export` default (weight-independent optimization, verified); `lorafx_ort` = "
             "`optimize=\"ort\"` (ONNX Runtime transformer fusions, verified); `unfolded` = LoRA branches kept. "
             "`lorafx graph = plain`: the two files are the same graph node for node (operators, attributes, "
             "wiring, initializer shapes and dtypes; names and weight values aside), so ONNX Runtime runs the same "
             "kernels on the same shapes and their latency ratio measures session-to-session noise. GPT-2 and Llama have random weights with every constant "
             "parameter (zero biases, unit norm scales) perturbed, as in a trained checkpoint. "
             "Goal: lorafx/plain median <= max(1, q3 of the noise ratio) and no more nodes than plain.", "", table, ""]
    for r in data["models"]:
        if r["batch"] != min(x["batch"] for x in data["models"] if x["model"] == r["model"]):
            continue
        lines.append(f"- {r['model']}: verification {'PASSED' if all(r['verified'].values()) else 'FAILED'} for "
                     f"lorafx and lorafx_ort (structure identical to their base exports); ORT fusions: "
                     f"{r['fusions'] or 'none'}; export seconds "
                     + ", ".join(f"{k} {v:.1f}" for k, v in r["export_seconds"].items())
                     + " (lorafx/lorafx_ort include the verifying base export).")
    return "\n".join(lines)


def _plot(fig, data: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    series, labels = [], []
    short = {"peft": "peft", "lorafx": "lfx", "lorafx_ort": "ort", "unfolded": "unf", CONTROL: "noise"}
    for r in data["models"]:
        for v in (*VARIANTS[1:], CONTROL):
            series.append(r["ratio_samples"][f"{v}/{BASELINE}"])
            labels.append(f"{r['model'].split(' ')[0].split('-L')[0]} b{r['batch']}\n{short[v]}")
    ax.boxplot(series, showfliers=False)  # outliers (contended rounds) are in the JSON, not drawn
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=5)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("latency / plain torch.onnx.export (per round)")
    ax.set_title("ONNX Runtime CPU latency relative to the plain optimized export (boxes: IQR)", fontsize=9)
