"""Smoke runs of every benchmark (``--smoke``: tiny models, into tmp_path).

They check the plumbing and the output files (JSON keys, markdown table, PNG), never the timings:
smoke numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import quiet  # noqa: E402


def _run(name: str, out: str) -> dict:
    import importlib

    quiet()
    module = importlib.import_module(f"benchmarks.{name}")
    paths = module.run(out, smoke=True)
    for ext in ("json", "md", "png"):
        path = os.path.join(out, f"{name}.{ext}")
        assert paths[ext] == path
        assert os.path.getsize(path) > 0, path
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["json"]) as f:
        data = json.load(f)
    with open(paths["md"]) as f:
        md = f.read()
    assert data["benchmark"] == name and data["smoke"] is True
    assert {"date_utc", "torch", "onnxruntime", "cpu", "cpu_count"} <= set(data["env"])
    assert md.startswith("## ") and "|---|" in md and data["env"]["torch"] in md
    return {"data": data, "md": md}


def _stats(d: dict) -> None:
    assert {"median", "q1", "q3", "min", "max", "n"} <= set(d)
    assert d["min"] <= d["q1"] <= d["median"] <= d["q3"] <= d["max"]


def test_inference_smoke(tmp_path):
    r = _run("inference", str(tmp_path))
    (model,) = r["data"]["models"]
    assert set(model["latency_ms"]) == {"plain", "peft", "lorafx", "lorafx_ort", "unfolded", "plain_again"}
    assert set(model["ratio"]) == {"peft/plain", "lorafx/plain", "lorafx_ort/plain", "unfolded/plain", "plain_again/plain"}
    for s in [*model["latency_ms"].values(), *model["ratio"].values()]:
        _stats(s)
    assert model["verified"] == model["structure_identical"] == {"lorafx": True, "lorafx_ort": True}
    nodes = model["nodes"]
    assert nodes["lorafx"] <= nodes["plain"] and nodes["lorafx_ort"] < nodes["lorafx"] < nodes["unfolded"]
    same = model["same_graph_as_plain"]  # the default export is the plain export's graph, node for node
    assert same["lorafx"] and same["peft"] and not same["unfolded"] and not same["lorafx_ort"]
    assert model["goal"]["verdict"] in ("MET", "MISSED")
    assert "lorafx/plain" in r["md"]


def test_training_smoke(tmp_path):
    r = _run("training", str(tmp_path))
    d = r["data"]
    assert set(d["step_s"]) == set(d["memory"]) == {"lora-fx", "peft", "full"}
    for s in [*d["step_s"].values(), *d["ratios"].values()]:
        _stats(s)
    assert d["trainable"]["lora-fx"] == d["trainable"]["peft"] < d["trainable"]["full"]
    for m in d["memory"].values():
        assert m["peak_mb"] >= m["rss_setup_mb"] > 0
    assert set(d["goals"]) == {"time lora-fx/peft", "time lora-fx/full", "memory lora-fx/full"}
    assert "VmHWM" in r["md"]


def test_overhead_smoke(tmp_path):
    r = _run("overhead", str(tmp_path))
    d = r["data"]
    assert [s["n_layer"] for s in d["sizes"]] == [1]
    assert len(d["skipped"]) == 1 and d["skipped"][0].startswith("2 layers")  # over the smoke budget
    for s in d["sizes"]:
        assert set(s["seconds"]) == {"trace", "lorafy", "fold", "fold_and_export", "fold_and_export_verified",
                                     "plain_export", "plain_export_again"}
        _stats(s["export_ratio"])
        _stats(s["verified_ratio"])
        _stats(s["noise_ratio"])  # the control: the plain export timed twice
    assert len(d["goals"]) == 2 and "Skipped" in r["md"] and "noise control" in r["md"]
    export_goal = d["goals"]["fold_and_export/plain <= 1.1"]
    assert export_goal["noise_max"] >= 1 and export_goal["verdict"] in ("MET", "MISSED", "WITHIN NOISE")


def test_precision_smoke(tmp_path):
    r = _run("precision", str(tmp_path))
    d = r["data"]
    assert {(c["dtype"], c["delta_std"]) for c in d["cases"]} == {(t, s) for t in ("fp32", "fp16", "bf16")
                                                                  for s in (1e-3, 1e-4)}
    for c in d["cases"]:
        assert c["lora-fx"]["correctly_rounded"]["min"] == 1.0  # exact property, not a timing
        assert 0.0 <= c["naive"]["correctly_rounded"]["median"] <= 1.0
    assert d["goal_lora_fx_correctly_rounded"]["verdict"] == "MET"


def test_refold_smoke(tmp_path):
    r = _run("refold", str(tmp_path))
    d = r["data"]
    assert set(d["storage"]) == {"inline", "external"}
    for r in d["storage"].values():
        assert set(r["seconds"]) == {"re-export", "refold"} and r["verdict"] in ("MET", "MISSED")
        assert len(r["samples"]["refold"]) == len(r["samples"]["re-export"]) == 2


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for name in ("inference", "training", "training_llm", "overhead", "precision", "all", "--smoke", "--out"):
        assert name in proc.stdout


@pytest.mark.slow  # four KV-cache exports: ~1 min
def test_generation_smoke(tmp_path):
    r = _run("generation", str(tmp_path))
    d = r["data"]
    assert d["export"]["verified"] and d["export"]["structure_identical"]
    assert d["export"]["nodes"]["folded"] == d["export"]["nodes"]["base"] < d["export"]["nodes"]["unfolded"]
    assert [(s["kind"], s["batch"], s["past"]) for s in d["steps"]] == [
        ("prefill", 1, 8), ("decode", 1, 8), ("prefill", 2, 16), ("decode", 2, 16)]
    for s in d["steps"]:
        assert set(s["ratio"]) == {"folded/base", "unfolded/base", "base_again/base"}
        _stats(s["ratio"]["folded/base"])
    assert [g["batch"] for g in d["generation"]] == [1, 2]
    assert all(g["same_tokens"] for g in d["generation"])
    assert "ORT/PyTorch" in r["md"]


@pytest.mark.slow  # ~30 s of CPU: three training-step measurements and four ONNX files
def test_quantize_smoke(tmp_path):
    r = _run("quantize", str(tmp_path))
    d = r["data"]
    assert set(d["quantized"]) == {"int4", "int8 dynamic", "int8 weight-only"}
    for q in d["quantized"].values():
        assert q["proof"] and q["changed"] > 0 and 0 < q["size_ratio"] < 1
        assert q["task_err"]["rms"] > 0 and q["fold_verdict"] in ("MET", "MISSED")
    assert d["quantized"]["int4"]["ops"] == {"MatMulNBits": 15, "GatherBlockQuantized": 1}  # + the embedding
    assert set(d["latency"]) == {"fp32", "int4", "int8 dynamic", "int8 weight-only", "fp32 (control)"}
    for v in d["latency"].values():
        _stats(v["ratio"])
    assert set(d["memory"]) == {"bf16 LoRA", "QLoRA nf4", "QLoRA int8"}
    assert all(m["step_peak_mb"] >= m["rss_before_mb"] > 0 for m in d["memory"].values())
    assert "fold cost" in r["md"] and "peak vs bf16 LoRA" in r["md"]


@pytest.mark.slow  # one subprocess per variant: ~1 min
def test_training_llm_smoke(tmp_path):
    from benchmarks import training_llm

    quiet()
    variants = ("peft", "peft+ckpt", "lora-fx", "lora-fx+ckpt", "floor")
    bf16 = ("lora-fx-bf16" + training_llm.SMALL,)
    gqa = ("peft" + training_llm.GQA, "lora-fx" + training_llm.GQA)
    real = ("lora-fx" + training_llm.SMOLLM2,) if training_llm.has_smollm2() else ()  # the real model, smoke batch
    paths = training_llm.run(str(tmp_path), smoke=True, variants=variants, bf16=bf16, gqa=gqa, smollm2=real)
    with open(paths["json"]) as f:
        d = json.load(f)  # what a user reads (in memory the summaries are Stats objects)
    assert d["variants"] == list(variants) and set(d["memory"]) == set(variants + bf16 + gqa + real)
    assert not d["failed"] and all("error" not in m for m in d["memory"].values())
    for s in [*d["step_s"].values(), *d["ratios"].values(), *d["cpu_ratios"].values(), *d["step_vs_peft"].values()]:
        _stats(s)
    assert len({d["trainable"][v] for v in variants if v != "floor"}) == 1 and d["trainable"]["floor"] == 0
    assert set(d["goals"]) == {"memory lora-fx+ckpt / peft+ckpt", "time lora-fx+ckpt / peft+ckpt",
                               "time lora-fx / peft"}  # the compile goal needs the compile variant
    with open(paths["md"]) as f:
        text = f.read()
    assert "| lora-fx+ckpt |" in text and f"| {bf16[0]} |" in text and "Floor (no LoRA" in text
    assert f"| {gqa[1]} |" in text and "Grouped-query attention" in text
    assert all(f"| {v} |" in text for v in real)


@pytest.mark.slow  # ~20 s (a trace, plots)
def test_training_gpu_smoke(tmp_path):
    """The GPU benchmark's smoke shape runs on the CPU where there is no GPU (no memory then); every
    variant it names is set up by training_llm's builder and timed against PEFT."""
    from benchmarks import training_gpu

    quiet()
    variants = ("peft", "peft#2", "lora-fx", "floor")
    paths = training_gpu.run(str(tmp_path), smoke=True, variants=variants)
    with open(paths["json"]) as f:
        d = json.load(f)
    (shape,) = d["shapes"].values()
    assert not shape["failed"] and list(shape["step_vs_peft"]) == list(variants)
    for s in shape["step_vs_peft"].values():
        _stats(s)
    assert shape["trainable"]["peft"] == shape["trainable"]["lora-fx"] > 0 == shape["trainable"]["floor"]
    gpu = d["device"] == "cuda"
    assert all((m is not None) == gpu for m in shape["memory_mb"].values())
    assert shape["goals"]["time lora-fx / peft"]["value"] is not None
    assert shape["goals"]["time lora-fx+compile / peft"]["verdict"] == "NOT MEASURED"
    with open(paths["md"]) as f:
        assert "| peft#2 |" in f.read()


