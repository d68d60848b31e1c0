"""Export backends (see :mod:`.base`): the registry, and the backends lora-fx ships.

A new backend: one module here with a :class:`~.base.Backend` subclass, and its registration below.
"""

from .base import (
    DEFAULT_BACKEND,
    Backend,
    ExportRequest,
    ExportResult,
    backend_names,
    get_backend,
    register_backend,
    select_backend,
    timed,
    unregister_backend,
)
from .genai_builder import GenaiBuilder
from .torch_onnx import TorchOnnxBackend

__all__ = ["DEFAULT_BACKEND", "Backend", "ExportRequest", "ExportResult", "TorchOnnxBackend", "backend_names",
           "get_backend", "register_backend", "select_backend", "timed", "unregister_backend"]

register_backend(TorchOnnxBackend())
register_backend(GenaiBuilder())  # decoders of the builder's architectures (kv_cache=True), when installed
