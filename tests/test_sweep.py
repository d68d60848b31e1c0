"""The coverage sweep (tests/sweep.py) as tests: every model of ``sweep_models.SWEEP`` through every stage.

All but a few representative cases are ``slow``. A model passes when every stage passes; the only
accepted failure is an export of a model whose base the plain exporter cannot export either, and then the
error must name the op / node / dimension that blocks and what to do.
"""

from __future__ import annotations

import re

import pytest
from sweep import STAGES, run_model
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
