"""Shared helpers for the benchmarks: environment record, interleaved timing, statistics, output files.

Every benchmark writes three files into its output folder: ``<name>.json`` (all raw samples and
summaries plus the environment), ``<name>.md`` (a README-ready table and a plain verdict per goal)
and ``<name>.png`` (a matplotlib plot, Agg backend).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict[str, Any]:
    """Date (UTC), library versions, CPU model and core count: stored with every result."""
    import torch

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's kernels use
        "cpu_bf16": _cpu_has_bf16(),  # bf16 dot-product instructions (AVX512-BF16 / AMX): fast bf16 GEMMs
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # The machine is shared: 1/5/15-minute load averages say how contended the run was.
        "loadavg_start": list(os.getloadavg()),
    }
    for mod in ("onnxruntime", "onnx", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # optional: a missing library is recorded, not fatal
            info[mod] = None
    return info


def _cpu_has_bf16() -> bool | None:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) if flags else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Stats:
    """Robust summary of a list of samples: median, quartiles, extremes."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        """Summarise ``samples`` (at least one value)."""
        xs = sorted(float(x) for x in samples)
        if len(xs) == 1:
            return cls(xs[0], xs[0], xs[0], xs[0], xs[0], 1)
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(statistics.median(xs), q[0], q[2], xs[0], xs[-1], len(xs))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max, "n": self.n}

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        """``median [q1, q3]`` with ``digits`` decimals, values multiplied by ``scale``."""
        m, a, b = self.median * scale, self.q1 * scale, self.q3 * scale
        return f"{m:.{digits}f} [{a:.{digits}f}, {b:.{digits}f}]"


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """``items`` rotated by ``round_index``: each variant takes each position equally often."""
    k = round_index % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, inner: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Times each callable ``inner`` times per round, variants round-robin with the order rotated.

    Returns per variant one sample per round: the mean seconds of that round's ``inner`` calls, so
    samples of the same round index are paired (taken close in time) and their ratios are fair under
    drifting machine load. ``cpu`` (optional) receives the same samples in process CPU seconds
    (user + system): with one torch thread, the time the step computed, less sensitive to other
    processes taking the cores than the wall clock.
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    for r in range(rounds):
        for name in rotated(names, r):
            fn = fns[name]
            c, t = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            out[name].append((time.perf_counter() - t) / inner)
            if cpu is not None:
                cpu[name].append((time.process_time() - c) / inner)
    return out


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]``."""
    return [a / b for a, b in zip(num, den, strict=True)]


def trim() -> None:
    """Collects garbage and returns freed heap to the OS (``malloc_trim``), so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``); -1 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> None:
    """Resets the kernel's peak-RSS mark (``VmHWM``) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def logits_of(out: Any) -> Any:
    """The logits of a model output (HF ``ModelOutput``, dict, tuple or a tensor)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0] if isinstance(out, (tuple, list)) else out


def lm_step(net: Any, params: list, ids: Any) -> Callable[[], float]:
    """One causal-LM training step of ``net`` on ``ids``: ``AdamW(lr=1e-4)`` over ``params``, cross
    entropy on shifted fp32 logits computed outside the model (the same for every variant). The
    returned function runs zero_grad, forward, loss, backward, optimizer step and returns the loss;
    its ``trainable`` attribute counts the parameters it trains."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # none: a no-LoRA floor (backward only)

    def step() -> float:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        logits = logits_of(net(ids)).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if opt is not None:
            opt.step()
        return float(loss.detach())

    step.trainable = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def run_children(module: str, variants: Sequence[str], args: Sequence[str] = (),
                 parallel: bool = False, timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Runs ``python -m <module> --child <variant> <args>`` per variant (one at a time unless
    ``parallel``: concurrent children share the memory bandwidth); each prints one JSON line last.
    Returns variant -> that JSON. Raises RuntimeError with the child's stderr when one fails or runs
    past ``timeout`` seconds (then it is killed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def start(v: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", module, "--child", v, *args], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def collect(proc: subprocess.Popen, v: str) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"{module} child for {v} did not finish in {timeout:.0f} s (killed)") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{module} child for {v} failed ({proc.returncode}):\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    if parallel:
        procs = {v: start(v) for v in variants}
        return {v: collect(p, v) for v, p in procs.items()}
    return {v: collect(start(v), v) for v in variants}


def child_main(description: str, variants: Sequence[str], child: Callable[[str, bool], dict[str, Any]]) -> None:
    """``__main__`` of a benchmark's child process: ``--child VARIANT [--smoke] [--threads N]``; prints
    ``child(variant, smoke)`` as one JSON line."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--child", choices=variants, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    quiet()
    print(json.dumps(child(ns.child, ns.smoke)), flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``; collects garbage first so earlier work does not bill this call."""
    gc.collect()
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def verdict(value: float, lo: float | None, hi: float | None) -> str:
    """``MET`` when ``lo <= value <= hi`` (None = unbounded), else ``MISSED``."""
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    return "MET" if ok else "MISSED"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def env_line(env: dict[str, Any]) -> str:
    """One markdown line describing where and when a result was measured."""
    return (f"Measured {env['date_utc']} UTC on {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, "
            f"onnxruntime {env.get('onnxruntime')}, transformers {env.get('transformers')}, "
            f"peft {env.get('peft')}, Python {env['python']}; load average (1 min) {_load(env)} "
            f"on {env['cpu_count']} cores (shared machine).")


def _load(env: dict[str, Any]) -> str:
    start = env.get("loadavg_start") or [float("nan")]
    end = env.get("loadavg_end") or start
    return f"{start[0]:.1f} at start, {end[0]:.1f} at end"


def out_dir(path: str | None) -> str:
    """The output folder (default ``benchmarks/results``), created if needed."""
    path = os.path.abspath(path or RESULTS_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def write_outputs(out: str, name: str, data: dict[str, Any], markdown: Callable[[], str],
                  plot: Callable[[Any], None]) -> dict[str, str]:
    """Writes ``<name>.json``, ``<name>.md`` (``markdown()``) and ``<name>.png`` (``plot(fig)`` draws it).

    The end-of-run load average is added to ``data["env"]`` before ``markdown`` is called.
    ``plot`` receives a matplotlib ``Figure``; it adds its own axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {ext: os.path.join(out, f"{name}.{ext}") for ext in ("json", "md", "png")}
    if "env" in data and "loadavg_end" not in data["env"]:  # kept when re-rendering an old result
        data["env"]["loadavg_end"] = list(os.getloadavg())
    text = markdown().rstrip() + "\n"  # before any file is opened: a failing table leaves old files intact
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(text)
    fig = plt.figure(figsize=(8, 4.5), dpi=110)
    try:
        plot(fig)
        fig.tight_layout()
        fig.savefig(paths["png"])
    finally:
        plt.close(fig)
    return paths


def load_results(path: str) -> dict[str, Any]:
    """Reads a result JSON back, turning summary dicts into :class:`Stats` again (for re-rendering)."""
    keys = set(Stats.__dataclass_fields__)

    def revive(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == keys:
                return Stats(**obj)
            return {k: revive(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [revive(v) for v in obj]
        return obj

    with open(path) as f:
        return revive(json.load(f))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Stats):
        return obj.as_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    return str(obj)


def quiet() -> None:
    """Silence warnings and library chatter that would bury the benchmark output."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def log(msg: str) -> None:
    """Progress line with a timestamp (stdout, flushed)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
