"""The conventions of lora-fx's ONNX files, in one place: metadata keys, derived and untied weight
names, and the decoder layout. Readers and writers of these files import them from here.

Metadata (``model.metadata_props``, JSON values)::

    lora_fx.decoder          DecoderLayout of a KV-cache export (exporters/decoder/, generation.py)
    lora_fx.multi_lora       a multi-LoRA export's parameter mapping (exporters/multi_lora.py)
    lora_fx.quantize         the QuantizeConfig a quantized file was made with (exporters/quantize/)
    lora_fx.derived_weights  {derived initializer: {"source": weight, "ops": [...]}} (optimize)
    lora_fx.genai_builder    a builder-made decoder's settings, "padding": "right" (backends/genai_builder.py)

Initializer names::

    <weight>::<Op>[::<Op>...]      a weight with layout ops folded in (``W::Transpose``; optimize)
    <path>.<attr>_folded[_call<k>] fold's untied copy of a weight other ops still read
                                   (built by ``lora_fx.graph_facts.untied_name``)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BUILDER_KEY", "DECODER_KEY", "DERIVED_KEY", "MULTI_LORA_KEY", "QUANTIZE_KEY", "DecoderLayout", "derived_aliases", "derived_name",
           "derived_source", "is_untied_copy", "op_name"]

DECODER_KEY = "lora_fx.decoder"
MULTI_LORA_KEY = "lora_fx.multi_lora"
QUANTIZE_KEY = "lora_fx.quantize"
DERIVED_KEY = "lora_fx.derived_weights"
BUILDER_KEY = "lora_fx.genai_builder"

_SEP = "::"
_UNTIED = re.compile(r".+_folded(_call\d+)?")


def derived_name(source: str, ops: Sequence[str]) -> str:
    """The initializer name of ``source`` with the layout ops ``ops`` folded in: ``W::Transpose``."""
    return _SEP.join([source, *ops])


def derived_source(name: str) -> tuple[str, tuple[str, ...]]:
    """``(weight, ops)`` of a derived initializer name; ``(name, ())`` for a plain one."""
    source, *ops = name.split(_SEP)
    return source, tuple(ops)


def op_name(domain: str, op_type: str) -> str:
    """An op's name in counts and reports: ``MatMul``, or ``<domain>::<op>`` outside the default domain."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def derived_aliases(untied: dict[str, str], names: set[str]) -> dict[str, str]:
    """Aliases for weights derived from untied copies: ``{copy::Op: base::Op}`` for each ``{copy: base}``
    in ``untied`` whose derived name is in ``names`` (the structure proof's aliases)."""
    out = {}
    for name in names:
        source, ops = derived_source(name)
        if ops and source in untied:
            out[name] = derived_name(untied[source], ops)
    return out


def is_untied_copy(name: str) -> bool:
    """Whether an initializer (plain or derived) is an untied copy fold made (``..._folded[_call<k>]``)."""
    return _UNTIED.fullmatch(derived_source(name)[0]) is not None


@dataclass(frozen=True)
class DecoderLayout:
    """What a generator needs to know about the cache: per layer (key shape, value shape) without
    batch and length, i.e. ``(heads, head_dim)`` each; plus the limits of the model. Stored as JSON
    under :data:`DECODER_KEY`; the decoder's inputs/outputs carry the names below (Optimum's)."""

    kv: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    max_positions: int | None
    vocab_size: int
    eos_token_id: list[int]
    pad_token_id: int | None

    def to_json(self) -> str:
        return json.dumps({"kv": self.kv, "max_positions": self.max_positions, "vocab_size": self.vocab_size,
                           "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id})

    @classmethod
    def from_json(cls, text: str) -> DecoderLayout:
        d = json.loads(text)
        kv = tuple((tuple(k), tuple(v)) for k, v in d["kv"])
        return cls(kv, d["max_positions"], d["vocab_size"], list(d["eos_token_id"]), d["pad_token_id"])

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{w}" for i in range(len(self.kv))
                                                   for w in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{w}" for i in range(len(self.kv)) for w in ("key", "value")]
