"""The LoRA branch and its delta: pure tensor math, the one home of fold's arithmetic.

A :class:`Branch` is one A/B pair and what it means. The delta of the branches of one site, in the
weight's own layout and shape, is::

    D[out, in]        = sum_i  scale_i · B_i @ A_i    (B_i @ A_i lands in rows slice_i; all rows if None)
    delta             = to_layout(D, layout, shape)    (per op kind, lora_fx/kinds: "out,in": D,
                                                        "in,out"/"embedding": D.T, computed as
                                                        sum s·Aᵀ@Bᵀ; "conv": D.reshape(shape))

computed in the *compute dtype* (fp32, fp64 for fp64 weights) and rounded once::

    merge:    W' = round_{dtype(W)}(cdt(W) + delta)                 (lora_fx.fold)
    recover:  W  = the x with round(x + delta) == W', else W' - delta  (undoing a fold, see recover)

Everything that folds (fold, swap_adapter, combine_adapters, refold_onnx) calls these functions, so
a swapped or refolded weight is bit-identical to a freshly folded one. Nothing here knows graphs,
modules or files: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import inf
from typing import TYPE_CHECKING

import torch

from .kinds import LAYOUTS, kind_for_layout
from .kinds.base import transposed

if TYPE_CHECKING:
    from .sites import Site

__all__ = ["Branch", "compute_dtype", "delta", "fold_weight", "merge", "product", "recover", "to_layout"]

@dataclass(frozen=True)
class Branch:
    """One A/B pair: ``delta[slice rows] += scale · B @ A`` at ``site``, A (r, in...), B (out, r...).

    ``a`` and ``b`` name the tensors in their container: parameter names in a lorafied module
    (``<path>.lora_A.<leaf>``), tensor names in an :class:`~lora_fx.adapters.Adapter`. The same type
    serves both, so nothing converts one into the other.
    """

    key: str  # PEFT-style module key, e.g. "transformer.h.0.attn.c_attn" (+ "_slice0_768" ...)
    site: Site  # where it applies; for a branch read from a file only id/path/weight/op/layout/kind
    a: str
    b: str
    rank: int
    alpha: float
    scale: float
    dropout: float = 0.0
    slice: tuple[int, int] | None = None
    magnitude: str | None = None  # DoRA: the name of m (one value per output row of the slice)

    @property
    def names(self) -> tuple[str, ...]:
        """The trainable tensors' names: A, B (and m for DoRA)."""
        return (self.a, self.b) if self.magnitude is None else (self.a, self.b, self.magnitude)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta is computed and added in: fp64 for fp64 weights, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def product(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float, tuple[int, int] | None]],
            out_features: int, dtype: torch.dtype, ab_dtype: torch.dtype | None = None, *,
            batched: bool = False, transpose: bool = False) -> torch.Tensor:
    """``D = sum scale · B @ A`` as an (out_features, in*) matrix in ``dtype``.

    Args:
        pairs: ``(A, B, scale, slice)``; A (r, in, *kernel), B (rows, r, *1).
        ab_dtype: round A and B to this dtype first (what a module holding them in the weight's dtype
            computes with); None uses them as given.
        batched: A (E, r, in), B (E, out, r) (MoE experts): ``D[e] = sum scale · B[e] @ A[e]``,
            (E, out, in), whole-weight pairs only.
        transpose: return ``Dᵀ`` (in, out), computed as ``sum scale · Aᵀ @ Bᵀ`` (contiguous).
    """
    if batched:
        if any(sl is not None for *_, sl in pairs):
            raise ValueError("batched (per-expert) LoRA pairs cannot adapt output slices")
        cast = (lambda t: t.detach()) if ab_dtype is None else (lambda t: t.detach().to(ab_dtype))
        out = None
        for a, b, scale, _ in pairs:
            prod = torch.bmm(cast(b).to(dtype), cast(a).to(dtype).to(b.device)).mul_(scale)
            out = prod if out is None else out.add_(prod)
        return out
    def matmul(a, b):  # B @ A, or (transpose) Aᵀ @ Bᵀ
        a, b = a.detach(), b.detach()
        if ab_dtype is not None:
            a, b = a.to(ab_dtype), b.to(ab_dtype)
        a, b = a.to(dtype).reshape(a.shape[0], -1), b.to(dtype).reshape(b.shape[0], -1)
        return a.T @ b.T if transpose else b @ a

    first_a = pairs[0][0]
    if len(pairs) == 1 and pairs[0][3] is None and pairs[0][1].shape[0] == out_features:
        a, b, scale, _ = pairs[0]  # one whole-weight branch: no zero buffer to add into
        return matmul(a, b).mul_(scale)  # the same products and one rounding each as scale * (B @ A)
    rows_first = (out_features, first_a[0].numel())
    out = torch.zeros(rows_first[::-1] if transpose else rows_first, dtype=dtype, device=first_a.device)
    for a, b, scale, sl in pairs:
        rows = slice(None) if sl is None else slice(*sl)
        prod = scale * matmul(a.to(out.device), b.to(out.device))
        if transpose:
            out[:, rows] += prod
        else:
            out[rows] += prod
    return out


