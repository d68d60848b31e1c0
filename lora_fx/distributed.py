"""Data-parallel training of lorafied graphs.

A lorafied module is a plain ``nn.Module`` whose base parameters are frozen, so
``torch.nn.parallel.DistributedDataParallel`` registers only the LoRA A/B parameters with its reducer
and all-reduces only their gradients (a few MB instead of the model). :func:`wrap_ddp` checks that
this is really so before wrapping, and :func:`adapter_divergence` checks that the ranks agree.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import fx
from torch.nn.parallel import DistributedDataParallel

from .errors import SiteError
from .passes.lorafy import lora_parameters


def wrap_ddp(lgm: fx.GraphModule, *, allow_extra: bool = False, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wraps a lorafied module in DDP after checking that only LoRA parameters require grad.

    Args:
        lgm: what :func:`lora_fx.lorafy` returned, on this rank's device.
        allow_extra: accept trainable parameters besides LoRA's (a classification head, say).
        **ddp_kwargs: passed to ``DistributedDataParallel`` (``device_ids``, ``bucket_cap_mb``...).

    Raises:
        SiteError: a base parameter requires grad (DDP would all-reduce its gradient every step), or
            ``lgm`` carries no LoRA.
    """
    lora = {id(p) for p in lora_parameters(lgm)}
    extra = [n for n, p in lgm.named_parameters() if p.requires_grad and id(p) not in lora]
    if extra and not allow_extra:
        raise SiteError(f"wrap_ddp: base parameters {extra[:3]} ({len(extra)} in all) require grad, so DDP "
                        "would all-reduce their gradients too; freeze them (p.requires_grad_(False)) or "
                        "pass allow_extra=True if you train them on purpose")
    return DistributedDataParallel(lgm, **ddp_kwargs)


def adapter_divergence(lgm: fx.GraphModule, group: Any = None) -> float:
    """Largest |difference| between this rank's LoRA parameters and rank 0's (0.0 when in sync).

    A collective: every rank of ``group`` must call it.
    """
    module = lgm.module if isinstance(lgm, DistributedDataParallel) else lgm
    params = lora_parameters(module)
    worst = torch.zeros((), device=params[0].device)
    for p in params:
        ref = p.detach().clone()
        dist.broadcast(ref, src=0, group=group)
        worst = torch.maximum(worst, (ref - p.detach()).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst)
