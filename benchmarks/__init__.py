"""Ratio benchmarks for lora-fx: ``python -m benchmarks {inference,training,training_llm,dispatch,overhead,precision,refold,generation,quantize,scale,llm_deploy,variants,all}``.

Each benchmark measures lora-fx and its baselines in the same run (interleaved where possible) and
writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``benchmarks/results/`` (or ``--out``).
``--smoke`` runs tiny sizes in seconds (what tests/test_benchmarks.py checks); its numbers mean nothing.
"""

BENCHMARKS = ("inference", "training", "training_llm", "dispatch", "overhead", "precision", "refold", "generation",
              "quantize", "scale", "llm_deploy", "variants")
GPU_BENCHMARKS = ("training_gpu",)  # need a CUDA device (their --smoke runs on the CPU); not part of "all"

__all__ = ["BENCHMARKS", "GPU_BENCHMARKS"]
