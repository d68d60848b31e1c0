"""The decoder file's canonical I/O: inputs ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key``
/ ``.value``; outputs ``logits``, ``present.{i}.key`` / ``.value`` (the names Optimum and onnxruntime-genai
use), and the :class:`~lora_fx.exporters.format.DecoderLayout` as metadata."""

from __future__ import annotations

import json
import os
import shutil

from ...errors import ExportError
from ..format import DECODER_KEY, MULTI_LORA_KEY, DecoderLayout

__all__ = ["name_io"]


def name_io(src: str, dst: str, layout: DecoderLayout) -> None:
    """Copies ``src`` to ``dst`` with canonical input/output names and the layout as metadata.

    Inputs beyond the decoder's own (a multi-LoRA export's overridable A/B) keep their names; a
    multi-LoRA mapping in the metadata gets the new input names too. A file that already carries the
    layout metadata (a backend that writes the decoder's I/O itself) is copied as it is.
    """
    import onnx_ir as ir

    external = os.path.exists(src + ".data")
    model = ir.load(src)
    if DECODER_KEY in model.metadata_props:
        for suffix in ("", ".data") if external else ("",):
            shutil.copyfile(src + suffix, dst + suffix)
        return
    ins, outs = list(model.graph.inputs)[:len(layout.input_names)], list(model.graph.outputs)
    if len(ins) != len(layout.input_names) or len(outs) != len(layout.output_names):
        raise ExportError(f"the KV-cache export has {len(ins)} inputs / {len(outs)} outputs, expected "
                          f"{len(layout.input_names)} / {len(layout.output_names)} for {len(layout.kv)} layers")
    for value, new in zip(ins + outs, layout.input_names + layout.output_names, strict=True):
        value.name = new
    model.metadata_props[DECODER_KEY] = layout.to_json()
    if MULTI_LORA_KEY in model.metadata_props:
        mapping = json.loads(model.metadata_props[MULTI_LORA_KEY])
        mapping["inputs"] = layout.input_names
        model.metadata_props[MULTI_LORA_KEY] = json.dumps(mapping)
    ir.save(model, dst, external_data=os.path.basename(dst) + ".data" if external else None)
