"""Shared fixtures: zoo models are built and traced once per test session."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo tests talk over loopback only (no hostname lookup)
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", module="torch")

from zoo import ZOO_BY_NAME  # noqa: E402

import lora_fx  # noqa: E402

# The default run (the README's `python -m pytest -q -n 2`) must end in about 3 minutes on 2 cores. These
# tests are the slowest of it (each 2-30 s idle, measured with --durations): each one's feature keeps
# a faster test in the default run, and CI still runs these with `-m slow`. A node id without
# parameters covers all of its parameters.
SLOW = (
    "tests/test_benchmarks.py::test_refold_smoke",
    "tests/test_benchmarks.py::test_inference_smoke",
    "tests/test_benchmarks.py::test_training_smoke",
    "tests/test_benchmarks.py::test_overhead_smoke",
    "tests/test_cli.py::test_demo_quick",
    "tests/test_cli.py::test_export_with_adapter",
    "tests/test_cli.py::test_export_verify_round_trip",
    "tests/test_cli.py::test_refold_swaps_the_adapter_of_an_export",
    "tests/test_cli.py::test_python_m_help",
    "tests/test_generation.py::test_bad_generate_arguments",
    "tests/test_kv_cache.py::test_llama_kv_export_verified_and_generates_like_hf",
    "tests/test_export.py::test_zoo_folded_export_is_the_base_export[minilm]",
    "tests/test_export.py::test_zoo_folded_export_is_the_base_export[llama]",
    "tests/test_export.py::test_zoo_folded_export_is_the_base_export[bert]",
    "tests/test_export.py::test_zoo_folded_export_is_the_base_export[gpt2]",
    "tests/test_export.py::test_zoo_folded_export_is_the_base_export[convnet]",
    "tests/test_export.py::test_zoo_folded_export_is_the_base_export[functional]",
    "tests/test_export.py::test_unfolded_export_fails_structure_negative_control",
    "tests/test_export.py::test_fp16_export_for_gpu",
    "tests/test_export.py::test_dynamic_batch_and_sequence_in_onnx_runtime",
    "tests/test_export.py::test_failed_verification_writes_nothing",
    "tests/test_multi_lora.py::test_export_maps_every_lora_tensor_to_an_overridable_zero_initializer",
    "tests/test_fold.py::test_zoo_fold_equals_lora_model_and_captured_graph[minilm]",
    "tests/test_fold.py::test_zoo_fold_equals_lora_model_and_captured_graph[llama]",
    "tests/test_distributed.py::test_ddp_two_ranks_equal_single_process",
    "tests/test_sweep.py::test_every_stage",
    "tests/test_streaming.py::test_streamed_files_are_byte_identical_to_a_plain_export",
    "tests/test_lorafy.py::test_zoo_lorafy_then_train[bert]",
    "tests/test_lorafy.py::test_zoo_lorafy_then_train[llama]",
    "tests/test_lorafy.py::test_zoo_lorafy_then_train[convnet]",
    "tests/test_fallback.py::test_export_report_says_base_weights_and_file_size",
    "tests/test_refold.py::test_refold_equals_folding_the_new_adapter",
    "tests/test_refold.py::test_refold_external_data_patches_the_data_file",
    "tests/test_blocks.py::test_each_block_owns_its_weights_and_lora_and_computes_the_same",
    "tests/test_capture.py::test_var_positional_forward_traces_lorafies_and_exports",
    "tests/test_quantize.py::test_prepare_puts_every_weight_matmul_in_initializer_form",
    "tests/test_properties.py::test_fold_and_export_verifies",
    "tests/test_adapters.py::test_peft_trained_adapter_loads_into_graph[gpt2]",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        base = item.nodeid.split("[", 1)[0]
        if item.nodeid in SLOW or base in SLOW:
            item.add_marker(pytest.mark.slow)


@functools.cache
def traced(name: str):
    """(model, args, kwargs, gm) for a zoo case; the model and gm are shared, so never mutate them."""
    model, args, kwargs = ZOO_BY_NAME[name].build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = lora_fx.trace(model, args, kwargs)
    return model, args, kwargs, gm


@pytest.fixture
def zoo_traced():
    return traced
