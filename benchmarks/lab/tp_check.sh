#!/usr/bin/env bash
# Tensor parallelism on two GPUs, in one device call: NCCL itself, the CUDA TP tests one by one, then
# bench.py --dummy at tp=1 and tp=2. Every stage has a time limit; a stage that runs over it gets every
# Python process's stacks printed into its log (SIGUSR1, see stack_dumps/sitecustomize.py) and is killed.
#   [TP_SIZES="1 2"] bash benchmarks/lab/tp_check.sh [nccl] [tests] [bench] [dead] [single]    # logs go to $OUT
# No argument: all but single (the one-GPU CUDA tests).
set -uo pipefail
cd "$(dirname "$0")/../.."
# No NVLink multicast on shared machines (it can take the host's GPUs out of service).
export PYTHONPATH=benchmarks/lab/stack_dumps:. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 NCCL_DEBUG=WARN
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())" | tee -a "$OUT/gpus.txt"
[ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] || { echo "needs two GPUs"; exit 1; }
stages=" ${*:-nccl tests bench dead} "

# bounded SECONDS LOG CMD...: run CMD with output appended to $OUT/LOG; past SECONDS, dump stacks and kill it.
bounded() {
  local limit=$1 log=$OUT/$2; shift 2
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  setsid "$@" >>"$log" 2>&1 &
  local pid=$!
  ( sleep "$limit"
    echo "== over ${limit}s: stacks of every python process" >>"$log"
    pkill -USR1 -s $pid; sleep 5; kill -9 -- -$pid ) &
  local watcher=$!
  wait $pid; local rc=$?
  kill $watcher 2>/dev/null; wait $watcher 2>/dev/null
  echo "== exit $rc after $((SECONDS - t0))s" | tee -a "$log"
}

if [[ $stages == *" nccl "* ]]; then
  # First the hang we saw: destroying the group while a graph that captured its all-reduce still exists.
  bounded 30 nccl.log python benchmarks/lab/nccl_graph_check.py --keep-graph
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P,SHM bounded 45 nccl.log python benchmarks/lab/nccl_graph_check.py
  # A dead peer: does aborting the group release a stuck replay, and does the abort return (graph alive/freed)?
  bounded 35 nccl.log python benchmarks/lab/nccl_graph_check.py --kill-peer
  bounded 35 nccl.log python benchmarks/lab/nccl_graph_check.py --kill-peer-drop-graph
  grep -E "^== |rank [01]:|exit codes|via|Error|error" "$OUT/nccl.log" | grep -v "Channel [0-9][1-9]" | head -60
fi
run_tests() {   # the -k expression, its limit
  bounded $2 tests.log python -m pytest tests/test_tensor_parallel.py -v -rA -p no:logging -p no:cacheprovider -k "$1"
}
summarize_tests() {
  grep -E "PASSED|FAILED|ERROR|relative error|^(kill|Error)|^E |^== (exit|over)" "$OUT/tests.log" | head -60
}
if [[ $stages == *" tests "* ]]; then
  run_tests "cuda and greedy" 180
  run_tests "cuda and logits" 120
  summarize_tests
fi
if [[ $stages == *" bench "* ]]; then
  for tp in ${TP_SIZES:-1 2}; do
    bounded 100 bench.log python bench.py --dummy --repeat 2 --tensor-parallel-size $tp
  done
  grep -E "^(==|Startup|Total|  run|Batch-1)|Error" "$OUT/bench.log"
fi
if [[ $stages == *" dead "* ]]; then
  run_tests "cuda and (dead_worker or ctrl_c)" 260
  awk "/cuda and .dead_worker/{f=1} f" "$OUT/tests.log" | grep -v "Warning\|warnings.warn" | tail -80
fi
if [[ $stages == *" single "* ]]; then    # the one-GPU CUDA tests, on GPU 0
  bounded 240 single.log python -m pytest -q -rs -p no:logging tests/test_triton_kernels.py tests/test_cuda.py -m ""
  tail -5 "$OUT/single.log"
fi
