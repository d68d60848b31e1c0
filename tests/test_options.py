"""ExportOptions (lora_fx/exporters/options.py): one frozen object, checked once; the verbs take it and/or
its fields as keywords, and an unknown keyword names the valid ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import traced

import lora_fx
from lora_fx import ExportError, ExportOptions
from lora_fx.exporters.options import FIELDS, resolve_options


@pytest.mark.parametrize("field, value, works", [
    ("verify", "yes", "'full'"),
    ("verify", 1, "True"),
    ("opset", "18", "an ONNX opset version"),
    ("dynamic", None, "True or False"),
    ("external_data", "auto", "None"),
    ("dtype", torch.int8, "a floating torch dtype"),
    ("providers", "CPUExecutionProvider", "a list of ONNX Runtime provider names"),
    ("optimize", "fast", "'ort'"),
    ("quantize", "int3", "int4"),
    ("backend", "nope", "'torch_onnx'"),
    ("model_type", 3, "'bert'"),
])
def test_a_bad_setting_is_named_with_what_works(field, value, works):
    with pytest.raises(ExportError, match=f"{field}=.*{works.replace('(', '.')}"):
        ExportOptions(**{field: value})


def test_settings_are_normalised_frozen_and_defined_once():
    opts = ExportOptions(quantize="int8", optimize="ORT")
    assert isinstance(opts.quantize, lora_fx.QuantizeConfig) and opts.quantize.scheme == "int8"
    assert opts.optimize == "ort" and opts.verify is True and opts.backend == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.verify = False
    with pytest.raises(ExportError, match="needs folded=True and dtype float32"):
        ExportOptions(quantize="int4", dtype=torch.float16)
    assert ExportOptions(verify="full", dtype=torch.float16).verify == "full"
    assert set(FIELDS) == {f.name for f in dataclasses.fields(ExportOptions)}


def test_keywords_override_an_options_object_and_unknown_ones_are_named():
    base = ExportOptions(dtype=torch.float16, verify=False)
    opts = resolve_options(base, {"verify": "full"}, "fold_and_export")
    assert (opts.dtype, opts.verify, base.verify) == (torch.float16, "full", False)
    assert resolve_options(None, {}, "fold_and_export") == ExportOptions()
    with pytest.raises(ExportError, match=r"fold_and_export\(\) got unknown keyword\(s\) \['verfy'\]; valid: \[.*'verify'"):
        resolve_options(base, {"verfy": True}, "fold_and_export")
    with pytest.raises(ExportError, match="options=.* is not an ExportOptions"):
        resolve_options({"verify": True}, {}, "fold_and_export")


def test_the_verbs_check_settings_before_exporting(tmp_path):
    _, _, _, gm = traced("mlp")
    lgm = lora_fx.lorafy(gm, "fc1", rank=2)
    with pytest.raises(ExportError, match=r"unknown keyword\(s\) \['kv_cach'\]; valid: .*'kv_cache'"):
        lora_fx.fold_and_export(lgm, tmp_path / "a.onnx", kv_cach=True)
    with pytest.raises(ExportError, match="verify='yes' is not supported"):
        lora_fx.fold_and_export(lgm, tmp_path / "a.onnx", ExportOptions(), verify="yes")
    with pytest.raises(ExportError, match=r"export_decoder\(\) got unknown keyword\(s\) \['example_args'\]"):
        lora_fx.export_decoder(lgm, tmp_path / "a.onnx", example_args=())
    assert list(tmp_path.iterdir()) == []
