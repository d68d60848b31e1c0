"""The ``conv`` kind: ``conv1d`` / ``conv2d`` with ``groups=1`` (``nn.Conv1d/2d``, ``F.conv1d/2d``).

Branch (PEFT's): A is a conv with the site's kernel, stride, padding and dilation, B a 1x1 conv::

    d = conv_B(conv_A(dropout(x)))       A (r, in, *kernel), B (out, r, *1)

Delta layout ``"conv"``: ``B.flatten(1) @ A.flatten(1)`` is (out, in·prod(kernel)), reshaped to the
weight's (out, in, *kernel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import CONV, OpKind, OpSpec, arg, register

__all__ = ["Conv", "CONV_KIND", "conv_params", "GROUPS_ARG"]

aten = torch.ops.aten
GROUPS_ARG = 6  # conv*(input, weight, bias, stride, padding, dilation, groups)


def conv_params(gm: fx.GraphModule, node: fx.Node) -> tuple[int, object, object, object]:
    """(spatial dims, stride, padding, dilation) of a conv site, whatever its graph form."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if mod.padding_mode != "zeros":
            raise NotImplementedError(f"{node.target}: padding_mode={mod.padding_mode!r}")
        return mod.weight.dim() - 2, mod.stride, mod.padding, mod.dilation
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    w = gm.get_parameter(str(given["weight"].target))
    nd = w.dim() - 2
    return nd, given.get("stride", [1] * nd), given.get("padding", [0] * nd), given.get("dilation", [1] * nd)


class Conv(OpKind):
    name = "conv"
    functions = {op: OpSpec("conv", 0, 1, CONV) for op in (
        aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding, aten.conv2d.padding, F.conv1d, F.conv2d)}
    modules = {nn.Conv1d: OpSpec("conv", 0, -1, CONV), nn.Conv2d: OpSpec("conv", 0, -1, CONV)}
    layouts = {CONV: lambda d, shape: d.reshape(shape)}
    peft_modules = {"Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d"}
    out_dim = 1  # (N, C_out, *spatial)
    dora = None  # DoRA: a magnitude per output channel, the norm over (in, *kernel) as PEFT's

    def accepts(self, node, weight):
        return (arg(node, GROUPS_ARG) or 1) == 1

    def accepts_module(self, mod):
        return mod.groups == 1

    def rejection(self, node):
        return (f"it is a grouped convolution (groups={arg(node, GROUPS_ARG)}): LoRA's update B @ A mixes every "
                "input channel into every output channel, which a grouped convolution's weight cannot hold, so it "
                "could not be folded back into that weight (PEFT trains such adapters but cannot merge them "
                "either); target the model's linear or ungrouped convolution layers")

    def features(self, shape, layout):
        return shape[1], shape[0]

    def lora_in(self, site):
        return math.prod(site.shape[1:])

    def lora_shapes(self, site, rank, width):
        kernel = tuple(site.shape[2:])
        return (rank, site.in_features, *kernel), (width, rank, *([1] * len(kernel)))

    def build(self, emit, gm, node, site, x, a, b):
        nd, stride, padding, dilation = conv_params(gm, node)
        target = {1: aten.conv1d, 2: aten.conv2d}[nd]
        first = target.padding if isinstance(padding, str) else target.default
        h = emit("call_function", first, (x, a, None, stride, padding, dilation, 1))
        return emit("call_function", target.default, (h, b))


CONV_KIND = register(Conv())
