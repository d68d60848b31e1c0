"""Smoke run of ``python -m benchmarks llm_deploy`` (tiny Llama, into tmp_path): the plumbing and the
output files, never the timings (smoke numbers mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("matplotlib")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                 reason="onnxruntime-genai not installed (pip install 'lora-fx[genai]')")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def test_llm_deploy_smoke(tmp_path):
    from benchmarks import llm_deploy
    from benchmarks.common import quiet

    quiet()
    paths = llm_deploy.run(str(tmp_path), smoke=True)
    data = json.loads(open(paths["json"]).read())
    md = open(paths["md"]).read()
    assert data["benchmark"] == "llm_deploy" and data["smoke"] is True
    assert {"lorafx_fp32", "lorafx_int4", "builder_fp32", "builder_int4"} <= set(data["exports"])
    assert set(data["decode_ms"]) >= {"lorafx_fp32", "builder_fp32", "builder_again_fp32"}
    for stats in data["decode_ms"].values():
        assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["n"] == llm_deploy.SMOKE["rounds"]
    eq = data["tokens_equal"]
    assert eq["builder_fp32"]["vs_builder_fp32"] == eq["builder_fp32"]["of"] == 3
    assert eq["lorafx_fp32"]["vs_hf"] == 3  # lora-fx's fp32 file generates what HF generate does
    for e in data["exports"].values():
        assert e["nodes"] > 0 and e["mib"] > 0 and e["export_s"] > 0
    assert "noise: builder_again/builder decode fp32" in data["ratios"]
    assert md.startswith("## LLM deployment") and "|---|" in md
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
