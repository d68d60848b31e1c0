"""Decoder (KV-cache) export: ``capture`` (the wrapper and its capture with the LoRA moved over,
``merged_model``), ``io_names`` (canonical I/O names + layout metadata), ``checks`` (prefill/decode
checks), ``export`` (the verb ``export_decoder`` and the frame ``decoder_files``), ``folder`` (the files
beside the model). Import the submodules."""

__all__: list[str] = []
