"""Pass overhead benchmark: trace, lorafy, fold and export times vs model size (GPT-2, hidden 768).

Per size (2, 4, 8, 12, 24 layers; random weights; ids (2, 64)), per repetition:

* ``trace``: ``lora_fx.trace`` (torch.export non-strict; GPT-2 has dropout, so it captures twice,
  eval and train, to make ``.train()``/``.eval()`` work);
* ``lorafy``: ``lorafy(gm, "*.c_attn", rank=8)``; ``fold``: ``fold(lgm)``;
* ``fold_and_export``: ``fold_and_export(lgm, path, verify=False)`` (fold + dynamo export + atomic
  write + summary); ``fold_and_export_verified``: the default ``fold_and_export(lgm, path)`` (plus the
  structure proof from the skeletons and ORT-vs-torch on two shapes);
* ``plain export``: ``torch.onnx.export(gm, dynamo=True, dynamic_shapes=<same>)`` of the traced *base*
  GraphModule with torch's defaults (``optimize=True``), then ``save``: what a user runs to ship the
  model. fold_and_export optimizes by default too (weight-independently, lora_fx.exporters.optimize),
  so both sides export and optimize one GraphModule and write one file.

``plain export again``: the same plain export a second time, the noise control of the export ratio.
The four exports rotate which goes first. Repetition 1 covers every size up to 12 layers; later
repetitions (12 layers first) and 24 layers run only while the time budget allows; what was skipped
is recorded.

Goals at GPT-2-small size (12 layers): (lorafy + fold) <= 5% of trace time; fold_and_export
<= 1.1x the plain export (and the verified default's ratio beside it).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

from .common import Stats, env_line, environment, log, md_table, timed, verdict, write_outputs

NAME = "overhead"
STAGES = ("trace", "lorafy", "fold", "fold_and_export", "fold_and_export_verified", "plain_export",
          "plain_export_again")
GOAL_PASSES, GOAL_EXPORT = 0.05, 1.1


def _model(n_layer: int, smoke: bool) -> tuple[torch.nn.Module, tuple]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if smoke:
        config = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=128, n_positions=64, use_cache=False)
    else:
        config = GPT2Config(n_layer=n_layer, use_cache=False)  # GPT-2 small widths: 768 wide, 12 heads
    ids = torch.randint(0, config.vocab_size, (2, 16 if smoke else 64), generator=torch.Generator().manual_seed(0))
    return GPT2LMHeadModel(config).eval(), (ids,)


def _plain_export(gm: torch.nn.Module, args: tuple, path: str) -> None:
    from lora_fx.capture import dynamic_shapes_for

    program = torch.onnx.export(gm, args, dynamo=True, dynamic_shapes=dynamic_shapes_for(args, {}), verbose=False)
    program.save(path)


def _measure(n_layer: int, smoke: bool, rep: int, folder: str) -> dict[str, float]:
    import lora_fx

    model, args = _model(n_layer, smoke)
    row: dict[str, float] = {}
    gm, row["trace"] = timed(lambda: lora_fx.trace(model, args))
    lgm, row["lorafy"] = timed(lambda: lora_fx.lorafy(gm, "*.c_attn", rank=8))
    _, row["fold"] = timed(lambda: lora_fx.fold(lgm))
    exports = {
        "fold_and_export": lambda: lora_fx.fold_and_export(lgm, os.path.join(folder, "fae.onnx"), verify=False),
        "fold_and_export_verified": lambda: lora_fx.fold_and_export(lgm, os.path.join(folder, "faev.onnx")),
        "plain_export": lambda: _plain_export(gm, args, os.path.join(folder, "plain.onnx")),
        "plain_export_again": lambda: _plain_export(gm, args, os.path.join(folder, "plain2.onnx")),  # noise control
    }
    k = rep % len(exports)
    order = list(exports)[k:] + list(exports)[:k]
    for name in order:
        _, row[name] = timed(exports[name])
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return row


def run(out: str, smoke: bool = False, budget_s: float | None = None, reps: int = 3,
        torch_threads: int = 1) -> dict[str, Any]:
    """Runs the benchmark and writes ``overhead.{json,md,png}`` into ``out``.

    ``torch_threads`` (default 1): on a shared 2-core machine under load, intra-op parallelism makes
    every tensor op wait on a descheduled worker thread (fold of GPT-2 small measured 4.4-4.9 s with 2
    threads vs 0.55-0.87 s with 1 at load average ~7), which measures the scheduler, not the pass.
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return _run(out, smoke, budget_s, reps, torch_threads)
    finally:
        torch.set_num_threads(old_threads)


