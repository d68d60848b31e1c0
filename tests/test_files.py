"""lora_fx/exporters/files.py: staging folders carry their owner's PID, and the next export to the same
target removes those a killed export left (only those whose process is gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_fx.exporters import files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staging_removes_only_folders_of_processes_that_are_gone(tmp_path: Path) -> None:
    target = tmp_path / "task.onnx"
    dead = tmp_path / f".task.onnx.{_dead_pid()}.k1ll3d_x.tmp"
    live = tmp_path / f".task.onnx.{os.getppid()}.r4nn1ng.tmp"  # the test runner's parent: alive
    other = tmp_path / f".other.onnx.{_dead_pid()}.abc.tmp"  # another target's: not ours to judge now
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "task.onnx").write_bytes(b"half")
    with files.staging(target) as staged:
        mine = Path(staged).parent
        assert mine.name.startswith(f".task.onnx.{os.getpid()}.") and mine.name.endswith(".tmp")
        assert not dead.exists() and live.exists() and other.exists()
        Path(staged).write_bytes(b"done")
        files.install(staged, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "task.onnx"])
    assert files.remove_stale(tmp_path / "other.onnx") == [str(other)]


_CHILD = """
import sys, torch, lora_fx
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
lgm = lora_fx.lorafy(lora_fx.trace(model, (torch.randn(2, 64),)), "0", rank=4)
print("ready", flush=True)
lora_fx.fold_and_export(lgm, sys.argv[1], external_data=True, verify="full")
"""


@pytest.mark.slow
def test_exports_killed_mid_way_leave_nothing_after_the_next_one(tmp_path: Path) -> None:
    """5 SIGKILLs during exports over an existing file (at several points), then one good export: only
    the model and its data file are left next to the target."""
    target = tmp_path / "task.onnx"
    subprocess.run([sys.executable, "-c", _CHILD, str(target)], check=True, capture_output=True, timeout=300)
    before = target.read_bytes()
    mid_way = 0
    for delay in (0.0, 0.2, 0.6, 1.2, 2.5):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".task.onnx.") for p in tmp_path.iterdir()):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        time.sleep(delay)
        mid_way += proc.poll() is None and any(p.name.startswith(".task.onnx.") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert target.read_bytes() == before  # the same export, or the old file intact
    assert mid_way >= 3, "the kills came after the exports had finished: not a test of killed exports"
    subprocess.run([sys.executable, "-c", _CHILD, str(target)], check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.onnx", "task.onnx.data"]
