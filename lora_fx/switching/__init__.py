"""Task switching: replace the adapter folded into a model, without re-exporting.

* :mod:`.folded`: :func:`swap_adapter` / :func:`combine_adapters` on folded GraphModules.
* :mod:`.refold`: :func:`refold_onnx` on a folded ONNX file (rewrites only adapted initializers),
  :func:`refold_quantized` on a quantized one; loaded on first use (it needs onnx).

Both use :mod:`lora_fx.delta` (fold's arithmetic), so a swapped or refolded weight is bit-identical
to a fresh fold of the new adapter.
"""

from .folded import SWAP_KEY, AdapterLike, SwapState, as_adapter, combine_adapters, swap_adapter

__all__ = ["SWAP_KEY", "AdapterLike", "RefoldReport", "SwapState", "as_adapter", "combine_adapters",
           "refold_onnx", "refold_quantized", "swap_adapter"]

_REFOLD = ("RefoldReport", "refold_onnx", "refold_quantized")


def __getattr__(name: str):
    if name in _REFOLD:
        from . import refold

        return getattr(refold, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
