"""int4 on the real SmolLM2-135M-Instruct: held-out exact match of the LLM demo's task, fp32 vs int4.

The demo's training (:mod:`lora_fx.demos.llm`: its loader, batches, ``train`` and ``LlmDemoConfig``;
r=16 on the 7 projections, answer-only loss, AdamW 2e-3, warm-up then linear decay) with
``--steps`` (default 30: held-out exact match >= 0.8, like the demo's 50). Then greedy exact match
on the 48 held-out messages with the demo's ``evaluate`` (Hugging Face ``generate`` on the merged fp32
model), and with
``fold_and_export(lgm, quantize="int4")`` (the default int4: verified, int4 proof against the int4
base, error report) in ONNX Runtime. Further int4 settings (``--variants``) are quantized from one
fp32 folded export with ``quantize_file`` and evaluated the same way (size, logit error against the
fp32 LoRA model, exact match). In ONNX Runtime greedy decoding re-runs the whole sequence per token,
one example at a time (no KV cache, no padding); on this adapter that procedure on the fp32 folded
file gives the same exact match as the demo's evaluation (0.833, README).

Goal: |EM(int4) - EM(fp32)| <= 0.05, and the int4 file <= 0.35x the fp32 file.

Two stages, each < 20 min under the benchmark lock (~2 GB RAM)::

    flock /tmp/lorafx-bench.lock python -m benchmarks.quantize_llm --stage train --adapter /tmp/qllm
    flock /tmp/lorafx-bench.lock python -m benchmarks.quantize_llm --stage eval --adapter /tmp/qllm
    flock /tmp/lorafx-bench.lock python -m benchmarks.quantize_llm --stage variants --adapter /tmp/qllm

``train`` trains, saves the adapter and its record (losses, fp32 exact match) in ``--adapter``;
``eval`` loads them, measures the default int4 and writes ``benchmarks/results/quantize_llm.{json,md}``;
``variants`` adds the other int4 settings to those files (``--variants NAME...``, default all).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from .common import RESULTS_DIR, env_line, environment, log, md_table, quiet

# name -> (QuantizeConfig overrides, what it is); the default int4 is measured through fold_and_export
VARIANTS = {
    "before": ({"ops": ("MatMul",), "head_bits": 4}, "the previous default: every MatMul int4 incl. the tied "
               "lm_head, embedding Gather fp32"),
    "head8_gather_fp32": ({"ops": ("MatMul",)}, "lm_head 8-bit, embedding Gather fp32"),
    "head4_gather4": ({"head_bits": 4}, "every MatMul and the embedding int4"),
    "head_fp32": ({"head_bits": 32}, "lm_head fp32, embedding int4"),
}


def greedy(next_logits, tokenizer, examples, max_new: int = 16) -> tuple[float, list[str]]:
    """Exact match of greedy answers; ``next_logits(ids [1, T] int64) -> logits [V]`` of the last position."""
    from lora_fx.demos.llm import _chat

    right, preds = 0, []
    for message, answer in examples:
        ids = _chat(tokenizer, message)
        out: list[int] = []
        for _ in range(max_new):
            t = int(np.argmax(next_logits(np.array([ids + out], dtype=np.int64))))
            if t == tokenizer.eos_token_id:
                break
            out.append(t)
        preds.append(tokenizer.decode(out, skip_special_tokens=True).strip())
        right += preds[-1] == answer
    return right / len(examples), preds


def _ort_greedy(path: str, tokenizer, examples, threads: int) -> tuple[float, list[str], float]:
    from lora_fx.exporters.verify.ort import ort_session

    sess = ort_session(path, threads=threads, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    t = time.perf_counter()
    em, preds = greedy(lambda a: sess.run(None, {name: a})[0][0, -1], tokenizer, examples)
    return em, preds, time.perf_counter() - t


def _setup(ns):
    import lora_fx
    from lora_fx.demos import llm as demo_llm
    from lora_fx.examples.orders import make_dataset

    cfg = demo_llm.LlmDemoConfig(steps=ns.steps)
    torch.manual_seed(0)
    torch.set_num_threads(ns.threads)
    tokenizer, model = demo_llm.load_smollm2()
    train_set, test_set = make_dataset(cfg.n_train, cfg.n_test, seed=0)
    ids, _ = demo_llm._training_batch(tokenizer, train_set[:2])
    gm = lora_fx.trace(model, (ids,))
    return cfg, tokenizer, gm, train_set, test_set


def train_stage(ns) -> dict:
    import lora_fx
    from lora_fx.demos import llm as demo_llm
    from lora_fx.exporters.decoder.capture import merged_model

    env = environment()
    cfg, tokenizer, gm, train_set, test_set = _setup(ns)
    lgm = lora_fx.lorafy(gm, list(cfg.targets), rank=cfg.rank, alpha=cfg.alpha)
    t = time.perf_counter()
    losses = demo_llm.train(lgm, tokenizer, train_set, cfg, seed=0)
    rec = {"env": env, "config": dict(cfg.__dict__), "losses": losses, "train_seconds": time.perf_counter() - t}
    log(f"trained {cfg.steps} steps x {cfg.batch}: loss {losses[0]:.3f} -> {losses[-1]:.4f} "
        f"({rec['train_seconds']:.0f}s)")
    lora_fx.save_adapter(lgm, ns.adapter)
    t = time.perf_counter()  # the demo's own evaluation: HF greedy generate on the merged fp32 model
    ev = demo_llm.evaluate(demo_llm.hf_generate(merged_model(lgm)), tokenizer, test_set,
                           max_new_tokens=cfg.max_new_tokens)
    rec["em_fp32"], rec["preds_fp32"] = ev.exact_match, ev.predictions
    rec["eval_seconds"] = time.perf_counter() - t
    log(f"fp32 LoRA (PyTorch) held-out exact match {rec['em_fp32']:.3f}")
    rec["env"]["loadavg_end"] = list(os.getloadavg())
    with open(os.path.join(ns.adapter, "train_record.json"), "w") as f:
        json.dump(rec, f, indent=2)
    return rec


def eval_stage(ns) -> dict:
    import lora_fx

    with open(os.path.join(ns.adapter, "train_record.json")) as f:
        rec = json.load(f)
    env = environment()
    cfg, tokenizer, gm, _, test_set = _setup(ns)
    params_mib = sum(p.numel() * p.element_size() for p in gm.parameters()) / 2**20  # tied weights once
    lgm = lora_fx.load_adapter(gm, ns.adapter)
    res = {"benchmark": "quantize_llm", "fp32_params_mib": params_mib, "env": env, "train_env": rec["env"],
           "config": rec["config"],
           "steps": rec["config"]["steps"], "final_loss": rec["losses"][-1], "train_seconds": rec["train_seconds"],
           "n_test": len(test_set), "em_fp32": rec["em_fp32"], "train_note": rec.get("note"), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task4.onnx")
        rep = lora_fx.fold_and_export(lgm, path, quantize="int4")
        q = rep.quantized
        log(str(rep))
        em, preds, secs = _ort_greedy(path, tokenizer, test_set, ns.threads)
        res["default"] = {"config": json.loads(q.config.to_json()), "em": em, "preds": preds, "eval_seconds": secs,
                          "fp32_verified": rep.verification.ok, "int4_proof": q.ok, "changed": len(q.changed),
                          "size_ratio": q.info.bytes / q.info.fp32_bytes, "mib": q.info.bytes / 2**20,
                          "fp32_mib": q.info.fp32_bytes / 2**20, "ops": q.info.quantized, "heads": q.info.heads,
                          "task_err": q.task_err, "base_err": q.base_err, "fold_cost": q.fold_cost,
                          "seconds": dict(rep.seconds)}
        log(f"default int4 (ONNX Runtime) exact match {em:.3f}")
    env["loadavg_end"] = list(os.getloadavg())
    d = res["default"]
    res["em_gap"] = d["em"] - res["em_fp32"]
    res["verdict_em"] = "MET" if abs(res["em_gap"]) <= 0.05 else "MISSED"
    res["verdict_size"] = "MET" if d["size_ratio"] <= 0.35 else "MISSED"
    return res


def variants_stage(ns, res: dict) -> dict:
    """Adds ``ns.variants`` (other int4 settings, quantized from one fp32 folded export) to ``res``."""
    import lora_fx
    from lora_fx.capture import example_inputs
    from lora_fx.exporters.quantize import as_config, quantize_file
    from lora_fx.exporters.quantize.step import quantized_error
    from lora_fx.exporters.verify.numerics import variants as shapes

    env = environment()
    with open(os.path.join(ns.adapter, "train_record.json")) as f:
        res.setdefault("train_note", json.load(f).get("note"))
    _, tokenizer, gm, _, test_set = _setup(ns)
    lgm = lora_fx.load_adapter(gm, ns.adapter)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "task.onnx")
        lora_fx.fold_and_export(lgm, fp32, verify=False)
        args = example_inputs(lgm)[:2]
        for name in ns.variants:
            overrides, what = VARIANTS[name]
            out = os.path.join(tmp, f"{name}.onnx")
            info = quantize_file(fp32, out, as_config("int4", **overrides))
            _, err = quantized_error(out, lgm, shapes(*args))
            em, _, secs = _ort_greedy(out, tokenizer, test_set, ns.threads)
            res["variants"][name] = {"what": what, "config": json.loads(info.config.to_json()), "em": em,
                                     "mib": info.bytes / 2**20, "size_ratio": info.bytes / info.fp32_bytes,
                                     "ops": info.quantized, "task_err": err, "eval_seconds": secs}
            log(f"{name}: exact match {em:.3f}, {info.bytes / 2**20:.0f} MiB, logit rel. RMS {err['rms']:.3f}")
            os.remove(out)
    env["loadavg_end"] = list(os.getloadavg())
    res["variants_env"] = env
    return res


def render(res: dict) -> str:
    d, env, tenv = res["default"], res["env"], res["train_env"]
    rows = [["fp32 LoRA (PyTorch, merged; the demo's evaluate)", f"{res['em_fp32']:.3f}", "-", f"{d['fp32_mib']:.0f} (fp32 folded file)",
             "-", "-"],
            ["**int4 default** (fold_and_export, proved)", f"**{d['em']:.3f}** ({d['em']-res['em_fp32']:+.3f}: "
             f"{res['verdict_em']})", f"{d['task_err']['rms']:.3f} (base {d['base_err']['rms']:.3f}, fold cost "
             f"{d['fold_cost']:.2f}x)", f"{d['mib']:.0f}", f"**{d['size_ratio']:.3f}x** ({res['verdict_size']})",
             "PASSED" if d["int4_proof"] and d["fp32_verified"] else "FAILED"]]
    for name, v in res["variants"].items():
        rows.append([f"{name}: {v['what']}", f"{v['em']:.3f} ({v['em'] - res['em_fp32']:+.3f})",
                     f"{v['task_err']['rms']:.3f}", f"{v['mib']:.0f}", f"{v['size_ratio']:.3f}x", "-"])
    c = d["config"]
    return "\n".join([
        "## int4 on the real SmolLM2-135M-Instruct (the LLM demo's order-desk task)", "",
        "Training: " + env_line(tenv) + (f" ({res['train_note']})" if res.get("train_note") else ""), "",
        "Evaluation: " + env_line(env), "",
        f"The demo's training (`lora_fx.demo_llm.train`, LoRA r=16 on the 7 projections, {res['steps']} steps x "
        f"{res['config']['batch']}, final loss {res['final_loss']:.4f}); held-out greedy exact match over "
        f"{res['n_test']} unseen-frame/unseen-city messages (no KV cache, batch 1). Default int4: MatMulNBits block "
        f"{c['block_size']}, {'symmetric' if c['symmetric'] else 'asymmetric'}, RTN; output head (the tied lm_head) "
        f"{c['head_bits']}-bit; embedding Gather int4 (GatherBlockQuantized). Logit error: relative RMS against the "
        "unmerged fp32 LoRA model on the example inputs.", "",
        md_table(["", "held-out exact match", "logit error (rel. RMS)", "file MiB", "x fp32 file", "proof"], rows),
        "", _fp32_file_note(d, res)])


def _fp32_file_note(d: dict, res: dict) -> str:
    """What the fp32 file holds next to the model's parameters (a tied embedding stored once or twice)."""
    params = res["fp32_params_mib"]
    twice = d["fp32_mib"] > 1.1 * params
    how = ("stores the tied 49152 x 576 embedding twice (the Gather's rows and the lm_head MatMul's transposed "
           "copy)" if twice else "stores the tied embedding once (the lm_head reads it through a Transpose node)")
    return (f"The fp32 folded file ({d['fp32_mib']:.0f} MiB) {how}; the model's fp32 parameters are {params:.0f} "
            f"MiB, so the default int4 file is {d['mib'] / params:.3f}x those.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["train", "eval", "variants"], required=True)
    p.add_argument("--adapter", required=True, help="folder for the trained adapter and its record")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=RESULTS_DIR)
    ns = p.parse_args(argv)
    quiet()
    if ns.stage == "train":
        train_stage(ns)
        return 0
    if ns.stage == "eval":
        res = eval_stage(ns)
    else:
        with open(os.path.join(ns.out, "quantize_llm.json")) as f:
            res = variants_stage(ns, json.load(f))
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "quantize_llm.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = render(res)
    with open(os.path.join(ns.out, "quantize_llm.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
