"""Graph passes: lorafy (inject LoRA branches) and fold (merge them back into the weights)."""
