#!/usr/bin/env bash
# The device check, one call: the CUDA test file, then the GPU training benchmark.
# Usage (on the GPU machine, repo root): OUT=<folder> bash benchmarks/gpu/run.sh [benchmark args]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, peft, onnx, onnxscript, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'onnx', onnx.__version__, 'onnxscript', onnxscript.__version__, 'ort', ort.__version__, ort.get_available_providers())"
} 2>&1 | tee "$OUT/env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" --tb=short -p no:logging tests/test_cuda.py -k "${TESTS:-}" \
  >"$OUT/test_cuda.txt" 2>&1; grep -E "Error|error|^(PASSED|FAILED)|passed|failed" "$OUT/test_cuda.txt" | tail -30
[ "${TESTS_ONLY:-0}" = 1 ] && exit 0
timeout "${BENCH_TIMEOUT:-400}" python3 -m benchmarks training_gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -60
