"""PiSSA and OLoRA: LoRA initialised from W itself, the base weight becoming the residual.

PEFT's ``init_lora_weights`` names, for a weight's rows W (out, in) in fp32 and scale s::

    "pissa":          W = V S Uᵀ (full SVD);  A = sqrt(S_r / s) U_rᵀ,  B = V_r sqrt(S_r / s)
    "pissa_niter_N":  the same from torch.svd_lowrank(W, r, niter=N) (randomised: not reproducible)
    "olora":          W = Q R (QR);          A = R[:r],               B = Q[:, :r]
    base:             W_res = W - s·B@A      (rounded once to W's dtype)

so a fresh module computes W_res + s·B@A ≈ W. lorafy writes W_res as a new frozen parameter of the
lorafied module (the user's model keeps W) and keeps ``(A0, B0)`` in ``gm.meta[INITIAL_KEY]``; fold
merges into W_res as usual (the folded export is structurally the base export, with other weights).

Saving converts to a plain LoRA over the ORIGINAL W, as PEFT's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` does (:func:`converted`)::

    W_res + s·B A = W + s·(B A - B0 A0)  =  W + s·[B, -B0] @ [A; A0]      rank 2r, alpha 2·alpha

(``alpha·sqrt(2)`` with rsLoRA, the same scale), so the file loads on the original model, in PEFT or
lora-fx, and swap / refold / combine treat it as any adapter.
"""

from __future__ import annotations

import math

import torch

from .dora import out_major
from .errors import SiteError

__all__ = ["check_site", "converted", "decompose", "INITIAL_KEY", "write_rows"]

INITIAL_KEY = "lora_fx_initial"  # gm.meta: branch key -> (A0, B0, init) of PiSSA / OLoRA branches


def check_site(site, init: str) -> None:
    """SiteError unless ``init`` can start a branch of ``site`` (linear-like 2-D weights only)."""
    if site.kind != "linear":
        raise SiteError(f"site {site.id} ({site.op} {site.weight}): init={init!r} decomposes a 2-D (out, in) weight; "
                        f"{site.kind} sites take init='kaiming' or 'gaussian' (PEFT's PiSSA / OLoRA adapt Linear "
                        "layers only)")


def decompose(w: torch.Tensor, layout: str, lo: int, hi: int, rank: int, scale: float, init: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A0, B0, W_res rows)`` of rows lo:hi of ``w`` (see module doc), all fp32."""
    rows = out_major(w.detach(), layout)[lo:hi].to(torch.float32)
    if rank > min(rows.shape):
        raise SiteError(f"init={init!r}: rank {rank} exceeds min(out, in) = {min(rows.shape)} of the weight's "
                        f"rows {lo}:{hi}; PiSSA / OLoRA take the first r singular vectors / QR columns")
    if init == "olora":
        q, r = torch.linalg.qr(rows)
        a0, b0 = r[:rank].contiguous(), q[:, :rank].contiguous()
    else:
        if init == "pissa":
            v, s, uh = torch.linalg.svd(rows, full_matrices=False)
            vr, sr, uhr = v[:, :rank], s[:rank] / scale, uh[:rank]
        else:  # pissa_niter_N
            vr, sr, ur = torch.svd_lowrank(rows, rank, niter=int(init.rpartition("_")[2]))
            sr, uhr = sr / scale, ur.t()
        root = torch.diag(torch.sqrt(sr))
        a0, b0 = root @ uhr, vr @ root
    return a0, b0, rows - scale * b0 @ a0


def write_rows(w: torch.Tensor, layout: str, lo: int, hi: int, rows: torch.Tensor) -> None:
    """Writes ``rows`` (out rows, in) into rows lo:hi of ``w`` (in place, rounded to w's dtype)."""
    with torch.no_grad():
        out_major(w, layout)[lo:hi] = rows.to(w.dtype)


def converted(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, alpha: float, rank: int,
              rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A', B', rank', alpha') of the plain LoRA over the original W that a residual branch equals."""
    a2 = torch.cat([a.detach(), a0.to(device=a.device, dtype=a.dtype)], 0)
    b2 = torch.cat([b.detach(), -b0.to(device=b.device, dtype=b.dtype)], 1)
    return a2, b2, 2 * rank, alpha * (math.sqrt(2) if rslora else 2)
