"""The LLM demo's held-out exact match per deployment path (issue #26 item 4), on the real SmolLM2-135M-Instruct.

The demo's training (:mod:`lora_fx.demos.llm`: ``LlmDemoConfig()``, r=16 on the 7 projections, 50 steps x 8
(``--steps``), answer-only loss), then greedy exact match on its 48 held-out messages with the demo's ``evaluate`` (batches
of 16, left-padded, 16 new tokens) for:

* Hugging Face ``generate`` on the merged fp32 model (the reference);
* the fp32 export: ``fold_and_export(lgm, "fp32/model.onnx", kv_cache=True)`` (the default path: the
  model builder's graph for SmolLM2), run by :class:`lora_fx.OnnxGenerator`;
* lora-fx's own int4 default: ``kv_cache=True, quantize="int4", backend="torch_onnx"``;
* the builder's int4: ``kv_cache=True, quantize="int4"`` (the default path for SmolLM2);
* ``--torch-fp32`` adds lora-fx's own fp32 graph (``backend="torch_onnx"``).

Each file's answers are also compared token for token with the reference's. The trained adapter is kept in
``--adapter`` (trained when absent), so a second run only exports and evaluates::

    python -m benchmarks.llm_em --adapter /tmp/llm_em_adapter   # -> benchmarks/results/llm_em.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from .common import RESULTS_DIR, env_line, environment, log, md_table, quiet

# name -> (fold_and_export keywords, what it is)
PATHS = {
    "fp32": ({}, "fp32 export, default path"),
    "int4_builder": ({"quantize": "int4"}, "the builder's int4 (default path)"),
    "int4_lorafx": ({"quantize": "int4", "backend": "torch_onnx"}, "lora-fx's own int4 default (torch_onnx)"),
    "fp32_torch_onnx": ({"backend": "torch_onnx"}, "lora-fx's own fp32 graph (torch_onnx)"),
}


def _model_and_adapter(adapter: str, threads: int, steps: int) -> tuple:
    import lora_fx
    from lora_fx.demos import llm as demo
    from lora_fx.examples.orders import make_dataset

    cfg = demo.LlmDemoConfig(steps=steps)
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tokenizer, model = demo.load_smollm2()
    train_set, test_set = make_dataset(cfg.n_train, cfg.n_test, seed=0)
    ids, _ = demo._training_batch(tokenizer, train_set[:2])
    gm = lora_fx.trace(model, (ids,))
    record = os.path.join(adapter, "train_record.json")
    if os.path.exists(record):
        lgm = lora_fx.load_adapter(gm, adapter)
        with open(record) as f:
            rec = json.load(f)
    else:
        lgm = lora_fx.lorafy(gm, list(cfg.targets), rank=cfg.rank, alpha=cfg.alpha)
        t = time.perf_counter()
        losses = demo.train(lgm, tokenizer, train_set, cfg, seed=0)
        rec = {"env": environment(), "config": dict(cfg.__dict__), "losses": losses,
               "train_seconds": time.perf_counter() - t}
        lora_fx.save_adapter(lgm, adapter)
        with open(record, "w") as f:
            json.dump(rec, f, indent=2)
    log(f"adapter: {cfg.steps} steps x {cfg.batch}, final loss {rec['losses'][-1]:.4f}")
    return cfg, tokenizer, lgm, test_set, rec


def measure(ns) -> dict:
    import lora_fx
    from lora_fx.demos import llm as demo

    env = environment()
    cfg, tokenizer, lgm, test_set, rec = _model_and_adapter(ns.adapter, ns.threads, ns.steps)
    ev = demo.evaluate(demo.hf_generate(lora_fx.merged_model(lgm)), tokenizer, test_set,
                       max_new_tokens=cfg.max_new_tokens, desc="HF generate, merged")
    res = {"benchmark": "llm_em", "env": env, "train_env": rec["env"], "config": rec["config"],
           "final_loss": rec["losses"][-1], "n_test": len(test_set),
           "reference": {"em": ev.exact_match, "preds": ev.predictions, "eval_seconds": ev.seconds}, "paths": {}}
    log(f"HF generate on the merged model: exact match {ev.exact_match:.3f}")
    names = [n for n in PATHS if n != "fp32_torch_onnx" or ns.torch_fp32]
    with tempfile.TemporaryDirectory(prefix="llm_em_") as tmp:
        for name in names:
            kwargs, what = PATHS[name]
            path = os.path.join(tmp, name, "model.onnx")
            os.makedirs(os.path.dirname(path))
            t = time.perf_counter()
            rep = lora_fx.fold_and_export(lgm, path, kv_cache=True, tokenizer=tokenizer, **kwargs)
            seconds = time.perf_counter() - t
            gen = lora_fx.OnnxGenerator(path, threads=ns.threads)
            got = demo.evaluate(lambda i, m, n, g=gen: g.generate(i, m, max_new_tokens=n), tokenizer, test_set,
                                max_new_tokens=cfg.max_new_tokens, desc=name)
            same = sum(a == b for a, b in zip(got.tokens, ev.tokens, strict=True))
            res["paths"][name] = {"what": what, "backend": rep.backend, "em": got.exact_match, "same_tokens": same,
                                  "export_seconds": seconds, "verified": bool(rep.verification.ok),
                                  "mib": os.path.getsize(path + ".data") / 2**20 if os.path.exists(path + ".data")
                                  else os.path.getsize(path) / 2**20,
                                  "preds": got.predictions, "eval_seconds": got.seconds}
            log(f"{name} ({rep.backend}): exact match {got.exact_match:.3f}, {same}/{len(test_set)} answers "
                f"token-equal to HF, export {seconds:.0f}s")
            del gen
            env["loadavg_end"] = list(os.getloadavg())
            write(ns.out, res)  # each path as it is measured
    return res


def write(out: str, res: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "llm_em.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "llm_em.md"), "w") as f:
        f.write(render(res) + "\n")


def render(res: dict) -> str:
    ref = res["reference"]
    rows = [["Hugging Face `generate`, merged fp32 model (reference)", "-", f"{ref['em']:.3f}", "-", "-", "-"]]
    for p in res["paths"].values():
        rows.append([p["what"], p["backend"], f"**{p['em']:.3f}** ({p['em'] - ref['em']:+.3f})",
                     f"{p['same_tokens']}/{res['n_test']}", f"{p['mib']:.0f}", f"{p['export_seconds']:.0f}"])
    c = res["config"]
    return "\n".join([
        "## The LLM demo's held-out exact match per deployment path (real SmolLM2-135M-Instruct)", "",
        "Training: " + env_line(res["train_env"]), "", "Exports and evaluation: " + env_line(res["env"]), "",
        f"`lora-fx demo llm`'s training (r={c['rank']} on the 7 projections, {c['steps']} steps x {c['batch']}, final "
        f"loss {res['final_loss']:.4f}); greedy exact match over the {res['n_test']} held-out messages with the demo's "
        "`evaluate` (batches of 16, left-padded, 16 new tokens); ONNX files run by `lora_fx.OnnxGenerator` "
        "(a builder file takes the padded batch packed to the front). Export seconds include the verification; "
        "the machine is shared by four engineers (timings noisy).", "",
        md_table(["path", "backend", "held-out exact match (vs reference)", "answers token-equal to reference",
                  "weights MiB", "export s"], rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--adapter", required=True, help="folder for the trained adapter (trained when absent)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=50, help="training steps (the demo's: 50)")
    p.add_argument("--torch-fp32", action="store_true", help="also lora-fx's own fp32 graph (backend torch_onnx)")
    p.add_argument("--out", default=RESULTS_DIR)
    ns = p.parse_args(argv)
    quiet()
    os.makedirs(ns.adapter, exist_ok=True)
    res = measure(ns)
    write(ns.out, res)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
