"""Stand-ins for captured ops while a lorafied module trains: lorafy points nodes at them, fold points
them back, so the folded graph is the captured one.

Each stand-in computes what the captured op computes; it only changes *how* in eager training::

    captured op                                    stand-in (training)
    scaled_dot_product_attention(q, k, v, mask)    causal_sdpa: is_causal=True when mask is the causal one
    reshape(expand(k[:, :, None]), ...) feeding    repeat_kv(..., k): grouped-query keys/values not
      only those                                     copied, gradients straight to k
    wrap_with_set_grad_enabled(False, region, *a)  no_grad_region: the region with autocast off
    _assert_tensor_metadata(t, dtype=d, ...)       metadata_check: no dtype check under autocast

Autocast: a captured graph records the dtypes the model computed in. Under ``torch.autocast`` its
matmuls run in the autocast dtype, which (a) changes what the model computes in regions it computes
without gradients (Hugging Face builds its rotary tables in fp32 with autocast disabled, but its
``maybe_autocast`` enters no context when autocast is off at capture, so nothing of it is in the
graph), and (b) trips the dtype assertions torch.export places before each ``.to(dtype)``. The
stand-ins give autocast training what eager autocast gives the model: no-grad regions run as captured
(autocast off), and the assertions check device and layout but not the dtype autocast chose.
Outside autocast every stand-in calls the captured op unchanged.

The node's ``meta[NODE_STAND_IN]`` names the op it stands in for; :func:`restore` puts it back, and
drops the arguments a stand-in was given beyond the captured op's (``meta[NODE_STAND_IN_ARGS]``: how
many the captured op had).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .attention import causal_sdpa, repeat_kv

__all__ = ["metadata_check", "no_grad_region", "NODE_STAND_IN", "NODE_STAND_IN_ARGS", "restore", "stand_in",
    "STAND_INS"]

aten = torch.ops.aten
NODE_STAND_IN = "lora_fx_stand_in"  # node.meta: the name of the captured op this node's target stands in for
NODE_STAND_IN_ARGS = "lora_fx_stand_in_args"  # node.meta: the captured op's argument count, where a stand-in has more
_no_grad_hop = torch.ops.higher_order.wrap_with_set_grad_enabled


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _autocasting(args: tuple) -> list[str]:
    """The device types among ``args``' tensors (CPU and CUDA when there are none) where autocast is on."""
    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)} or {"cpu", "cuda"}
    return [d for d in sorted(devices) if _autocast_on(d)]


def no_grad_region(enable: bool, region: Callable, *args: Any) -> Any:
    """``wrap_with_set_grad_enabled(enable, region, *args)``, with autocast off while the region runs."""
    on = _autocasting(args)
    if not on:
        return _no_grad_hop(enable, region, *args)
    with torch.autocast(on[0], enabled=False):
        return no_grad_region(enable, region, *args)  # a second autocast device, if any, on the next call


def metadata_check(a: torch.Tensor, size=None, stride=None, dtype=None, *, device=None, layout=None) -> None:
    """``_assert_tensor_metadata``, without the dtype check while autocast is on for ``a``'s device."""
    if dtype is not None and _autocast_on(a.device.type):
        dtype = None
    aten._assert_tensor_metadata.default(a, size, stride, dtype, device=device, layout=layout)


def _has_mask(node: fx.Node) -> bool:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return isinstance(mask, fx.Node)


_SDPA = (aten.scaled_dot_product_attention.default, causal_sdpa)


def _repeats_kv(node: fx.Node) -> bool:
    """A grouped-query key/value repetition (``reshape`` of a 5-d ``expand`` to 4-d) whose every user is
    a masked attention call reading it as key or value only."""
    src = node.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is aten.expand.default
            and len(src.args[1]) == 5 and len(node.args[1]) == 4 and node.users):
        return False
    return all(u.op == "call_function" and u.target in _SDPA and _has_mask(u)
               and all(a is not node for i, a in enumerate(u.args) if i not in (1, 2))
               and all(a is not node for a in u.kwargs.values()) for u in node.users)


def _full_slice(node: fx.Node) -> bool:
    """``aten.slice(x, dim, 0, end)`` with step 1 and ``end`` past the dimension (``x[:, :]``): a no-op view."""
    if not (node.op == "call_function" and node.target is aten.slice.Tensor and isinstance(node.args[0], fx.Node)):
        return False
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    if not (start in (0, None) and step == 1 and isinstance(dim, int)):
        return False
    if end is None or (isinstance(end, int) and end >= 2**62):  # torch.export writes x[:] as end=INT64_MAX
        return True
    val = node.args[0].meta.get("val")
    size = val.shape[dim] if isinstance(val, torch.Tensor) else None
    return isinstance(end, int) and isinstance(size, int) and end >= size


def _kv_source(node: fx.Node) -> tuple | None:
    """The repetition's source ``k`` (4-d) when ``node``'s expand reads ``k[:, :, None]``, captured as full
    slices around one ``unsqueeze(k, 2)``: then ``(x, shape, k)``, the stand-in's arguments."""
    src = node.args[0].args[0]
    seen_unsqueeze = False
    while isinstance(src, fx.Node):
        if _full_slice(src):
            src = src.args[0]
        elif (not seen_unsqueeze and src.op == "call_function" and src.target is aten.unsqueeze.default
              and src.args[1] == 2):
            seen_unsqueeze, src = True, src.args[0]
        else:
            break
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not (seen_unsqueeze and isinstance(val, torch.Tensor) and val.dim() == 4):
        return None
    return (*node.args[:2], src)


# captured op -> (stand-in, which of its nodes it applies to[, the stand-in's arguments or None: the captured ones])
STAND_INS: dict[Any, tuple] = {
    aten.scaled_dot_product_attention.default: (causal_sdpa, _has_mask),
    aten.reshape.default: (repeat_kv, _repeats_kv, _kv_source),
    _no_grad_hop: (no_grad_region, lambda node: node.args[0] is False),
    aten._assert_tensor_metadata.default: (metadata_check, lambda node: True),
}
_CAPTURED = {str(op): op for op in STAND_INS}  # node.meta holds names (plain data), not op objects


def stand_in(graph: fx.Graph) -> int:
    """Points every node :data:`STAND_INS` covers at its stand-in; returns how many."""
    n = 0
    for node in graph.nodes:
        entry = STAND_INS.get(node.target) if node.op == "call_function" else None
        if entry is not None and entry[1](node):
            node.meta[NODE_STAND_IN] = str(node.target)
            node.target = entry[0]
            args = entry[2](node) if len(entry) > 2 else None
            if args is not None:
                node.meta[NODE_STAND_IN_ARGS] = len(node.args)
                node.args = args
            n += 1
    return n


def restore(graph: fx.Graph) -> int:
    """Undoes :func:`stand_in` (each node's captured op again); returns how many nodes it restored."""
    n = 0
    for node in graph.nodes:
        original = node.meta.pop(NODE_STAND_IN, None)
        if original is not None:
            node.target = _CAPTURED[original]
            count = node.meta.pop(NODE_STAND_IN_ARGS, None)
            if count is not None:
                node.args = node.args[:count]
            n += 1
    return n
