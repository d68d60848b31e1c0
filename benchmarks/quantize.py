"""Quantized deployment: file size, ONNX Runtime CPU latency and error of int4/int8 vs the fp32 fold;
memory of a QLoRA training step vs bf16 LoRA.

A Llama-shaped model (random weights, r=8 LoRA with random A/B on q/v/down) is folded and exported
in fp32 and verified (``fold_and_export``); its quantize step (what ``fold_and_export(quantize=...)``
runs) then writes int4 (MatMulNBits, block 32, symmetric), int8 dynamic (MatMulInteger) and int8
weight-only (MatMulNBits 8 bits) files, each proven against the same-quantized base. Errors are
relative RMS over the logits against the unmerged fp32 LoRA model (task) and the fp32 base (base);
goal: task <= 1.5x base. Size goal: int4 <= 0.35x fp32. Latency: ORT CPU, 1 thread, interleaved
rounds, ratio to the fp32 folded file, with an fp32-vs-fp32 control session.

QLoRA memory: each configuration runs in its own process (bf16 LoRA; QLoRA with nf4 / int8 frozen
weights and bf16 compute); peak RSS of a training step (forward, backward, AdamW step) after the
peak counter is reset (``/proc/self/clear_refs``), and the RSS held before the step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
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

NAME = "quantize"
MEMORY_CONFIGS = ("bf16 LoRA", "QLoRA nf4", "QLoRA int8")
WEIGHT_BOUND = {"hidden": 1024, "layers": 8, "batch": 1, "seq": 64}
SIZE_GOAL, FOLD_GOAL = 0.35, 1.5
CONFIGS = {"int4": {"scheme": "int4"}, "int8 dynamic": {"scheme": "int8"},
           "int8 weight-only": {"scheme": "int8", "int8_method": "weight_only"}}


def _model(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden, layers, inter, vocab = (64, 2, 128, 256) if smoke else (512, 6, 1376, 8000)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, use_cache=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), cfg


def run(out: str, smoke: bool = False) -> dict[str, Any]:
    import lora_fx
    from lora_fx.exporters.quantize import as_config
    from lora_fx.exporters.quantize.step import quantize_step
    from lora_fx.exporters.verify.ort import ort_session

    torch.set_num_threads(1)
    model, cfg = _model(smoke)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, (ids,))
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj", "*.down_proj"], rank=8, alpha=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    from lora_fx.exporters.verify.numerics import variants as _variants

    rows: dict[str, Any] = {}
    rounds, seq = (2, 16) if smoke else (15, 128)
    with tempfile.TemporaryDirectory() as tmp:
        rep = lora_fx.fold_and_export(lgm, os.path.join(tmp, "task.onnx"), verify=False)
        base = lora_fx.fold_and_export(lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj", "*.down_proj"], rank=8),
                                       os.path.join(tmp, "base.onnx"), verify=False)
        from lora_fx.exporters.verify.structure import compare_structure

        changed = compare_structure(base.path, rep.path).changed_initializers
        fp32_bytes = os.path.getsize(rep.path)
        files = {"fp32": rep.path}
        for name, kw in CONFIGS.items():
            log(f"{NAME}: {name}")
            opts = dict(kw)
            path, q = quantize_step(rep.path, base.path, as_config(opts.pop("scheme"), **opts), changed, lgm=lgm,
                                    variants=_variants((ids,), {}))
            files[name] = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
            os.replace(path, files[name])
            rows[name] = {"bytes": os.path.getsize(files[name]), "size_ratio": os.path.getsize(files[name]) / fp32_bytes,
                          "ops": q.info.quantized, "proof": q.ok, "changed": len(q.changed),
                          "task_err": q.task_err, "base_err": q.base_err, "fold_cost": q.fold_cost,
                          "fold_verdict": verdict(q.fold_cost, None, FOLD_GOAL)}
        rows["int4"]["size_verdict"] = verdict(rows["int4"]["size_ratio"], None, SIZE_GOAL)
        x = torch.randint(0, cfg.vocab_size, (1, seq)).numpy()
        sessions = {n: ort_session(p, threads=1, providers=["CPUExecutionProvider"]) for n, p in files.items()}
        sessions["fp32 (control)"] = ort_session(files["fp32"], threads=1, providers=["CPUExecutionProvider"])
        feeds = {n: {s.get_inputs()[0].name: x} for n, s in sessions.items()}
        for n, s in sessions.items():  # warm-up
            s.run(None, feeds[n])
        log(f"{NAME}: latency, {rounds} interleaved rounds, batch 1 x {seq}")
        times = interleaved({n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()},
                            rounds=rounds, inner=3)
        latency = {n: {"seconds": Stats.of(t).as_dict(), "ratio": Stats.of(paired_ratios(t, times["fp32"])).as_dict()}
                   for n, t in times.items()}
    # peak RSS is per process: one process per configuration (smoke: in this one, numbers meaningless)
    memory = {name: step_memory(name, smoke) if smoke else _memory(name, smoke)
              for name in MEMORY_CONFIGS}
    # a weight-bound step (wider model, one short sequence), where QLoRA's saving shows
    memory_weights = {} if smoke else {name: _memory(name, smoke, **WEIGHT_BOUND) for name in MEMORY_CONFIGS}
    data = {"benchmark": NAME, "env": environment(), "smoke": smoke, "fp32_bytes": fp32_bytes,
            "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "seq": seq, "quantized": rows, "latency": latency, "samples": times, "memory": memory,
            "memory_weights": memory_weights}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _memory(name: str, smoke: bool, **sizes: int) -> dict[str, float]:
    """Runs one training-step measurement in a fresh process (peak RSS is per process)."""
    code = f"import json, benchmarks.quantize as q; print(json.dumps(q.step_memory({name!r}, {smoke}, **{sizes!r})))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # big tensors from mmap (returned to the OS on free): RSS then follows live memory, not glibc's retained heap
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode:
        raise RuntimeError(f"memory run {name} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def step_memory(name: str, smoke: bool, *, hidden: int = 512, layers: int = 8, batch: int = 4,
                seq: int = 256) -> dict[str, float]:
    """RSS before and peak during a QLoRA / bf16 LoRA training step (default Llama 8L/512, batch 4 x 256).

    ``python -c "import benchmarks.quantize as q; print(q.step_memory('QLoRA nf4', False, hidden=1024,
    batch=1, seq=64))"`` measures a weight-dominated step (one configuration per process).
    """
    import gc

    import lora_fx
    from benchmarks.common import quiet

    quiet()
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        hidden, layers, batch, seq = 64, 2, 2, 16
    cfg = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, use_cache=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    ids = torch.randint(0, 8000, (batch, seq))
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    gm = lora_fx.trace(model, (ids[:2, :16],))
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj",
                              "*.down_proj"], rank=16)
    if name.startswith("QLoRA"):
        lgm = lora_fx.quantize_base(lgm, scheme=name.split()[1])
    del model, gm
    gc.collect()
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-4)
    lgm.train()

    def step():
        loss = lgm(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state allocated
    gc.collect()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap (setup temporaries) to the OS: count live memory
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    step()
    return {"rss_before_mb": before, "step_peak_mb": _rss("VmHWM")}


def _markdown(data: dict[str, Any]) -> str:
    m = data["model"]
    rows = [["fp32 (folded)", f"{data['fp32_bytes'] / 2**20:.1f}", "1.000", "-", "-", "-", "-",
             _lat(data, "fp32")]]
    for name, r in data["quantized"].items():
        ops = ", ".join(f"{n} {op}" for op, n in r["ops"].items())
        size = f"{r['size_ratio']:.3f}" + (f" ({r['size_verdict']})" if "size_verdict" in r else "")
        rows.append([f"{name} ({ops})", f"{r['bytes'] / 2**20:.1f}", size, "yes" if r["proof"] else "NO",
                     f"{r['task_err']['rms']:.2e}", f"{r['base_err']['rms']:.2e}",
                     f"{r['fold_cost']:.2f}x ({r['fold_verdict']})", _lat(data, name)])
    rows.append(["control: fp32 again", "", "", "", "", "", "", _lat(data, "fp32 (control)")])
    mrows = []
    for label, mem in (("8 x 512, batch 4 x 256", data["memory"]), ("8 x 1024, batch 1 x 64", data.get("memory_weights"))):
        ref = (mem or {}).get("bf16 LoRA")
        mrows += [[label, n, f"{v['rss_before_mb']:.0f}", f"{v['step_peak_mb']:.0f}",
                   f"{v['step_peak_mb'] / ref['step_peak_mb']:.2f}"] for n, v in (mem or {}).items()]
    return "\n".join([
        "## Quantized deployment: int4 / int8 vs the fp32 fold", "", env_line(data["env"]), "",
        f"Llama-shaped, {m['layers']} layers x {m['hidden']}, vocab {m['vocab']}, {m['parameters'] / 1e6:.1f}M "
        "parameters, random weights; LoRA r=8 on q/v/down with random A, B. Error: relative RMS of the logits vs "
        "fp32 (task: vs the unmerged LoRA model; base: quantized base vs fp32 base); fold cost = task / base "
        f"(goal <= {FOLD_GOAL}x). Size goal: int4 <= {SIZE_GOAL}x. Latency: ONNX Runtime CPU, 1 thread, batch 1 x "
        f"{data['seq']}, median [IQR] ratio to fp32 over interleaved rounds.", "",
        md_table(["file", "MiB", "x fp32", "proof", "task err", "base err", "fold cost", "latency vs fp32"], rows),
        "", "QLoRA training step (Llama, r=16 on all 7 projections, AdamW, 1 thread, bf16 compute; the frozen "
        "projections stored as nf4 / int8 codes); MiB of RSS, one process per row, big tensors mmapped "
        "(MALLOC_MMAP_THRESHOLD_) and the freed heap trimmed, so RSS follows live memory:", "",
        md_table(["Llama, step", "configuration", "RSS before step", "peak during step", "peak vs bf16 LoRA"], mrows)])


def _lat(data: dict[str, Any], name: str) -> str:
    r = data["latency"][name]["ratio"]
    r = r.as_dict() if hasattr(r, "as_dict") else r  # --render revives summaries as Stats
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def _plot(fig, data: dict[str, Any]) -> None:
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = list(data["samples"])
    ax1.boxplot([[s * 1e3 for s in data["samples"][n]] for n in names], tick_labels=[n.replace(" ", "\n") for n in names])
    ax1.set_ylabel("ms per run")
    ax1.set_title("ORT CPU latency (1 thread)")
    mem = data["memory"]
    ax2.bar(list(mem), [v["step_peak_mb"] for v in mem.values()], label="peak during step")
    ax2.bar(list(mem), [v["rss_before_mb"] for v in mem.values()], label="before step")
    ax2.set_ylabel("MiB RSS")
    ax2.set_title("training step memory")
    ax2.legend()
