#!/usr/bin/env bash
# Tensor parallelism on two GPUs: the CUDA TP tests, then bench.py --dummy at tp=1 and tp=2.
#   bash benchmarks/tp_check.sh [tests] [bench] [all]    # no argument: tests and bench; logs go to $OUT
# Each test has a time limit (pytest-timeout, on the GPU image): a hang fails with every thread's stack
# instead of eating the call's 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
# No NVLink multicast on shared machines (it can take the host's GPUs out of service).
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())" | tee "$OUT/versions.txt"
[ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] || { echo "needs two GPUs"; exit 1; }

stages=" ${*:-tests bench} "
if [[ $stages == *" tests "* || $stages == *" all "* ]]; then
  # -rA prints each test's captured output too: the bf16 logits error and the kill timings.
  python -m pytest tests/test_tensor_parallel.py -v -rA -k cuda -p no:logging --timeout 150 2>&1 |
    tee "$OUT/pytest_tp_cuda.log" | grep -v "Warning\|warnings.warn" | tail -60
fi
[[ $stages == *" all "* ]] && python -m pytest -q tests/test_tensor_parallel.py 2>&1 | tee "$OUT/pytest_tp_all.log" | tail -3
[[ $stages == *" bench "* || $stages == *" all "* ]] || exit 0

for tp in 1 2; do
  echo "== python bench.py --dummy --repeat 2 --tensor-parallel-size $tp"
  timeout 240 python bench.py --dummy --repeat 2 --tensor-parallel-size $tp 2>&1 | tee "$OUT/bench_tp$tp.log" | grep -v Warning
done
echo "== rows for docs/BENCHMARKS.md ($(head -1 "$OUT/gpus.txt" | cut -d, -f2 | xargs) x2, NCCL_NVLS_ENABLE=0):"
echo "| command | run | time | throughput |"
echo "|---|---|---|---|"
for tp in 1 2; do
  grep '^Total:' "$OUT/bench_tp$tp.log" | sed -E 's/.*Time: ([0-9.]+)s, Throughput: ([0-9.]+)tok\/s.*/\1 s | \2 tok\/s |/' |
    awk -v tp=$tp '{print "| `python bench.py --dummy --repeat 2 --tensor-parallel-size " tp "` | run " NR " | " $0}'
done
