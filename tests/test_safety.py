"""Safety (issues 6.3-6.5): atomic writes under injected failures, non-ONNX inputs, fold numerics.

* 6.3 ``fold_and_export`` writes atomically: a failure in the middle of the write (the ONNX save,
  either rename, the exporter) leaves the previous ``task.onnx`` and its ``task.onnx.data`` byte for
  byte as they were and no temporary file or folder behind.
* 6.4 ``verify_fold`` / ``compare_structure`` on a file that is not ONNX raise ``VerifyError``
  naming the file, never a bare protobuf/OS exception.
* 6.5 fold is correctly rounded for huge (1e4) and tiny (1e-8) deltas on fp32/fp16/bf16 weights
  (``W' == (W.float() + delta_fp32).to(dtype)``), and an fp64 model stays fp64 end to end.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir
import pytest
import torch
from conftest import traced
from helpers import randomize_lora
from zoo import assert_close

import lora_fx
from lora_fx.delta import Branch
from lora_fx.examples import zoo_models
from lora_fx.exporters.verify.structure import compare_structure
from lora_fx.graph_module import graph_signature

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------------------------------
# 6.3 atomic writes
# --------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (recursively, hidden ones included) with its bytes (b"<dir>" for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = b"<dir>" if p.is_dir() else p.read_bytes()
    return out


def _lora_mlp(seed: int) -> Any:
    """A small lorafied MLP with random (trained-looking) A/B; ``seed`` changes the weights."""
    _, _, _, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, ["fc1", "fc2"], rank=2)
    randomize_lora(lgm, seed=seed)
    return lgm.eval()


@pytest.fixture(params=[False, True], ids=["inline", "external_data"])
def previous(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, bool, dict[str, bytes]]:
    """A folder holding a verified earlier export (``task.onnx`` [+ ``task.onnx.data``]) and its snapshot."""
    external = request.param
    path = tmp_path / "task.onnx"
    lora_fx.fold_and_export(_lora_mlp(seed=1), path, external_data=external, verify=False)
    snap = _snapshot(tmp_path)
    assert ("task.onnx.data" in snap) == external and "task.onnx" in snap
    return path, external, snap


def _assert_untouched(path: Path, snap: dict[str, bytes]) -> None:
    """The folder holds exactly the snapshot's files, byte for byte, and the old export still checks."""
    after = _snapshot(path.parent)
    assert sorted(after) == sorted(snap), f"stray or missing files: {sorted(set(after) ^ set(snap))}"
    for name, data in snap.items():
        assert after[name] == data, f"{name} changed although the write failed"
    onnx.checker.check_model(str(path))  # and the old pair still loads as a whole


