"""Scale benchmark: a 1.1B model end to end on one machine, and the passes from 2 to 80 layers on meta.

**End to end** (TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, vocab 32000;
random weights, fp32 and bf16), each in its own subprocess so peak RSS is that pipeline's alone:
build -> ``trace`` -> ``lorafy`` (q/k/v/o, r=16) -> 2 AdamW steps (ids 2 x 32; bf16: 2 x 4, see
``child_e2e``) ->
``fold_and_export(external_data=True, dtype=float16)`` (verified) -> a plain ``torch.onnx.export``
of the same captured graph (torch's default optimizer, external data, the model's dtype): the baseline;
and the same with ``optimize=False`` (the exporter alone).
Per phase: seconds and peak RSS (``VmHWM``, reset before each phase through ``/proc/self/clear_refs``).
Goals: pipeline peak <= 2x the weight bytes (1.6x stretch); fold_and_export <= 1.4x the plain export.

**Linear passes**: Llama-3-70B widths on the meta device (``lora_fx.empty_weights``), 2..80 layers:
``trace`` and ``lorafy`` seconds and RSS; plus ``fold`` on real weights of a narrow Llama (hidden
256) at the same depths, with one torch thread (the per-site tensor work is small; two OpenMP threads
on a loaded 2-core machine made fold times swing 7x) and its CPU seconds next to the wall seconds.
And ``lora-fx inspect <70B config.json> --targets q_proj v_proj`` wall time (goal < 120 s).
Hold ``flock /tmp/lorafx-bigmem.lock`` (the 1.1B children need ~9 GB).

Parts: ``LORA_FX_SCALE_PARTS=e2e-float32,e2e-bfloat16,passes,inspect`` (default: all) runs some of
them and keeps the other parts' rows of the JSON already in the output folder (each 1.1B row takes
~15-20 min on 2 loaded cores: one benchmark run per row stays under 20 min). Every part records the
load average at its start and end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import env_line, environment, log, md_table, verdict, write_outputs

NAME = "scale"
PARTS = ("e2e-float32", "e2e-bfloat16", "passes", "inspect")
GOAL_PEAK, GOAL_STRETCH, GOAL_EXPORT, GOAL_INSPECT = 2.0, 1.6, 1.4, 120.0
ATTN = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj"]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


# ------------------------------------------------------------------------------------------------
# child processes (python -m benchmarks.scale e2e|passes ...): print one JSON line
# ------------------------------------------------------------------------------------------------


def _memory() -> dict[str, float]:
    """Current and peak RSS in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _phase(results: dict, name: str, fn):
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    t, cpu = time.perf_counter(), time.process_time()
    value = fn()
    mem = _memory()
    results[name] = {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
                     "peak_bytes": mem["VmHWM"], "rss_after": mem["VmRSS"]}
    return value


def _measure_export_steps() -> dict[str, dict[str, float]]:
    """Observes fold_and_export's steps (lora_fx.exporters.backends.base.step_observer: fold, export,
    structure, base_export, verify, quantize) to record each one's seconds and peak RSS (reset at its
    start) into the returned dict, filled as they run."""
    from contextlib import contextmanager

    from lora_fx.exporters.backends import base

    steps: dict[str, dict[str, float]] = {}

    @contextmanager
    def measured(name):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t = time.perf_counter()
        yield
        steps[name] = {"seconds": time.perf_counter() - t, "peak_bytes": _memory()["VmHWM"]}

    base.step_observer = measured
    return steps


