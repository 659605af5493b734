#!/usr/bin/env bash
# Tensor parallelism on two GPUs in one call: the CUDA TP tests, then bench.py --dummy at tp=1 and tp=2.
#   bash benchmarks/tp_check.sh            # logs go to $OUT (default /tmp/out)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0     # no NVLink multicast on shared machines
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
[ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] || { echo "needs two GPUs"; exit 1; }

# -rA prints each test's captured output too: the bf16 logits error and the kill timings.
python -m pytest tests/test_tensor_parallel.py -v -rA -k cuda 2>&1 | tee "$OUT/pytest_tp_cuda.log" | tail -40
python -m pytest -q tests/test_tensor_parallel.py 2>&1 | tee "$OUT/pytest_tp_all.log" | tail -3

if python bench.py --help 2>/dev/null | grep -q -- --tensor-parallel-size; then
  for tp in 1 2; do
    echo "== python bench.py --dummy --tensor-parallel-size $tp"
    python bench.py --dummy --tensor-parallel-size $tp 2>&1 | tee "$OUT/bench_tp$tp.log" | grep -v Warning
  done
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  echo "== for docs/BENCHMARKS.md ($gpu x2, NCCL_NVLS_ENABLE=0):"
  for tp in 1 2; do
    echo "| tp=$tp | \`python bench.py --dummy --tensor-parallel-size $tp\` | $gpu | $(grep -m1 -o 'Throughput: [0-9.]*tok/s' "$OUT/bench_tp$tp.log") |"
  done
else
  echo "bench.py has no --tensor-parallel-size; skipped the throughput runs"
fi
