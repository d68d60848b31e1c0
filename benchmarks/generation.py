"""Generation benchmark: KV-cache exports in ONNX Runtime, and ORT generation vs Hugging Face ``generate``.

Model: a random Llama shaped like SmolLM2-135M (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab
49152, tied embeddings) with fewer layers (export time), LoRA r=16 on q/v with random non-zero B.
Files (all ``fold_and_export(..., kv_cache=True)``): ``base`` = the same model with B = 0 (W + s·0·A
is W exactly, and the graph is the folded graph), ``folded`` (verified against the base export with
cache: structure, prefill and decode numerics), ``unfolded`` (LoRA branches kept).

1. Step latency, ORT CPU, spinning off, sessions interleaved with the order rotated each round:
   *prefill* of P tokens with an empty past, and one *decode* step of one token with a past of P,
   at batch 1 and 8, P in {128, 512}. ``base again`` (a second session on the base file) is the
   noise floor. Goal: folded/base within [0.98, 1.02].
2. Generation: :class:`lora_fx.OnnxGenerator` vs ``model.generate(do_sample=False)`` in PyTorch on the
   merged model (same weights, same threads), 32 new tokens after a 128-token prompt, batch 1 and 8,
   interleaved; time per generated token = wall time / 32 (prefill included). Goal: ORT <= 0.7x PyTorch.
   The generated tokens are compared too.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
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

NAME = "generation"
GOAL_FOLDED = (0.98, 1.02)
GOAL_ORT = (None, 0.7)
VARIANTS = ("base", "folded", "unfolded")
CONTROL = "base_again"


def _model(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=96)
    else:
        cfg = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152)
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, max_position_embeddings=2048, tie_word_embeddings=True, use_cache=False,
                         eos_token_id=2, bos_token_id=1, pad_token_id=2)
    label = "tiny Llama" if smoke else "SmolLM2-135M-shaped Llama, 4 of 30 layers (random weights)"
    return label, LlamaForCausalLM(config).eval()


def _exports(model, folder: str) -> tuple[dict[str, str], dict[str, Any], Any]:
    import lora_fx

    ids = torch.randint(4, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = lora_fx.trace(model, (ids,))
    targets = ["*.q_proj", "*.v_proj"]
    paths = {v: os.path.join(folder, f"{v}.onnx") for v in VARIANTS}
    lora_fx.fold_and_export(lora_fx.lorafy(gm, targets, rank=16, alpha=32), paths["base"], kv_cache=True, verify=False)
    lgm = lora_fx.lorafy(gm, targets, rank=16, alpha=32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm)[1::2]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    rep = lora_fx.fold_and_export(lgm, paths["folded"], kv_cache=True)
    unf = lora_fx.fold_and_export(lgm, paths["unfolded"], kv_cache=True, folded=False, verify=False)
    ver = rep.verification
    info = {"verified": ver.ok, "structure_identical": ver.structure.ok,
            "nodes": {"base": rep.verification.structure.base_nodes, "folded": rep.export.nodes, "unfolded": unf.export.nodes},
            "checks": [{"what": c.shapes, "max_rel_err": c.max_rel_err, "ok": c.ok} for c in ver.numerics]}
    return paths, info, lgm


def _step_feeds(gen, batch: int, past: int, prefill: bool, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    layout = gen.layout
    n_new = past if prefill else 1
    p_len = 0 if prefill else past
    feeds = {"input_ids": rng.integers(4, vocab, (batch, n_new), dtype=np.int64),
             "attention_mask": np.ones((batch, p_len + n_new), dtype=np.int64)}
    for name, (heads, dim) in zip(layout.input_names[2:], [s for kv in layout.kv for s in kv], strict=True):
        feeds[name] = rng.standard_normal((batch, heads, p_len, dim)).astype(np.float32)
    return feeds


def _steps(paths: dict[str, str], threads: int, shapes: list[tuple[int, int]], rounds: int,
           vocab: int) -> list[dict[str, Any]]:
    import lora_fx

    gens = {v: lora_fx.OnnxGenerator(paths[v], threads=threads) for v in VARIANTS}
    gens[CONTROL] = lora_fx.OnnxGenerator(paths["base"], threads=threads)
    rows = []
    for batch, past in shapes:
        for kind in ("prefill", "decode"):
            feeds = _step_feeds(gens["base"], batch, past, kind == "prefill", vocab)
            fns = {v: (lambda g=g, f=feeds: g.session.run(["logits"], f)) for v, g in gens.items()}
            for fn in fns.values():
                fn()
            samples = interleaved(fns, rounds=rounds)
            ratios = {f"{v}/base": paired_ratios(samples[v], samples["base"]) for v in ("folded", "unfolded", CONTROL)}
            rows.append({"kind": kind, "batch": batch, "past": past, "samples_s": samples, "ratio_samples": ratios,
                         "latency_ms": {v: Stats.of([x * 1e3 for x in s]) for v, s in samples.items()},
                         "ratio": {k: Stats.of(r) for k, r in ratios.items()}})
            log(f"{NAME}: {kind} batch {batch} past {past}: folded/base {rows[-1]['ratio']['folded/base'].median:.3f}")
    return rows


def _generation(path: str, lgm, threads: int, batches: tuple[int, ...], prompt: int, new: int, rounds: int,
                vocab: int) -> list[dict[str, Any]]:
    import lora_fx
    from lora_fx.exporters.decoder.capture import merged_model

    gen = lora_fx.OnnxGenerator(path, threads=threads)
    model = merged_model(lgm)
    rows = []
    for batch in batches:
        ids = torch.randint(4, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
        outs: dict[str, torch.Tensor] = {}

        def ort(ids=ids, outs=outs):
            outs["ort"] = gen.generate(ids, max_new_tokens=new, eos_token_id=[])

        def hf(ids=ids, outs=outs):
            with torch.no_grad():
                outs["torch"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                               min_new_tokens=new, do_sample=False, pad_token_id=2,
                                               use_cache=True)  # the traced model has use_cache=False

        ort(), hf()
        samples = interleaved({"ort": ort, "torch": hf}, rounds=rounds)
        per_token = {k: [s / new for s in v] for k, v in samples.items()}
        ratio = paired_ratios(samples["ort"], samples["torch"])
        rows.append({"batch": batch, "prompt": prompt, "new_tokens": new,
                     "same_tokens": bool(torch.equal(outs["ort"], outs["torch"])),
                     "ms_per_token": {k: Stats.of([x * 1e3 for x in v]) for k, v in per_token.items()},
                     "tokens_per_s": {k: batch / Stats.of(v).median for k, v in per_token.items()},
                     "ratio_samples": ratio, "ratio": Stats.of(ratio),
                     "goal": verdict(Stats.of(ratio).median, *GOAL_ORT)})
        log(f"{NAME}: generate batch {batch}: ORT/PyTorch {rows[-1]['ratio'].median:.3f}, same tokens "
            f"{rows[-1]['same_tokens']}")
    return rows


def run(out: str, smoke: bool = False, threads: int = 2, rounds: int | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``generation.{json,md,png}`` into ``out``."""
    rounds = rounds or (2 if smoke else 15)
    shapes = [(1, 8), (2, 16)] if smoke else [(1, 128), (1, 512), (8, 128), (8, 512)]
    env = environment()
    start = time.perf_counter()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    label, model = _model(smoke)
    vocab = model.config.vocab_size
    try:
        with tempfile.TemporaryDirectory() as folder:
            log(f"{NAME}: {label}: exporting base/folded/unfolded with KV cache")
            paths, info, lgm = _exports(model, folder)
            steps = _steps(paths, threads, shapes, rounds, vocab)
            gen_rows = _generation(paths["folded"], lgm, threads, (1, 2) if smoke else (1, 8),
                                   8 if smoke else 128, 4 if smoke else 32, max(2, rounds // 3), vocab)
    finally:
        torch.set_num_threads(torch_threads)
    data = {"benchmark": NAME, "smoke": smoke, "env": env, "model": label, "threads": threads, "rounds": rounds,
            "export": info, "steps": steps, "generation": gen_rows, "seconds": time.perf_counter() - start}
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data)) | {"data": data}