def to_layout(d: torch.Tensor, layout: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``D`` (out, in*) in the weight's layout and shape (each op kind registers its layouts)."""
    try:
        convert = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown weight layout {layout!r}; known: {sorted(LAYOUTS)}") from None
    return convert(d, tuple(shape))


def delta(branches: Sequence[Branch], tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
          site: Site, dtype: torch.dtype, *, ab_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The summed delta of one site's branches, weight-shaped, in ``dtype``.

    Args:
        branches: the site's branches (slices of one fused weight, or one branch).
        tensors: their A/B tensors by name: a mapping, or a getter such as ``gm.get_parameter``.
        site: gives ``out_features``, ``layout`` and ``shape`` (the weight's).
        dtype: usually :func:`compute_dtype` of the weight's dtype.
        ab_dtype: see :func:`product`.
    """
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    pairs = [(get(br.a), get(br.b), br.scale, br.slice) for br in branches]
    batched = kind_for_layout(site.layout).batched if site.layout in LAYOUTS else False
    if LAYOUTS.get(site.layout) is transposed:  # Dᵀ computed as such: contiguous like the weight
        return product(pairs, site.out_features, dtype, ab_dtype, transpose=True)
    return to_layout(product(pairs, site.out_features, dtype, ab_dtype, batched=batched), site.layout, site.shape)


def merge(w: torch.Tensor, d: torch.Tensor, *, into_delta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round(cdt(W) + delta), cdt(W) + delta)``: the folded weight in W's dtype, and before rounding.

    ``into_delta``: add W into ``d``'s buffer (``d`` is consumed): one new weight-sized buffer instead
    of two, the same values (W is cast to the compute dtype either way)."""
    merged = d.add_(w.detach()) if into_delta else w.detach().to(d.dtype) + d
    return merged.to(w.dtype), merged


def fold_weight(w: torch.Tensor, branches: Sequence[Branch],
                tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor], site: Site, *,
                ab_dtype: torch.dtype | None = None, base: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round(W'), W')``: a site's folded weight, LoRA (``W + delta``) or DoRA (:func:`lora_fx.dora.merge`).

    ``base``: W itself when ``w`` only gives the dtype (swap: the recorded base weight); the sum is
    formed in the compute dtype of ``w`` (fp64 when ``base`` is fp64, a recovered base)."""
    src = w if base is None else base
    cdt = torch.float64 if src.dtype == torch.float64 else compute_dtype(w.dtype)
    d = delta(branches, tensors, site, cdt, ab_dtype=ab_dtype)
    if not any(br.magnitude for br in branches):
        merged = d.add_(src.detach().to(cdt))
        return merged.to(w.dtype), merged
    from .dora import merge as dora_merge

    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    rows = [(get(br.magnitude), *(br.slice or (0, site.out_features))) for br in branches if br.magnitude]
    rounded, merged = dora_merge(src.detach().to(cdt), d, site.layout, rows)
    return rounded.to(w.dtype), merged


def recover(folded: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The base weight, in fp64, of a folded weight ``W' = round(x + d)``.

    Where ``|d|`` is small next to ``|W|`` (most entries of any real fine-tune) exactly one float x
    has ``round(x + d) == W'``, and it is the true base, bit for bit. Elsewhere (several fit: a delta
    larger than the weight) ``W' - d`` in fp64 is kept, within half an ulp of ``|W'|`` of the truth;
    for dtypes other than fp32/fp64 it is kept everywhere.
    """
    guess = folded.double() - d.double()
    if folded.dtype not in (torch.float32, torch.float64):
        return guess
    x = guess.to(folded.dtype)
    cands = [x]
    up, down = x, x
    for _ in range(2):  # the floats x whose x + d rounds to W' lie within 2 ulps of x
        up = torch.nextafter(up, torch.full_like(up, inf))
        down = torch.nextafter(down, torch.full_like(down, -inf))
        cands += [up, down]
    fits = [(c.to(d.dtype) + d).to(folded.dtype) == folded for c in cands]
    count = torch.stack(fits).sum(0)
    best = x
    for c, ok in zip(cands, fits, strict=True):
        best = torch.where(ok, c, best)
    return torch.where(count == 1, best.double(), guess)
