"""Export backends (lora_fx/exporters/backends/base.py): selection by name or "auto", a refusal falls
back to the torch.onnx backend with a note, unknown names are errors, and a failing backend leaves
nothing half-written."""

from __future__ import annotations

import os

import pytest
from conftest import traced
from helpers import randomize_lora

import lora_fx
from lora_fx.exporters.backends import (
    DEFAULT_BACKEND,
    ExportResult,
    TorchOnnxBackend,
    backend_names,
    register_backend,
    unregister_backend,
)

pytest.importorskip("onnxruntime")


class Recording(TorchOnnxBackend):
    """The torch.onnx backend, recording what it was asked; refuses with ``reason`` when set."""

    name = "recording"
    priority = 5

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        self.calls: list[tuple] = []

    def supports(self, request):
        return self.reason

    def export(self, request) -> ExportResult:
        lora = sum("lora_" in n for n, _ in request.base.named_parameters())  # the base: LoRA stripped
        self.calls.append((request.options.backend, request.source is not None, lora, os.path.basename(request.staged)))
        result = super().export(request)
        result.notes.append("recorded")
        return result


class Failing(TorchOnnxBackend):
    """Writes half a file where the task belongs, then fails."""

    name = "failing"
    priority = 5

    def export(self, request) -> ExportResult:
        with open(request.staged, "wb") as f:
            f.write(b"half an onnx file")
        raise lora_fx.ExportError("the toy backend broke down")


class DecoderOnly(Recording):
    name = "decoder_only"
    priority = 9
    scope = "decoder"


@pytest.fixture(scope="module")
def lgm():
    _, _, _, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    randomize_lora(lgm)
    return lgm


@pytest.fixture
def registered():
    """Registers backends for one test; the registry is as before afterwards."""
    before = backend_names()
    added = []

    def add(backend):
        added.append(register_backend(backend).name)
        return backend

    yield add
    for name in added:
        unregister_backend(name)
    assert backend_names() == before


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_selection_by_name_and_auto(lgm, tmp_path, registered):
    toy = registered(Recording())
    registered(DecoderOnly())  # "auto" skips a decoder backend for a plain export, silently
    assert [n for n in backend_names() if n != "genai_builder"] == ["decoder_only", "recording", DEFAULT_BACKEND]
    report = lora_fx.fold_and_export(lgm, tmp_path / "a.onnx", backend="recording")
    assert report.backend == "recording" and report.verification.ok and "recorded" in report.notes
    assert toy.calls == [("recording", True, 0, "a.onnx")]  # the traced model is remembered
    report = lora_fx.fold_and_export(lgm, tmp_path / "b.onnx", verify=False)  # "auto": highest priority first
    assert report.backend == "recording" and len(toy.calls) == 2 and report.verification is None
    assert not any("decoder_only" in n for n in report.notes)
    assert _listing(tmp_path) == ["a.onnx", "b.onnx"]


def test_a_refusing_backend_falls_back_with_a_note(lgm, tmp_path, registered):
    toy = registered(Recording(reason="the toy takes no MLPs"))
    report = lora_fx.fold_and_export(lgm, tmp_path / "a.onnx", backend="recording", verify=False)
    assert report.backend == DEFAULT_BACKEND and toy.calls == []
    assert report.notes == ["backend 'recording' cannot export this (the toy takes no MLPs): used 'torch_onnx' "
                            "instead"]
    report = lora_fx.fold_and_export(lgm, tmp_path / "b.onnx", verify=False)  # auto: noted too
    assert report.backend == DEFAULT_BACKEND and report.notes == ["backend 'recording' not used: the toy takes no MLPs"]


def test_unknown_backend_names_and_bad_registrations_are_errors(lgm, tmp_path):
    with pytest.raises(lora_fx.ExportError, match=r"backend='nope' is not a registered export backend; use "
                                                  r"'auto' or one of \[.*'torch_onnx'\]"):
        lora_fx.fold_and_export(lgm, tmp_path / "a.onnx", backend="nope")
    with pytest.raises(lora_fx.ExportError, match="a backend named 'torch_onnx' is registered already"):
        register_backend(TorchOnnxBackend())
    with pytest.raises(lora_fx.ExportError, match="has no name"):
        register_backend(type("Nameless", (TorchOnnxBackend,), {"name": ""})())
    assert list(tmp_path.iterdir()) == []


def test_a_failing_backend_leaves_nothing_half_written(lgm, tmp_path, registered):
    path = tmp_path / "a.onnx"
    lora_fx.fold_and_export(lgm, path, verify=False)
    before = path.read_bytes()
    registered(Failing())
    with pytest.raises(lora_fx.ExportError, match="the toy backend broke down"):
        lora_fx.fold_and_export(lgm, path, backend="failing", verify=False)
    assert path.read_bytes() == before and _listing(tmp_path) == ["a.onnx"]
    report = lora_fx.fold_and_export(lgm, path, verify=False)  # "auto": noted, the default backend writes it
    assert report.backend == DEFAULT_BACKEND and report.export.nodes > 0
    assert report.notes == ["backend 'failing' failed (the toy backend broke down): used 'torch_onnx' instead"]
    assert _listing(tmp_path) == ["a.onnx"]
