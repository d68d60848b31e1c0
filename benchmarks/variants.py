"""LoRA variants: DoRA's training step and peak memory against PEFT's DoRA, DoRA's norm alone, and a
fold-exactness table for every variant (LoRA, rsLoRA, DoRA, PiSSA, OLoRA).

* **Step time** (training_llm's model: Llama-shaped, 8 layers, hidden 512, vocab 32000, batch 4 x seq 512,
  r=16 alpha=32 on the 7 projections, AdamW): ``peft-dora`` (PEFT ``use_dora=True``), ``peft-dora#2`` (a
  second, identical PEFT model: the noise control, whose ratio to the first should be 1) and
  ``lora-fx-dora`` (``lorafy(..., dora=True)``), plus plain ``peft`` / ``lora-fx`` LoRA and the ``floor`` (no
  LoRA, frozen weights, backward through every layer: what any LoRA step costs at least); warm-up,
  then interleaved rounds (order rotated), paired per-round ratios to ``peft-dora``.
  ``LORA_FX_VARIANTS_SHAPE=half`` (or ``run(shape="half")``) halves batch and sequence (2 x 256) for a busy
  machine; the result says which shape ran.
* **Peak memory**: a fresh subprocess per variant (setup, a warm-up step, then the kernel's peak RSS over
  one step, minus the RSS after imports), as training_llm.
* **Norm**: one site's detached DoRA norm at the MLP shape (1376 x 512, r=16), PEFT's
  ``get_lora_weight`` + ``get_weight_norm`` against :func:`lora_fx.dora.row_norms` (the expanded form).
* **Fold exactness**: per variant a 2-layer Llama is lorafied, trained 3 steps, folded: max |folded -
  unfolded| of the logits, and ``fold_and_export``'s structural proof (folded export == base export).

Goals: DoRA step <= 0.8x PEFT DoRA's, peak memory <= 1.0x.
"""

from __future__ import annotations

import os
import tempfile
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
    lm_step,
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
from .llm_variants import ALPHA, RANK, TARGETS, _batch, _model, config
from .llm_variants import setup as llm_setup

NAME = "variants"
VARIANTS = ("peft-dora", "peft-dora#2", "lora-fx-dora", "peft", "lora-fx", "floor")
MEMORY = ("peft-dora", "lora-fx-dora")  # plain LoRA's peak at this shape: training_llm
ROUNDS = 3
GOALS = {"time lora-fx-dora / peft-dora": ("time", 0.8), "memory lora-fx-dora / peft-dora": ("memory", 1.0)}
FOLD_VARIANTS = {"LoRA": {}, "rsLoRA": {"use_rslora": True}, "DoRA": {"dora": True}, "PiSSA": {"init": "pissa"},
                 "OLoRA": {"init": "olora"}}
CHILD_TIMEOUT_S = 900


def shape_config(smoke: bool, shape: str) -> dict[str, int]:
    c = config(smoke)
    if shape == "half" and not smoke:
        c = {**c, "batch": c["batch"] // 2, "seq": c["seq"] // 2}
    return c


def setup(variant: str, c: dict[str, int]) -> Callable[[], float]:
    """One training step of ``variant`` (a fresh model each: PEFT's two copies are independent)."""
    if variant == "floor":  # no LoRA, weights frozen, backward through every layer: any LoRA step's floor
        return llm_setup("floor", c)
    model, ids = _model(c, torch.float32), _batch(c)
    kind = variant.partition("#")[0]
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                               use_dora=kind == "peft-dora"))
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        import lora_fx

        net = lora_fx.lorafy(lora_fx.trace(model, (ids,)), TARGETS, rank=RANK, alpha=ALPHA, dora=kind == "lora-fx-dora")
        params = lora_fx.lora_parameters(net)
    net.train()
    return lm_step(net, params, ids)


def child(variant: str, smoke: bool) -> dict[str, Any]:
    """Runs in a fresh process: peak memory of one variant over one step (see module doc)."""
    import peft  # noqa: F401

    import lora_fx  # noqa: F401

    trim()
    rss_imports = status_kb("VmRSS")
    step = setup(variant, shape_config(smoke, os.environ.get("LORA_FX_VARIANTS_SHAPE", "full")))
    step()
    trim()
    reset_peak()
    t = time.perf_counter()
    step()
    return {"variant": variant, "rss_imports_mb": rss_imports / 1024, "peak_mb": status_kb("VmHWM") / 1024,
            "seconds": time.perf_counter() - t}


