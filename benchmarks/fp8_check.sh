#!/usr/bin/env bash
# The fp8 KV cache (issue 14) on one GPU, in one device call. Stages: tests | accuracy | bench | all
#   bash benchmarks/fp8_check.sh [tests] [accuracy] [bench]       # logs go to $OUT
# tests: the Triton kernels against the reference under fp8 at small and real sizes (a CUDA graph included),
#   the fp8 engine tests (Triton logits on the tiny models), and the existing CUDA tests, which must not move.
# accuracy: benchmarks/fp8_accuracy.py at GPU sizes (dummy Qwen3-0.6B in bf16 and the tiny float32 models).
# bench: bench.py --dummy with the bf16 cache, then the fp8 one, same commit and call (the issue asks >= 1.35x
#   and about twice the KV blocks); then the fp8 roofline.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stages=" ${*:-all} "
has() { [[ $stages == *" $1 "* || $stages == *" all "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if has tests; then
  python -m pytest -q -rs -p no:logging tests/test_triton_kernels.py tests/test_fp8_kv_cache.py tests/test_cuda.py \
    -m "" 2>&1 | tee "$OUT/pytest_fp8.log" | tail -15
fi
if has accuracy; then
  python benchmarks/fp8_accuracy.py --attention-backend triton 2>&1 | grep -v "Writing model" \
    | tee "$OUT/fp8_accuracy.log"
fi
if has bench; then
  for kv in auto fp8; do
    python bench.py --dummy --attention-backend triton --kv-cache-dtype $kv 2>&1 | tee "$OUT/bench_$kv.log"
  done
  fp8_time=$(grep -o 'Time: [0-9.]*' "$OUT/bench_fp8.log" | head -1 | cut -d' ' -f2)
  [ -f ../shared/tools/roofline.py ] && [ -n "$fp8_time" ] && \
    python ../shared/tools/roofline.py --kv-bytes 1 --measured "$fp8_time" 2>&1 | tee "$OUT/roofline_fp8.log"
fi
