"""Graph passes: lorafy (inject LoRA branches) and fold (merge them back into the weights)."""

__all__ = ["attention", "checkpoint", "dtype", "fold", "functionalize", "fused", "lorafy", "quantize_base", "stand_ins",
           "variants"]  # the submodules (imported on use)
