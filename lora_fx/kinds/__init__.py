"""Op kinds: each kind of adaptable op defined once (see :mod:`lora_fx.kinds.base` for the interface
and how to add one). Importing this package registers the built-in kinds, in this order."""

from . import conv, einsum, embedding, experts, linear  # noqa: F401  (registers the built-in kinds)
from .base import (
    CONV,
    EMBED,
    FUNCTIONS,
    IN_OUT,
    KINDS,
    LAYOUTS,
    METHODS,
    MODULES,
    OUT_IN,
    PEFT_MODULES,
    Emitter,
    OpKind,
    OpSpec,
    get,
    kind_for_layout,
    kind_of,
    op_name,
    op_names,
    register,
    spec_of,
)

__all__ = ["CONV", "EMBED", "FUNCTIONS", "IN_OUT", "KINDS", "LAYOUTS", "METHODS", "MODULES", "OUT_IN",
           "PEFT_MODULES", "Emitter", "OpKind", "OpSpec", "get", "kind_for_layout", "kind_of", "op_name",
           "op_names", "register", "spec_of"]
