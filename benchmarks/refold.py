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
    from lora_fx.switching import refold_onnx

    torch.set_num_threads(1)
    layers, rounds = (2, 2) if smoke else (12, 5)
    model, args, kwargs = zoo_models.gpt2_small_sized(n_layer=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, args, kwargs)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        first, second = _adapter_module(gm, 1), _adapter_module(gm, 2)
        lora_fx.save_adapter(second, os.path.join(tmp, "new"))
        for storage in ("inline", "external"):
            ext = storage == "external"
            d = os.path.join(tmp, storage)
            os.makedirs(d)
            base = lora_fx.fold_and_export(lora_fx.lorafy(gm, "*.c_attn", rank=8), os.path.join(d, "base.onnx"),
                                           verify=False, external_data=ext).path
            task = lora_fx.fold_and_export(first, os.path.join(d, "task.onnx"), verify=False,
                                           external_data=ext).path
            log(f"{NAME}: {storage}, {layers} layers, {rounds} interleaved rounds")
            times = interleaved({
                "re-export": lambda d=d, ext=ext: lora_fx.fold_and_export(
                    second, os.path.join(d, "re.onnx"), verify=False, external_data=ext),
                "refold": lambda d=d, task=task, base=base: refold_onnx(
                    task, os.path.join(tmp, "new"), os.path.join(d, "rf.onnx"), base_onnx=base),
            }, rounds=rounds)
            speedup = Stats.of(paired_ratios(times["re-export"], times["refold"]))
            results[storage] = {"seconds": {k: Stats.of(v).as_dict() for k, v in times.items()}, "samples": times,
                                "speedup": speedup.as_dict(), "verdict": verdict(speedup.median, GOAL, None)}
        size_mb = sum(os.path.getsize(os.path.join(tmp, "external", f)) for f in ("task.onnx", "task.onnx.data")) / 2**20
    data = {"benchmark": NAME, "env": environment(), "layers": layers, "file_mb": size_mb, "smoke": smoke,
            "goal": GOAL, "storage": results}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    rows = []
    for storage, r in data["storage"].items():
        s, sp = r["seconds"], r["speedup"]
        rows.append([storage, f"{s['re-export']['median']:.2f} [{s['re-export']['q1']:.2f}, {s['re-export']['q3']:.2f}]",
                     f"{s['refold']['median']:.2f} [{s['refold']['q1']:.2f}, {s['refold']['q3']:.2f}]",
                     f"{sp['median']:.1f}x [{sp['q1']:.1f}, {sp['q3']:.1f}]", r["verdict"]])
    lines = ["## Task switching: refold an export vs re-export", "", env_line(data["env"]), "",
             f"GPT-2-small-sized, {data['layers']} layers, r=8 on `c_attn`, {data['file_mb']:.0f} MiB of weights; "
             "seconds, median [IQR] over interleaved rounds. `inline`: weights inside the .onnx (refold parses "
             "and re-serializes every initializer); `external`: weights in `.onnx.data` (refold copies the "
             "data file and overwrites only the adapted tensors' bytes).", "",
             md_table(["storage", "re-export s", "refold s", "speed-up", f"goal >= {GOAL:.0f}x"], rows)]
    return "\n".join(lines)


def _plot(fig, data: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    labels, values = [], []
    for storage, r in data["storage"].items():
        for variant in ("re-export", "refold"):
            labels.append(f"{variant}\n{storage}")
            values.append(r["samples"][variant])
    ax.boxplot(values, tick_labels=labels)
    ax.set_ylabel("seconds")
    ax.set_title("refold vs re-export")
