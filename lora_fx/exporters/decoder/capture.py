"""KV-cache export of decoder LLMs: one ONNX graph for prefill and decode, folded and verified.

``fold_and_export(lgm, "chat.onnx", kv_cache=True)`` lands here. The no-cache graph that
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
it unchanged. The exported file's inputs and outputs are then renamed
(``past_key_values.{i}.key`` ... ``present.{i}.value``, the names Optimum uses), a
``lora_fx.decoder`` metadata entry records the layout, and ORT is checked against torch on a
left-padded prefill (past length 0) followed by decode steps that feed ``present`` back as ``past``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, VerifyError
from ..graph_module import LoraFxModule, capture_of, copy_module, lora_state
from . import onnx_files
from .ort import available_providers

__all__ = ["DecoderWithCache", "DecoderLayout", "METADATA_KEY", "recapture", "export_with_cache",
           "export_multi_lora_with_cache", "merged_model"]

METADATA_KEY = "lora_fx.decoder"
_B, _S, _P = 2, 3, 4  # capture example: batch, new tokens, past length (all >= 2: stay dynamic)


@dataclass(frozen=True)
class DecoderLayout:
    """What a generator needs to know about the cache: per layer (key shape, value shape) without
    batch and length, i.e. ``(heads, head_dim)`` each; plus the limits of the model."""

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
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.decoder.config)
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
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = model.config
    cache = DynamicCache(config=config)
    bad = [i for i, layer in enumerate(cache.layers) if type(layer) is not DynamicLayer]
    if bad:
        raise ExportError(f"kv_cache=True: layers {bad} of {type(model).__name__} use "
                          f"{type(cache.layers[bad[0]]).__name__} (sliding-window or other special "
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


def _source(lgm) -> nn.Module:
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
    from ..capture import trace
    from ..passes.lorafy import lorafy
    from ..targets import Target

    state = lora_state(lgm, "fold_and_export(kv_cache=True)")
    model = _source(lgm)
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
    new = {br.site.id for br in lora_state(kv, 'kv_cache').branches}
    if new != set(by_site):
        raise ExportError(f"kv_cache=True: sites {sorted(set(by_site) ^ new)} differ between the capture and "
                          "the KV-cache capture; export without kv_cache")
    with torch.no_grad():
        for br in state.branches:
            for name in (br.a, br.b):
                kv.get_parameter(name).copy_(lgm.get_parameter(name))
    kv.meta[METADATA_KEY] = layout
    return kv.train(lgm.training)


def export_with_cache(lgm: LoraFxModule, path, *, verify: bool = True, dtype: torch.dtype | None = None,
                      providers: list[str] | None = None, quantize=None, **kwargs):
    """``fold_and_export(..., kv_cache=True)``: see the module docstring. Returns its ExportReport
    with the prefill/decode checks appended to ``report.verification.numerics``.

    With ``quantize`` the proof is the quantized export's (quantized task == quantized base with new
    values); the prefill/decode checks against fp32 torch are then reported in the notes, not enforced."""
    from .export import fold_and_export

    if kwargs.get("example_args") is not None or kwargs.get("example_kwargs"):
        raise ExportError("kv_cache=True builds its own example inputs (tokens, mask, past tensors); "
                          "drop example_args / example_kwargs")
    kwargs.pop("example_args", None)
    kwargs.pop("example_kwargs", None)
    kv = recapture(lgm)
    layout: DecoderLayout = kv.meta[METADATA_KEY]
    final = os.path.abspath(os.fspath(path))
    name = os.path.basename(final)
    with onnx_files.staging(final) as staged:
        tmp = os.path.dirname(staged)
        raw, named = (os.path.join(tmp, d, name) for d in ("raw", "named"))
        for d in ("raw", "named"):
            os.makedirs(os.path.join(tmp, d))
        report = fold_and_export(kv, raw, verify=verify, dtype=dtype, providers=providers, quantize=quantize,
                                 **kwargs)
        _name_io(raw, named, layout)
        if verify:
            checks = decode_checks(kv, named, layout, dtype=dtype, providers=providers)
            if quantize is not None:
                report.verification.notes += [f"{c.shapes}: max rel err vs fp32 torch {c.max_rel_err:.2e} "
                                              "(quantized: not enforced)" for c in checks]
                checks = []
            report.verification.numerics += checks
            if not all(c.ok for c in checks):
                raise VerifyError(f"the KV-cache export for {final} FAILED verification, so nothing was "
                                  f"written:\n{report.verification}")
        onnx_files.install(named, final)
    report.path = report.export.path = final
    return report


def _name_io(src: str, dst: str, layout: DecoderLayout) -> None:
    """Copies ``src`` to ``dst`` with canonical input/output names and the layout as metadata.

    Inputs beyond the decoder's own (a multi-LoRA export's overridable A/B) keep their names; a
    multi-LoRA mapping in the metadata gets the new input names too.
    """
    import onnx_ir as ir

    from .multi_lora import META_KEY

    model = ir.load(src)
    ins, outs = list(model.graph.inputs)[:len(layout.input_names)], list(model.graph.outputs)
    if len(ins) != len(layout.input_names) or len(outs) != len(layout.output_names):
        raise ExportError(f"the KV-cache export has {len(ins)} inputs / {len(outs)} outputs, expected "
                          f"{len(layout.input_names)} / {len(layout.output_names)} for {len(layout.kv)} layers")
    for value, new in zip(ins + outs, layout.input_names + layout.output_names, strict=True):
        value.name = new
    model.metadata_props[METADATA_KEY] = layout.to_json()
    if META_KEY in model.metadata_props:
        mapping = json.loads(model.metadata_props[META_KEY])
        mapping["inputs"] = layout.input_names
        model.metadata_props[META_KEY] = json.dumps(mapping)
    external = os.path.exists(src + ".data")
    ir.save(model, dst, external_data=os.path.basename(dst) + ".data" if external else None)


def export_multi_lora_with_cache(lgm: LoraFxModule, path, **kwargs):
    """``export_multi_lora(..., kv_cache=True)``: the multi-LoRA export (A/B as zero-default overridable
    inputs) of the KV-cache graph, with the decoder's canonical I/O names, for :class:`lora_fx.OnnxGenerator`
    (``generate(..., run_options=...)`` with an active adapter). Adapter files written from ``lgm``
    with ``write_ort_adapter`` fit it: the parameter names are the same."""
    from .multi_lora import MultiLoraExport, export_multi_lora

    if kwargs.pop("example_args", None) is not None or kwargs.pop("example_kwargs", None):
        raise ExportError("kv_cache=True builds its own example inputs; drop example_args / example_kwargs")
    kv = recapture(lgm)
    layout: DecoderLayout = kv.meta[METADATA_KEY]
    final = os.path.abspath(os.fspath(path))
    name = os.path.basename(final)
    with onnx_files.staging(final) as staged:
        tmp = os.path.dirname(staged)
        raw, named = (os.path.join(tmp, d, name) for d in ("raw", "named"))
        for d in ("raw", "named"):
            os.makedirs(os.path.join(tmp, d))
        exp = export_multi_lora(kv, raw, **kwargs)
        _name_io(raw, named, layout)
        onnx_files.install(named, final)
    out = MultiLoraExport.read(final)
    out.info = exp.info
    out.info.path = final
    return out


def decode_checks(kv: LoraFxModule, path: str, layout: DecoderLayout, *, dtype=None, providers=None,
                  steps: int = 3) -> list:
    """ORT on ``path`` vs torch on ``kv`` (the unfolded LoRA cache graph): a left-padded prefill with
    an empty past, then ``steps`` decode steps of one token feeding each side its own ``present``.

    Positions the mask hides (padding) are excluded: their values are never read later, and fully
    masked attention rows are undefined (torch and ORT fill them differently).
    """
    from .segments import bounded_session
    from .verify import NumericCheck, tolerance

    session = bounded_session(path, providers=providers or available_providers())
    ref = copy_module(kv, freeze=False).eval()
    model_dtype = next(p.dtype for p in kv.parameters() if p.is_floating_point())
    float_dtype = dtype or model_dtype
    rtol = tolerance(model_dtype, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(layout.vocab_size, 100), (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    past_t = tuple(torch.zeros(2, s[0], 0, s[1], dtype=float_dtype) for k, v in layout.kv for s in (k, v))
    past_o = [p.numpy() for p in past_t]
    checks = []
    for step in range(steps + 1):
        with torch.no_grad():
            expected = [t.detach() for t in ref(ids, mask, past_t)]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                 **dict(zip(layout.input_names[2:], past_o, strict=True))}
        got = session.run(None, feeds)
        valid_q = mask[:, -ids.shape[1]:].bool()
        err = scale = 0.0
        pairs = [(got[0][valid_q.numpy()], expected[0][valid_q])]
        pairs += [(g.transpose(0, 2, 1, 3)[mask.bool().numpy()], e.transpose(1, 2)[mask.bool()])
                  for g, e in zip(got[1:], expected[1:], strict=True)]
        for g, e in pairs:
            e = e.double().numpy()
            err = max(err, float(np.abs(g.astype(np.float64) - e).max(initial=0.0)))
            scale = max(scale, float(np.abs(e).max(initial=0.0)))
        rel = err / max(scale, 1e-12)
        what = f"prefill {tuple(ids.shape)} left-padded, past 0" if step == 0 else \
            f"decode step {step}, past {past_t[0].shape[2]}"
        checks.append(NumericCheck(what, err, rel, rel <= rtol and len(got) == len(expected)))
        nxt = expected[0][:, -1].argmax(-1, keepdim=True)
        ids, mask = nxt, torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        past_t, past_o = tuple(expected[1:]), got[1:]
    return checks


def merged_model(lgm: LoraFxModule) -> nn.Module:
    """A copy of the traced Hugging Face model with the LoRA of ``lgm`` folded into its weights
    (``W + s·B@A``, by :func:`lora_fx.fold`): what ``model.generate`` should be compared against.

    A folded weight that fold had to untie (a tied embedding whose ``lm_head`` use was adapted) is
    untied in the copy too.
    """
    import copy

    from ..passes.fold import fold

    model = _source(lgm)
    folded = fold(lgm)
    report = folded.fold_report
    untied = dict(report.untied) if report else {}
    state = dict(folded.named_parameters())
    out = copy.deepcopy(model)
    if untied:
        raise ExportError(f"merged_model: the fold untied {sorted(untied)}; compare against fold(lgm) instead")
    missing = out.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise ExportError(f"merged_model: folded weights {missing.unexpected_keys[:3]} are not in "
                          f"{type(model).__name__}")
    return out.eval()
