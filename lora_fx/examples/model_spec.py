"""``MODEL`` specs: a built-in example name, ``package.module:factory``, or a Hugging Face config.json.

Used by the command line (``lora-fx inspect MODEL``) and by anyone who names models the same way.
A factory is a callable returning ``(model, args, kwargs)`` or ``(model, args)`` (like uvicorn's app
spec; the current directory is importable). A ``config.json`` (or its folder) is built on the meta
device, no weights read (:func:`lora_fx.weights.config_example`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from ..errors import LoraFxError

__all__ = ["builtin_names", "describe_builtin", "load_model", "ModelSpecError"]


class ModelSpecError(LoraFxError, ValueError):
    """A MODEL spec names no model: unknown name, module that does not import, bad factory."""


def describe_builtin(name: str) -> str:
    """First docstring line of a built-in example's factory, marked as random weights."""
    from . import zoo_models

    factory = zoo_models.MODELS.get(name) or zoo_models.BENCH_MODELS.get(name)
    first = (factory.__doc__ or name).strip().splitlines()[0].rstrip(".").replace("``", "")  # console, not reST
    real = " (real pretrained weights)" if name == "minilm" else "; random weights, not a pretrained model"
    return f"{first}{real}"


def builtin_names() -> list[str]:
    """Names :func:`load_model` accepts without a ``:``."""
    from . import zoo_models

    return [*zoo_models.MODELS, *zoo_models.BENCH_MODELS]


def load_model(spec: str) -> tuple[Any, tuple, dict]:
    """Resolves ``MODEL``: a built-in example name, or ``package.module:factory`` -> ``(model, args, kwargs)``.

    Raises:
        ModelSpecError: unknown name, module that does not import, factory missing or returning another shape.
    """
    from torch import nn

    if spec.endswith(".json") or os.path.isfile(os.path.join(spec, "config.json")):
        from ..weights import config_example

        return config_example(spec)  # a Hugging Face config.json: built on meta, no weights read
    if ":" not in spec:
        names = builtin_names()
        if spec not in names:
            raise ModelSpecError(f"unknown model {spec!r}: use a built-in name ({', '.join(names)}) "
                           "or package.module:factory")
        from . import zoo_models

        try:
            return zoo_models.build(spec)
        except ImportError as e:
            raise ModelSpecError(f"model {spec!r} needs an optional package: {e}") from e
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"model spec {spec!r} must look like package.module:factory")
    if os.getcwd() not in sys.path:  # like uvicorn: modules in the current directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import module {module_name!r} of model spec {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n)))[:12]
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r}; callables there: {', '.join(public)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{spec} is a {type(obj).__name__}, not a callable returning (model, args, kwargs)")
    try:
        result = obj()
    except LoraFxError:
        raise
    except Exception as e:
        raise ModelSpecError(f"factory {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(result, tuple) and len(result) == 2:
        result = (*result, {})
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module)):
        raise ModelSpecError(f"factory {spec} must return (model, args, kwargs) with an nn.Module first; "
                       f"got {type(result).__name__}")
    model, args, kwargs = result
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    return model, args, dict(kwargs or {})
