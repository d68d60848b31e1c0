"""QLoRA: keep the frozen base weights quantized while LoRA trains; fold against what was trained.

``quantize_base(lgm)`` returns a new module in which each selected frozen weight ``W`` (default: the
weights lorafy adapted) is stored as codes + per-block scales and dequantized on use::

    before:  y = linear(x, W) + s·B(A(x))                       # W: fp32/bf16 parameter
    after:   y = linear(x, deq(codes, scales)) + s·B(A(x))      # deq = Ŵ, same shape and dtype

Per block of ``block_size`` consecutive weights (row-major), with ``m = max|w|`` over the block:

* ``int8``: ``q = round(127·w/m)``, ``Ŵ = q·m/127`` (1 byte per weight);
* ``int4``: ``q = round(7·w/m)`` in [-7, 7], ``Ŵ = q·m/7`` (two codes per byte);
* ``nf4`` (QLoRA's NormalFloat4): ``q = argmin_k |w/m - NF4[k]|``, ``Ŵ = NF4[q]·m`` (two per byte).

Memory: autograd would keep every dequantized ``Ŵ`` alive from forward to backward (``linear``
saves it to compute the input gradient), which gives back the memory quantization saved. The
module therefore runs under ``torch.autograd.graph.saved_tensors_hooks`` that store a dequantized
weight (or a view of it) as a reference to its quantized module and dequantize it again in backward,
as QLoRA's kernels do.

Fold: :func:`dequantized` puts ``Ŵ`` back as a plain parameter under the weight's own name, so the
graph is lorafy's graph again; ``fold``, ``strip`` and ``fold_and_export`` call it first. The adapter
is therefore merged into ``Ŵ``, the weights it was trained against, never into the original ``W``
(which this module no longer holds, nor references: the capture forgets the traced model, so
``fold_and_export(..., kv_cache=True)``, which re-captures it, is refused for a QLoRA module).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .._text import plural
from ..errors import LoraFxError
from ..graph_module import (
    CAPTURE_KEY,
    LoraFxModule,
    copy_module,
    del_attr_path,
    get_attr_path,
    lora_state,
    prune_empty_modules,
    set_attr_path,
    wrap,
)

__all__ = ["QuantizedWeight", "QLoraModule", "quantize_base", "dequantized", "is_quantized"]

SCHEMES = ("int8", "int4", "nf4")
# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1].
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
_HOLDER = "lora_fx_qweights"  # submodule that holds the QuantizedWeight modules


class QuantizedWeight(nn.Module):
    """A frozen weight as codes + per-block scales; ``forward()`` returns the dequantized weight Ŵ."""

    def __init__(self, weight: torch.Tensor, name: str, scheme: str, block_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.name, self.scheme, self.block_size, self.dtype = name, scheme, block_size, dtype
        self.shape = tuple(weight.shape)
        w = weight.detach().float().reshape(-1)
        pad = (-w.numel()) % block_size
        blocks = torch.nn.functional.pad(w, (0, pad)).reshape(-1, block_size)
        m = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        if scheme == "int8":
            codes = torch.round(blocks / m * 127).to(torch.int8)
        elif scheme == "int4":
            codes = _pack(torch.round(blocks / m * 7).to(torch.int16) + 8)
        else:  # nearest level: bucketize against the midpoints (no n x 16 temporary)
            table = torch.tensor(NF4, device=w.device)
            codes = _pack(torch.bucketize(blocks / m, (table[1:] + table[:-1]) / 2).to(torch.int16))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", m.squeeze(1).to(torch.float32))

    def forward(self) -> torch.Tensor:
        if self.scheme == "int8":
            q = self.codes.float() / 127
        elif self.scheme == "int4":
            q = (_unpack(self.codes).float() - 8) / 7
        else:
            q = torch.tensor(NF4, device=self.codes.device).index_select(0, _unpack(self.codes).reshape(-1).int())
            q = q.reshape(self.scales.shape[0], -1)
        w = (q * self.scales.unsqueeze(1)).reshape(-1)[: _numel(self.shape)]
        return w.reshape(self.shape).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.scheme} {list(self.shape)}, block {self.block_size}, -> {self.dtype}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (0..15) per uint8: even index in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class QLoraModule(LoraFxModule):
    """A lorafied module whose frozen weights are quantized (see module doc); trains like any other."""

    def __call__(self, *args, **kwargs):
        live: dict[int, tuple[weakref.ref, QuantizedWeight]] = {}

        def pack(t: torch.Tensor):
            entry = live.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
            if entry is not None and entry[0]() is not None:
                return (entry[1], t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(saved):
            if isinstance(saved, tuple):
                qw, size, stride, offset = saved
                return qw().as_strided(size, stride, offset)
            return saved

        def record(module, _inputs, out):
            live[out.untyped_storage().data_ptr()] = (weakref.ref(out), module)

        hooks = [m.register_forward_hook(record) for m in self.modules() if isinstance(m, QuantizedWeight)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return super().__call__(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()


@dataclass
class QuantizeBaseReport:
    """What quantize_base stored: per weight its scheme, and the bytes before/after."""

    weights: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        return (f"quantized {plural(len(self.weights), 'frozen weight')}: {self.bytes_before / 2**20:.2f} MiB -> "
                f"{self.bytes_after / 2**20:.2f} MiB")


def quantize_base(lgm: fx.GraphModule, weights: str | list[str] = "adapted", *, scheme: str = "nf4",
                  block_size: int = 64) -> QLoraModule:
    """A copy of ``lgm`` whose selected frozen weights are quantized (see module doc).

    Args:
        lgm: what :func:`lora_fx.lorafy` returned.
        weights: ``"adapted"`` (the weights of the adapted sites) or glob patterns over weight names
            (2-D or larger floating weights read by the graph; LoRA parameters never match).
        scheme: ``"nf4"``, ``"int4"`` or ``"int8"``.
        block_size: weights per scale (even; 64 as in QLoRA).

    Returns:
        A :class:`QLoraModule` sharing LoRA parameters and unselected weights with ``lgm``;
        ``.meta["lora_fx_qbase"]`` holds a :class:`QuantizeBaseReport`.

    Raises:
        LoraFxError: unknown scheme, odd block size, a pattern matching nothing, or ``lgm`` already quantized.
    """
    state = lora_state(lgm, "quantize_base")
    if scheme not in SCHEMES or block_size < 2 or block_size % 2:
        raise LoraFxError(f"quantize_base: scheme={scheme!r}, block_size={block_size}; use a scheme of {SCHEMES} "
                          "and an even block size (64 as in QLoRA)")
    if is_quantized(lgm):
        raise LoraFxError("quantize_base: the module is already quantized")
    lora = {n for br in state.branches for n in (br.a, br.b)}
    reads = {str(n.target) for n in lgm.graph.nodes if n.op == "get_attr"}
    candidates = [n for n, p in lgm.named_parameters(remove_duplicate=False)
                  if n in reads and n not in lora and p.dim() >= 2 and p.is_floating_point()]
    if weights == "adapted":
        chosen = sorted({br.site.weight for br in state.branches} & set(candidates))
    else:
        pats = [weights] if isinstance(weights, str) else list(weights)
        chosen = [n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not chosen:
            raise LoraFxError(f"quantize_base: {pats} match no frozen weight; weights are e.g. {candidates[:8]}")
    out = copy_module(lgm, freeze=False)
    holder = nn.Module()
    report = QuantizeBaseReport()
    nodes = [n for n in out.graph.nodes if n.op == "get_attr" and str(n.target) in chosen]
    for i, name in enumerate(chosen):
        w = get_attr_path(out, name)
        qw = QuantizedWeight(w, name, scheme, block_size, w.dtype)
        holder.add_module(str(i), qw)
        report.weights[name] = scheme
        report.bytes_before += w.numel() * w.element_size()
        report.bytes_after += qw.codes.numel() * qw.codes.element_size() + qw.scales.numel() * 4
    out.add_module(_HOLDER, holder)
    index = {name: i for i, name in enumerate(chosen)}
    for node in nodes:
        with out.graph.inserting_before(node):
            new = out.graph.call_module(f"{_HOLDER}.{index[str(node.target)]}")
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        out.graph.erase_node(node)
    for name in chosen:  # the high-precision weights leave the module (tied names too)
        del_attr_path(out, name)
    prune_empty_modules(out)
    out.graph.lint()
    q = wrap(out, cls=QLoraModule)
    q.meta["lora_fx_qbase"] = report
    cap = q.meta.get(CAPTURE_KEY)
    if cap is not None and getattr(cap, "source", None) is not None:
        # the capture remembers the traced model, whose high-precision weights would stay alive (the
        # memory QLoRA saves) and which kv_cache=True would re-capture (folding into W, not Ŵ)
        q.meta[CAPTURE_KEY] = dataclasses.replace(cap, source=None)
    return q


def is_quantized(gm: object) -> bool:
    return isinstance(gm, QLoraModule)


def dequantized(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each quantized weight put back as a parameter holding Ŵ under its own name.

    The graph is lorafy's again (get_attr of the weight); a plain module is returned unchanged.
    """
    if not is_quantized(gm):
        return gm
    out = copy_module(gm, freeze=False)
    for node in list(out.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(_HOLDER + "."):
            qw = get_attr_path(out, str(node.target))
            with torch.no_grad():
                set_attr_path(out, qw.name, nn.Parameter(qw(), requires_grad=False))
            with out.graph.inserting_before(node):
                new = out.graph.get_attr(qw.name)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            out.graph.erase_node(node)
    delattr(out, _HOLDER)
    out.graph.lint()
    plain = wrap(out)
    plain.meta.pop("lora_fx_qbase", None)
    return plain
