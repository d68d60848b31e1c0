"""The coverage sweep (tests/sweep.py) as tests: every model of ``sweep_models.SWEEP`` through every stage.

All but a few representative cases are ``slow``. A model passes when every stage passes; the only
accepted failure is an export of a model whose base the plain exporter cannot export either, and then the
error must name the op / node / dimension that blocks and what to do.
"""

from __future__ import annotations

import json
import re

import pytest
from sweep import KV_FAMILIES, STAGES, merge, run_model, table
from sweep_models import SWEEP, vision_import

CASES = [pytest.param(m, id=f"{m.family}-{m.name}", marks=() if m.fast else (pytest.mark.slow, pytest.mark.sweep))
         for m in SWEEP]


@pytest.mark.parametrize("entry", CASES)
def test_every_stage(entry, tmp_path):
    if entry.family in ("timm", "torchvision") and (why := vision_import()):
        pytest.skip(why)
    r = run_model(entry, str(tmp_path))
    assert list(r.stages) == list(STAGES)
    failed = {s: v for s, v in r.stages.items() if v not in ("ok", "skipped")}
    if not failed:
        assert r.sites > 0 and r.pairs >= r.sites and r.nodes > 0 and r.max_rel_err is not None
        return
    assert list(failed) == ["export"] and r.base_exports is False, f"{entry.name}: {failed}"
    assert re.search(r"(op|node|dimension) .*What to do", failed["export"]), failed["export"]


def test_sweep_lists_enough_models():
    per = {}
    for m in SWEEP:
        per[m.family] = per.get(m.family, 0) + 1
    hf = sum(n for f, n in per.items() if f not in ("timm", "torchvision"))
    assert hf >= 40 and per["timm"] >= 15 and per["multimodal"] >= 3, per
    assert len({(m.family, m.name) for m in SWEEP}) == len(SWEEP)


KV_MODELS = ("llama", "qwen2", "gpt2", "phi3", "gemma", "mistral")  # popular decoders: their kv_cache=True export


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("name", KV_MODELS)
def test_kv_cache_export_of_decoders(name, tmp_path):
    entry = next(m for m in SWEEP if m.family == "decoder" and m.name == name)
    r = run_model(entry, str(tmp_path), kv=True)
    assert r.ok and r.kv_cache == "ok", (r.stages, r.kv_cache)
    assert r.times["kv_cache"] > 0


def test_kv_cache_column_kept_across_runs_and_rendered(tmp_path):
    """A run without --kv keeps the kv_cache result of a passing row; the table shows it for decoder families."""
    from sweep import SweepResult

    path = str(tmp_path / "r.json")
    ok = dict.fromkeys(STAGES, "ok")
    llama = SweepResult("decoder", "llama", "LlamaForCausalLM", dict(ok), 3, 3, 10, 1e-6, kv_cache="ok")
    gemma = SweepResult("decoder", "gemma", "GemmaForCausalLM", dict(ok), 3, 3, 10, 1e-6,
                        kv_cache="ExportError: sliding window")
    bert = SweepResult("encoder", "bert", "BertModel", dict(ok), 3, 3, 10, 1e-6)
    merge(path, [llama, gemma, bert])
    failed = {**ok, "export": "ExportError: x", "verify": "skipped"}
    merge(path, [SweepResult("decoder", "llama", "LlamaForCausalLM", dict(ok), 3, 3, 10, 1e-6),
                 SweepResult("decoder", "gemma", "GemmaForCausalLM", failed, 3, 3, 0, None)])
    with open(path) as f:
        rows = {r["name"]: r for r in json.load(f)["models"]}
    assert rows["llama"]["kv_cache"] == "ok" and rows["gemma"]["kv_cache"] is None  # a failed row drops it
    text = table(path)
    assert "1 of 1 decoders run pass" in text and "decoder" in KV_FAMILIES
    decoder_header, encoder_header = (ln for ln in text.splitlines() if ln.startswith("| model"))
    assert decoder_header.endswith("| verify | kv_cache | ORT rel err | note |")
    assert "kv_cache" not in encoder_header
