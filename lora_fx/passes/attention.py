"""Causal attention for training: a materialized causal mask runs as ``is_causal=True`` in eager mode.

A captured Hugging Face decoder has no ``is_causal`` flag: under torch.export the model builds its
causal mask as a boolean tensor and passes it to every ``scaled_dot_product_attention`` (eager
Hugging Face skips the mask and sets ``is_causal=True`` when it can). Attention with an explicit mask
turns the mask into an additive float mask and attends to every block of keys; with ``is_causal`` the
kernel skips the blocks above the diagonal. This pass points each mask-taking sdpa call at
:func:`causal_sdpa`, which checks at run time whether the mask *is* the causal one (once per mask
tensor, not once per layer) and then drops it::

    before:  o = scaled_dot_product_attention(q, k, v, mask, scale=s)
    after:   o = causal_sdpa(q, k, v, mask, scale=s)
             # = scaled_dot_product_attention(q, k, v, None, is_causal=True, scale=s) when mask is
             #   exactly tril(ones(L, S)) (broadcast over batch and heads) and L == S; else the call above

Same values and gradients (the masked-out keys get probability 0 either way; the CPU flash kernel
gives bitwise-equal results). The check is one comparison of the boolean mask per mask tensor. It is skipped
(the original call runs) under ``torch.export`` (nothing of this reaches an exported graph), under
torch.compile (a data-dependent branch would break the graph), with attention dropout (the kernels
may draw dropout masks differently) and for non-boolean masks. lorafy points the nodes at it and fold
points them back at the aten op (both in :mod:`lora_fx.passes.stand_ins`), so the folded graph is the
captured one.

Grouped-query attention (fewer key/value heads than query heads): the captured graph repeats the
key and value heads to the query heads' count before the call (``repeat_kv``: an ``expand`` and a
``reshape`` that copies them), which the causal kernels do not need::

    before:  k = reshape(expand(k[:, :, None], (b, kv, n, s, d)), (b, kv*n, s, d))   # copies k n times
             o = scaled_dot_product_attention(q, k, v, mask, scale=s)
    after:   k = repeat_kv(expand(...), (b, kv*n, s, d), k)   # RepeatedKV: the broadcast view, no copy
             o = causal_sdpa(q, k, v, mask, scale=s)
             # = sdpa(q, k, v, None, is_causal=True, enable_gqa=True) on the un-repeated k and v when
             #   the mask is the causal one and a kernel with grouped-query support runs there (CPU
             #   flash; CUDA flash); else the repetition is copied as captured and the call above runs

The un-repeated ``k`` is the node the repetition starts from (``k[:, :, None]`` is captured as full
slices and an ``unsqueeze``; lorafy passes it as a third argument when it finds that chain): gradients
reach it directly, not back through the chain of views (a ``select``, an ``expand``, two full ``slice``s
and an ``unsqueeze`` per key and value, each a zero-fill and copy or a sum in backward).

Same values and gradients (query head h reads key/value head h // n either way); the repeated
keys/values are neither copied nor kept for backward (n times less attention input memory per
layer). What eager Hugging Face runs for a decoder without padding (``enable_gqa`` with no mask).
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch

__all__ = ["causal_sdpa", "repeat_kv", "RepeatedKV"]

aten = torch.ops.aten


class RepeatedKV(NamedTuple):
    """Keys or values repeated for grouped-query attention, not copied yet (see the module doc).

    ``x`` is the ``(b, kv, n, s, d)`` broadcast view (stride 0 along ``n``); ``shape`` the captured
    ``reshape``'s target, ``(b, kv*n, s, d)``; ``source`` the ``(b, kv, s, d)`` tensor ``x`` repeats."""

    x: torch.Tensor
    shape: tuple
    source: torch.Tensor

    def materialize(self) -> torch.Tensor:
        """The captured ``reshape``: the heads repeated, copied."""
        return aten.reshape.default(self.x, list(self.shape))


