"""The GraphModule class lora-fx hands back, and the copy/attribute helpers every pass shares.

``torch.export``'s ``ep.module()`` refuses ``.train()`` / ``.eval()``. Our modules accept them: the
capture step rewires mode-dependent ops (dropout, batch norm, attention dropout) to read
``self.training`` through a ``get_attr`` node, so switching mode is an attribute write, and
``torch.compile`` simply re-specialises on it.
"""

from __future__ import annotations

import contextvars
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx import graph_module as fx_graph_module
from torch.fx.experimental import _config as fx_config
from torch.fx.graph import PythonCode

from .codegen import share_attribute_prefixes
from .errors import NoLoraError
from .graph_facts import is_transpose

__all__ = ["Capture", "CAPTURE_KEY", "capture_of", "copy_module", "del_attr_path", "first_difference",
    "FOLD_KEY", "fold_report_of", "GeneratedCode", "get_attr_path", "graph_signature", "has_attr_path",
    "has_lora", "LORA_KEY", "lora_state", "LoraFxModule", "NODE_LORA", "NODE_MODE", "prune_empty_modules",
    "recompile_as", "set_attr_path", "SourceRef", "wrap"]

# Keys under GraphModule.meta. Values hold plain data and tensors only (never fx.Node): deepcopy must work.
# Read them through capture_of / lora_state / LoraFxModule.lora_report / .fold_report, not directly.
CAPTURE_KEY = "lora_fx_capture"
LORA_KEY = "lora_fx"
FOLD_KEY = "lora_fx_fold"
# Keys under Node.meta.
NODE_LORA = "lora_fx_branch"  # str: branch name, on every node lorafy added
NODE_MODE = "lora_fx_mode"  # dict: how a mode-dependent op was rewired at capture


@dataclass
class Capture:
    """What trace() remembers so that later steps need no inputs."""

    args: tuple
    kwargs: dict
    dynamic_shapes: Any
    mode_notes: list[str] = field(default_factory=list)
    source: SourceRef | None = None  # the traced model (KV-cache export re-captures it)
    model: str = ""  # what was traced: class name (+ config name), recorded in saved adapters
    dims: dict[int, tuple[int, ...]] | None = None  # dynamic dims per input leaf, proven (lora_fx.dynamic_dims)
    static_notes: list[str] = field(default_factory=list)  # the dims the proof declared static, for the reports


