#!/usr/bin/env bash
# The whole GPU check in one call (device time is scarce): environment, CUDA tests, kernel bench, bench.py.
#   bash benchmarks/gpu_check.sh [quick]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -x tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
if [ "${1:-}" = quick ]; then
  python bench.py --dummy --attention-backend torch --enforce-eager --num-seqs 16 --skip-batch1 2>&1 | tee "$OUT/bench_torch.log"
  exit 0
fi
[ -f benchmarks/attention_kernels.py ] && python benchmarks/attention_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -30
python -m pytest -q tests 2>&1 | tee "$OUT/pytest_all.log" | tail -5
for backend in triton; do
  python bench.py --dummy --attention-backend $backend --repeat 2 2>&1 | tee "$OUT/bench_$backend.log"
done
python bench.py --dummy --attention-backend triton --enforce-eager --skip-batch1 2>&1 | tee "$OUT/bench_triton_eager.log"
