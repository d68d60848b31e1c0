"""Per-expert routing loops captured densely: every expert on every token, masked to the tokens routed to it.

Most Hugging Face mixture-of-experts layers before transformers' ``experts_implementation`` (Switch Transformers,
NLLB-MoE, GPTSAN, Mixtral's old form) loop over the experts that got tokens::

    hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()          # which experts got tokens: a data-dependent count
    for e in hit:                                          # torch.export cannot decide the loop's length
        slot, rows = torch.where(mask[e].squeeze(0))       # that expert's tokens: a data-dependent size
        out.index_add_(0, rows, expert[e](x[rows]) * w[rows, slot, None])

:class:`DenseRouting` (a ``TorchFunctionMode`` active only while ``trace`` captures) makes both sizes static:

* ``nonzero()`` of a 1-D mask of a fixed length (``hit``) is every index ``0..L-1``, a real constant tensor, so
  ``for e in hit`` runs over every expert and ``self[f"expert_{e[0]}"]`` reads a real index;
* ``torch.where(mask)`` / ``nonzero`` of any other mask is every position (row-major, the order nonzero gives
  when all are true), each index tensor remembered with the mask flattened;
* ``index_add`` / ``index_add_`` / ``index_put_(accumulate=True)`` with such an index multiply the added rows
  by the mask: the rows of tokens not routed there add exactly zero.

Exact for experts that act on each token alone (every expert layer we know: linears and activations per row):
the routed tokens get what the loop computes, the others ``0 * finite``. Gradients are those of the loop (a
masked row gets zero gradient). The price is compute: each expert runs on every token of every top-k slot, so a
layer of E experts costs E times its routed cost. Each of ``trace``'s uses is then proven: :func:`prove_values`
runs the captured graph against the model at other input values (other routing) before it is accepted, and the
export's verification runs the file at random inputs again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["DenseRouting", "NOTE", "prove_values"]

NOTE = ("per-expert routing loops captured densely (every expert runs on every token, masked to the tokens routed "
        "to it: exact, at E times the routed compute of a layer of E experts); proven against the model at other "
        "input values")

_WHERE = {torch.where, torch.nonzero, torch.Tensor.nonzero}
_ADDS = {torch.index_add, torch.Tensor.index_add, torch.Tensor.index_add_}


@contextlib.contextmanager
def _real() -> Iterator[None]:
    """Real tensors inside a capture: the loop constants are Python-visible values, not traced ones."""
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


class DenseRouting(TorchFunctionMode):
    """The rewrite of the module doc; ``used`` counts the data-dependent index ops it made dense."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(index) -> (index, flat mask)
        self.consts: dict[int, torch.Tensor] = {}  # loop constants (real tensors) and what was read from them
        self.used = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and self._constant(args, kwargs):
            with _real():
                out = func(*args, **kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.consts[id(t)] = t
            return out
        if func in _WHERE and len(args) == 1 and set(kwargs) <= {"as_tuple"} and args[0].dim() > 0:
            return self._dense(args[0], as_tuple=func is torch.where or bool(kwargs.get("as_tuple")))
        if func in _ADDS and len(args) >= 4:
            args = (*args[:3], self._masked(args[3], args[2], args[1]), *args[4:])
        elif func is torch.Tensor.index_put_ and (kwargs.get("accumulate") or (len(args) > 3 and args[3])):
            index = args[1][0] if len(args[1]) == 1 else None
            args = (args[0], args[1], self._masked(args[2], index, 0), *args[3:])
        return func(*args, **kwargs)

    def _constant(self, args: tuple, kwargs: dict) -> bool:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return bool(tensors) and all(id(t) in self.consts for t in tensors)

    def _dense(self, cond: torch.Tensor, as_tuple: bool):
        self.used += 1
        mask = (cond != 0).reshape(-1)
        if cond.dim() == 1 and isinstance(cond.shape[0], int) and not as_tuple:  # a loop over what got tokens
            with _real():
                index = torch.arange(cond.shape[0], device=cond.device).unsqueeze(1)
            self.consts[id(index)] = index
            self.masks[id(index)] = (index, mask)
            return index
        grids = torch.meshgrid(*[torch.arange(s, device=cond.device) for s in cond.shape], indexing="ij")
        out = tuple(g.reshape(-1) for g in grids)
        for index in out:
            self.masks[id(index)] = (index, mask)
        return out if as_tuple else torch.stack(out, 1)

    def _masked(self, rows: torch.Tensor, index: object, dim: int) -> torch.Tensor:
        """``rows`` (added at ``index`` along ``dim``) times the mask ``index`` was made dense with."""
        hit = self.masks.get(id(index))
        if hit is None or not isinstance(rows, torch.Tensor):
            return rows
        shape = [1] * rows.dim()
        shape[dim] = -1
        return rows * hit[1].reshape(shape).to(rows.dtype)


def prove_values(model: torch.nn.Module, gm: torch.nn.Module, args: tuple, kwargs: dict, tries: int = 3
                 ) -> str | None:
    """None when the captured graph equals the model on the example and on ``tries`` inputs of the same
    shapes with other values (random token ids below the example's maximum, random floats; the last try also
    right-pads every 0/1 mask to a random length, so index ops on a padding mask are checked too): other
    routing. Else why not. An input the model itself cannot take (a padding mask it does not support) is
    skipped."""
    from .dynamic_dims import redraw, runs_as_model  # dynamic_dims imports capture's helpers

    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None  # nothing to run (a model captured on the meta device): the export's verification checks it
    gen = torch.Generator().manual_seed(0)
    for k in range(tries + 1):
        inputs = (args, kwargs) if k == 0 else pytree.tree_map_only(
            torch.Tensor, lambda t: redraw(t, list(t.shape), gen), (args, kwargs))
        if k == tries:
            inputs = pytree.tree_map_only(torch.Tensor, lambda t: _padded(t, gen), inputs)
        why = runs_as_model(model, gm, inputs)
        if why is not None and not why.startswith("the model itself fails"):
            return f"{why} ({'at the example' if k == 0 else 'at other input values'})"
    return None


def _padded(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A 2-D 0/1 mask of ones right-padded: each row keeps a random number (>= 1) of leading ones."""
    if t.dim() != 2 or t.is_floating_point() or t.numel() == 0 or int(t.min()) != 1 or int(t.max()) != 1:
        return t
    keep = torch.randint(1, t.shape[1] + 1, (t.shape[0], 1), generator=gen)
    return (torch.arange(t.shape[1]).unsqueeze(0) < keep).to(t.dtype)