def repeat_kv(x: torch.Tensor, shape, source: torch.Tensor | None = None) -> torch.Tensor | RepeatedKV:
    """``aten.reshape(x, shape)`` of a grouped-query key/value repetition, deferred to :func:`causal_sdpa`
    (its only consumer) in eager mode; the reshape itself under torch.export and torch.compile.
    ``source``: the tensor ``x`` repeats (``x`` is ``source[:, :, None].expand(...)``), if the graph
    showed it; else the repetition's first copy is used."""
    if (x.dim() == 5 and len(shape) == 4 and x.stride(2) == 0 and not torch.compiler.is_exporting()
            and not torch.compiler.is_compiling()
            and list(shape) == [x.shape[0], x.shape[1] * x.shape[2], x.shape[3], x.shape[4]]):
        if source is None or tuple(source.shape) != (x.shape[0], x.shape[1], x.shape[3], x.shape[4]):
            source = x.select(2, 0)
        return RepeatedKV(x, tuple(shape), source)
    return aten.reshape.default(x, shape)


def causal_sdpa(query: torch.Tensor, key: torch.Tensor | RepeatedKV, value: torch.Tensor | RepeatedKV,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` with a causal boolean mask run as ``is_causal=True`` (and
    keys/values repeated by :func:`repeat_kv` read as grouped-query attention, without the copies)."""
    k_len = (key.x if isinstance(key, RepeatedKV) else key).shape[-2]
    if (attn_mask is not None and not is_causal and not dropout_p and attn_mask.dtype == torch.bool
            and not torch.compiler.is_exporting() and not torch.compiler.is_compiling()
            and _causal_cached(attn_mask, query.shape[-2], k_len)):
        attn_mask, is_causal = None, True
        if _grouped(query, key, value):
            return aten.scaled_dot_product_attention.default(query, key.source, value.source,
                                                             None, 0.0, True, scale=scale, enable_gqa=True)
    key = key.materialize() if isinstance(key, RepeatedKV) else key
    value = value.materialize() if isinstance(value, RepeatedKV) else value
    return aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, is_causal,
                                                     scale=scale, enable_gqa=enable_gqa)


def _grouped(query: torch.Tensor, key, value) -> bool:
    """Whether causal attention over ``key``/``value`` from :func:`repeat_kv` runs as grouped-query
    attention without the copies: both deferred, the query's heads their repetition, and a kernel with
    grouped-query support available (CPU flash attention; CUDA flash attention, which needs fp16/bf16:
    the CUDA kernel for fp32 has no grouped-query support, so there the repetition is copied)."""
    if not (isinstance(key, RepeatedKV) and isinstance(value, RepeatedKV) and query.dim() == 4
            and key.x.shape[1:3] == value.x.shape[1:3] and query.shape[1] == key.x.shape[1] * key.x.shape[2]):
        return False
    if query.device.type == "cpu":
        return True
    if query.device.type != "cuda":
        return False
    params = torch.backends.cuda.SDPAParams(query, key.source, value.source, None, 0.0, True, True)
    return torch.backends.cuda.can_use_flash_attention(params)


_LAST: list = [None, None, False]  # (weakref to the mask last checked, its key, the answer)


def _causal_cached(mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    """:func:`_is_causal_mask`, computed once per mask tensor: a decoder passes one mask to every layer,
    and the check's comparison reads the mask back to the host (on a GPU a synchronization, which
    would stall the host once per layer instead of once per forward)."""
    if mask.is_inference():  # no version counter to tell an in-place change: checked every time
        return _is_causal_mask(mask, q_len, k_len)
    ref, key, answer = _LAST
    now = (mask._version, q_len, k_len)
    if ref is not None and ref() is mask and key == now:
        return answer
    answer = _is_causal_mask(mask, q_len, k_len)
    _LAST[:] = [weakref.ref(mask), now, answer]
    return answer


def _is_causal_mask(mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    if q_len != k_len or mask.dim() < 2 or tuple(mask.shape[-2:]) != (q_len, k_len):
        return False
    return torch.equal(mask, _tril(q_len, mask.device).expand(mask.shape))


@functools.lru_cache(maxsize=16)
def _tril(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()
