"""Where a GPU training step's time goes: PEFT vs lora-fx variants (torch.profiler, one shape).

Usage on the GPU machine: ``PYTHONPATH=. python3 -m benchmarks.gpu.profile_step [llama-8x512|llama-1.1b]
[variants]``, variants comma-separated (default ``peft,lora-fx``; the checkpointing comparison:
``peft+ckpt,lora-fx+ckpt``). Prints, per variant, the wall time of a step, the summed GPU kernel time,
the kernel launches, and the top ops by GPU time.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import llm_variants
from benchmarks import training_gpu as tg


def main(shape: str = "llama-1.1b", variants: str = "peft,lora-fx", steps: int = 3) -> None:
    c, dtype = tg.SHAPES[shape]
    for v in variants.split(","):
        step = llm_variants.setup(tg._variant(v, dtype), c, None, device="cuda")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t) / steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / steps / 1e3
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / steps
        print(f"=== {shape} {v}: wall {wall * 1e3:.1f} ms/step, GPU kernels {gpu:.1f} ms/step, "
              f"{launches:.0f} kernel launches/step")
        print(events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(*sys.argv[1:3])
