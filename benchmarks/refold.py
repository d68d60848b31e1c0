"""Task switching on a deployed file: ``refold_onnx`` vs a fresh ``fold_and_export``.

Both produce the same ONNX file for a new adapter (tested in tests/test_cli.py); refold only rewrites
the adapted initializers of an existing folded export (base weights from the base export), while the
re-export traces nothing but folds, runs the dynamo exporter and writes the file. Goal: refold >= 10x
faster. Variants interleaved, torch at 1 thread (see overhead.py on this shared machine).
"""

from __future__ import annotations

import os
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

NAME = "refold"
GOAL = 10.0


def _adapter_module(gm, seed: int):
    import lora_fx

    lgm = lora_fx.lorafy(gm, "*.c_attn", rank=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return lgm


def run(out: str, smoke: bool = False) -> dict[str, Any]:
    """Measures re-export and refold on GPT-2-small-sized (2 layers with ``smoke``)."""
    import lora_fx
    from lora_fx.examples import zoo_models
    from lora_fx.exporters.refold import refold_onnx

    torch.set_num_threads(1)
    layers, rounds = (2, 2) if smoke else (12, 5)
    model, args, kwargs = zoo_models.gpt2_small_sized(n_layer=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, args, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        first, second = _adapter_module(gm, 1), _adapter_module(gm, 2)
        lora_fx.save_adapter(second, os.path.join(tmp, "new"))
        base = lora_fx.fold_and_export(lora_fx.lorafy(gm, "*.c_attn", rank=8), os.path.join(tmp, "base.onnx"),
                                       verify=False).path
        task = lora_fx.fold_and_export(first, os.path.join(tmp, "task.onnx"), verify=False).path
        log(f"{NAME}: {layers} layers, {rounds} interleaved rounds")
        times = interleaved({
            "re-export": lambda: lora_fx.fold_and_export(second, os.path.join(tmp, "re.onnx"), verify=False),
            "refold": lambda: refold_onnx(task, os.path.join(tmp, "new"), os.path.join(tmp, "rf.onnx"),
                                          base_onnx=base),
        }, rounds=rounds)
        size_mb = os.path.getsize(task) / 2**20
    speedup = Stats.of(paired_ratios(times["re-export"], times["refold"]))
    data = {"benchmark": NAME, "env": environment(), "layers": layers, "file_mb": size_mb, "smoke": smoke,
            "seconds": {k: Stats.of(v).as_dict() for k, v in times.items()}, "samples": times,
            "speedup": speedup.as_dict(), "goal": GOAL, "verdict": verdict(speedup.median, GOAL, None)}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    s = data["seconds"]
    sp = data["speedup"]
    rows = [[k, f"{v['median']:.2f} [{v['q1']:.2f}, {v['q3']:.2f}]"] for k, v in s.items()]
    lines = ["## Task switching: refold an export vs re-export", "", env_line(data["env"]), "",
             f"GPT-2-small-sized, {data['layers']} layers, r=8 on `c_attn`, inline ONNX file of "
             f"{data['file_mb']:.0f} MiB. Seconds, median [IQR] over interleaved rounds.", "",
             md_table(["variant", "seconds"], rows), "",
             f"- Goal refold >= {GOAL:.0f}x faster than re-export: measured {sp['median']:.1f}x "
             f"[{sp['q1']:.1f}, {sp['q3']:.1f}] -> {data['verdict']}.",
             "- refold is I/O bound: it reads the task and base files and writes a new one (protobuf "
             "parse/serialize of every initializer); the exporter work it saves is what remains of the "
             "re-export time. Patching an external-data file in place would be the way to go further."]
    return "\n".join(lines)


def _plot(fig, data: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    names = list(data["samples"])
    ax.boxplot([data["samples"][n] for n in names], tick_labels=names)
    ax.set_ylabel("seconds")
    ax.set_title(f"refold vs re-export ({data['speedup']['median']:.1f}x)")
