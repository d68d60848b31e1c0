"""Example models and tasks shipped with lora-fx (used by the tests, the demo, the CLI and benchmarks).

- :mod:`lora_fx.examples.zoo_models`: tiny deterministic models (``build(name)``).
- :mod:`lora_fx.examples.textcls`: a generated text-classification task for the MiniLM LoRA demo.

Submodules are not imported here, so ``import lora_fx.examples`` stays cheap.
"""

__all__ = ["decoders", "model_spec", "orders", "textcls", "zoo_models"]  # the submodules (imported on use)