def _run(out: str, smoke: bool, budget_s: float | None, reps: int, torch_threads: int) -> dict[str, Any]:
    layers = (1, 2) if smoke else (2, 4, 8, 12, 24)
    reps = 1 if smoke else reps
    budget_s = budget_s or (1.0 if smoke else 420.0)  # smoke: 1 layer, then skip 2 (tests the skip path)
    env = environment()
    start = time.perf_counter()
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in layers}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        ref_n = layers[0] if smoke else 12
        for rep in range(reps):
            # Later repetitions measure the goal size (12 layers) first: the budget goes where the goals are.
            for n in layers if rep == 0 else sorted(layers, key=lambda m: (m != ref_n, m)):
                known = [sum(r[s] for s in STAGES) for r in samples[n]]
                prev = [m for m in layers if m < n and samples[m]]
                estimate = known[0] if known else (sum(samples[prev[-1]][0][s] for s in STAGES) * n / prev[-1]
                                                   if prev else 0.0)
                elapsed = time.perf_counter() - start
                mandatory = rep == 0 and n <= (1 if smoke else 12)
                if not mandatory and elapsed + estimate > budget_s:
                    skipped.append(f"{n} layers, repetition {rep + 1} (estimated {estimate:.0f}s, "
                                   f"{elapsed:.0f}s of the {budget_s:.0f}s budget used)")
                    continue
                log(f"{NAME}: {n} layers, repetition {rep + 1}")
                samples[n].append(_measure(n, smoke, rep, folder))
    sizes = []
    for n in layers:
        rows = samples[n]
        if not rows:
            continue
        passes = [(r["lorafy"] + r["fold"]) / r["trace"] for r in rows]
        export = [r["fold_and_export"] / r["plain_export"] for r in rows]
        verified = [r["fold_and_export_verified"] / r["plain_export"] for r in rows]
        noise = [r["plain_export_again"] / r["plain_export"] for r in rows if "plain_export_again" in r]
        sizes.append({"n_layer": n, "params_m": rows[0]["params_m"], "reps": len(rows),
                      "seconds": {s: Stats.of([r[s] for r in rows]) for s in STAGES},
                      "passes_over_trace": Stats.of(passes), "export_ratio": Stats.of(export),
                      "verified_ratio": Stats.of(verified), "noise_ratio": Stats.of(noise) if noise else None,
                      "samples": rows})
    ref = next((s for s in sizes if s["n_layer"] == (1 if smoke else 12)), sizes[-1])
    goals = {"(lorafy+fold)/trace <= 0.05": {"n_layer": ref["n_layer"], "median": ref["passes_over_trace"].median,
                                             "verdict": verdict(ref["passes_over_trace"].median, None, GOAL_PASSES)},
             "fold_and_export/plain <= 1.1": _export_goal(ref)}
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "seconds": time.perf_counter() - start,
            "budget_s": budget_s, "torch_threads": torch_threads, "example_input": "ids (2, 16)" if smoke else "ids (2, 64)",
            "sizes": sizes, "skipped": skipped, "goals": goals}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _export_goal(ref: dict[str, Any]) -> dict[str, Any]:
    """fold_and_export / plain against 1.1, judged with the noise control: a second plain export of the same
    module in the same repetition. A median over 1.1 whose excess the control's own spread covers (its max
    ratio of two identical exports) is reported as within noise, not as met or missed."""
    value, noise = ref["export_ratio"].median, ref.get("noise_ratio")
    goal = {"n_layer": ref["n_layer"], "median": value, "verdict": verdict(value, None, GOAL_EXPORT)}
    if noise is not None:
        spread = max(noise.max, 1 / noise.min)  # how far apart two identical exports landed
        goal["noise_max"] = spread
        if value > GOAL_EXPORT and value <= GOAL_EXPORT * spread:
            goal["verdict"] = "WITHIN NOISE"
    return goal


def _fmt_range(st: Stats | None) -> str:
    return "-" if st is None else f"{st.median:.3f} ({st.min:.3f}-{st.max:.3f})"


