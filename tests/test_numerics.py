"""exporters/verify/numerics: a near miss of the tolerance is judged against the base model's own file."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_lora
from torch import nn

import lora_fx
from lora_fx.exporters.verify import numerics


def _exported(tmp_path, random_b: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 64), nn.Tanh()).eval()
    x = torch.randn(4, 64)
    lgm = lora_fx.lorafy(lora_fx.trace(model, (x,)), ["0", "3"], rank=2)
    if random_b:
        randomize_lora(lgm, std=0.2)
    path = tmp_path / "m.onnx"
    lora_fx.fold_and_export(lgm, path)
    return lgm, x, str(path)


def _check(lgm, x, path):
    notes: list[str] = []
    _, checks = numerics.check_numerics(lgm, path, (x,), {}, None, None, notes)
    return checks, notes


def test_a_near_miss_passes_when_the_base_models_file_misses_alike(tmp_path, monkeypatch):
    lgm, x, path = _exported(tmp_path, random_b=False)  # a zero adapter: the task file is the base model's file
    checks, _ = _check(lgm, x, path)
    err = max(c.max_rel_err for c in checks)
    assert len(checks) == 2 and err > 0  # ORT and torch round differently
    monkeypatch.setitem(numerics.RTOL, torch.float32, err / 2)  # now the file misses the tolerance by 2x
    checks, notes = _check(lgm, x, path)
    missed = [c for c in checks if c.max_rel_err > err / 2]
    assert missed and all(c.ok and c.base_rel_err == pytest.approx(c.max_rel_err, rel=1e-6) for c in missed)
    assert sum("accepted (within 1.5x" in n for n in notes) == len(missed)
    assert not list(tmp_path.glob("base-*"))  # the base file was written beside the task and removed


def test_a_near_miss_is_refused_when_the_base_models_file_is_exact_and_far_off_is_never_compared(
        tmp_path, monkeypatch):
    lgm, x, path = _exported(tmp_path, random_b=True)
    checks, _ = _check(lgm, x, path)
    monkeypatch.setitem(numerics.RTOL, torch.float32, max(c.max_rel_err for c in checks) / 20)  # 20x: over NEAR_MISS
    checks, notes = _check(lgm, x, path)
    assert any(not c.ok for c in checks) and all(c.base_rel_err is None for c in checks) and not notes
    monkeypatch.undo()
    with torch.no_grad():  # the file no longer holds this adapter: a wrong fold, as verification would see it
        for name, p in lgm.named_parameters():
            if "lora_B" in name:
                p.mul_(1.01)
    checks, _ = _check(lgm, x, path)
    err = max(c.max_rel_err for c in checks)
    assert err > 1e-6  # the 1% change of B, far above rounding
    monkeypatch.setitem(numerics.RTOL, torch.float32, err / 2)
    checks, notes = _check(lgm, x, path)
    worst = max(checks, key=lambda c: c.max_rel_err)
    assert not worst.ok and worst.base_rel_err is not None and worst.base_rel_err < worst.max_rel_err / 10
    assert any("refused (over 1.5x the base's)" in n for n in notes)