class SourceRef:
    """Holds the traced ``nn.Module`` without ever copying it: ``deepcopy`` returns the same ref.

    Its parameters are the tensors the graph reads, so holding it costs no memory.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> SourceRef:
        return self


_CODEGEN = contextvars.ContextVar("lora_fx_codegen", default=True)  # False: copy_module(codegen=False)


class GeneratedCode:
    """A module's generated Python (the parts of fx's ``PythonCode``), kept for a pass whose result has
    exactly that graph again: fold gives back the captured graph, so it adopts the captured module's
    code (:func:`recompile_as`) instead of generating it again (~70 KB of Python at 12 GPT-2 layers, a
    third of fold's time).

    Empty (``code is None``) for a module whose class generates its forward otherwise (a checkpointed
    module) and while fx's profiler metadata is on (its code names a per-graph file). Shared by copies
    (``deepcopy`` returns it), dropped when pickled (the pass then generates the code)."""

    __slots__ = ("code", "forward")

    def __init__(self, gm: fx.GraphModule | None = None) -> None:
        self.code = self.forward = None
        forward = type(gm).__dict__.get("forward") if gm is not None else None
        src = getattr(gm, "_code", None)
        if (forward is None or not isinstance(src, str) or not hasattr(gm, "_lineno_map")
                or type(gm).recompile not in (LoraFxModule.recompile, fx.GraphModule.recompile)
                or getattr(fx_config, "enrich_profiler_metadata", False)):
            return
        try:
            self.code = PythonCode(src, forward.__globals__, gm._lineno_map, getattr(gm, "_prologue_start", 0))
        except TypeError:  # another torch's PythonCode fields: generate the code instead
            return
        self.forward = forward  # the function fx compiled from ``src``: the copy's forward, not compiled again

    def __deepcopy__(self, memo: dict) -> GeneratedCode:
        return self

    def __reduce__(self):
        return (GeneratedCode, ())


class LoraFxModule(fx.GraphModule):
    """A GraphModule whose ``.train()`` / ``.eval()`` work, whatever produced the graph."""

    def recompile(self):
        if not _CODEGEN.get():  # a pass's working copy: it recompiles once its graph is final
            return None
        graph = self.graph
        if "python_code" in vars(graph):  # recompile_as installed code generated (and shared) before
            return super().recompile()
        generate = graph.python_code
        graph.python_code = lambda *args, **kwargs: share_attribute_prefixes(generate(*args, **kwargs), graph)
        try:
            return super().recompile()
        finally:
            del graph.python_code

    def train(self, mode: bool = True) -> LoraFxModule:
        return nn.Module.train(self, mode)

    def eval(self) -> LoraFxModule:
        return nn.Module.train(self, False)

    @property
    def lora_report(self):
        """The :class:`~lora_fx.passes.lorafy.LoraReport` of the lorafy pass, or None."""
        state = self.meta.get(LORA_KEY)
        return None if state is None else state.report

    @property
    def fold_report(self):
        """The :class:`~lora_fx.passes.fold.FoldReport` of the fold that made this module, or None."""
        return self.meta.get(FOLD_KEY)


def _meta(gm: object) -> dict:
    meta = getattr(gm, "meta", None)
    return meta if isinstance(meta, dict) else {}


def capture_of(gm: nn.Module) -> Capture | None:
    """What :func:`lora_fx.trace` remembered (example inputs, dynamic shapes), or None."""
    return _meta(gm).get(CAPTURE_KEY)


def has_lora(gm: object) -> bool:
    """Whether ``gm`` carries LoRA branches (is what lorafy returned)."""
    state = _meta(gm).get(LORA_KEY)
    return state is not None and bool(state.branches)


def lora_state(gm: object, who: str):
    """The :class:`~lora_fx.passes.lorafy.LoraState` of a lorafied module; the one check every step makes.

    Raises:
        NoLoraError: ``gm`` carries no LoRA (a subclass of the errors each step raised before:
            FoldError, AdapterError, SiteError, ExportError).
    """
    if not has_lora(gm):
        raise NoLoraError(f"{who}: {type(gm).__name__} carries no LoRA; pass what lora_fx.lorafy(gm, "
                          "patterns) returned")
    return _meta(gm)[LORA_KEY]


def fold_report_of(gm: object):
    """The FoldReport of a folded module (what fold / swap_adapter returned), or None."""
    return _meta(gm).get(FOLD_KEY)


def wrap(root: fx.GraphModule, graph: fx.Graph | None = None, *, cls: type | None = None) -> LoraFxModule:
    """Builds a LoraFxModule (or subclass ``cls``) over ``graph`` (default: root's), sharing root's tensors."""
    graph = root.graph if graph is None else graph
    new = (cls or LoraFxModule)(root, graph, class_name=type(root).__name__)
    for attr in ("_in_spec", "_out_spec"):  # torch.export's pytree codegen reads these from self
        if hasattr(root, attr):
            setattr(new, attr, getattr(root, attr))
    new.meta = copy.deepcopy(getattr(root, "meta", {}))
    new.training = root.training
    new.recompile()
    return new


def copy_module(gm: fx.GraphModule, *, freeze: bool, codegen: bool = True) -> LoraFxModule:
    """Deep-copies graph, submodules and buffers; parameters share storage with ``gm``.

    With ``freeze`` the copy holds new Parameter objects (same storage, ``requires_grad=False``), so
    freezing the copy leaves the user's model and its ``requires_grad`` flags alone. Tied parameters
    stay tied: one source object maps to one new object. With ``codegen=False`` the copy's Python
    code is not generated (a third of a pass's time on GPT-2 small): the caller edits the graph and
    must call ``recompile()`` before the copy runs, as lorafy and fold do.
    """
    memo: dict[int, Any] = {}
    for p in gm.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False) if freeze else p
    memo[id(gm._modules)] = _copy_modules(gm._modules, memo)  # deepcopy below reuses it
    token = _CODEGEN.set(codegen)
    try:
        with warnings.catch_warnings():  # deep-copying torch.export's TreeSpec warns about LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            new = copy.deepcopy(gm, memo)
    finally:
        _CODEGEN.reset(token)
    if not isinstance(new, LoraFxModule):
        new = wrap(new)
    return new


def recompile_as(gm: LoraFxModule, code: GeneratedCode | None) -> None:
    """``gm.recompile()``, installing ``code`` instead of generating it. The caller proves that
    ``gm.graph`` is the graph ``code`` was generated from (fold: the captured graph's signature, no
    untied weights). Modules whose class generates its forward otherwise are recompiled as usual."""
    if code is None or code.code is None or type(gm).recompile is not LoraFxModule.recompile:
        gm.recompile()
        return
    graph, adopted, compiled = gm.graph, code.code, code.forward
    compile_source = getattr(fx_graph_module, "_forward_from_src", None)

    def forward_from_src(src, globals, co_fields=None):  # fx's compile step, skipped for the adopted source
        return compiled if src is adopted.src else compile_source(src, globals, co_fields)

    graph.python_code = lambda *args, **kwargs: adopted  # what fx's recompile asks the graph for
    if compile_source is not None:
        fx_graph_module._forward_from_src = forward_from_src
    try:
        gm.recompile()
    finally:
        del graph.python_code
        if compile_source is not None:
            fx_graph_module._forward_from_src = compile_source


_PLAIN = frozenset(nn.Module().__dict__)  # what a bare nn.Module holds: torch.export's attribute containers
_HOOKS = tuple(k for k in _PLAIN if k.endswith("hooks") or k.endswith("hooks_with_kwargs")
               or k.endswith("hooks_always_called"))


def _copy_modules(modules: dict[str, nn.Module | None], memo: dict[int, Any]) -> dict[str, nn.Module | None]:
    """``copy.deepcopy(modules, memo)``, fast for the bare ``nn.Module`` containers a captured graph
    keeps its weights in (a third of a pass's copy time on GPT-2 small went to deep-copying their
    empty hook dicts); any other module, or one with hooks, is deep-copied as usual."""
    out: dict[str, nn.Module | None] = {}
    for name, m in modules.items():
        if m is None or id(m) in memo:
            out[name] = m if m is None else memo[id(m)]
        elif type(m) is nn.Module and m.__dict__.keys() == _PLAIN and not any(m.__dict__[k] for k in _HOOKS):
            new = nn.Module.__new__(nn.Module)
            memo[id(m)] = new
            d = dict(m.__dict__)
            for k in _HOOKS:
                d[k] = type(d[k])()
            d["_parameters"] = {k: copy.deepcopy(p, memo) for k, p in m._parameters.items()}
            d["_buffers"] = {k: copy.deepcopy(b, memo) for k, b in m._buffers.items()}
            d["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
            d["_modules"] = _copy_modules(m._modules, memo)
            new.__dict__.update(d)
            out[name] = new
        else:
            out[name] = copy.deepcopy(m, memo)
    return out


def get_attr_path(root: nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def has_attr_path(root: nn.Module, qualname: str) -> bool:
    try:
        get_attr_path(root, qualname)
    except AttributeError:
        return False
    return True


def set_attr_path(root: nn.Module, qualname: str, value: Any) -> None:
    """Sets ``root.a.b.c = value``, creating empty intermediate modules where missing."""
    *parents, leaf = qualname.split(".")
    mod = root
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        setattr(mod, leaf, value)


def del_attr_path(root: nn.Module, qualname: str) -> None:
    *parents, leaf = qualname.split(".")
    mod = get_attr_path(root, ".".join(parents)) if parents else root
    delattr(mod, leaf)


def prune_empty_modules(root: nn.Module) -> None:
    """Removes submodules left without parameters, buffers or children (after fold erased LoRA)."""
    for name, child in list(root.named_children()):
        prune_empty_modules(child)
        if (type(child) is nn.Module and not child._parameters and not child._buffers
                and not child._modules):
            delattr(root, name)


def graph_signature(graph: fx.Graph, rename: dict[str, str] | None = None, *, dedupe: bool = True) -> list[str]:
    """A name-free description of a graph: one line per node, node references by position.

    Two graphs with equal signatures compute the same thing from the same attributes. ``rename``
    maps get_attr targets to the names they stand for (an untied copy of a weight); ``dedupe=False``
    keeps repeated get_attr/transpose nodes (exact node-for-node description).
    """
    rename = rename or {}
    index: dict[fx.Node, int] = {}
    lines: list[str] = []
    seen: dict[str, int] = {}

    def fmt(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in a.items()) + "}"
        return repr(a)

    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = rename.get(str(node.target), str(node.target))
        elif isinstance(node.target, torch._ops.OpOverload):
            target = str(node.target)
        elif callable(node.target):
            target = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', node.target)}"
        else:
            target = str(node.target)
        args = node.args if node.op != "placeholder" else ()
        line = f"{node.op} {target} {fmt(args)} {fmt(node.kwargs)}"
        # An untied copy of a weight adds a get_attr (and maybe a transpose) that computes the same
        # value as an existing node: treat duplicates of these pure nodes as one.
        if dedupe and (node.op == "get_attr" or is_transpose(node)):
            if line in seen:
                index[node] = seen[line]
                continue
            seen[line] = len(lines)
        index[node] = len(lines)
        lines.append(line)
    return lines


def first_difference(a: list[str], b: list[str]) -> str | None:
    """Human-readable first differing line of two signatures, or None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"node {i}: {x!r} != {y!r}"
    if len(a) != len(b):
        return f"node count differs: {len(a)} != {len(b)}"
    return None
