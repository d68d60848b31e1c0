"""Text generation in ONNX Runtime from a KV-cache export (``fold_and_export(..., kv_cache=True)``).

One session serves prefill and decode. Each step::

    logits, present = session(input_ids, attention_mask, past)   # prefill: past length 0
    next = argmax(logits[:, -1])            # or sample: temperature -> top-k -> top-p (HF's order)
    finished |= next in eos;  next[finished before this step] = pad
    input_ids, attention_mask, past = next, [attention_mask, 1], present

``present`` stays in ONNX Runtime memory: it is bound as an output (OrtValue, allocated by ORT) and fed
back as the next step's input through I/O binding, so the cache never passes through numpy; only the
last position's logits are copied out. Greedy output equals Hugging Face ``generate(do_sample=False)``
on the same weights token for token, left padding included (same position ids: cumsum of the mask).
Beam search is not implemented.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from .errors import LoraFxError
from .exporters.format import BUILDER_KEY, DecoderLayout
from .exporters.format import DECODER_KEY as METADATA_KEY
from .exporters.verify.ort import available_providers, ort_session

__all__ = ["GenerationError", "OnnxGenerator"]


class GenerationError(LoraFxError, ValueError):
    """Bad input to :class:`OnnxGenerator` (the message names it and what works)."""


class OnnxGenerator:
    """Greedy or sampled generation with an ONNX Runtime session on a KV-cache export.

    Args:
        path: ``.onnx`` written by ``fold_and_export(lgm, path, kv_cache=True)`` (also unfolded or
            multi-LoRA KV exports).
        providers: ONNX Runtime execution providers; default CUDA when usable, else CPU.
        threads: ``intra_op_num_threads`` (None: ORT's default, all cores).

    Raises:
        GenerationError: the file has no KV-cache inputs (an export without ``kv_cache=True``).
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        self.path = os.fspath(path)
        self.session = ort_session(self.path, providers=providers or available_providers(), threads=threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        names = [i.name for i in self.session.get_inputs()]
        if METADATA_KEY not in meta or "past_key_values.0.key" not in names:
            raise GenerationError(f"{self.path} has no KV-cache inputs (past/present key-values; its inputs: "
                                  f"{names[:6]}); generation needs a decoder exported with them: "
                                  "lora_fx.fold_and_export(lgm, path, kv_cache=True), "
                                  "or 'lora-fx export MODEL --targets ... --kv-cache -o FILE'")
        self.layout = DecoderLayout.from_json(meta[METADATA_KEY])
        self.provider = self.session.get_providers()[0]
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        past_type = next(i.type for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        self._dtype = np.float16 if "float16" in past_type else np.float32
        overridable = [i.name for i in self.session.get_overridable_initializers()]
        # a builder-made file (GroupQueryAttention) reads the mask as row lengths: padded rows are packed
        self.right_padding_only = json.loads(meta.get(BUILDER_KEY, "{}")).get("padding") == "right"
        self.extra_inputs = [n for n in names + overridable if n not in self.layout.input_names]
        self._positions = "position_ids" in names  # a builder file with a RotaryEmbedding outside attention

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, eos_token_id=None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, pad_token_id: int | None = None,
                 adapter: str | os.PathLike | None = None, run_options: Any = None) -> torch.LongTensor:
        """Continues each row of ``input_ids`` by up to ``max_new_tokens`` tokens.

        Args:
            input_ids: ``[B, T]`` token ids (LongTensor, numpy array or nested lists); pad rows on the
                left and give the mask.
            attention_mask: ``[B, T]`` of 0/1 (0 = padding); default all ones.
            max_new_tokens: >= 1; prompt + new tokens must fit the model's positions.
            eos_token_id: int or list; default the model's. A row stops at its first EOS; later
                positions of that row hold the pad id (``pad_token_id``, else the first EOS id), and
                generation ends when every row has stopped.
            do_sample: sample instead of argmax, from ``softmax(logits / temperature)`` restricted to the
                ``top_k`` most likely tokens and then to the smallest set with probability >= ``top_p``.
            seed: seeds the sampler (numpy PCG64) for reproducible samples.
            adapter: an ``.onnx_adapter`` file (``write_ort_adapter``) for a multi-LoRA KV export
                (``export_multi_lora(..., kv_cache=True)``): its A/B tensors are bound as inputs at
                every step (ORT ignores ``RunOptions`` adapters under I/O binding).
            run_options: ``onnxruntime.RunOptions`` for every step.

        Returns:
            LongTensor ``[B, T + n]``, n <= max_new_tokens.

        Raises:
            GenerationError: bad shapes, ``max_new_tokens <= 0``, a prompt too long for the model,
                bad sampling settings.
        """
        ids, mask = self._check(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
        eos = self.layout.eos_token_id if eos_token_id is None else (
            [int(eos_token_id)] if np.isscalar(eos_token_id) else [int(e) for e in eos_token_id])
        pad = pad_token_id if pad_token_id is not None else (
            self.layout.pad_token_id if self.layout.pad_token_id is not None else (eos[0] if eos else 0))
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        extra = self._adapter(adapter)
        binding = self.session.io_binding()
        past = [self._empty(batch, shape) for k, v in self.layout.kv for shape in (k, v)]
        step_ids, out, last = ids, [ids], None
        packed = self.right_padding_only and not mask.all()
        if packed:  # GroupQueryAttention reads the mask as row lengths: each row's tokens moved to its front
            from .exporters.backends.genai_support import right_padded  # (import lora_fx loads no onnx)

            step_ids, mask = right_padded(ids, mask)
            last = mask.sum(1) - 1
        finished = np.zeros(batch, dtype=bool)
        # position ids (a file that takes them): the prefill's cumsum of the mask - 1, then the tokens so far
        positions = np.where(mask == 0, 0, mask.cumsum(-1) - 1) if self._positions else None
        for _ in range(max_new_tokens):
            logits = self._step(binding, step_ids, mask, past, run_options, extra, last, positions)
            last = None
            if do_sample:
                nxt = _sample(logits, temperature, top_k, top_p, rng)
            else:
                nxt = logits.argmax(-1)
            nxt = np.where(finished, pad, nxt).astype(np.int64)
            out.append(nxt[:, None])
            finished |= np.isin(nxt, eos)
            if finished.all():
                break
            past = binding.get_outputs()[1:]
            step_ids = nxt[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            if packed:  # the new token right after each row's last one
                mask = -np.sort(-mask, axis=1)
            positions = mask.sum(1, keepdims=True) - 1 if self._positions else None
        return torch.from_numpy(np.concatenate(out, axis=1))

    def _step(self, binding, ids: np.ndarray, mask: np.ndarray, past: list, run_options,
              extra: dict | None = None, last: np.ndarray | None = None,
              positions: np.ndarray | None = None) -> np.ndarray:
        """One run through I/O binding; returns the logits ``[B, V]`` at the last position (or at each
        row's ``last`` index) as numpy."""
        import onnxruntime as ort

        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in (extra or {}).items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if positions is not None:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in zip(self.layout.input_names[2:], past, strict=True):
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(value, self._device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.layout.output_names:
            binding.bind_output(name, self._device if name != "logits" else "cpu")
        self.session.run_with_iobinding(binding, run_options)
        logits = binding.get_outputs()[0].numpy()
        at = logits[:, -1] if last is None else logits[np.arange(len(last)), last]
        return at.astype(np.float32)

    def _adapter(self, adapter) -> dict:
        """The A/B OrtValues of an ORT adapter file, checked against this export's inputs."""
        if adapter is None:
            return {}
        import onnxruntime as ort

        params = ort.AdapterFormat.read_adapter(os.fspath(adapter)).get_parameters()
        unknown = sorted(set(params) - set(self.extra_inputs))
        if unknown:
            raise GenerationError(f"adapter {os.fspath(adapter)!r} sets {unknown[:3]}, which {self.path} does not "
                                  "take; export with export_multi_lora(lgm, path, kv_cache=True) and write the "
                                  "adapter with write_ort_adapter(lgm, file, path)")
        return dict(params)

    def _empty(self, batch: int, shape: tuple[int, int]) -> np.ndarray:
        return np.zeros((batch, shape[0], 0, shape[1]), dtype=self._dtype)

    def _check(self, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise GenerationError(f"input_ids must be integer token ids of shape [batch, length >= 1], got "
                                  f"{ids.dtype}{list(ids.shape)}")
        ids = ids.astype(np.int64)
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
            if mask.shape != ids.shape:
                raise GenerationError(f"attention_mask has shape {list(mask.shape)} but input_ids has "
                                      f"{list(ids.shape)}; pass one 0/1 entry per token (0 = left padding)")
            mask = mask.astype(np.int64)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        limit = self.layout.max_positions
        if limit is not None and ids.shape[1] + max_new_tokens > limit:
            raise GenerationError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the "
                                  f"model's {limit} positions; shorten the prompt or lower max_new_tokens to "
                                  f"{max(limit - ids.shape[1], 0)}")
        if ids.min() < 0 or ids.max() >= self.layout.vocab_size:
            raise GenerationError(f"input_ids must lie in [0, {self.layout.vocab_size}); got "
                                  f"[{ids.min()}, {ids.max()}]")
        if temperature <= 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise GenerationError(f"sampling needs temperature > 0, top_k >= 1, 0 < top_p <= 1; got "
                                  f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
        return ids, mask


def _sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
            rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits / T), keeping the top-k, then the top-p nucleus."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


def generate_text(path: str | os.PathLike, prompts: list[str], *, tokenizer: Any = None, max_new_tokens: int = 64,
                  chat: bool = True, system: str | None = None, **sampling: Any) -> list[str]:
    """Prompts in, generated text out (``lora-fx generate``): tokenizes with the chat template, left-pads,
    runs :meth:`OnnxGenerator.generate` and decodes only the new tokens.

    Args:
        path: a KV-cache export.
        prompts: one string per batch row.
        tokenizer: a Hugging Face tokenizer or its folder; default the export's folder (where
            ``tokenizer.save_pretrained`` put it, as ``lora-fx demo llm`` does).
        chat: wrap each prompt as a user turn of the tokenizer's chat template (when it has one).
        system: a system turn before it (``lora-fx demo llm`` trains with ``lora_fx.demos.llm.SYSTEM``).
        sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``.

    Raises:
        GenerationError: the file has no KV-cache inputs (checked first), or no tokenizer found.
    """
    gen = OnnxGenerator(path)
    tok = tokenizer
    if tok is None or isinstance(tok, (str, os.PathLike)):
        folder = os.fspath(tok) if tok is not None else os.path.dirname(os.path.abspath(os.fspath(path)))
        if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise GenerationError(f"no tokenizer in {folder!r}: save one beside the export "
                                  "(tokenizer.save_pretrained(folder)) or pass --tokenizer DIR")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    for p in prompts:
        if chat and getattr(tok, "chat_template", None):
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            rows.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tok(p)["input_ids"])
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = gen.generate(ids, mask, max_new_tokens=max_new_tokens, **sampling)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]
