"""Writing, running and comparing ONNX files (the layout: ARCHITECTURE.md).

Submodules are imported on demand (``from lora_fx.exporters import files``) so that importing
``lora_fx`` does not pull in onnx, onnxruntime or the torch ONNX exporter.
"""

from __future__ import annotations

__all__: list[str] = []