def _half_written_save(real: Callable[..., Any]) -> Callable[..., Any]:
    """An ``onnx_ir.save`` that writes its files, truncates them to half, then hits 'disk full'."""

    def save(model: Any, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        real(model, path, *args, **kwargs)
        for p in Path(path).parent.iterdir():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    return save


def _failing_replace(monkeypatch: pytest.MonkeyPatch, target: Path, nth: int) -> list[str]:
    """Makes the ``nth`` (1-based) ``os.replace`` into ``target``'s folder fail; returns the call log."""
    real = os.replace
    calls: list[str] = []

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).parent == target.parent:
            calls.append(os.path.basename(dst))
            if len(calls) == nth:
                raise OSError(errno.EIO, f"I/O error renaming onto {dst} (injected)")
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_failure_while_saving_keeps_previous_export(previous, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full after half of the new model (and data) was written: the old pair is untouched."""
    path, external, snap = previous
    monkeypatch.setattr(onnx_ir, "save", _half_written_save(onnx_ir.save))
    with pytest.raises(lora_fx.ExportError, match=r"task\.onnx.*No space left"):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external, verify=False)
    _assert_untouched(path, snap)


def test_failure_in_exporter_keeps_previous_export(previous, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.onnx.export raising becomes ExportError naming the target; nothing on disk changes."""
    path, external, snap = previous

    def broken_export(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter crashed (injected)")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(lora_fx.ExportError, match=r"task\.onnx.*exporter crashed"):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external, verify=False)
    _assert_untouched(path, snap)


def test_failure_on_first_rename_keeps_previous_export(previous, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first os.replace (data file, or the model without external data) fails."""
    path, external, snap = previous
    calls = _failing_replace(monkeypatch, path, nth=1)
    with pytest.raises(lora_fx.ExportError, match=r"task\.onnx.*I/O error"):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external, verify=False)
    assert calls == ["task.onnx.data" if external else "task.onnx"]
    _assert_untouched(path, snap)


def test_failure_between_renames_keeps_previous_external_data(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """External data: the data rename succeeded, the model rename fails.

    Regression: the old task.onnx was left pointing at the NEW task.onnx.data (same tensor names and
    offsets when only weights changed, so it loaded silently with the wrong weights).
    """
    path = tmp_path / "task.onnx"
    lora_fx.fold_and_export(_lora_mlp(seed=1), path, external_data=True, verify=False)
    snap = _snapshot(tmp_path)
    calls = _failing_replace(monkeypatch, path, nth=2)
    with pytest.raises(lora_fx.ExportError, match=r"task\.onnx.*I/O error"):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=True, verify=False)
    assert calls[:2] == ["task.onnx.data", "task.onnx"]
    _assert_untouched(path, snap)


def test_interrupt_during_save_leaves_no_temp_files(previous, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BaseException (Ctrl-C) is not turned into ExportError, but still cleans up."""
    path, external, snap = previous

    class Interrupt(BaseException):
        pass

    def save(*args: Any, **kwargs: Any) -> None:
        raise Interrupt

    monkeypatch.setattr(onnx_ir, "save", save)
    with pytest.raises(Interrupt):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external, verify=False)
    _assert_untouched(path, snap)


def test_successful_rewrite_replaces_both_files(previous) -> None:
    """Control for the tests above: without a failure the same call does change the files."""
    path, external, snap = previous
    report = lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external)
    assert report.verification is not None and report.verification.ok
    after = _snapshot(path.parent)
    assert sorted(after) == sorted(snap)
    assert after["task.onnx.data" if external else "task.onnx"] != snap["task.onnx.data" if external else "task.onnx"]


# --------------------------------------------------------------------------------------------------
# 6.4 files that are not ONNX
# --------------------------------------------------------------------------------------------------


def _not_onnx(kind: str, good: Path, folder: Path) -> Path:
    """A file at ``folder/<kind>.onnx`` that is not a valid ONNX model."""
    bad = folder / f"{kind}.onnx"
    if kind == "random":
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif kind == "empty":
        bad.write_bytes(b"")  # protobuf parses b"" as an empty ModelProto without complaint
    elif kind == "text":
        bad.write_text("this is not an ONNX model\n")
    else:
        raise ValueError(kind)
    return bad


@pytest.fixture(scope="module")
def good_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid folded export of the MLP (shared by the 6.4 tests)."""
    path = tmp_path_factory.mktemp("good") / "task.onnx"
    lora_fx.fold_and_export(_lora_mlp(seed=3), path, verify=False)
    return path


BAD_KINDS = ["random", "truncated", "empty", "text"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("which", ["base", "task"])
def test_verify_fold_on_non_onnx_names_the_file(kind: str, which: str, good_onnx: Path, tmp_path: Path) -> None:
    """verify_fold checks both files with onnx.checker first: VerifyError naming the bad one and its role."""
    bad = _not_onnx(kind, good_onnx, tmp_path)
    base, task = (bad, good_onnx) if which == "base" else (good_onnx, bad)
    with pytest.raises(lora_fx.VerifyError) as info:
        lora_fx.verify_fold(base, task)
    assert str(bad) in str(info.value) and which in str(info.value)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_compare_structure_on_non_onnx_names_the_file(kind: str, good_onnx: Path, tmp_path: Path) -> None:
    """compare_structure alone (no checker in front of it) must not leak a protobuf DecodeError, nor
    call an empty file (protobuf parses b"" as an empty ModelProto) 'identical: 0 nodes'."""
    bad = _not_onnx(kind, good_onnx, tmp_path)
    with pytest.raises(lora_fx.VerifyError, match=str(bad)):
        compare_structure(good_onnx, bad)
    with pytest.raises(lora_fx.VerifyError, match=str(bad)):
        compare_structure(bad, bad)


def test_verify_fold_on_missing_file_names_it(good_onnx: Path, tmp_path: Path) -> None:
    """A path that does not exist is a VerifyError naming it, not FileNotFoundError."""
    missing = tmp_path / "nope.onnx"
    with pytest.raises(lora_fx.VerifyError, match=str(missing)):
        lora_fx.verify_fold(good_onnx, missing)


def test_verify_fold_on_missing_external_data_names_the_file(tmp_path: Path) -> None:
    """A model whose .data file was deleted fails the checker: VerifyError naming the model."""
    path = tmp_path / "task.onnx"
    lora_fx.fold_and_export(_lora_mlp(seed=3), path, external_data=True, verify=False)
    os.remove(str(path) + ".data")
    with pytest.raises(lora_fx.VerifyError, match=str(path)):
        lora_fx.verify_fold(path, path)


# --------------------------------------------------------------------------------------------------
# 6.5 numerics
# --------------------------------------------------------------------------------------------------


def _set_delta(lgm: Any, br: Branch, magnitude: float, seed: int) -> torch.Tensor:
    """Gives the branch A, B with |scale·B@A| ~ ``magnitude``; returns that delta in fp32, (out, in)."""
    g = torch.Generator().manual_seed(seed)
    a, b = lgm.get_parameter(br.a), lgm.get_parameter(br.b)
    root = (magnitude / br.scale) ** 0.5  # split the magnitude between A and B so neither under/overflows
    with torch.no_grad():
        a.copy_((torch.rand(a.shape, generator=g) + 0.5) * root)  # in [0.5, 1.5)·root: no cancellation
        b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 2 * root / br.rank)
    return br.scale * (b.float() @ a.float())


@pytest.mark.parametrize("magnitude", [1e4, 1e-8], ids=["huge", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fold_is_correctly_rounded(dtype: torch.dtype, magnitude: float) -> None:
    """W' == round(fp32(W) + fp32(s·B@A)) bit for bit, for |delta| ~ 1e4 and ~ 1e-8, with zero and tiny W rows."""
    model, args, _ = zoo_models.mlp()
    model, args = model.to(dtype), tuple(a.to(dtype) for a in args)
    with torch.no_grad():  # zeros and tiny weights too, where a 1e-8 delta is not absorbed by W
        model.fc1.weight[0].zero_()
        model.fc1.weight[1].mul_(1e-6)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), ["fc1", "fc2"], rank=2, alpha=3.0)
    for k, br in enumerate(lgm.lora_report.branches):
        _set_delta(lgm, br, magnitude, seed=k)
    folded = lora_fx.fold(lgm)
    for br in lgm.lora_report.branches:
        w = lgm.get_parameter(br.site.weight)
        a, b = lgm.get_parameter(br.a), lgm.get_parameter(br.b)
        delta = br.scale * (b.float() @ a.float())  # nn.Linear layout (out, in), computed in fp32
        assert delta.abs().max() > magnitude / 10, "the test must produce deltas of the intended size"
        expected = (w.float() + delta).to(dtype)
        got = folded.get_parameter(br.site.weight)
        assert got.dtype == dtype
        mismatch = (got != expected).sum().item()
        assert mismatch == 0, f"{br.site.id}: {mismatch} entries not round(fp32(W) + fp32 delta)"
        if magnitude == 1e-8 and dtype == torch.float32:  # the tiny delta really reached the weight
            assert not torch.equal(got, w)
    out = folded(*args)
    assert out.dtype == dtype
    if not (dtype == torch.float16 and magnitude > 1):  # fp16 activations of 1e4 weights overflow 65504
        assert torch.isfinite(out).all()


