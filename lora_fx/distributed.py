"""Data-parallel and sharded training of lorafied graphs.

A lorafied module is a plain ``nn.Module`` whose base parameters are frozen, so
``torch.nn.parallel.DistributedDataParallel`` registers only the LoRA A/B parameters with its reducer
and all-reduces only their gradients (a few MB instead of the model). :func:`wrap_ddp` checks that
this is really so before wrapping, and :func:`adapter_divergence` checks that the ranks agree.

For a base that does not fit one device, :func:`fully_shard_blocks` splits the captured graph back
into its transformer blocks (:mod:`lora_fx.blocks`) and applies FSDP2's ``fully_shard`` to each
block, then to the root: a block gathers its weights only while it runs. :func:`gather_adapter`
copies the trained (sharded) LoRA tensors back into the lorafied module for ``save_adapter`` / fold.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import SiteError
from .passes.lorafy import lora_parameters

__all__ = ["adapter_divergence", "fully_shard_blocks", "gather_adapter", "wrap_ddp"]


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


def fully_shard_blocks(lgm: fx.GraphModule, prefix: str = "model.layers", **fsdp_kwargs: Any) -> nn.Module:
    """Per-block FSDP2 on a lorafied graph: ``fully_shard`` on every block, then on the root.

    Returns the split module (train it; its parameters are DTensors). ``lgm`` keeps the original,
    unsharded tensors: after training call :func:`gather_adapter` to bring the adapter back into it.

    Raises:
        SiteError: a base parameter requires grad, or no block lies under ``prefix``.
    """
    from torch.distributed.fsdp import fully_shard

    from .blocks import blocks_of, split_blocks

    _check_frozen(lgm)
    split = split_blocks(lgm, prefix)
    for block in blocks_of(split):
        fully_shard(block, **fsdp_kwargs)
    fully_shard(split, **fsdp_kwargs)
    return split


def gather_adapter(split: nn.Module, lgm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Copies the LoRA tensors of a sharded split module into ``lgm`` (a collective: every rank calls it).

    Returns the full tensors by their names in ``lgm``.
    """
    from .blocks import split_name

    lora = {n for br in lgm.meta["lora_fx"].branches for n in (br.a, br.b)}
    out = {}
    for name, p in split.named_parameters():
        original = split_name(name)
        if original in lora:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[original] = full.detach()
            with torch.no_grad():
                lgm.get_parameter(original).copy_(full)
    missing = lora - set(out)
    if missing:
        raise SiteError(f"gather_adapter: the split module has no parameter for {sorted(missing)[:3]}")
    return out


def _check_frozen(lgm: fx.GraphModule) -> None:
    lora = {id(p) for p in lora_parameters(lgm)}
    extra = [n for n, p in lgm.named_parameters() if p.requires_grad and id(p) not in lora]
    if extra:
        raise SiteError(f"base parameters {extra[:3]} ({len(extra)} in all) require grad; freeze them "
                        "(p.requires_grad_(False)) before sharding")
