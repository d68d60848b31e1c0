"""lorafy's side of the LoRA variants: DoRA sites and PiSSA / OLoRA initialisations.

* :func:`settle`: a selection's ``dora`` / ``init`` (a Target's, else lorafy's), checked against the site.
* :func:`init_pair`: A and B of a new branch (kaiming / gaussian: the kind's; PiSSA / OLoRA:
  :mod:`lora_fx.residual`, which also makes the site's base weight the residual ``W - s·B@A``).
* :func:`add_magnitude`: DoRA's magnitude parameter ``m`` (the row norms of W), named
  ``<module>.lora_magnitude_vector.<leaf>`` as PEFT's ``lora_magnitude_vector``.
* :func:`build_dora`: the DoRA graph of a site (math in :mod:`lora_fx.dora`)::

      y  = op(x, W, b)                                   # the captured op, unchanged
      u  = y + s·B(A x)          (linear, whole weight: lora_addmm, accumulated into y)
      g  = dora_scale(W, m, A, B)                         # m / ||W + s·B@A||_row, norm detached
      y' = dora_output(y, u, g, b)                        # g ⊙ (u - b) + b; every user of y reads y'

  With LoRA dropout (PEFT's form, in training and eval alike): ``u = W x_d + s·B(A x_d)`` and
  ``y' = y - W x_d + g ⊙ u``, one more base matmul on the dropped input.

Every node is tagged as a LoRA node of the site, so fold erases them (``dora_output`` like the
``add`` of a plain branch: its users read ``y`` again).
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import kinds
from .. import residual as residual_init
from ..dora import dora_output, dora_scale, magnitude_init
from ..errors import SiteError
from ..graph_facts import weight_reads
from ..graph_module import NODE_LORA, set_attr_path
from ..kinds.conv import conv_params
from ..targets import Selection
from .fused import build_addmm

__all__ = ["add_magnitude", "build_dora", "check_init", "init_pair", "INITS", "settle"]

aten = torch.ops.aten
INITS = ("kaiming", "gaussian", "pissa", "olora")  # and "pissa_niter_<N>"


def check_init(init: object) -> str:
    """``init`` if it is one lorafy knows, else SiteError listing them."""
    if isinstance(init, str) and (init in INITS or re.fullmatch(r"pissa_niter_\d+", init)):
        return init
    raise SiteError(f"init must be one of {INITS} or 'pissa_niter_<N>' (PEFT's init_lora_weights names), "
                    f"got {init!r}")


def settle(sel: Selection, dora: bool, init: str) -> Selection:
    """The selection with its own ``dora`` / ``init`` or lorafy's; SiteError where the site cannot have them."""
    dora = bool(dora if sel.dora is None else sel.dora)
    init = check_init(init if sel.init is None else sel.init)
    site = sel.site
    reason = kinds.get(site.kind).dora
    if dora and reason is not None:
        raise SiteError(f"site {site.id} ({site.op} {site.weight}) cannot take DoRA: {reason}")
    if init not in ("kaiming", "gaussian"):
        if dora:
            raise SiteError(f"site {site.id}: DoRA with init={init!r} is not supported (PiSSA / OLoRA change the "
                            "base weight DoRA's magnitude is measured on); use one of them at a time")
        residual_init.check_site(site, init)
    return dataclasses.replace(sel, dora=dora, init=init)


def init_pair(gm: fx.GraphModule, kind: kinds.OpKind, sel: Selection, a: nn.Parameter, b: nn.Parameter,
              sl: tuple[int, int] | None, scale: float, key: str) -> None:
    """A and B of a new branch; PiSSA / OLoRA also write the residual base weight (see module doc)."""
    if sel.init in ("kaiming", "gaussian"):
        kind.init_pair(a, b, sel.init)
        return
    site = sel.site
    w = gm.get_parameter(site.weight)
    if weight_reads(gm.graph)[site.weight] > 1:
        raise SiteError(f"site {site.id}: init={sel.init!r} makes {site.weight} the residual W - s·B@A, but other "
                        "ops read that weight too (a tied weight) and would change; use init='kaiming' there")
    lo, hi = sl or (0, site.out_features)
    a0, b0, res = residual_init.decompose(w, site.layout, lo, hi, sel.rank, scale, sel.init)
    with torch.no_grad():
        a.copy_(a0)
        b.copy_(b0)
    new = w.detach().clone() if not getattr(w, "_lora_fx_residual", False) else w.detach()
    residual_init.write_rows(new, site.layout, lo, hi, res)
    param = nn.Parameter(new, requires_grad=False)
    param._lora_fx_residual = True  # later slices of the site write into this copy, not the user's weight
    set_attr_path(gm, site.weight, param)
    gm.meta.setdefault(residual_init.INITIAL_KEY, {})[key] = (a0.detach().clone(), b0.detach().clone(), sel.init)


