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
"""

from __future__ import annotations

import functools
import weakref

import torch

aten = torch.ops.aten


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` with a causal boolean mask run as ``is_causal=True``."""
    if (attn_mask is not None and not is_causal and not dropout_p and attn_mask.dtype == torch.bool
            and not torch.compiler.is_exporting() and not torch.compiler.is_compiling()
            and _causal_cached(attn_mask, query.shape[-2], key.shape[-2])):
        attn_mask, is_causal = None, True
    return aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, is_causal,
                                                     scale=scale, enable_gqa=enable_gqa)


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
