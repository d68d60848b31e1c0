"""The proofs of an export: ``structure`` (two ONNX graphs equal up to initializer values), ``numerics``
(ONNX Runtime vs torch), ``proof`` (``verify_fold`` / ``verify_export`` and their report), ``segments``
(ONNX Runtime with bounded weight memory), ``ort`` (sessions and runs). Import the submodules."""

__all__: list[str] = []