def norm_timing(smoke: bool, repeats: int = 20) -> dict[str, Any]:
    """One site's detached DoRA norm: PEFT's layer code against lora-fx's expanded form (seconds, error)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from lora_fx.dora import row_norms

    out_f, in_f = (64, 32) if smoke else (1376, 512)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    lin_a, lin_b = torch.nn.Linear(in_f, RANK, bias=False), torch.nn.Linear(RANK, out_f, bias=False)
    with torch.no_grad():
        lin_a.weight.normal_(0, 0.02, generator=g)
        lin_b.weight.normal_(0, 0.02, generator=g)
    peft_layer, s = DoraLinearLayer(fan_in_fan_out=False), ALPHA / RANK

    def theirs():
        with torch.no_grad():
            return peft_layer.get_weight_norm(w, peft_layer.get_lora_weight(lin_a, lin_b), s)

    def ours():
        return row_norms(w, lin_a.weight, lin_b.weight, s)

    times = interleaved({"peft": theirs, "lora-fx": ours}, repeats)
    exact = torch.linalg.vector_norm(w.double() + s * lin_b.weight.double() @ lin_a.weight.double(), dim=1)
    return {"shape": [out_f, in_f], "rank": RANK, "seconds": {k: Stats.of(v) for k, v in times.items()},
            "ratio": Stats.of(paired_ratios(times["lora-fx"], times["peft"])),
            "max_rel_err": {"peft": float(((theirs().double() - exact).abs() / exact).max()),
                            "lora-fx": float(((ours().double() - exact).abs() / exact).max())}}


def fold_table(smoke: bool) -> dict[str, dict[str, Any]]:
    """Per variant: max |folded - unfolded| logits after 3 training steps, and the export's proof."""
    import lora_fx

    c = {"layers": 2, "hidden": 64, "heads": 4, "mlp": 128, "vocab": 256, "batch": 2, "seq": 16}
    model = _model(c, torch.float32).eval()
    ids = _batch(c)
    gm = lora_fx.trace(model, (ids,))
    rows = {}
    for name, options in FOLD_VARIANTS.items():
        lgm = lora_fx.lorafy(gm, TARGETS, rank=4, alpha=8, **options)
        opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-2)
        for _ in range(3):
            lgm(ids).logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
        lgm.eval()
        with torch.no_grad():
            unfolded = lgm(ids).logits
            folded = lora_fx.fold(lgm)(ids).logits
        row = {"max_abs_diff": float((folded - unfolded).abs().max()), "max_abs_logit": float(unfolded.abs().max())}
        if not smoke:
            try:
                with tempfile.TemporaryDirectory() as d:
                    report = lora_fx.fold_and_export(lgm, os.path.join(d, "task.onnx"))
                v = report.verification
                row |= {"proof": bool(v.ok and v.structure.ok and report.lora_nodes_added == 0),
                        "export_max_rel_err": max(n.max_rel_err for n in v.numerics)}
            except Exception as e:  # reported in the table; the timings measured before are kept
                row |= {"proof": f"export failed: {type(e).__name__}: {str(e)[:120]}"}
        rows[name] = row
        log(f"{NAME}: fold {name}: {row}")
    return rows


