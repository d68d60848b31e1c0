"""The Adapter: a set of LoRA branches and their A/B tensors, independent of any graph or file.

``adapter_of(lgm)`` snapshots a lorafied module; :mod:`.peft_format` reads and writes adapters as
PEFT folders; :mod:`.bind` loads one into a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

from .. import kinds
from ..delta import Branch
from ..graph_module import capture_of, lora_state
from ..residual import INITIAL_KEY, converted

__all__ = ["Adapter", "adapter_of"]


@dataclass
class Adapter:
    """Branches and their A/B tensors, read from a file or snapshot from a lorafied module.

    Attributes:
        branches: branch key -> :class:`~lora_fx.delta.Branch` (for a file, its ``site`` holds only
            the id, path, weight, op, layout and kind recorded there).
        tensors: ``branch.a`` / ``branch.b`` -> the tensor (detached; :meth:`pair` reads both).
        use_rslora: scale = alpha / sqrt(r).
        source: where it came from (a file, or ``<LoraFxModule>``), for messages.
        peft: keys of the branches stored under PEFT's tensor names.
    """

    branches: dict[str, Branch]
    tensors: dict[str, torch.Tensor]
    use_rslora: bool = False
    source: str = "<module>"
    peft: frozenset[str] = frozenset()
    model: str = ""  # the model it was made for (trace() records it; PEFT's base_model_name_or_path)
    init: str = ""  # PEFT's init_lora_weights when it changes the base ("pissa", "olora"): lorafy the same way

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the branch ``key``."""
        br = self.branches[key]
        return self.tensors[br.a], self.tensors[br.b]

    def tensors_of(self, key: str) -> tuple[torch.Tensor, ...]:
        """A, B (and DoRA's magnitude m) of the branch ``key``, in :attr:`Branch.names` order."""
        return tuple(self.tensors[n] for n in self.branches[key].names)

    @property
    def dora(self) -> bool:
        return any(br.magnitude for br in self.branches.values())


def adapter_of(lgm: fx.GraphModule) -> Adapter:
    """Snapshot (detached clones) of the current A/B (and DoRA m) values of a lorafied module.

    PiSSA / OLoRA branches come out as the plain LoRA over the original weight that they equal
    (rank 2r: :func:`lora_fx.residual.converted`, PEFT's ``path_initial_model_for_weight_conversion``)."""
    state = lora_state(lgm, "adapter_of")
    tensors = {n: lgm.get_parameter(n).detach().clone() for br in state.branches for n in br.names}
    nodes = {n.name: n for n in lgm.graph.nodes}  # one scan (a lookup per branch is branches x nodes)
    peft = frozenset(br.key for br in state.branches if _is_peft(lgm, br, nodes))
    cap = capture_of(lgm)
    rslora = bool(state.report.rslora)
    branches = {br.key: br for br in state.branches}
    for key, (a0, b0, _) in lgm.meta.get(INITIAL_KEY, {}).items():  # PiSSA / OLoRA: over the original W
        br = branches[key]
        tensors[br.a], tensors[br.b], rank, alpha = converted(tensors[br.a], tensors[br.b], a0, b0, br.alpha,
                                                              br.rank, rslora)
        branches[key] = replace(br, rank=rank, alpha=alpha)
    return Adapter(branches, tensors, rslora, f"<{type(lgm).__name__}>", peft, cap.model if cap is not None else "")


def _is_peft(lgm: fx.GraphModule, br: Branch, nodes: dict[str, fx.Node]) -> bool:
    """True when PEFT can hold this branch: a whole weight of one call of a module type PEFT wraps."""
    site = br.site
    if br.slice is not None or br.key != site.path or "#" in site.id or not site.path:
        return False
    node = nodes.get(site.node)
    if node is None:
        return False
    if node.op == "call_module":
        tname = type(lgm.get_submodule(str(node.target))).__name__
    else:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return False
        owner = list(stack.values())[-1][1]
        tname = (owner if isinstance(owner, str) else getattr(owner, "__qualname__", str(owner))).split(".")[-1]
    peft_types = kinds.PEFT_MODULES  # module class names PEFT's LoRA wraps -> their site's op
    return tname in peft_types and site.op in (peft_types[tname], tname)