def test_fold_into_fp16_weight_that_overflows_is_inf_not_silent() -> None:
    """A delta pushing fp16 weights past 65504 rounds to inf; fold must not hand back a silent inf model
    (regression: the finiteness check ran on the fp32 delta only)."""
    model, args, _ = zoo_models.mlp()
    model, args = model.half(), tuple(a.half() for a in args)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), "fc1", rank=2)
    _set_delta(lgm, lgm.lora_report.branches[0], 1e5, seed=0)
    with pytest.raises(lora_fx.FoldError, match="fc1"):
        lora_fx.fold(lgm)


@pytest.mark.parametrize("name", ["mlp", "functional", "convnet", "tied_lm"])
def test_fp64_stays_fp64_end_to_end(name: str) -> None:
    """trace -> lorafy -> fold keep every parameter, buffer and output fp64, and merge in fp64."""
    model, args, kwargs = zoo_models.build(name)
    model = model.double()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    gm = lora_fx.trace(model, args, kwargs)
    assert all(p.dtype == torch.float64 for p in gm.parameters() if p.is_floating_point())
    lgm = lora_fx.lorafy(gm, "*", rank=2)
    assert all(p.dtype == torch.float64 for p in lora_fx.lora_parameters(lgm))
    randomize_lora(lgm, std=0.1)
    lgm.eval()
    with torch.no_grad():
        expected = lgm(*args, **kwargs)
        folded = lora_fx.fold(lgm)
        got = folded(*args, **kwargs)
    assert expected.dtype == got.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in folded.parameters() if p.is_floating_point())
    assert all(b.dtype == torch.float64 for b in folded.buffers() if b.is_floating_point())
    assert graph_signature(folded.graph, rename=folded.fold_report.untied) == graph_signature(gm.graph)
    assert_close(got, expected)  # fp64 tolerance: the merge is computed in fp64, not fp32
    # and the fold really is fp64-exact: an fp32 merge would be off by ~1e-8 relative
    untied = set(folded.fold_report.untied.values())
    for br in lgm.lora_report.branches:
        if br.site.layout == "out,in" and br.site.kind == "linear" and br.site.weight not in untied:
            w = lgm.get_parameter(br.site.weight)
            delta = br.scale * (lgm.get_parameter(br.b) @ lgm.get_parameter(br.a))
            assert torch.equal(folded.get_parameter(br.site.weight), w + delta)