def _markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in data["steps"]:
        lat, rat = r["latency_ms"], r["ratio"]
        fb = rat["folded/base"]
        ok = data["export"]["verified"] and verdict(fb.median, *GOAL_FOLDED) == "MET"
        rows.append([r["kind"], r["batch"], r["past"], lat["base"].fmt(2), fb.fmt(3), rat["unfolded/base"].fmt(3),
                     rat[f"{CONTROL}/base"].fmt(3), "MET" if ok else "MISSED"])
    steps = md_table(["step", "batch", "past / prompt", "base ms", "folded/base", "unfolded/base",
                      "base again/base (noise)", "goal [0.98, 1.02]"], rows)
    grows = [[g["batch"], g["prompt"], g["new_tokens"], g["ms_per_token"]["ort"].fmt(2),
              g["ms_per_token"]["torch"].fmt(2), f"{g['tokens_per_s']['ort']:.1f}", f"{g['tokens_per_s']['torch']:.1f}",
              g["ratio"].fmt(3), "yes" if g["same_tokens"] else "NO", g["goal"]] for g in data["generation"]]
    gen = md_table(["batch", "prompt", "new tokens", "ORT ms/token", "PyTorch ms/token", "ORT tokens/s",
                    "PyTorch tokens/s", "ORT/PyTorch", "same tokens", "goal <= 0.7"], grows)
    e = data["export"]
    return "\n".join([
        "## Generation: KV-cache exports in ONNX Runtime", "", env_line(data["env"]), "",
        f"{data['model']}; LoRA r=16 on q/v; {data['threads']} threads for ORT and torch; {data['rounds']} "
        f"interleaved rounds. Nodes base/folded/unfolded: {e['nodes']['base']} / {e['nodes']['folded']} / "
        f"{e['nodes']['unfolded']}; folded verification {'PASSED' if e['verified'] else 'FAILED'} (structure "
        f"identical to the base export with cache: {e['structure_identical']}; max rel err over prefill/decode "
        f"checks {max(c['max_rel_err'] for c in e['checks']):.1e}).", "",
        "Step latency (prefill: P tokens, empty past; decode: 1 token, past P); median [IQR]:", "", steps, "",
        "Generation (greedy; time per token = wall time / new tokens, prefill included; PyTorch = Hugging Face "
        "`generate` on the merged model):", "", gen, ""])


def _plot(fig, data: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 2, 1)
    series = [r["ratio_samples"]["folded/base"] for r in data["steps"]]
    labels = [f"{r['kind'][:3]} b{r['batch']}\np{r['past']}" for r in data["steps"]]
    ax.boxplot(series, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=6)
    ax.axhspan(*GOAL_FOLDED, color="tab:green", alpha=0.15, label="goal [0.98, 1.02]")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("folded / base latency (per round)")
    ax.set_title("KV-cache steps, ORT CPU", fontsize=9)
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    g = data["generation"]
    xs = np.arange(len(g))
    ax2.bar(xs - 0.2, [r["tokens_per_s"]["ort"] for r in g], 0.4, label="ONNX Runtime (OnnxGenerator)")
    ax2.bar(xs + 0.2, [r["tokens_per_s"]["torch"] for r in g], 0.4, label="PyTorch (HF generate)")
    ax2.set_xticks(xs, [f"batch {r['batch']}" for r in g])
    ax2.set_ylabel("generated tokens / s")
    ax2.set_title("greedy generation, merged model", fontsize=9)
    ax2.legend(fontsize=7)
