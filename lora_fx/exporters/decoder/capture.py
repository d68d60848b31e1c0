"""The KV-cache graph of a decoder LLM: the wrapper, its capture with the trained LoRA moved over.

``export_decoder`` (exporters/decoder/export.py) starts here. The no-cache graph that
``trace`` captured recomputes the whole prefix for each new token; serving needs the past keys and
values as inputs. So the user's own model (remembered by ``trace``) is captured again through
:class:`DecoderWithCache`::

    forward(input_ids [B, S], attention_mask [B, P+S], past = (k_0, v_0, ..., k_{L-1}, v_{L-1}))
        cache = DynamicCache(config); cache.update(k_i, v_i, i) for each layer   # P past positions
        position_ids = (cumsum(attention_mask) - 1).masked_fill(attention_mask == 0, 0)[:, -S:]
        return logits [B, S, V], k'_0, v'_0, ...                                  # P+S positions each

(the position ids are those Hugging Face ``generate`` computes, so left padding gives the same
tokens). The wrapper shares the model's submodules under their own names, so the new graph has the
same parameter names and site ids as the first capture: the trained LoRA pairs are moved over site by
site (same rank, alpha, slices; A/B copied), and the existing fold / export / structural proof runs on
it unchanged. The exported file's inputs and outputs are then renamed (decoder/io_names.py) and ORT
is checked against torch on a prefill and decode steps (decoder/checks.py).
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from ...errors import ExportError
from ...graph_module import LoraFxModule, capture_of, lora_state
from ..format import DECODER_KEY, DecoderLayout

__all__ = ["DecoderWithCache", "layout_of", "merged_model", "recapture", "source_model"]

_B, _S, _P = 2, 3, 4  # capture example: batch, new tokens, past length (all >= 2: stay dynamic)


class DecoderWithCache(nn.Module):
    """A Hugging Face causal LM as a function of (tokens, mask, past tensors) -> (logits, present).

    It shares the model's submodules, parameters and buffers by name (nothing is copied), so a
    capture of it names parameters and sites exactly like a capture of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "decoder", model)  # not a submodule: paths stay the model's own
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.cache_arg = _cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]):
        cache = full_cache(self.decoder.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 0)[:, -input_ids.shape[1]:]
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           use_cache=True, **{self.cache_arg: cache})
        present = getattr(out, self.cache_arg, None)
        if present is None:
            present = out.past_key_values
        return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])


def full_cache(config):
    """``DynamicCache(config)`` with each sliding-window layer (Mistral, Gemma 2/3, Cohere 2) keeping every
    position: the file's cache grows by Concat, present = past + new, as genai and OnnxGenerator feed it;
    the model's own mask still limits attention to the window, so the outputs are the windowed ones."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def _cache_argument(model: nn.Module) -> str:
    """The forward keyword taking the KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    arg = next((a for a in ("cache", "past_key_values") if a in params), None)
    if config is None or arg is None or getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"kv_cache=True needs a Hugging Face decoder-only *ForCausalLM (forward takes "
                          f"`cache`/`past_key_values` and the model has a config); {name} has no KV-cache "
                          f"support. Export it without kv_cache (fold_and_export(lgm, path)), or trace the "
                          f"*ForCausalLM itself")
    return arg


def layout_of(model: nn.Module) -> DecoderLayout:
    """Runs the model once on two tokens to read the cache shapes each layer produces."""
    from transformers.cache_utils import DynamicLayer

    config = model.config
    cache = full_cache(config)
    bad = [i for i, layer in enumerate(cache.layers) if type(layer) is not DynamicLayer]
    if bad:
        raise ExportError(f"kv_cache=True: layers {bad} of {type(model).__name__} use "
                          f"{type(cache.layers[bad[0]]).__name__} (linear-attention, state-space or other special "
                          "caches), which the KV export does not support; export without kv_cache")
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache})
    present = getattr(out, _cache_argument(model), None) or out.past_key_values
    kv = tuple((tuple(layer.keys.shape[1::2]), tuple(layer.values.shape[1::2])) for layer in present.layers)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(config, "eos_token_id", None) if eos is None else eos
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return DecoderLayout(kv, max_pos, int(config.vocab_size), eos, None if pad is None else int(pad))


