"""Task switching: replace the adapter folded into a model, without re-exporting.

* :mod:`.folded`: :func:`swap_adapter` / :func:`combine_adapters` on folded GraphModules.
* :mod:`.refold`: :func:`refold_onnx` on a folded ONNX file (rewrites only adapted initializers).

Both use :mod:`lora_fx.delta` (fold's arithmetic), so a swapped or refolded weight is bit-identical
to a fresh fold of the new adapter.
"""

from .folded import SWAP_KEY, AdapterLike, SwapState, as_adapter, combine_adapters, swap_adapter
from .refold import RefoldReport, refold_onnx

__all__ = ["SWAP_KEY", "AdapterLike", "RefoldReport", "SwapState", "as_adapter", "combine_adapters",
           "refold_onnx", "swap_adapter"]
