"""LoRA adapters: the :class:`Adapter` model, its PEFT file format, and binding it to a graph.

* :mod:`.adapter`: :class:`Adapter` (branches + A/B tensors) and :func:`adapter_of` (snapshot).
* :mod:`.peft_format`: :func:`save_adapter` / :func:`read_adapter` (PEFT's folder layout).
* :mod:`.bind`: :func:`load_adapter` (check everything, lorafy if needed, copy A/B in).
"""

from .adapter import Adapter, adapter_of
from .bind import load_adapter
from .peft_format import CONFIG, TENSORS, file_keys, read_adapter, save_adapter, site_ref

__all__ = ["CONFIG", "TENSORS", "Adapter", "adapter_of", "file_keys", "load_adapter", "read_adapter",
           "save_adapter", "site_ref"]