def test_fp64_export_is_fp64(tmp_path: Path) -> None:
    """fold_and_export of an fp64 model writes DOUBLE initializers/outputs and verifies."""
    model, args, _ = zoo_models.mlp()
    model, args = model.double(), tuple(a.double() for a in args)
    lgm = lora_fx.lorafy(lora_fx.trace(model, args), "*", rank=2)
    randomize_lora(lgm, std=0.1)
    report = lora_fx.fold_and_export(lgm, tmp_path / "task.onnx")
    assert report.verification is not None and report.verification.ok, str(report)
    proto = onnx.load(str(tmp_path / "task.onnx"))
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.DOUBLE}
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


def test_failure_in_verification_leaves_no_temp_files(previous, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base export for the proof lives in a temp folder next to the target: it must go too."""
    path, external, snap = previous
    real, calls = torch.onnx.export, []

    def second_export_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the first export is the task model, the second the base model
            raise RuntimeError("base export crashed (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", second_export_fails)
    with pytest.raises(lora_fx.ExportError, match="base export crashed"):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external, verify="full")
    assert sorted(_snapshot(path.parent)) == sorted(snap), "a temp file or folder was left behind"


def test_failed_numeric_check_leaves_the_old_file(previous, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default proof (one export, skeletons compared) fails in its numeric check: nothing changes."""
    from lora_fx.exporters.verify import numerics as verify

    path, external, snap = previous
    real = verify.run_onnx
    monkeypatch.setattr(verify, "run_onnx", lambda *a, **k: [x * 2 for x in real(*a, **k)])  # a wrong file
    with pytest.raises(lora_fx.VerifyError, match="FAILED verification"):
        lora_fx.fold_and_export(_lora_mlp(seed=2), path, external_data=external)
    assert sorted(_snapshot(path.parent)) == sorted(snap), "a temp file or folder was left behind"
