"""Writing, running and comparing ONNX files.

Submodules are imported on demand (``from lora_fx.exporters import onnx_io``) so that importing
``lora_fx`` does not pull in onnxruntime or the torch ONNX exporter.
"""

from __future__ import annotations