def _markdown(data: dict[str, Any]) -> str:
    rows = []
    for s in data["sizes"]:
        sec = s["seconds"]
        rows.append([s["n_layer"], f"{s['params_m']:.0f}M", s["reps"], *(sec[k].fmt(2) for k in ("trace", "plain_export",
                     "fold_and_export", "fold_and_export_verified")), sec["lorafy"].fmt(3), sec["fold"].fmt(3),
                     f"{100 * s['passes_over_trace'].median:.2f}%",
                     f"{s['export_ratio'].median:.3f} ({s['export_ratio'].min:.3f}-{s['export_ratio'].max:.3f})",
                     f"{s['verified_ratio'].median:.3f} ({s['verified_ratio'].min:.3f}-{s['verified_ratio'].max:.3f})",
                     _fmt_range(s.get("noise_ratio"))])
    table = md_table(["layers", "params", "reps", "trace s", "plain export s", "fold_and_export s",
                      "verified (default) s", "lorafy s", "fold s", "(lorafy+fold)/trace",
                      "fold_and_export/plain (min-max)", "verified/plain (min-max)",
                      "noise: plain again/plain (min-max)"], rows)
    lines = ["## Pass overhead vs model size (GPT-2, hidden 768, r=8 on c_attn)", "", env_line(data["env"]), "",
             f"torch intra-op threads: {data['torch_threads']} (see `run`'s docstring: on this shared machine 2 threads "
             "measure scheduler waits, not work). "
             f"Example input {data['example_input']}. Cells: median [IQR] seconds over repetitions. `plain export` = "
             "`torch.onnx.export(gm, dynamo=True, dynamic_shapes=<same>)` (torch's default optimizer) of the traced base "
             "GraphModule + save (like with like: fold_and_export also exports and optimizes a GraphModule, "
             "weight-independently; it adds fold and an atomic write). `trace` includes lora-fx's second capture in "
             "train mode (GPT-2 has dropout).", "", table, ""]
    for name, g in data["goals"].items():
        control = (f" (noise control: two plain exports of the same module differ by up to {g['noise_max']:.3f}x)"
                   if "noise_max" in g else "")
        lines.append(f"- Goal {name} at {g['n_layer']} layers: measured {g['median']:.3f}{control} -> {g['verdict']}.")
    ratios = [s["export_ratio"].median for s in data["sizes"]]
    lines.append(f"- fold_and_export/plain medians over all sizes: {min(ratios):.3f}-{max(ratios):.3f}; "
                 "(lorafy+fold)/trace: "
                 f"{100 * min(s['passes_over_trace'].median for s in data['sizes']):.1f}%-"
                 f"{100 * max(s['passes_over_trace'].median for s in data['sizes']):.1f}%. Judge a goal met at one "
                 "size against the other sizes: on this shared machine single export timings vary by 10-40%.")
    if data["skipped"]:
        lines.append(f"- Skipped to stay within the {data['budget_s']:.0f}s budget: " + "; ".join(data["skipped"]) + ".")
    return "\n".join(lines)


def _plot(fig, data: dict[str, Any]) -> None:
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs = [s["n_layer"] for s in data["sizes"]]
    for stage in (st for st in STAGES if st in data["sizes"][0]["seconds"]):
        ax1.plot(xs, [max(s["seconds"][stage].median, 1e-4) for s in data["sizes"]], marker="o", label=stage)
    ax1.set_yscale("log")
    ax1.set_xlabel("GPT-2 layers")
    ax1.set_ylabel("seconds (median)")
    ax1.legend(fontsize=7)
    ax2.plot(xs, [s["export_ratio"].median for s in data["sizes"]], marker="o", label="fold_and_export / plain export")
    ax2.plot(xs, [s["verified_ratio"].median for s in data["sizes"]], marker="^", label="verified default / plain export")
    ax2.plot(xs, [s["passes_over_trace"].median for s in data["sizes"]], marker="s", label="(lorafy+fold) / trace")
    ax2.axhline(GOAL_EXPORT, color="tab:blue", ls="--", lw=0.8)
    ax2.axhline(GOAL_PASSES, color="tab:orange", ls="--", lw=0.8)
    ax2.set_xlabel("GPT-2 layers")
    ax2.set_ylabel("ratio (dashed: goal)")
    ax2.legend(fontsize=7)
    fig.suptitle("lora-fx pass and export overhead")
