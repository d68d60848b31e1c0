"""DoRA (weight-decomposed LoRA, Liu et al. 2024): the magnitude, its detached norm, its output and its fold.

A DoRA site keeps LoRA's A and B and adds a trainable magnitude ``m`` (one value per output feature,
initialised to the row norms of W). With ``V = W + s·B@A`` (W as (out, in*): one row per output)::

    W' = m / ||V||_row · V              ||V||_row detached (paper, section 4.3; PEFT does the same)

so the site's output is ``y' = g ⊙ (y - b + s·B A x) + b`` with ``g = m / ||V||`` per output
feature (b: the op's bias). This is PEFT's ``DoraLinearLayer.forward``:
``y + (g - 1)·(y - b) + g·s·B(A x)``; with LoRA dropout in training, PEFT's base term uses the
dropped input, ``y + (g - 1)·W x_d + g·s·B A x_d``, and so does :func:`dora_output`.

Cheaper than PEFT, which rebuilds ``B@A`` from an identity matrix and takes the norm of the full
``W + s·B@A`` every step: the squared row norm is expanded (:func:`row_norms`)::

    ||W_j + s·(BA)_j||² = ||W_j||² + 2s·<(W Aᵀ)_j, B_j> + s²·<(B (A Aᵀ))_j, B_j>

which needs ``W Aᵀ`` (out x r), ``A Aᵀ`` (r x r) and one pass over W for its row norms: no
weight-sized temporary. The output (:class:`_Rescale`) multiplies ``y + s·B A x`` by g in place and
keeps the product itself for backward (the gradient of m is ``Σ dy ⊙ (y' - b) / g``): no second
wide tensor per site.

Fold (:func:`merge`): ``V = fp32(W) + s·B@A``, the norm of V taken directly (not expanded), each row
times ``m / ||V||``, rounded once to W's dtype. m is then gone: the folded graph is the captured one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kinds import CONV, IN_OUT, OUT_IN

__all__ = ["dora_output", "dora_scale", "LAYOUTS", "magnitude_init", "merge", "out_major", "row_norms"]

LAYOUTS = (OUT_IN, IN_OUT, CONV)  # weight layouts with one output feature per row of out_major()


def out_major(w: torch.Tensor, layout: str) -> torch.Tensor:
    """``w`` as (out, in*): one row per output feature (a view; (in, out) weights transposed)."""
    if layout == OUT_IN:
        return w
    if layout == IN_OUT:
        return w.T
    if layout == CONV:
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"DoRA needs a weight of layout {LAYOUTS}, got {layout!r}")


def row_norms(w_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``||W_j + s·(B@A)_j||`` for every row j of ``w_rows`` (out, in*), in fp32 (fp64 for fp64 W),
    by the expansion in the module doc; A (r, in*...), B (out, r...) are read detached."""
    cdt = torch.float64 if w_rows.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        a2 = a.detach().reshape(a.shape[0], -1).to(cdt)
        b2 = b.detach().reshape(b.shape[0], -1).to(cdt)
        wc = w_rows.detach().to(cdt)  # no copy for fp32 weights
        sq = torch.linalg.vector_norm(wc, dim=1).square_()
        cross = torch.linalg.vecdot(wc @ a2.T, b2)  # <(W Aᵀ)_j, B_j>
        low = torch.linalg.vecdot(b2 @ (a2 @ a2.T), b2)  # ||(B A)_j||²
        return sq.add_(cross, alpha=2 * scale).add_(low, alpha=scale * scale).clamp_min_(0).sqrt_()


def dora_scale(w: torch.Tensor, layout: str, scale: float, out_features: int,
               parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]]) -> torch.Tensor:
    """``g = m / ||W + s·B@A||_row`` over the site's output features (graph node of a DoRA site).

    ``parts``: ``(m, A, B, start, stop)`` per branch (rows start:stop; the whole weight for one
    unsliced branch). Output features no branch covers get g = 1. Only m receives a gradient.
    """
    rows = out_major(w, layout)
    pieces, at = [], 0
    for m, a, b, lo, hi in parts:
        if lo > at:
            pieces.append(torch.ones(lo - at, dtype=m.dtype, device=m.device))
        pieces.append(m / row_norms(rows[lo:hi], a, b, scale).to(m.dtype))
        at = hi
    if at < out_features:
        pieces.append(torch.ones(out_features - at, dtype=pieces[0].dtype, device=pieces[0].device))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def magnitude_init(w: torch.Tensor, layout: str, lo: int, hi: int) -> torch.Tensor:
    """The initial magnitude of rows lo:hi: their norms in W (computed in fp32)."""
    rows = out_major(w.detach(), layout)[lo:hi]
    return torch.linalg.vector_norm(rows.to(torch.float64 if w.dtype == torch.float64 else torch.float32), dim=1)


