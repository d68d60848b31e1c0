"""The op-kind interface and its registry: everything lora-fx knows about one kind of matmul.

An *op kind* (linear, conv, embedding, einsum, ...) is one :class:`OpKind` subclass in one file of
this package. It says, in one place:

* **recognition**: which graph ops are its sites (``functions``, ``methods``, ``modules`` tables of
  :class:`OpSpec`: where the activation and the weight are, the weight's default layout) and
  :meth:`OpKind.describe`, which reads a site's weight, shape and features from a node;
* **LoRA shapes**: :meth:`OpKind.lora_shapes` (A (r, in...), B (out, r...)), :meth:`OpKind.lora_in`
  and the init of A (:meth:`OpKind.init_pair`);
* **branch builder**: :meth:`OpKind.build` emits ``d = B(A(x))`` after the site's node
  (optionally :meth:`OpKind.build_merged`, a fused ``y + s·B(A x)``);
* **delta layout**: ``layouts`` maps each weight layout the kind produces to the function turning
  ``D = scale·B@A`` (out, in*) into a weight-shaped tensor (used by :mod:`lora_fx.delta`), and
  :meth:`OpKind.features` reads (in, out) from a weight shape in that layout;
* **file format**: ``peft_modules`` (module class names PEFT's LoRA wraps, and their site op) and
  ``peft_tensors`` (the tensor names PEFT uses for the kind's A/B).

To add a kind: write ``lora_fx/kinds/<name>.py`` with a subclass, call :func:`register` on an
instance at the bottom, and import the module in ``lora_fx/kinds/__init__.py``. Nothing else
changes: sites, lorafy, fold, targets, adapters, switching and refold all ask the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx, nn

from ..graph_facts import param_source
from ..graph_module import NODE_LORA

if TYPE_CHECKING:
    from ..sites import Site

__all__ = ["arg", "CONV", "EMBED", "Emitter", "FUNCTIONS", "get", "IN_OUT", "kind_for_layout", "kind_of",
    "KINDS", "LAYOUT_KINDS", "LAYOUTS", "METHODS", "MODULES", "op_name", "op_names", "OpKind", "OpSpec",
    "OUT_IN", "PEFT_MODULES", "register", "spec_of", "transposed"]

# Weight layouts of the built-in kinds: how the weight tensor stores (out, in).
OUT_IN = "out,in"  # nn.Linear, x @ w.T
IN_OUT = "in,out"  # GPT-2 Conv1D (addmm), x @ w
CONV = "conv"  # (out, in, *kernel)
EMBED = "embedding"  # (num_embeddings, dim): a lookup; A is (r, num), B is (dim, r)


def transposed(d: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The layout that stores D's transpose. :func:`lora_fx.delta.delta` recognizes it and computes
    Dᵀ = Σ s·Aᵀ@Bᵀ directly, contiguous like the weight (adding a transposed view costs 5x)."""
    return d.T


@dataclass(frozen=True)
class OpSpec:
    """How to read one op: its kind, which arg is the activation, which the weight, default layout."""

    kind: str
    x: int
    w: int
    layout: str


@dataclass
class Emitter:
    """Inserts nodes after a cursor, tagging each with the branch name (``meta[NODE_LORA]``)."""

    graph: fx.Graph
    cursor: fx.Node
    tag: str

    def __call__(self, op: str, target, args=(), kwargs=None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            if op == "get_attr":
                node = self.graph.get_attr(target)
            else:
                node = self.graph.call_function(target, tuple(args), kwargs or {})
        node.meta[NODE_LORA] = self.tag
        self.cursor = node
        return node


def arg(node: fx.Node, i: int) -> Any:
    return node.args[i] if len(node.args) > i else None


def op_name(target: object) -> str:
    """Short op name of a call target: ``aten.linear.default`` -> ``linear``, ``F.conv2d`` -> ``conv2d``."""
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name).split(".")[0]


