"""Patterns resolved on a captured module, where the sites alone do not say enough (lorafy uses these).

* :func:`output_heads`: the module ``"all-linear"`` leaves out, by PEFT's rule (a Hugging Face model's
  ``get_output_embeddings()``; without one, a linear reading an embedding's table or named ``lm_head``).
* :func:`unmatched_reason`: why a pattern selected no site. A matmul it names that cannot be adapted
  (a weight that is not a parameter, a grouped convolution) raises SiteError; a module of the user's
  model that the captured forward never calls, or calls without making an adaptable matmul, gets its
  own message instead of "matches no adaptable site" with unrelated closest names.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from . import kinds
from .errors import SiteError
from .graph_module import capture_of
from .sites import Site, module_path
from .targets import Target, is_all_linear, matches, matches_names, no_match

__all__ = ["called_modules", "output_heads", "unmatched_reason", "unused_linears"]


def output_heads(gm: fx.GraphModule, found: Sequence[Site]) -> frozenset[str]:
    """Module paths PEFT's ``target_modules="all-linear"`` excludes: the output embedding layer only.

    PEFT (``_maybe_include_all_linear_layers``) asks a ``PreTrainedModel`` for
    ``get_output_embeddings()`` (GPT-2's / Llama's ``lm_head``, BERT-MLM's ``cls.predictions.decoder``);
    a model without one (``BertModel``, a classifier) keeps every linear layer, its head included. For a
    module trace() did not capture from such a model, a linear site reading an embedding's table (a tied
    output embedding) or a module named ``lm_head`` is the head.
    """
    capture = capture_of(gm)
    model = capture.source.module if capture is not None and capture.source is not None else None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # some models raise for heads they do not have
            head = None
        if not isinstance(head, nn.Module):
            return frozenset()
        return frozenset(name for name, m in model.named_modules() if m is head)
    tables = {s.weight for s in found if s.kind == "embedding"}
    return frozenset(s.path for s in found if s.kind == "linear"
                     and (s.weight in tables or s.path.rpartition(".")[2] == "lm_head"))


def unused_linears(gm: fx.GraphModule) -> list[str]:
    """``"all-linear"``'s note: linear modules of the user's model (PEFT's ``nn.Linear`` / ``Conv1D``) that the
    captured forward never calls (BLIP retrieval's ``text_proj`` with the ITM head): PEFT would wrap them
    and train nothing; lora-fx has no site there, and says so."""
    model = _source(gm)
    called = called_modules(gm)
    unused = [n for n, m in model.named_modules() if n and n not in called
              and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    if not unused:
        return []
    shown = ", ".join(unused[:5]) + (f" ... ({len(unused)} in all)" if len(unused) > 5 else "")
    return [f"'all-linear': the linear module(s) {shown} are never called by the captured forward (unused for "
            "these inputs), so they get no LoRA (PEFT would wrap them and train nothing)"]


def unmatched_reason(gm: fx.GraphModule, target: Target, found: Sequence[Site]) -> str:
    """Why ``target`` selected no site, as a message naming it; SiteError when it names an unadaptable matmul."""
    _raise_if_unadaptable(gm, target)
    if not is_all_linear(target.pattern) and target.ops is None:
        model = _source(gm)
        named = [n for n, _ in model.named_modules() if n and matches_names(target.pattern, (n,))]
        if named:
            called = called_modules(gm)
            unused = [n for n in named if n not in called]
            shown = ", ".join(f"`{n}`" for n in (unused or named)[:3]) + (" ..." if len(unused or named) > 3 else "")
            if unused:
                verb = "is a module" if len(unused) == 1 else "are modules"
                return (f"pattern {_show(target)}: {shown} {verb} of the model but the captured forward never "
                        "calls it (unused for these inputs), so there is nothing to adapt there; target a module "
                        "the forward calls (lora_fx.sites(gm) lists the adaptable ones)")
            types = sorted({type(model.get_submodule(n)).__name__ for n in named})
            return (f"pattern {_show(target)}: {shown} ({', '.join(types)}) is called by the captured forward but "
                    "makes no adaptable matmul (a linear, conv, embedding, einsum or experts call with a parameter "
                    "weight) itself; target its linear children (lora_fx.sites(gm) lists the adaptable ones)")
    return no_match([target], found)


def called_modules(gm: fx.GraphModule) -> set[str]:
    """Module paths the captured forward enters (every level of each node's module stack), or whose
    parameters it uses."""
    out: set[str] = set()
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            out.update(str(v[0]).split("@")[0] for v in stack.values())
        elif node.op == "call_module":
            out.add(str(node.target))
        if node.op == "get_attr" and node.users:  # torch.export reads every parameter; an unused one has no user
            out.add(str(node.target).rpartition(".")[0])
    for path in list(out):  # a called module's parents are called too
        while path:
            path = path.rpartition(".")[0]
            out.add(path)
    return out


def _source(gm: fx.GraphModule) -> nn.Module:
    capture = capture_of(gm)
    return capture.source.module if capture is not None and capture.source is not None else gm


def _show(t: Target) -> str:
    return repr(getattr(t.pattern, "pattern", t.pattern))


def _raise_if_unadaptable(gm: fx.GraphModule, target: Target) -> None:
    """A pattern that selects no site but names a matmul whose weight is not a parameter, or one its
    kind turns down (a grouped convolution), gets its own error."""
    if target.pattern == "*" or is_all_linear(target.pattern):
        return
    for node in gm.graph.nodes:
        spec = kinds.FUNCTIONS.get(node.target) if node.op == "call_function" else None
        kind = None if spec is None else kinds.get(spec.kind)
        w = None if kind is None else kind.weight_input(node, None, spec)
        if w is None:
            continue
        is_param = isinstance(w, fx.Node) and w.op == "get_attr" and _is_parameter(gm, str(w.target))
        if is_param and kind.describe(gm, node, spec) is not None:
            continue  # a site: not this error's case
        path = module_path(node, None)
        wname = str(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else path
        probe = Site(path, path, str(node.target), spec.kind, wname, spec.layout, (), 0, 0, node.name)
        if not matches(target.pattern, probe):
            continue
        site = f"site {path or wname} (node {node.name}, {node.target})"
        if is_param:
            raise SiteError(f"{site} cannot be adapted: {kind.rejection(node)}")
        what = f"node {w.name} ({w.op} {w.target})" if isinstance(w, fx.Node) else repr(w)
        source = _computed_from(gm, w)
        if source:  # e.g. weight standardization (timm's ScaledStdConv2d): a function of the parameter
            raise SiteError(f"{site}: its weight {what} is computed from the parameter {source} inside the forward, "
                            "so an update could not be folded back into that parameter; target another site "
                            "(lora_fx.sites(gm) lists the adaptable ones)")
        raise SiteError(f"{site}: its weight {what} is not a parameter, and LoRA adapts parameters only; register "
                        "the weight as an nn.Parameter of the module, or target another site")


def _is_parameter(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _computed_from(gm: fx.GraphModule, w, depth: int = 8) -> str | None:
    """The parameter a computed weight is derived from (a few ops up), if any."""
    todo, seen = [w], set()
    while todo and depth:
        depth -= 1
        nxt = []
        for n in todo:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr" and _is_parameter(gm, str(n.target)):
                return str(n.target)
            nxt += list(n.all_input_nodes)
        todo = nxt
    return None