def _shape(g: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    view = [1] * like.dim()
    view[dim] = -1
    return g.view(view)


def _reduce_dims(t: torch.Tensor, dim: int) -> list[int]:
    dim = dim % t.dim()
    return [d for d in range(t.dim()) if d != dim]


class _Rescale(torch.autograd.Function):
    """``out = g ⊙ u + (1 - g) ⊙ b`` over the channel dim; keeps ``out`` (not u) for the gradient of g."""

    @staticmethod
    def forward(ctx, u, g, bias, dim, inplace):
        gv = _shape(g.to(u.dtype), u, dim)
        out = u.mul_(gv) if inplace else u * gv
        if bias is not None:
            out.add_(_shape((1 - g.to(u.dtype)) * bias.to(u.dtype), u, dim))
        if inplace:
            ctx.mark_dirty(u)
        ctx.save_for_backward(out, g, bias)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, dout):
        out, g, bias = ctx.saved_tensors
        dim = ctx.dim
        du = dout * _shape(g.to(dout.dtype), dout, dim) if ctx.needs_input_grad[0] else None
        dg = None
        if ctx.needs_input_grad[1]:
            red = _reduce_dims(out, dim)
            if out.dim() >= 2 and dim % out.dim() == out.dim() - 1:  # channels last: no wide product
                s1 = torch.linalg.vecdot(dout.reshape(-1, out.shape[-1]), out.reshape(-1, out.shape[-1]), dim=0)
            else:
                s1 = (dout * out).sum(red)
            s1 = s1.to(g.dtype)
            if bias is not None:
                s1 = s1 - bias.to(g.dtype) * dout.sum(red).to(g.dtype)
            dg = s1 / g  # Σ dy ⊙ (y' - b) / g = Σ dy ⊙ (u - b)
        return du, dg, None, None, None


def _in_place_ok(u: torch.Tensor) -> bool:
    """u may be scaled in place: plain eager autograd on a fresh tensor (as fused.lora_addmm's rule)."""
    return (u._base is None and u.is_contiguous() and not (u.is_leaf and u.requires_grad)
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0)


def dora_output(y: torch.Tensor, u: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, dim: int,
                base_dropped: torch.Tensor | None = None, save_output: bool = True) -> torch.Tensor:
    """The output of a DoRA site (graph node; fold points its users back to ``y``).

    Args:
        y: the site's own output (with bias).
        u: ``y + s·B A x`` (no LoRA dropout), or ``W x_d + s·B A x_d`` (dropout: ``base_dropped`` is ``W x_d``).
        g: :func:`dora_scale`. ``bias``: the op's bias or None. ``dim``: the output-feature dim.
        save_output: keep the output for backward (False when a later op changes it in place).
    """
    if base_dropped is not None:  # PEFT's dropout form: y + (g - 1)·W x_d + g·s·B A x_d
        return (y - base_dropped + u * _shape(g.to(u.dtype), u, dim)).to(y.dtype)
    if torch.compiler.is_exporting() or not save_output:
        gv = _shape(g.to(u.dtype), u, dim)
        out = u * gv
        return (out if bias is None else out + _shape((1 - g.to(u.dtype)) * bias.to(u.dtype), u, dim)).to(y.dtype)
    out = _Rescale.apply(u, g, bias, dim, _in_place_ok(u))
    return out if out.dtype == y.dtype else out.to(y.dtype)


def merge(w: torch.Tensor, d: torch.Tensor, layout: str, scale_rows: Sequence[tuple[torch.Tensor, int, int]]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round(W'), W')`` with ``W' = m / ||V||_row · V``, ``V = cdt(W) + d`` (d: the summed delta in
    W's layout and the compute dtype, consumed); ``scale_rows``: ``(m, start, stop)`` per DoRA branch.
    Rows no branch covers stay ``V`` (= W there)."""
    v = d.add_(w.detach())
    rows = out_major(v, layout)
    for m, lo, hi in scale_rows:
        norm = torch.linalg.vector_norm(rows[lo:hi], dim=1)
        rows[lo:hi] *= (m.detach().to(v.dtype) / norm).unsqueeze(1)
    return v.to(w.dtype), v


def refuse_ort_adapters(branches, error: type[Exception], who: str) -> None:
    """ONNX Runtime's multi-LoRA adapters override A and B of an unfolded export; a DoRA site also needs
    ``m / ||W + s·B@A||`` recomputed from W, A, B and m, which an adapter file cannot carry: refused."""
    dora = [br.key for br in branches if br.magnitude]
    if dora:
        raise error(f"{who}: {dora[0]} (and {len(dora) - 1} more) are DoRA branches; ONNX Runtime adapter files "
                    "override an unfolded export's A and B only, and cannot express DoRA's magnitude and weight "
                    "norm. Fold each DoRA adapter instead (fold_and_export per task, or swap_adapter / refold_onnx "
                    "with the base)")
