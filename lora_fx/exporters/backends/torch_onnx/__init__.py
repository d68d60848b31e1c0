"""The default backend: torch's dynamo exporter (``onnx_io``), weights streamed into the file
(``streaming``), past its known failures (``fallback``), optimized with the weights opaque (``optimize``,
``ort_fusions``); the structure proven from the skeletons or by a base export (``backend``)."""

from .backend import TorchOnnxBackend

__all__ = ["TorchOnnxBackend"]
