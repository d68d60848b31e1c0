"""LoRA+: the B matrices learn faster than the A matrices (Hayou et al., 2024, arXiv:2402.12354).

The same parameter groups as PEFT's ``peft.optimizers.create_loraplus_optimizer``, built from a lorafied
module instead of a ``PeftModel``::

    group          parameters                                         lr                     weight decay
    A              every lora_A (and other trainable tensors)         lr                     loraplus_weight_decay
    embedding      lora_A and lora_B of embedding sites               loraplus_lr_embedding  loraplus_weight_decay
    B              every lora_B, and 1-d trainable tensors            lr * loraplus_lr_ratio loraplus_weight_decay
    B no decay     B-group tensors whose name contains "bias"         lr * loraplus_lr_ratio 0

(PEFT sorts a parameter by the module holding it: both tensors of a LoRA ``Embedding`` layer go to the
embedding group, a ``lora_B`` name or a 1-d tensor, such as DoRA's magnitude, to B, anything else to A.)
Empty groups are left out. Trainer's LR schedule scales every group's lr by the same factor, so the
ratio holds through warmup and decay::

    opt = lora_fx.create_loraplus_optimizer(lgm, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    trainer = transformers.Trainer(model, args, optimizers=(opt, None), ...)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .graph_module import lora_state

__all__ = ["create_loraplus_optimizer", "lora_module", "loraplus_param_groups"]


def lora_module(model: nn.Module) -> nn.Module:
    """The lorafied module inside ``model``: ``model`` itself, or what a wrapper holds
    (:class:`lora_fx.training.TrainerModule`'s ``graph_module``, DDP's ``module``)."""
    seen = 0
    while seen < 8 and not isinstance(getattr(model, "meta", None), dict):
        inner = getattr(model, "graph_module", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0, *,
                          loraplus_weight_decay: float = 0.0,
                          loraplus_lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """The optimizer parameter groups of LoRA+ (PEFT's grouping, see the module docstring).

    Args:
        model: what :func:`lora_fx.lorafy` returned (or a :class:`~lora_fx.training.TrainerModule` / DDP
            wrapper of it).
        lr: the learning rate of the A matrices.
        loraplus_lr_ratio: lr of B / lr of A (LoRA+'s ratio; the paper recommends 16, PEFT has no default).
        loraplus_weight_decay: weight decay of every group except B tensors named ``*bias*``.
        loraplus_lr_embedding: lr of the LoRA tensors of embedding sites (PEFT's default 1e-6).

    Returns:
        ``[{"params": [...], "lr": ..., "weight_decay": ..., "name": "A" | "embedding" | "B" | "B_no_decay"}]``
        in that order, empty groups left out.

    Raises:
        NoLoraError: ``model`` carries no LoRA.
        ValueError: a learning rate or the ratio is not positive.
    """
    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio),
                        ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if not value > 0:
            raise ValueError(f"LoRA+ needs {name} > 0, got {value!r}")
    lgm = lora_module(model)
    state = lora_state(lgm, "loraplus_param_groups")
    embedding = {n for br in state.branches if br.site.kind == "embedding" for n in (br.a, br.b)}
    b_names = {br.b for br in state.branches}
    groups: dict[str, list[torch.nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in lgm.named_parameters():
        if not p.requires_grad:
            continue
        if name in embedding:
            groups["embedding"].append(p)
        elif name in b_names or p.ndim == 1:
            groups["B_no_decay" if "bias" in name else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, loraplus_weight_decay), "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
                "B": (lr * loraplus_lr_ratio, loraplus_weight_decay), "B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    return [{"params": params, "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g, params in groups.items() if params]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer`` for a lorafied module: ``optimizer_cls`` over
    :func:`loraplus_param_groups`.

    Args:
        model: a lorafied module (or a wrapper of it).
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: the A matrices' learning rate (also the optimizer's default ``lr``).
        loraplus_lr_ratio: lr of B / lr of A.
        **kwargs: ``loraplus_weight_decay`` (default 0.0) and ``loraplus_lr_embedding`` (default 1e-6),
            as in PEFT; everything else goes to ``optimizer_cls``.
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay=weight_decay,
                                   loraplus_lr_embedding=lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)
