"""A decoder export folder that runs as is: the files serving stacks read beside ``model.onnx``.

``fold_and_export(lgm, "out/model.onnx", kv_cache=True)`` writes, next to the model::

    genai_config.json        onnxruntime-genai: og.Model("out"), og.Generator
    config.json              the Hugging Face config (Optimum's ORTModelForCausalLM.from_pretrained("out"))
    generation_config.json   eos / pad / sampling defaults (Optimum, transformers)
    tokenizer files          og.Tokenizer, `lora-fx generate out/model.onnx`, AutoTokenizer

onnxruntime-genai reads the decoder's I/O names from ``genai_config.json``; lora-fx's graph grows
its cache by ``Concat``, so ``search.past_present_share_buffer`` must be false (true fails in the
Concat with a shape error). A builder-made file (exporters/backends/genai_builder.py) brings its own
genai_config.json, which is kept.

The tokenizer comes from ``tokenizer=`` (a transformers tokenizer or a folder holding its files), else
from the model's ``name_or_path`` when that is a local folder with tokenizer files (or one ``.gguf``
file, whose tokenizer transformers reads). Without one the other files are still written and the
report says how to add it (og.Model loads without a tokenizer; og.Tokenizer does not).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from ..._atomic import replace_files
from ...errors import ExportError

__all__ = ["FolderFiles", "TOKENIZER_FILES", "folder_files", "genai_config", "install_folder", "read_genai_config",
           "write_beside"]

GENAI_CONFIG = "genai_config.json"
# onnxruntime-genai 0.18's decoder-only model types; it refuses any other ("Unsupported model_type"), and runs
# lora-fx's file (plain decoder I/O) as its generic "decoder" type
GENAI_TYPES = frozenset({"ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama", "mistral",
                         "nemotron", "olmo", "phi3", "qwen2", "qwen3", "smollm3"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class FolderFiles:
    """The files written beside a decoder export (names relative to its folder)."""

    files: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # where the tokenizer came from; None: none was found
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        tok = f"tokenizer from {self.tokenizer}" if self.tokenizer else "NO tokenizer"
        return f"folder files: {', '.join(self.files)} ({tok})"


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def genai_config(model: Any, layout: Any, filename: str, *, share_buffer: bool = False) -> dict:
    """onnxruntime-genai's config for a lora-fx KV-cache export of ``model`` (a Hugging Face causal LM).

    ``layout`` is the export's DecoderLayout (per layer (heads, head_dim) of keys and values).
    """
    config = model.config
    gen = getattr(model, "generation_config", None)
    heads, head_size = layout.kv[0][0]
    eos = _ids(getattr(gen, "eos_token_id", None)) or layout.eos_token_id or _ids(config.eos_token_id)
    pad = layout.pad_token_id if layout.pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    bos = getattr(config, "bos_token_id", None)
    context = int(layout.max_positions or 2048)
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", heads)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", heads * head_size)

    def setting(name: str, default: Any) -> Any:
        value = getattr(gen, name, None)
        return default if value is None else value

    sample = bool(setting("do_sample", False))
    return {
        "model": {
            "bos_token_id": int(bos) if isinstance(bos, int) else (eos[0] if eos else 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(head_size),
                "hidden_size": int(hidden),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(n_heads),
                "num_hidden_layers": len(layout.kv),
                "num_key_value_heads": int(heads),
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": int(pad),
            "type": config.model_type if config.model_type in GENAI_TYPES else "decoder",
            "vocab_size": int(layout.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": sample, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
            "repetition_penalty": float(setting("repetition_penalty", 1.0)),
            "temperature": float(setting("temperature", 1.0)) if sample else 1.0,
            "top_k": int(setting("top_k", 50)) if sample else 1, "top_p": float(setting("top_p", 1.0)) if sample else 1.0,
        },
    }


def _hf_json(model: Any) -> tuple[bytes, bytes]:
    """config.json (``use_cache`` on: the file serves a cache) and generation_config.json."""
    from transformers import GenerationConfig

    config = model.config.to_dict()
    config["use_cache"] = True
    config.pop("quantization_config", None)  # a GGUF-loaded model's: the ONNX file holds plain weights
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    return (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode(), \
        (gen.to_json_string(use_diff=True)).encode()


def _tokenizer_folder(tokenizer: Any, model: Any, tmp: str) -> tuple[str | None, str | None, list[str]]:
    """(folder holding the tokenizer files, where they came from, notes)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if not hasattr(tokenizer, "save_pretrained"):
            raise ExportError(f"tokenizer= takes a transformers tokenizer or a folder with its files, not "
                              f"{type(tokenizer).__name__}")
        tokenizer.save_pretrained(tmp)
        return tmp, f"the given {type(tokenizer).__name__}", []
    if tokenizer is not None:
        folder = os.fspath(tokenizer)
        if not _has_tokenizer(folder):
            raise ExportError(f"tokenizer={folder!r} holds none of {list(TOKENIZER_FILES[:3])}; pass a folder "
                              "written by tokenizer.save_pretrained(...) or the tokenizer object")
        return folder, folder, []
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if source and os.path.isdir(source):
        if _has_tokenizer(source):
            return source, source, []
        ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0]).save_pretrained(tmp)
                return tmp, os.path.join(source, ggufs[0]), []
            except Exception as e:  # no gguf package, an unreadable file: the folder still runs without it
                reason = f"reading the tokenizer of {ggufs[0]} failed ({type(e).__name__}: {e})"
        else:
            reason = f"{source} holds no tokenizer files"
    else:
        reason = "the model's name_or_path is not a local folder" if source else "the model has no name_or_path"
    return None, None, [f"no tokenizer written ({reason}): og.Model loads the folder, but og.Tokenizer and "
                        "`lora-fx generate` need one; add it with tokenizer.save_pretrained(<folder>) or pass "
                        "tokenizer=<tokenizer or folder> to the export"]


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES[:3])