def source_model(lgm) -> nn.Module:
    """The model ``trace`` captured ``lgm`` from (ExportError when it does not remember one)."""
    cap = capture_of(lgm)
    ref = getattr(cap, "source", None)
    if ref is None:
        raise ExportError("kv_cache=True re-captures the model you traced, but this module does not "
                          "remember one: capture it with lora_fx.trace(model, (input_ids,)) and lorafy that")
    return ref.module


def _example(model: nn.Module, layout: DecoderLayout, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(layout.vocab_size, 100), (_B, _S), generator=gen)
    mask = torch.ones(_B, _P + _S, dtype=torch.long)
    past = tuple(torch.randn(_B, shape[0], _P, shape[1], generator=gen, dtype=dtype)
                 for k, v in layout.kv for shape in (k, v))
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    return (ids, mask, past), shapes


def recapture(lgm: LoraFxModule) -> LoraFxModule:
    """The KV-cache graph of the model ``lgm`` was traced from, carrying ``lgm``'s LoRA pairs.

    Every branch of ``lgm`` is re-created at the same site (same rank, alpha, dropout, slices) and its
    A/B values are copied; the result is ready for fold / fold_and_export.

    Raises:
        ExportError: the model has no KV-cache support, or a site of ``lgm`` is missing in the new capture.
    """
    from ...capture import trace
    from ...passes.lorafy import lorafy
    from ...targets import Target

    state = lora_state(lgm, "fold_and_export(kv_cache=True)")
    model = source_model(lgm)
    wrapper = DecoderWithCache(model)
    layout = layout_of(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    args, shapes = _example(model, layout, dtype)
    kv_gm = trace(wrapper, args, dynamic_shapes=shapes)
    by_site: dict[str, list] = {}
    for br in state.branches:
        by_site.setdefault(br.site.id, []).append(br)
    targets = [Target(re.compile(re.escape(sid)), rank=brs[0].rank, alpha=brs[0].alpha, dropout=brs[0].dropout,
                      ops=(brs[0].site.op,), slices=None if brs[0].slice is None else tuple(b.slice for b in brs))
               for sid, brs in by_site.items()]
    try:
        kv = lorafy(kv_gm, targets, use_rslora=state.report.rslora, init="gaussian")
    except Exception as e:
        raise ExportError(f"kv_cache=True: the LoRA sites of lgm do not all exist in the KV-cache capture "
                          f"of {type(model).__name__}: {e}") from e
    new = {br.site.id for br in lora_state(kv, "kv_cache").branches}
    if new != set(by_site):
        raise ExportError(f"kv_cache=True: sites {sorted(set(by_site) ^ new)} differ between the capture and "
                          "the KV-cache capture; export without kv_cache")
    with torch.no_grad():
        for br in state.branches:
            for name in (br.a, br.b):
                kv.get_parameter(name).copy_(lgm.get_parameter(name))
    kv.meta[DECODER_KEY] = layout
    return kv.train(lgm.training)


def merged_model(lgm: LoraFxModule) -> nn.Module:
    """A copy of the traced Hugging Face model with the LoRA of ``lgm`` folded into its weights
    (``W + s·B@A``, by :func:`lora_fx.fold`): what ``model.generate`` should be compared against.

    Raises:
        ExportError: fold had to untie a weight (a tied embedding whose ``lm_head`` use was adapted): the
            model's own tied parameter cannot hold both values; compare against ``fold(lgm)`` instead.
            Checked before the model is copied.
    """
    import copy

    from ...passes.fold import fold

    model = source_model(lgm)
    folded = fold(lgm)
    report = folded.fold_report
    if report and report.untied:
        raise ExportError(f"merged_model: the fold untied {sorted(dict(report.untied))}; compare against fold(lgm) "
                          "instead")
    state = dict(folded.named_parameters())
    out = copy.deepcopy(model)
    missing = out.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise ExportError(f"merged_model: folded weights {missing.unexpected_keys[:3]} are not in "
                          f"{type(model).__name__}")
    return out.eval()