class OpKind:
    """One kind of adaptable op. Subclasses override what differs from a plain ``linear``."""

    name: ClassVar[str]
    functions: ClassVar[dict[object, OpSpec]] = {}  # call_function targets (aten ops, torch functions)
    methods: ClassVar[dict[str, OpSpec]] = {}  # call_method names (symbolic_trace: x.matmul(w))
    modules: ClassVar[dict[type, OpSpec]] = {}  # call_module types (symbolic_trace)
    layouts: ClassVar[dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]]] = {}
    slices: ClassVar[bool] = False  # Target(slices=...) may adapt output ranges of the weight
    dropout: ClassVar[bool] = True  # LoRA dropout on the branch input (PEFT: none for embeddings)
    float_input: ClassVar[bool] = True  # the activation is a float tensor (fp32 adapters cast it up)
    kaiming: ClassVar[bool] = True  # init="kaiming" draws A kaiming-uniform (else normal, std 1/r)
    batched: ClassVar[bool] = False  # A, B, delta have a leading batch (expert) dim: D[e] = B[e] @ A[e]
    peft_modules: ClassVar[dict[str, str]] = {}  # module class name PEFT wraps -> op name of its site
    peft_tensors: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")
    out_dim: ClassVar[int] = -1  # the dim of the site's output that holds the output features (conv: 1)
    dora: ClassVar[str | None] = ("lora-fx implements DoRA for linear and (ungrouped) convolution sites only, "
                                  "whose output features are the rows of one weight")  # None: DoRA works

    # -- recognition ------------------------------------------------------------------------------

    def function_spec(self, target: object) -> OpSpec | None:
        """The OpSpec of a call_function target missing from ``functions`` (ops registered by other
        libraries after import, recognised by name), else None."""
        return None

    def describe(self, gm: fx.GraphModule, node: fx.Node, spec: OpSpec) -> dict | None:
        """Site facts of ``node`` (op, weight, layout, shape, in/out features, transposed), or None
        when this call cannot be adapted (weight not a parameter, unsupported arguments)."""
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not self.accepts_module(mod):
                return None
            wname, weight, transposed, op = f"{node.target}.weight", mod.weight, False, type(mod).__name__
        else:
            wnode, wname, transposed = param_source(gm, arg(node, spec.w))
            if wnode is None:
                return None
            weight = gm.get_parameter(wname)
            if not self.accepts(node, weight):
                return None
            op = op_name(node.target)
        layout = spec.layout
        if transposed:
            layout = IN_OUT if layout == OUT_IN else OUT_IN
        shape = tuple(weight.shape)
        in_f, out_f = self.features(shape, layout)
        return dict(op=op, kind=self.name, weight=wname, layout=layout, shape=shape, in_features=in_f,
                    out_features=out_f, transposed=transposed)

    def accepts(self, node: fx.Node, weight: torch.Tensor) -> bool:
        """Whether a call_function node with this weight parameter is a site of this kind."""
        return True

    def rejection(self, node: fx.Node) -> str:
        """Why a node :meth:`accepts` turned down is not a site (for the error of a pattern naming it)."""
        return f"lora-fx's {self.name} kind does not adapt this form of {op_name(node.target)}"

    def accepts_module(self, mod: nn.Module) -> bool:
        return True

    def features(self, shape: tuple[int, ...], layout: str) -> tuple[int, int]:
        """(in_features, out_features) of a weight of ``shape`` stored in ``layout``."""
        out_f, in_f = shape if layout == OUT_IN else shape[::-1]
        return in_f, out_f

    # -- LoRA shapes and init ---------------------------------------------------------------------

    def lora_in(self, site: Site) -> int:
        """Elements of one row of A (what B @ A.flatten(1) has as columns)."""
        return site.in_features

    def lora_shapes(self, site: Site, rank: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for a site, or one output slice of it ``width`` rows wide."""
        return (rank, site.in_features), (width, rank)

    def fits(self, site: Site, a: torch.Tensor, b: torch.Tensor, rows: int) -> bool:
        """Whether tensors A, B (from an adapter) are a pair for ``site`` with ``rows`` output rows."""
        return b.shape[0] == rows and a[0].numel() == self.lora_in(site)

    def init_pair(self, a: torch.Tensor, b: torch.Tensor, init: str) -> None:
        """B = 0 so a fresh branch adds exactly nothing; A random (PEFT's kaiming-uniform by default)."""
        with torch.no_grad():
            if init == "kaiming" and self.kaiming:
                nn.init.kaiming_uniform_(a, a=5 ** 0.5)
            elif init in ("gaussian", "kaiming"):
                nn.init.normal_(a, std=1.0 / a.shape[0])
            else:
                raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
            b.zero_()

    # -- graph ------------------------------------------------------------------------------------

    def activation(self, node: fx.Node, site: Site, spec: OpSpec) -> fx.Node:
        """The input of the site's op (token ids for an embedding)."""
        if node.op == "call_module":
            return node.args[0]
        return node.args[spec.x] if len(node.args) > spec.x else node.kwargs["input"]

    def build(self, emit: Emitter, gm: fx.GraphModule, node: fx.Node, site: Site, x: fx.Node,
              a: fx.Node, b: fx.Node) -> fx.Node:
        """Emits the branch after ``node``; returns the unscaled delta ``B(A(x))``."""
        raise NotImplementedError(f"op kind {self.name} has no branch builder")

    def build_merged(self, emit: Emitter, node: fx.Node, x: fx.Node, a: str, b: str, dropout: float,
                     training: fx.Node, scale: float) -> fx.Node | None:
        """A fused form of the whole ``y + scale·B(A(dropout(x)))`` for a whole-weight site, or None
        to use :meth:`build` (then lorafy adds the scale and the sum itself)."""
        return None

    def weight_input(self, node: fx.Node, site: Site | None, spec: OpSpec) -> Any:
        """The argument of ``node`` that feeds the weight (None when it needs the site to say)."""
        return arg(node, spec.w)

    def replace_weight_input(self, node: fx.Node, site: Site, spec: OpSpec, new: fx.Node) -> None:
        """Makes ``node`` read its weight from ``new`` (fold's untied copy)."""
        node.args = tuple(new if k == spec.w else a for k, a in enumerate(node.args))


# -- the registry ---------------------------------------------------------------------------------

KINDS: dict[str, OpKind] = {}
FUNCTIONS: dict[object, OpSpec] = {}
METHODS: dict[str, OpSpec] = {}
MODULES: dict[type, OpSpec] = {}
LAYOUTS: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {}
LAYOUT_KINDS: dict[str, str] = {}  # layout -> the kind that defines it
PEFT_MODULES: dict[str, str] = {}


def register(kind: OpKind) -> OpKind:
    """Adds an op kind; its ops, layouts and PEFT names must not be claimed by another kind."""
    if kind.name in KINDS:
        raise ValueError(f"op kind {kind.name!r} is registered already")
    for table, mine in ((FUNCTIONS, kind.functions), (METHODS, kind.methods), (MODULES, kind.modules),
                        (LAYOUTS, kind.layouts), (PEFT_MODULES, kind.peft_modules)):
        taken = [k for k in mine if k in table]
        if taken:
            raise ValueError(f"op kind {kind.name!r}: {taken} already belong to another kind")
    for spec in (*kind.functions.values(), *kind.methods.values(), *kind.modules.values()):
        if spec.kind != kind.name:
            raise ValueError(f"op kind {kind.name!r} lists an OpSpec of kind {spec.kind!r}")
    KINDS[kind.name] = kind
    FUNCTIONS.update(kind.functions)
    METHODS.update(kind.methods)
    MODULES.update(kind.modules)
    LAYOUTS.update(kind.layouts)
    LAYOUT_KINDS.update(dict.fromkeys(kind.layouts, kind.name))
    PEFT_MODULES.update(kind.peft_modules)
    return kind


def get(name: str) -> OpKind:
    """The registered kind ``name``."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown op kind {name!r}; registered: {sorted(KINDS)}") from None


def spec_of(gm: fx.GraphModule, node: fx.Node) -> OpSpec | None:
    """The OpSpec of a node whose op some kind adapts, else None."""
    if node.op == "call_function":
        spec = FUNCTIONS.get(node.target)
        if spec is None and isinstance(node.target, torch._ops.OpOverload):
            spec = next((s for k in KINDS.values() if (s := k.function_spec(node.target))), None)
        return spec
    if node.op == "call_method":
        return METHODS.get(str(node.target))
    if node.op == "call_module":
        return MODULES.get(type(gm.get_submodule(str(node.target))))
    return None


def op_names() -> set[str]:
    """Every op name a site can have (``Target(ops=...)`` accepts these and the kind names)."""
    return ({op_name(t) for t in FUNCTIONS} | set(METHODS) | {t.__name__ for t in MODULES})


def kind_for_layout(layout: str) -> OpKind:
    """The kind whose weights use ``layout``."""
    try:
        return KINDS[LAYOUT_KINDS[layout]]
    except KeyError:
        raise ValueError(f"unknown weight layout {layout!r}; known: {sorted(LAYOUT_KINDS)}") from None


def kind_of(op: str, layout: str) -> OpKind:
    """The kind of a site recorded only by op name and layout (an adapter file): by op, else layout."""
    for kind in KINDS.values():
        if any(op_name(t) == op for t in kind.functions) or op in kind.methods or \
                any(t.__name__ == op for t in kind.modules):
            return kind
    return kind_for_layout(layout) if layout in LAYOUT_KINDS else KINDS["linear"]
