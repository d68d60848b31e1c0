"""DDP on a lorafied graph: gloo, two CPU processes, only LoRA gradients synced.

Each rank trains on half of the batch; DDP averages the gradients, so after a few SGD steps both
ranks must hold the adapter that one process gets from the whole batch (same init, same steps).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import lora_fx
from lora_fx.distributed import adapter_divergence, wrap_ddp

STEPS, LR, BATCH = 4, 0.1, 8


class Net(nn.Module):
    """Two linears and a raw parameter used functionally (a site PEFT could not adapt)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.tanh(h @ self.w.T)
        return self.fc2(h)


def build() -> tuple[torch.fx.GraphModule, torch.Tensor, torch.Tensor]:
    """The same lorafied graph, init and data in every process."""
    torch.manual_seed(0)
    model = Net().eval()
    x, y = torch.randn(BATCH, 12), torch.randn(BATCH, 4)
    lgm = lora_fx.lorafy(lora_fx.trace(model, (x,)), ["fc1", "w", "fc2"], rank=2, alpha=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # B != 0 so every grad is non-zero
    return lgm, x, y


def train(module: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        loss = ((module(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lgm, x, y = build()
        ddp = wrap_ddp(lgm)
        lora = lora_fx.lora_parameters(lgm)
        reducer = ddp._get_ddp_logging_data()  # what DDP's reducer buckets and all-reduces
        lora_bytes = sum(p.numel() * p.element_size() for p in lora_fx.lora_parameters(lgm))
        half = BATCH // world
        train(ddp, lora, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        frozen_grads = [n for n, p in lgm.named_parameters() if p.grad is not None and "lora_" not in n]
        tensors = {n: p.detach() for n, p in lgm.named_parameters() if "lora_" in n}
        meta = {"synced": str(reducer["num_parameter_tensors"]), "lora": str(len(lora)),
                "synced_bytes": str(reducer["total_parameter_size_bytes"]), "lora_bytes": str(lora_bytes),
                "frozen_grads": ",".join(frozen_grads),
                "divergence": repr(adapter_divergence(lgm))}
        save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"), metadata=meta)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_ranks_equal_single_process(tmp_path: Path):
    start = time.perf_counter()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    elapsed = time.perf_counter() - start

    lgm, x, y = build()
    train(lgm, lora_fx.lora_parameters(lgm), x, y)
    ref = {n: p.detach() for n, p in lgm.named_parameters() if "lora_" in n}
    from safetensors import safe_open

    for rank in range(2):
        path = tmp_path / f"rank{rank}.safetensors"
        got = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        # the reducer only holds LoRA tensors; base weights never get a gradient
        assert meta["synced"] == meta["lora"] == str(len(ref))
        assert meta["synced_bytes"] == meta["lora_bytes"]
        assert meta["frozen_grads"] == ""
        assert float(meta["divergence"]) == 0.0
        assert got.keys() == ref.keys()
        for name, t in ref.items():
            err = (got[name] - t).abs().max().item()
            assert err <= 1e-6, f"rank {rank} {name}: max |DDP - single process| = {err:.3g}"
    moved = [n for n, t in ref.items() if not torch.equal(t, build()[0].get_parameter(n))]
    assert moved == list(ref)  # training changed every LoRA tensor
    assert elapsed < 60, f"DDP test took {elapsed:.1f}s (typically 10-20 s)"


def test_wrap_ddp_refuses_trainable_base():
    lgm, _, _ = build()
    lgm.get_parameter("fc1.weight").requires_grad_(True)
    with pytest.raises(lora_fx.SiteError, match="fc1.weight"):
        wrap_ddp(lgm)


# --------------------------------------------------------------------------------------------------
# per-block FSDP2 on a lorafied Llama (lora_fx.blocks + fully_shard_blocks)
# --------------------------------------------------------------------------------------------------


def build_llama():
    """A tiny lorafied Llama with B != 0, the same in every process, and its data."""
    import warnings

    from lora_fx.examples import zoo_models

    model, args, kwargs = zoo_models.build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lgm = lora_fx.lorafy(lora_fx.trace(model, args, kwargs), ["*.q_proj", "*.v_proj", "*.down_proj"], rank=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_fx.lora_parameters(lgm):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(2))
    return lgm, ids


def lm_loss(module, ids):
    logits = module(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from lora_fx.distributed import fully_shard_blocks, gather_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lgm, ids = build_llama()
        total = sum(p.numel() for n, p in lgm.named_parameters() if "lora_" not in n)
        sharded = fully_shard_blocks(lgm)
        local = sum(p.to_local().numel() for n, p in sharded.named_parameters() if "lora_" not in n)
        opt = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], lr=LR)
        half = ids.shape[0] // world
        for _ in range(STEPS):
            loss = lm_loss(sharded, ids[rank * half:(rank + 1) * half])
            opt.zero_grad()
            loss.backward()
            opt.step()
        tensors = gather_adapter(sharded, lgm)
        meta = {"local": str(local), "total": str(total), "blocks": str(len(list(sharded.blocks.children())))}
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(out, f"fsdp{rank}.safetensors"),
                  metadata=meta)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # three tiny-Llama captures (two ranks + the reference): ~40 s idle, minutes on a busy machine
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_per_block_fsdp_two_ranks_equal_single_process(tmp_path: Path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    lgm, ids = build_llama()
    opt = torch.optim.SGD(lora_fx.lora_parameters(lgm), lr=LR)
    for _ in range(STEPS):
        loss = lm_loss(lgm, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = {n: p.detach() for n, p in lgm.named_parameters() if "lora_" in n}
    start = build_llama()[0]
    assert all(not torch.equal(t, start.get_parameter(n)) for n, t in ref.items())  # training moved them
    from safetensors import safe_open

    for rank in range(2):
        path = tmp_path / f"fsdp{rank}.safetensors"
        got = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["blocks"] == "2"
        assert 0.45 <= int(meta["local"]) / int(meta["total"]) <= 0.55  # each rank holds half the base
        assert got.keys() == ref.keys()
        for name, t in ref.items():
            err = (got[name] - t).abs().max().item()
            assert err <= 1e-5, f"rank {rank} {name}: max |FSDP - single process| = {err:.3g}"