def run(out: str, smoke: bool = False, rounds: int | None = None, shape: str | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``variants.{json,md,png}`` into ``out``."""
    shape = shape or os.environ.get("LORA_FX_VARIANTS_SHAPE", "full")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, smoke, rounds or (2 if smoke else ROUNDS), shape)
    finally:
        torch.set_num_threads(old)


def _run(out: str, smoke: bool, rounds: int, shape: str) -> dict[str, Any]:
    env, start, c = environment(), time.perf_counter(), shape_config(smoke, shape)
    args = ["--threads", "1", *(["--smoke"] if smoke else [])]
    os.environ["LORA_FX_VARIANTS_SHAPE"] = shape  # the memory children run the same shape
    memory: dict[str, dict[str, Any]] = {}
    for v in MEMORY:
        try:
            memory.update(run_children("benchmarks.variants", [v], args, timeout=CHILD_TIMEOUT_S))
            log(f"{NAME}: {v}: peak {memory[v]['peak_mb'] - memory[v]['rss_imports_mb']:.0f} MB over imports")
        except RuntimeError as e:
            memory[v] = {"error": str(e).strip().splitlines()[-1][:300]}
    used = {v: m["peak_mb"] - m["rss_imports_mb"] for v, m in memory.items() if "error" not in m}
    steps = {v: setup(v, c) for v in VARIANTS}
    for fn in steps.values():
        fn()  # warm-up
    cpu: dict[str, list[float]] = {}
    times = interleaved(steps, rounds, cpu=cpu)
    vs = {v: Stats.of(paired_ratios(times[v], times["peft-dora"])) for v in times}
    cpu_vs = {v: Stats.of(paired_ratios(cpu[v], cpu["peft-dora"])) for v in cpu}
    goals = {}
    for goal, (kind, hi) in GOALS.items():
        if kind == "time":
            value = vs["lora-fx-dora"].median
        else:
            value = used["lora-fx-dora"] / used["peft-dora"] if {"lora-fx-dora", "peft-dora"} <= used.keys() else None
        goals[goal] = {"value": value, "bound": hi, "verdict": verdict(value, None, hi) if value is not None
                       else "FAILED"}
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "shape": shape, "seconds": 0.0,
            "config": {**c, "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "rounds": rounds, "torch_threads": 1},
            "variants": list(VARIANTS), "step_s": {v: Stats.of(t) for v, t in times.items()}, "step_samples_s": times,
            "cpu_samples_s": cpu, "step_vs_peft_dora": vs, "cpu_vs_peft_dora": cpu_vs, "memory": memory,
            "memory_used_mb": used, "goals": goals, "norm": norm_timing(smoke), "fold": fold_table(smoke)}
    data["seconds"] = time.perf_counter() - start
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    c, used, vs, cpu = data["config"], data["memory_used_mb"], data["step_vs_peft_dora"], data["cpu_vs_peft_dora"]
    rows = [[v, data["step_s"][v].fmt(3), vs[v].fmt(3), cpu[v].fmt(3),
             f"{used[v]:.0f}" if v in used else data["memory"].get(v, {}).get("error", "-"),
             f"{used[v] / used['peft-dora']:.3f}" if v in used and "peft-dora" in used else "-"]
            for v in data["variants"]]
    goal_rows = [[f"{g} <= {x['bound']}", "-" if x["value"] is None else f"{x['value']:.3f}", x["verdict"]]
                 for g, x in data["goals"].items()]
    n = data["norm"]
    norm = md_table(["norm of one site", "seconds (median [IQR])", "max rel. error vs fp64"],
                    [[k, n["seconds"][k].fmt(6), f"{n['max_rel_err'][k]:.1e}"] for k in ("peft", "lora-fx")])
    fold_rows = [[k, f"{r['max_abs_diff']:.2e}", f"{r['max_abs_logit']:.3g}", str(r.get("proof", "-")),
                  f"{r['export_max_rel_err']:.1e}" if "export_max_rel_err" in r else "-"] for k, r in data["fold"].items()]
    return "\n".join([
        "## LoRA variants: DoRA against PEFT's DoRA, and fold exactness", "", env_line(data["env"]), "",
        f"Shape **{data['shape']}**: Llama-shaped ({c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, MLP "
        f"{c['mlp']}, vocab {c['vocab']}, random weights), batch {c['batch']} x seq {c['seq']}, r={c['rank']} "
        f"alpha={c['alpha']} on the 7 projections, AdamW, 1 torch thread. {c['rounds']} interleaved rounds after a "
        "warm-up step; ratios paired per round against `peft-dora`; `peft-dora#2` is a second identical PEFT model "
        "(the noise control: its ratio shows the run's noise). Peak memory: a fresh subprocess per variant, peak "
        "RSS over one step minus RSS after imports. The machine is shared with other jobs: wall-clock numbers are "
        "noisy; the CPU-time ratio is less so.", "",
        md_table(["variant", "step s", "step / PEFT DoRA", "CPU s / PEFT DoRA", "peak MB over imports",
                  "peak / PEFT DoRA"], rows), "", md_table(["goal", "measured", "verdict"], goal_rows), "",
        f"DoRA's detached weight norm of one {n['shape'][0]} x {n['shape'][1]} site, r={n['rank']} (per step and "
        f"site; lora-fx / PEFT {n['ratio'].fmt(3)}): PEFT builds B@A from an identity and takes the norm of W + s·B@A; "
        "lora-fx expands ||W||² + 2s<WAᵀ, B> + s²<B AAᵀ, B> (no weight-sized temporary).", "", norm, "",
        "Fold exactness (2-layer Llama, hidden 64, r=4, 3 AdamW steps at lr 1e-2): max |folded - unfolded| of the "
        "logits in fp32, and fold_and_export's structural proof (the folded export is the base export's graph).", "",
        md_table(["variant", "max abs diff", "max abs logit", "export proof", "ORT vs torch max rel err"], fold_rows)])


def _plot(fig, data: dict[str, Any]) -> None:
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    vs = data["variants"]
    ax1.barh(vs, [data["step_s"][v].median for v in vs])
    ax1.set_xlabel("seconds per training step (median)")
    ax1.invert_yaxis()
    mem = [v for v in vs if v in data["memory_used_mb"]]
    ax2.barh(mem, [data["memory_used_mb"][v] for v in mem], color="tab:orange")
    ax2.set_xlabel("peak RSS over imports (MB)")
    ax2.invert_yaxis()
    fig.suptitle(f"DoRA vs PEFT DoRA, batch {data['config']['batch']} x seq {data['config']['seq']}")


if __name__ == "__main__":
    child_main("memory child of the LoRA variants benchmark", VARIANTS, child)