def test_dispatch_smoke(tmp_path):
    """The dispatch-bound step: every variant set up by training_llm's builder, the same trainable
    parameters for PEFT and lora-fx, checkpointed variants paired with PEFT + checkpointing."""
    from benchmarks import dispatch

    quiet()
    paths = dispatch.run(str(tmp_path), smoke=True)
    with open(paths["json"]) as f:
        d = json.load(f)
    shape = d["shape"]
    assert not shape["failed"] and list(shape["step_vs_peft"]) == list(dispatch.VARIANTS)
    assert shape["trainable"]["peft"] == shape["trainable"]["lora-fx"] == shape["trainable"]["lora-fx+ckpt"] > 0
    for s in shape["step_vs_peft"].values():
        _stats(s)
    assert set(d["goals"]) == set(dispatch.GOALS) and all(g["value"] > 0 for g in d["goals"].values())
    with open(paths["md"]) as f:
        assert "| lora-fx+ckpt |" in f.read()


@pytest.mark.slow  # spawns a child per measurement (tiny Llamas): minutes on a busy 2-core machine
def test_scale_smoke(tmp_path):
    r = _run("scale", str(tmp_path))
    assert [e["dtype"] for e in r["data"]["e2e"]] == ["float32", "bfloat16"]
    for e in r["data"]["e2e"]:
        assert e["verified"]
        assert set(e["phases"]) == {"build", "trace", "lorafy", "train", "fold_and_export", "plain_export",
                                    "plain_export_raw"}
        assert {"fold", "export", "verify"} <= set(e["export_steps"])  # each step's seconds and peak
        assert e["phases"]["fold_and_export"]["peak_bytes"] >= max(s["peak_bytes"] for s in e["export_steps"].values())
        assert all(p["peak_bytes"] > 0 and p["seconds"] >= 0 for p in e["phases"].values())
    assert [p["layers"] for p in r["data"]["passes"]] == [2, 4]
    assert r["data"]["passes"][1]["sites"] > r["data"]["passes"][0]["sites"]
    assert "adaptable sites" in " ".join(r["data"]["inspect"]["summary"])


def test_variants_smoke(tmp_path):
    """The DoRA/variants benchmark's plumbing: every variant timed, memory children, goals, norm and fold tables."""
    got = _run("variants", str(tmp_path))
    data, md = got["data"], got["md"]
    assert set(data["step_s"]) == {"peft-dora", "peft-dora#2", "lora-fx-dora", "peft", "lora-fx", "floor"}
    for v in data["step_s"].values():
        _stats(v)
    assert {"peft-dora", "lora-fx-dora"} <= set(data["memory_used_mb"])
    assert set(data["goals"]) == {"time lora-fx-dora / peft-dora", "memory lora-fx-dora / peft-dora"}
    assert data["norm"]["max_rel_err"]["lora-fx"] < 1e-5
    assert set(data["fold"]) == {"LoRA", "rsLoRA", "DoRA", "PiSSA", "OLoRA"}
    assert all(r["max_abs_diff"] < 1e-4 for r in data["fold"].values())
    assert "| lora-fx-dora |" in md and "| OLoRA |" in md