def _llama(config: dict, dtype, meta: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx

    cfg = LlamaConfig(**config, use_cache=False)
    with lora_fx.empty_weights():
        model = LlamaForCausalLM(cfg)
    if not meta:  # fill one tensor at a time (randn on the full model would allocate it twice)
        gen = torch.Generator().manual_seed(0)
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    real = torch.empty(p.shape, dtype=dtype).normal_(0, 0.02, generator=gen)
                    mod._parameters[name] = torch.nn.Parameter(real)
    return model.to(dtype).eval() if meta else model.eval()


def child_e2e(dtype_name: str, smoke: bool) -> dict[str, Any]:
    import torch

    import lora_fx
    from lora_fx.capture import dynamic_shapes_for

    dtype = getattr(torch, dtype_name)
    res: dict[str, Any] = {"dtype": dtype_name, "phases": {}}
    ph = res["phases"]
    config = SMOKE if smoke else TINYLLAMA
    model = _phase(ph, "build", lambda: _llama(config, dtype, meta=False))
    res["parameters"] = sum(p.numel() for p in model.parameters())
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    # bf16: 2 x 4 tokens. linear's input gradient in bf16 (grad @ W, W row-major) takes torch's slow
    # CPU path on CPUs without avx512_bf16 (~0.15 GFLOP/s, 30-50x fp32): 2 x 32 tokens would train ~30 min
    seq = 32 if dtype == torch.float32 else 4
    ids = torch.randint(0, config["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(0))
    res["tokens"] = [2, seq]
    gm = _phase(ph, "trace", lambda: lora_fx.trace(model, (ids,)))
    lgm = _phase(ph, "lorafy", lambda: lora_fx.lorafy(gm, ATTN, rank=16, alpha=32))
    res["trainable"] = lgm.lora_report.trainable
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-3)

    def train():
        lgm.train()
        for _ in range(2):
            loss = lgm(ids).logits.float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        lgm.eval()

    _phase(ph, "train", train)
    steps = res["export_steps"] = _measure_export_steps()
    with tempfile.TemporaryDirectory(prefix="lora_fx_scale_", dir=os.environ.get("LORA_FX_SCALE_TMP")) as tmp:
        rep = _phase(ph, "fold_and_export", lambda: lora_fx.fold_and_export(
            lgm, os.path.join(tmp, "task.onnx"), external_data=True, dtype=torch.float16))
        # each step reset the peak at its start: the phase's peak is the largest step's
        ph["fold_and_export"]["peak_bytes"] = max(ph["fold_and_export"]["peak_bytes"],
                                                  *(st["peak_bytes"] for st in steps.values()))
        res["verified"] = bool(rep.verification.ok)
        res["report_seconds"] = dict(rep.seconds)
        res["numerics"] = [c.max_rel_err for c in rep.verification.numerics]
        res["file_bytes"] = os.path.getsize(os.path.join(tmp, "task.onnx.data"))

        def plain(optimize: bool):
            program = torch.onnx.export(gm, (ids,), dynamo=True, dynamic_shapes=dynamic_shapes_for((ids,), {}),
                                        optimize=optimize, verbose=False)
            program.save(os.path.join(tmp, "plain.onnx"), external_data=True)

        _phase(ph, "plain_export", lambda: plain(True))  # what a user runs: torch's default (optimized)
        _phase(ph, "plain_export_raw", lambda: plain(False))  # the exporter alone, for comparison
    res["pipeline_peak_bytes"] = max(p["peak_bytes"] for k, p in ph.items() if not k.startswith("plain_export"))
    return res


def child_passes(layers: int, smoke: bool) -> dict[str, Any]:
    import torch

    import lora_fx

    torch.set_num_threads(1)  # see the module doc: the passes' own cost, not OpenMP waits under load
    res: dict[str, Any] = {"layers": layers, "phases": {}}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    wide = dict(SMOKE if smoke else LLAMA3_70B, num_hidden_layers=layers)
    model = _llama(wide, torch.bfloat16, meta=True)
    gm = _phase(res["phases"], "trace_meta", lambda: lora_fx.trace(model, (ids,)))
    _phase(res["phases"], "lorafy_meta", lambda: lora_fx.lorafy(gm, ATTN, rank=16))
    res["sites"] = len(lora_fx.sites(gm))
    narrow = dict(SMOKE, hidden_size=64 if smoke else 256, intermediate_size=128 if smoke else 512,
                  num_hidden_layers=layers)
    small = _llama(narrow, torch.float32, meta=False)
    sgm = lora_fx.trace(small, (ids,), dynamic=False, train_capture=False)  # (fold's input; ~5x cheaper)
    lgm = lora_fx.lorafy(sgm, ATTN, rank=16)
    _phase(res["phases"], "fold_real", lambda: lora_fx.fold(lgm))
    return res


def child_inspect(smoke: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(SMOKE if smoke else LLAMA3_70B, num_hidden_layers=2 if smoke else 80,
                   architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lora_fx", "inspect", tmp, "--targets", "q_proj", "v_proj",
                               "--rank", "16"], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t
    tail = [line for line in proc.stdout.splitlines() if "adaptable sites" in line or "trainable" in line]
    return {"seconds": seconds, "summary": tail}


def _child(args: list[str], timeout: float = 3600) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.scale", *args]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------


def _parts(parts: list[str] | None) -> list[str]:
    if parts is None:
        env = os.environ.get("LORA_FX_SCALE_PARTS", "")
        parts = [p.strip() for p in env.split(",") if p.strip()] or list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown scale part(s) {unknown}; choose from {list(PARTS)}")
    return parts


def _previous(out: str, smoke: bool) -> dict[str, Any]:
    """The rows already measured (kept for the parts not re-run)."""
    path = os.path.join(out, f"{NAME}.json")
    if smoke or not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if old.get("smoke"):
        return {}
    for row in [*old.get("e2e", []), *old.get("passes", []), old.get("inspect") or {}]:
        row.setdefault("env", old.get("env"))  # rows of a run from before per-part environments
    if old.get("passes") and "env" not in old.get("passes_env", {}):
        old["passes_env"] = old["passes"][0].get("env")
    return old


def _timed_part(fn) -> tuple[Any, dict[str, Any]]:
    env = environment()
    value = fn()
    env["loadavg_end"] = list(os.getloadavg())
    return value, env


def run(out: str, smoke: bool = False, parts: list[str] | None = None) -> dict[str, str]:
    parts = _parts(parts)
    extra = ["--smoke"] if smoke else []
    old = _previous(out, smoke)
    data: dict[str, Any] = {"benchmark": NAME, "smoke": smoke, "env": environment(), "e2e": [], "passes": []}
    for dtype in ("float32", "bfloat16"):
        if f"e2e-{dtype}" in parts:
            log(f"scale: end to end, {dtype}")
            row, env = _timed_part(lambda dtype=dtype: _child(["e2e", dtype, *extra]))
            data["e2e"].append({**row, "env": env})
        else:
            data["e2e"] += [r for r in old.get("e2e", []) if r["dtype"] == dtype]
    if "passes" in parts:
        def passes():
            rows = []
            for layers in ((2, 4) if smoke else (2, 5, 10, 20, 40, 80)):
                log(f"scale: passes at {layers} layers")
                rows.append(_child(["passes", str(layers), *extra]))
            return rows

        data["passes"], data["passes_env"] = _timed_part(passes)
    else:
        data["passes"], data["passes_env"] = old.get("passes", []), old.get("passes_env")
    if "inspect" in parts:
        log("scale: lora-fx inspect on a config.json")
        row, env = _timed_part(lambda: _child(["inspect", *extra]))
        data["inspect"] = {**row, "env": env}
    else:
        data["inspect"] = old.get("inspect")
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data))


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def _load(env: dict[str, Any] | None) -> str:
    """``measured <date> UTC, load average (1 min) a -> b on 2 cores`` for one part."""
    if not env:
        return "not measured"
    start, end = (env.get("loadavg_start") or [float("nan")])[0], (env.get("loadavg_end") or [float("nan")])[0]
    return f"measured {env['date_utc']} UTC, load average (1 min) {start:.1f} at start, {end:.1f} at end"


def _markdown(data: dict[str, Any]) -> str:
    lines = ["## Scale: 1.1B end to end, passes linear to 80 layers", ""]
    for r in data["e2e"]:
        w = r["weight_bytes"]
        ph = r["phases"]
        tokens = "x".join(map(str, r.get("tokens", [2, 32])))
        lines += [f"**TinyLlama-1.1B-shaped, {r['dtype']}** ({r['parameters']:,} parameters, {_gib(w)} GiB of "
                  f"weights; LoRA r=16 on q/k/v/o: {r['trainable']:,} trainable; 2 AdamW steps on {tokens} "
                  "tokens; fold_and_export writes fp16, "
                  f"verified: {r['verified']}; {_load(r.get('env'))})", ""]
        rows = [[name, f"{p['seconds']:.1f}", _gib(p["peak_bytes"]), f"{p['peak_bytes'] / w:.2f}x"]
                for name, p in ph.items()]
        lines += [md_table(["phase", "seconds", "peak RSS GiB", "peak / weights"], rows), ""]
        peak = r["pipeline_peak_bytes"] / w
        ratio = ph["fold_and_export"]["seconds"] / ph["plain_export"]["seconds"]
        inside = ", ".join(f"{k} {v:.1f}s" for k, v in r["report_seconds"].items())
        lines += [md_table(["goal", "measured", ""], [
            [f"pipeline peak <= {GOAL_PEAK}x weights", f"{peak:.2f}x", verdict(peak, None, GOAL_PEAK)],
            [f"stretch <= {GOAL_STRETCH}x", f"{peak:.2f}x", verdict(peak, None, GOAL_STRETCH)],
            [f"fold_and_export / plain export <= {GOAL_EXPORT}", f"{ratio:.2f}", verdict(ratio, None, GOAL_EXPORT)],
        ]), ""]
        if "plain_export_raw" in ph:
            raw = ph["fold_and_export"]["seconds"] / ph["plain_export_raw"]["seconds"]
            lines += [f"plain export = `torch.onnx.export(dynamo=True)` with torch's default optimizer, external data, "
                      f"the model's dtype; against the exporter alone (`optimize=False`): {raw:.2f}x.", ""]
        if r.get("export_steps"):
            inside = ", ".join(f"{k} {v['seconds']:.1f}s (peak {_gib(v['peak_bytes'])} GiB = "
                               f"{v['peak_bytes'] / w:.2f}x)" for k, v in r["export_steps"].items())
        lines += [f"fold_and_export inside: {inside}.", ""]
    if data["passes"]:
        rows = []
        for r in data["passes"]:
            ph = r["phases"]
            fold = ph["fold_real"]
            cpu = f" ({fold['cpu_seconds']:.2f} CPU)" if "cpu_seconds" in fold else ""
            rows.append([r["layers"], r["sites"], f"{ph['trace_meta']['seconds']:.1f}",
                         f"{ph['lorafy_meta']['seconds']:.2f}", _gib(ph["lorafy_meta"]["peak_bytes"]),
                         f"{fold['seconds']:.2f}{cpu}", f"{1000 * fold['seconds'] / max(r['sites'], 1):.1f}"])
        lines += ["**Passes vs depth** (Llama-3-70B widths on meta; fold on a hidden-256 Llama with real weights, "
                  f"one torch thread; {_load(data.get('passes_env'))}):", "",
                  md_table(["layers", "sites", "trace s (meta)", "lorafy s (meta)", "RSS GiB",
                            "fold s (real, narrow)", "fold ms / site"], rows), ""]
    ins = data.get("inspect")
    if ins:
        lines += [f"`lora-fx inspect` on the Llama-3-70B config.json alone: {ins['seconds']:.0f} s "
                  f"(goal < {GOAL_INSPECT:.0f} s: {verdict(ins['seconds'], None, GOAL_INSPECT)}; "
                  f"{_load(ins.get('env'))}); " + "; ".join(ins["summary"]), ""]
    lines += [env_line(data["env"])]
    return "\n".join(lines)


def _plot(fig, data: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 2, 1)
    xs = [r["layers"] for r in data["passes"]]
    for key, label in (("trace_meta", "trace (meta)"), ("lorafy_meta", "lorafy (meta)"), ("fold_real", "fold (real, narrow)")):
        ax.plot(xs, [r["phases"][key]["seconds"] for r in data["passes"]], "o-", label=label)
    ax.set_xlabel("layers")
    ax.set_ylabel("seconds")
    ax.set_title("passes vs depth")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    for r in data["e2e"]:
        names = list(r["phases"])
        ax.plot(names, [r["phases"][n]["peak_bytes"] / r["weight_bytes"] for n in names], "o-", label=r["dtype"])
    ax.axhline(GOAL_PEAK, color="gray", linestyle="--", label="goal 2x")
    ax.set_ylabel("peak RSS / weight bytes")
    ax.set_title("1.1B pipeline memory")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()


def main(argv: list[str]) -> int:
    from .common import quiet

    quiet()
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    if argv[0] == "e2e":
        result = child_e2e(argv[1], smoke)
    elif argv[0] == "passes":
        result = child_passes(int(argv[1]), smoke)
    else:
        result = child_inspect(smoke)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