def folder_files(model: Any, layout: Any, staged: str, *, tokenizer: Any = None,
                 genai: dict | None = None) -> FolderFiles:
    """Writes the side files of a decoder export into the staging folder of ``staged`` (the model file).

    Args:
        model: the Hugging Face causal LM the export came from (its config, generation config, name).
        layout: the export's DecoderLayout.
        staged: the staged ``.onnx`` (its folder receives the files).
        tokenizer: a transformers tokenizer or a folder with its files; default: found from the model.
        genai: a genai_config.json to keep (a builder-made file's own); default :func:`genai_config`.
    """
    folder = os.path.dirname(staged)
    out = FolderFiles()
    config, generation = _hf_json(model)
    genai = genai if genai is not None else genai_config(model, layout, os.path.basename(staged))
    blobs = {GENAI_CONFIG: (json.dumps(genai, indent=4) + "\n").encode(), "config.json": config,
             "generation_config.json": generation}
    for name, data in blobs.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        out.files.append(name)
    with tempfile.TemporaryDirectory(prefix="lora_fx_tok_") as tmp:
        src, out.tokenizer, out.notes = _tokenizer_folder(tokenizer, model, tmp)
        for name in TOKENIZER_FILES if src else ():
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(folder, name))
                out.files.append(name)
    return out


def read_genai_config(folder: str) -> dict | None:
    """The genai_config.json a backend wrote into ``folder`` (the builder's own), or None."""
    path = os.path.join(folder, GENAI_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def install_folder(staged: str, final: str, files: FolderFiles) -> None:
    """Moves the staged model, its ``.data`` and the side files onto the final folder, all or nothing
    (:func:`lora_fx._atomic.replace_files`; the model last, so a reader never sees a new model with
    old side files). A stale ``<final>.data`` goes when the new model has none."""
    src, dst = os.path.dirname(staged), os.path.dirname(final)
    moves = [(os.path.join(src, n), os.path.join(dst, n)) for n in files.files]
    data = os.path.exists(staged + ".data")
    moves += ([(staged + ".data", final + ".data")] if data else []) + [(staged, final)]
    try:
        replace_files(moves, src)
        if not data and os.path.isfile(final + ".data"):
            os.remove(final + ".data")
    except OSError as exc:
        raise ExportError(f"writing {final!r} and its folder files failed: {exc}") from exc


def write_beside(model: Any, layout: Any, final: str, *, tokenizer: Any = None) -> FolderFiles:
    """The side files for an already-installed decoder export at ``final`` (staged, then installed
    together)."""
    from .. import files as onnx_files

    with onnx_files.staging(final) as staged:
        files = folder_files(model, layout, staged, tokenizer=tokenizer)
        moves = [(os.path.join(os.path.dirname(staged), n), os.path.join(os.path.dirname(final), n))
                 for n in files.files]
        replace_files(moves, os.path.dirname(staged))
    return files
