"""What both demos share: printing, progress, phase clocks, threads and the optional-package check."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import LoraFxError

__all__ = ["Clock", "DemoError", "default_threads", "machine", "progress", "say", "setup"]


class DemoError(LoraFxError, RuntimeError):
    """A demo cannot run here (missing optional package or weights)."""


def say(text: str = "") -> None:
    """One line of the demo's report on stdout, flushed (the demos run for minutes)."""
    print(text, flush=True)


def default_threads() -> int:
    """One core left free: ``min(2, cores - 1)`` (at least 1), and 1 when the machine is already busy.

    Intra-op threads wait for each other at every op, so one thread that loses its core stalls all of
    them: with 2 threads on 2 cores, another process taking a core mid-run slowed training 10x
    (637 s vs 63 s), and with a load average of ~7 a MiniLM step took 0.25 s on one thread and 1.4 s on
    two. Leaving a core free bounds that loss to the free core's share.
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if load >= cores else max(1, min(2, cores - 1))


def setup(threads: int | None, seed: int, extra: str) -> int:
    """Offline, quiet Hugging Face; torch threads and seeds. Returns the thread count.

    Raises:
        DemoError: transformers is missing (``pip install 'lora-fx[<extra>]'`` installs it).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError as e:
        raise DemoError(f"the demo needs transformers: pip install 'lora-fx[{extra}]' ({e})") from e
    return threads


def machine() -> dict[str, Any]:
    """When and where a run happened (stored with its numbers: timings mean little without it)."""
    import platform

    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cores": os.cpu_count(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__}


class Clock:
    """Wall and CPU seconds of consecutive phases (CPU time shows the cost on a loaded machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self._t, self._c = self.start, self.cpu_start

    def lap(self, name: str) -> float:
        """Ends the phase ``name`` (started at the previous lap); returns its wall seconds."""
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = t - self._t, c - self._c
        self._t, self._c = t, c
        return self.wall[name]


def progress(total: int, desc: str) -> Callable[..., None]:
    """A progress bar: tqdm on a terminal; else a plain line per ~10% (no carriage returns in logs).

    Returns ``update(n, **postfix)``: ``n`` more items done, ``postfix`` shown beside the count.
    """
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

        def update(n: int, **post: Any) -> None:
            bar.update(n)
            if post:
                bar.set_postfix(**post)
            if bar.n >= total:
                bar.close()
        return update
    state = {"done": 0, "shown": -1, "t": time.perf_counter()}

    def update_plain(n: int, **post: Any) -> None:
        state["done"] += n
        tenth = 10 * state["done"] // max(total, 1)
        if tenth != state["shown"] or state["done"] >= total:
            state["shown"] = tenth
            extra = " ".join(f"{k}={v}" for k, v in post.items())
            print(f"  {desc}: {state['done']}/{total} ({time.perf_counter() - state['t']:.0f}s) {extra}".rstrip(),
                  file=sys.stderr, flush=True)
    return update_plain