def add_magnitude(gm: fx.GraphModule, site, prefix: str, leaf: str, sl: tuple[int, int] | None,
                  dtype: torch.dtype) -> str:
    """DoRA's magnitude of one branch: a Parameter holding the norms of its rows of W; returns its name."""
    name = f"{prefix}lora_magnitude_vector.{leaf}"
    lo, hi = sl or (0, site.out_features)
    m = magnitude_init(gm.get_parameter(site.weight), site.layout, lo, hi)
    set_attr_path(gm, name, nn.Parameter(m.to(dtype)))
    return name


def build_dora(emit: kinds.Emitter, kind: kinds.OpKind, gm: fx.GraphModule, node: fx.Node, site, x: fx.Node,
               made: list, sel: Selection, training: fx.Node, scale: float, weight_dtype: torch.dtype) -> fx.Node:
    """Emits a DoRA site's graph (module doc) after ``node`` for its branches ``made``; returns y'."""
    spec = kinds.spec_of(gm, node)
    dropout = sel.dropout if kind.dropout else 0.0
    base_dropped = None
    if dropout > 0.0:
        x = emit("call_function", aten.dropout.default, (x, dropout, training))
        xb = x
        if kind.float_input and _cast(x):
            xb = emit("call_function", aten._to_copy.default, (x,), {"dtype": weight_dtype})
        base_dropped = _base_call(emit, gm, node, kind, spec, site, xb)
    y = node if base_dropped is None else base_dropped
    if kind.name == "linear" and len(made) == 1 and made[0].slice is None and base_dropped is None:
        u = build_addmm(emit, y, x, made[0].a, made[0].b, 0.0, training, scale)
    else:
        total = None
        for br in made:
            d = kind.build(emit, gm, node, site, x, emit("get_attr", br.a), emit("get_attr", br.b))
            if br.slice is not None:
                d = emit("call_function", aten.constant_pad_nd.default,
                         (d, [br.slice[0], site.out_features - br.slice[1]]))  # rows of a linear's output
            total = d if total is None else emit("call_function", aten.add.Tensor, (total, d))
        scaled = emit("call_function", aten.mul.Tensor, (total, scale))
        if _cast(x):
            scaled = emit("call_function", aten._to_copy.default, (scaled,), {"dtype": weight_dtype})
        u = emit("call_function", aten.add.Tensor, (y, scaled))
    w = emit("get_attr", site.weight)
    parts = [(emit("get_attr", br.magnitude), emit("get_attr", br.a), emit("get_attr", br.b),
              *(br.slice or (0, site.out_features))) for br in made]
    g = emit("call_function", dora_scale, (w, site.layout, scale, site.out_features, parts))
    keep = not any(_mutates(user) for user in node.users)
    return emit("call_function", dora_output,
                (node, u, g, _bias(emit, gm, node, spec), kind.out_dim, base_dropped, keep))


def _cast(x: fx.Node) -> bool:
    """Whether the branch input is lorafy's fp32 copy of a half-precision activation."""
    return x.target is aten._to_copy.default and NODE_LORA in x.meta or (
        x.target is aten.dropout.default and isinstance(x.args[0], fx.Node) and _cast(x.args[0]))


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` changes one of its inputs in place (then DoRA keeps its input, not its output)."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable
    return isinstance(t, str) and t.endswith("_") and not t.endswith("__")


def _bias(emit: kinds.Emitter, gm: fx.GraphModule, node: fx.Node, spec) -> fx.Node | None:
    """The bias the site's op adds (None when it adds none)."""
    if node.op == "call_module":
        return emit("get_attr", f"{node.target}.bias") if gm.get_submodule(str(node.target)).bias is not None \
            else None
    t = node.target
    if t is aten.addmm.default:
        return node.args[0]
    if t in (aten.linear.default, F.linear) or spec.kind == "conv":
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return b if isinstance(b, fx.Node) else None
    return None


def _base_call(emit: kinds.Emitter, gm: fx.GraphModule, node: fx.Node, kind, spec, site, x: fx.Node) -> fx.Node:
    """The site's op on another input, without bias: ``W x_d`` for PEFT's DoRA dropout term."""
    if spec.kind == "conv":
        nd, stride, padding, dilation = conv_params(gm, node)
        w = emit("get_attr", site.weight) if node.op == "call_module" else kind.weight_input(node, site, spec)
        target = {1: aten.conv1d, 2: aten.conv2d}[nd]
        op = target.padding if isinstance(padding, str) else target.default
        return emit("call_function", op, (x, w, None, list(stride), padding if isinstance(padding, str)
                                          else list(padding), list(dilation), 1))
    if node.op == "call_module" or node.target in (aten.linear.default, F.linear):
        w = emit("get_attr", site.weight) if node.op == "call_module" else node.args[1]
        return emit("call_function", aten.linear.default, (x, w))
    if node.target is aten.addmm.default:
        return emit("call_function", aten.mm.default, (x, node.args[2]))
    if node.target in (aten.mm.default, aten.matmul.default, torch.matmul, operator.matmul, torch.mm) or \
            node.op == "call_method":
        return emit("call_function", aten.matmul.default, (x, node.args[1]))
    raise SiteError(f"site {site.id}: DoRA with LoRA dropout is not supported on {site.op}; use dropout=0")
