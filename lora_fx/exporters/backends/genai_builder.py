"""onnxruntime-genai's model builder as an export backend: builder-grade decoder graphs, proof kept.

For a decoder the builder supports (Llama, Mistral, Qwen2/3, Phi-3, Gemma, Granite, OLMo, SmolLM3...,
read from the builder's own dispatch table), ``fold_and_export(lgm, "out/model.onnx", kv_cache=True)``::

    folded weights (fold in fp32) -> type(model)(config) holding them -> save_pretrained(tmp/task) + tokenizer
    base weights                  -> type(model)(config) holding them -> save_pretrained(tmp/base)
    builder(tmp/task) -> task.onnx,  builder(tmp/base) -> base.onnx      (-p fp32 | int4, -e cpu)
    compare_structure(base.onnx, task.onnx): same graph; every changed initializer is one the builder
        made from an adapted weight (``layers.3.attn.qkv_proj`` packs q/k/v; ``_Q4``/``_scales`` forms)

The builder's graph uses GroupQueryAttention (rotary inside), SkipSimplifiedLayerNormalization, a
packed q/k/v MatMul and, for int4, MatMulNBits at accuracy level 4. If its graph depended on weight
values, base and task would differ in structure and the export fails with a VerifyError naming the
first differing node (nothing is installed).

GroupQueryAttention reads the attention mask as per-row lengths (ReduceSum) and places each row's keys
from position 0: padding is only allowed at the END of a row (a left-padded batch fed as is comes out
wrong, relative error ~0.5). :func:`right_padded` turns any padded batch into that form (tokens moved
to the front, same positions); the decode checks and :class:`lora_fx.OnnxGenerator` feed builder files
left-padded batches that way, in one batch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ...errors import ExportError, VerifyError
from ..format import BUILDER_KEY  # metadata: the builder's settings (and "padding": "right")
from .base import Backend, ExportRequest, ExportResult, timed
from .genai_support import (
    GENAI_EXTRA,
    WRONG_GRAPHS,
    builder_architectures,
    right_padded,
    right_padding_only,
    unsupported,
    vocab_clash,
)

__all__ = ["BUILDER_KEY", "GENAI_EXTRA", "Built", "GenaiBuilder", "build_pair", "builder_architectures",
           "byte_level_tokenizer", "explained", "hf_checkpoint", "prove", "right_padded", "right_padding_only",
           "run_builder", "unsupported", "vocab_clash", "WRONG_GRAPHS"]

_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
           "query_key_value": ("q_proj", "k_proj", "v_proj")}


def _plain_model(model: Any, state: dict) -> Any:
    """``type(model)(config)`` holding ``state`` (a GGUF-loaded model cannot save_pretrained itself)."""
    config = copy.deepcopy(model.config)
    config.use_cache = True
    rope = getattr(config, "rope_parameters", None) or {}
    if type(model).__name__ == "Phi3ForCausalLM" and rope.get("rope_type") != "longrope":
        # the builder picks its LongRoPE Phi-3 (and fails) when the two differ; without longrope Hugging
        # Face never reads original_max_position_embeddings (tiny configs keep its default 4096)
        config.original_max_position_embeddings = config.max_position_embeddings
    eps = [getattr(config, a) for a in ("layer_norm_eps", "norm_eps", "layer_norm_epsilon") if hasattr(config, a)]
    if not hasattr(config, "rms_norm_eps") and eps:
        # the builder reads every norm's epsilon from rms_norm_eps (else 1e-6): Phi's and Nemotron's
        # LayerNorm eps 1e-5 was lost (relative error 0.01-0.02 on tiny configs); Hugging Face ignores the name
        config.rms_norm_eps = eps[0]
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(model)(config)
    # only the model's parameters: buffers (rotary tables) come from the config, a capture's lifted constants
    # (``lifted_tensor_0``) are no weights
    params = {n for n, _ in plain.named_parameters()}
    missing, _ = plain.load_state_dict({k: v for k, v in state.items() if k in params}, strict=False)
    missing = [m for m in missing if m in params and not (m.endswith("lm_head.weight")
                                                          and getattr(config, "tie_word_embeddings", False))]
    if missing:
        raise ExportError(f"genai_builder: the folded weights do not fit a fresh {type(model).__name__}: missing "
                          f"{missing[:3]}")
    return plain


def hf_checkpoint(model: Any, state: dict, folder: str, tokenizer: Any = None) -> None:
    """A Hugging Face folder the builder reads: ``model``'s class and config holding ``state``, and a
    tokenizer (given, found beside the model, or a small byte-level BPE: the builder insists on one)."""
    import tempfile

    from ..decoder.folder import TOKENIZER_FILES, _tokenizer_folder

    _plain_model(model, state).save_pretrained(folder)
    with tempfile.TemporaryDirectory(prefix="lora_fx_tok_") as tmp:
        src, _, _ = _tokenizer_folder(tokenizer, model, tmp)
        if src is None:
            byte_level_tokenizer(int(model.config.vocab_size)).save_pretrained(folder)
            return
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                with open(os.path.join(src, name), "rb") as f, open(os.path.join(folder, name), "wb") as g:
                    g.write(f.read())


def byte_level_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with ids below ``vocab_size`` (the builder only copies it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet)[: max(4, min(256, vocab_size))])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def run_builder(hf_dir: str, out_dir: str, precision: str, cache_dir: str, extra: dict | None = None) -> float:
    """The builder, in this process (``python -m onnxruntime_genai.models.builder -i hf_dir -o out_dir -p
    precision -e cpu -c cache_dir``), its chatter captured; returns its seconds.

    Raises:
        ExportError: the builder failed (with the end of its output).
    """
    from onnxruntime_genai.models import builder

    log = io.StringIO()
    start = time.perf_counter()
    quant = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # one INFO line per node
    level = quant.level
    quant.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            options = builder.parse_extra_options(None, hf_dir, out_dir, precision, "cpu", cache_dir,
                                                  [f"{k}={v}" for k, v in (extra or {}).items()])
            builder.create_model(None, hf_dir, out_dir, precision, "cpu", cache_dir, **options)
    except Exception as e:  # the builder raises whatever its architecture code raises
        tail = log.getvalue()[-600:].strip()
        raise ExportError(f"onnxruntime-genai's model builder failed ({type(e).__name__}: {e}); its output "
                          f"ended:\n{tail}") from e
    finally:
        quant.setLevel(level)
    return time.perf_counter() - start


def explained(name: str, adapted: list[str]) -> bool:
    """Whether the builder initializer ``name`` derives from one of the ``adapted`` HF weights: same
    layer index and the same projection (or a packed one holding it), in any quantized form."""
    layer = re.search(r"layers\.(\d+)\.", name)
    for weight in adapted:
        w_layer = re.search(r"layers\.(\d+)\.", weight)
        if (layer and layer.group(1)) != (w_layer and w_layer.group(1)):
            continue
        proj = weight.removesuffix(".weight").rsplit(".", 1)[-1]
        if re.search(rf"[./]{re.escape(proj)}[./]", name + "."):
            return True
        if any(re.search(rf"[./]{p}[./]", name + ".") and proj in parts for p, parts in _PACKED.items()):
            return True
    return False


def prove(base: str, task: str, adapted: list[str]) -> Any:
    """compare_structure(base, task); every changed initializer derives from an adapted weight.

    Raises:
        VerifyError: the files differ in structure (the first difference is named), or an initializer
            changed that no adapted weight explains (the builder's graph read weight values).
    """
    from ..verify.structure import compare_structure

    s = compare_structure(base, task)
    if not s.ok:
        raise VerifyError(f"genai_builder: the builder's task file is not its base file with new weights: "
                          f"{s.first_difference}. Its graph depends on weight values; export with "
                          "backend='torch_onnx'")
    stray = [n for n in s.changed_initializers if not explained(n, adapted)]
    if stray or not s.changed_initializers and adapted:
        raise VerifyError(f"genai_builder: initializers {stray[:4] or '(none)'} changed, which no adapted weight "
                          f"({adapted[:4]}) explains; export with backend='torch_onnx'")
    return s


@dataclass
class Built:
    """What :func:`build_pair` wrote."""

    task: str
    base: str
    seconds: dict[str, float] = field(default_factory=dict)
    genai_config: dict = field(default_factory=dict)


def build_pair(model: Any, task_state: dict, base_state: dict, folder: str, precision: str, *,
               tokenizer: Any = None, name: str = "model.onnx") -> Built:
    """Builds the task and base files with the builder under ``folder`` (``task/``, ``base/``)."""
    seconds: dict[str, float] = {}
    out = {}
    for role, state in (("task", task_state), ("base", base_state)):
        hf = os.path.join(folder, f"hf_{role}")
        t = time.perf_counter()
        hf_checkpoint(model, state, hf, tokenizer)
        seconds[f"save_pretrained_{role}"] = time.perf_counter() - t
        built = os.path.join(folder, role)
        seconds[f"builder_{role}"] = run_builder(hf, built, precision, os.path.join(folder, "cache"))
        out[role] = os.path.join(built, "model.onnx")
    if name != "model.onnx":
        raise ExportError(f"genai_builder writes model.onnx; got {name!r}")
    with open(os.path.join(folder, "task", "genai_config.json")) as f:
        config = json.load(f)
    return Built(out["task"], out["base"], seconds, config)


def _canonical(src: str, dst: str, layout: Any, metadata: dict[str, str]) -> None:
    """``src`` (a builder file) saved as ``dst`` with lora-fx's decoder I/O order (``input_ids``,
    ``attention_mask``, then key/value per layer; ``logits``, present key/value per layer), the layout
    and ``metadata`` in its metadata, and its external data renamed to ``<dst>.data``."""
    import onnx

    proto = onnx.load(src, load_external_data=False)
    graph = proto.graph
    for values, order in ((graph.input, layout.input_names), (graph.output, layout.output_names)):
        by_name = {v.name: v for v in values}
        if set(order) - set(by_name):
            raise ExportError(f"genai_builder: the builder's file lacks {sorted(set(order) - set(by_name))[:3]} "
                              f"(it has {sorted(by_name)[:4]}...)")
        ordered = [by_name[n] for n in order] + [v for v in values if v.name not in set(order)]
        copies = [type(v)() for v in ordered]
        for c, v in zip(copies, ordered, strict=True):
            c.CopyFrom(v)
        del values[:]
        values.extend(copies)
    data = os.path.basename(dst) + ".data"
    for t in graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = data
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, dst)
    if os.path.exists(src + ".data"):
        os.replace(src + ".data", os.path.join(os.path.dirname(dst), data))


class GenaiBuilder(Backend):
    """The ``genai_builder`` backend (see the module docstring): decoders of the builder's architectures."""

    name = "genai_builder"
    priority = 10
    scope = "decoder"

    def supports(self, request: ExportRequest) -> str | None:
        from ...graph_module import fold_report_of

        if request.decoder is None:
            return "not a decoder export (kv_cache=True / export_decoder)"
        if request.source is None:
            return "trace() did not remember the Hugging Face model"
        if not request.options.folded:
            return "folded=False (the builder writes plain weights)"
        report = fold_report_of(request.module) if request.module is not None else None
        return unsupported(_hf_model(request), quantize=request.options.quantize, dtype=request.options.dtype,
                           untied=dict(report.untied) if report is not None and report.untied else None)

    def export(self, request: ExportRequest) -> ExportResult:
        from ...graph_module import fold_report_of, lora_state
        from .. import files
        from ..format import DECODER_KEY

        quantize = request.options.quantize
        precision = "int4" if quantize is not None else "fp32"
        work = os.path.join(request.folder, "genai_builder")
        task = {k: v.detach() for k, v in request.module.state_dict().items()}
        fold_report = fold_report_of(request.module)
        request.module = None  # the pipeline's only reference: freed once the builder has the weights
        base = {k: v.detach() for k, v in request.base.state_dict().items()}
        built = build_pair(_hf_model(request), task, base, work, precision,
                           tokenizer=getattr(request.options, "tokenizer", None))
        fp32_bytes = 4 * sum(v.numel() for v in task.values())
        del task, base
        meta = {DECODER_KEY: request.decoder.to_json(),
                BUILDER_KEY: json.dumps({"precision": precision, "padding": "right", "version": _version()})}
        base_path = os.path.join(request.folder, "base", os.path.basename(request.staged))
        os.makedirs(os.path.dirname(base_path), exist_ok=True)
        _canonical(built.task, request.staged, request.decoder, meta)
        _canonical(built.base, base_path, request.decoder, meta)
        config = dict(built.genai_config)
        config["model"]["decoder"]["filename"] = os.path.basename(request.staged)
        eos, vocab = config["model"].get("eos_token_id"), config["model"].get("vocab_size")
        if isinstance(eos, list) and vocab:  # a tokenizer class's default EOS added past the vocabulary
            config["model"]["eos_token_id"] = [e for e in eos if e < vocab] or eos  # (og.Model refuses it)
        with open(os.path.join(request.folder, "genai_config.json"), "w") as f:
            json.dump(config, f, indent=4)
        # weights the fold changed (a zero adapter, B = 0, changes none: nothing may differ then)
        changed = fold_report.folded if fold_report is not None else None
        adapted = sorted({br.site.weight for br in lora_state(request.lgm, "genai_builder").branches
                          if changed is None or changed.get(br.site.id, 1.0) > 0})
        seconds = {"builder": built.seconds["builder_task"] + built.seconds["builder_base"],
                   "save_pretrained": built.seconds["save_pretrained_task"] + built.seconds["save_pretrained_base"]}
        with timed(seconds, "structure"):
            structure = prove(base_path, request.staged, adapted)
        export, base_info = files.describe(request.staged), files.describe(base_path)
        notes = [f"backend genai_builder: onnxruntime-genai {_version()} model builder ({precision}, cpu) on the "
                 f"folded and the base weights; {len(structure.changed_initializers)} initializers changed, all "
                 "from adapted weights"]
        quantized = _quantize_report(quantize, request.staged, fp32_bytes, structure) if quantize is not None else None
        return ExportResult(export, structure if request.options.verify else None, base_info, quantized, notes,
                            seconds=seconds)


def _hf_model(request: ExportRequest) -> Any:
    """The user's Hugging Face model (a decoder export's source is its KV-cache wrapper)."""
    return getattr(request.source, "decoder", request.source)


def _version() -> str:
    import onnxruntime_genai

    return str(getattr(onnxruntime_genai, "__version__", "?"))


def _quantize_report(cfg: Any, task: str, fp32_bytes: int, structure: Any) -> Any:
    """The builder's int4 as a QuantizeReport (the proof is the builder files' own)."""
    import onnx

    from .. import files
    from ..quantize import QuantizeReport, as_config
    from ..quantize.config import QuantizeInfo

    counts: dict[str, int] = {}
    for n in onnx.load(task, load_external_data=False).graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    cfg = as_config(cfg)
    info = QuantizeInfo(task, cfg, 0, counts, fp32_bytes, files.file_bytes(task))
    return QuantizeReport(cfg, info, structure.ok, structure.first_difference, structure.changed_initializers, [])
