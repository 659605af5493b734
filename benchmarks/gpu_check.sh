#!/usr/bin/env bash
# The GPU checks and benchmarks in one call, from a fresh clone (nothing outside the repository). Logs go to $OUT.
#   bash benchmarks/gpu_check.sh [STAGE...]        # no stage: tests bench fp8 accuracy kernels (and old, if .old/)
# Stages:
#   tests     the test files that have CUDA tests (their CPU tests run too); over ten minutes now, more than one
#             device call allows: tests1 and tests2 are its first and second half of the files, a call each
#   bench     python bench.py --dummy, then its fraction of the roofline limits (throughput and batch-1)
#   fp8       python bench.py --dummy --kv-cache-dtype fp8, then its fraction of the fp8 limit
#   accuracy  python benchmarks/fp8_accuracy.py
#   kernels   python benchmarks/attention_kernels.py, then python benchmarks/decode_sweep.py
#   old       bench.py of another tree copied to .old/, in the same call, for a before/after comparison:
#             e.g. `mkdir .old && git archive <commit> | tar -x -C .old`, then `bash benchmarks/gpu_check.sh bench old`
#   serve     the server on bench.py's workload (random Qwen3-0.6B weights, a byte-level tokenizer so that text is
#             detokenized): bench.py offline, then serve_bench.py whole answers, streaming, and at request rates
#   timeline  where a small-batch decode step's time goes (benchmarks/lab/step_timeline.py, batch 1)
#   startup   LLM() start-up cold and warm, compiling ahead off and on, by phase (benchmarks/lab/startup_profile.py)
#   tp        two GPUs: the tensor-parallel CUDA tests, then bench.py --dummy --tensor-parallel-size 2
# BENCH_ARGS adds flags to every bench.py run (e.g. BENCH_ARGS="--repeat 2").
set -uo pipefail
cd "$(dirname "$0")/.."
# No NVLink multicast: on a shared machine it can take the host's GPUs out of service.
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BENCH_ARGS=${BENCH_ARGS:-}
default="tests bench fp8 accuracy kernels$([ -d .old ] && echo " old")"
stages=" ${*:-$default} "
has() { [[ $stages == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
git log -1 --format="commit %h %s" 2>/dev/null | tee -a "$OUT/gpu.txt"

# bench LOG [bench.py flags...]: run bench.py --dummy, then print its first run's fraction of the one-GPU limit.
bench() {
  local log=$OUT/$1; shift
  # shellcheck disable=SC2086
  python bench.py --dummy "$@" $BENCH_ARGS 2>&1 | tee "$log"
  local seconds kv_bytes=2
  seconds=$(grep -o 'Time: [0-9.]*' "$log" | head -1 | cut -d' ' -f2)
  [[ " $* " == *" fp8 "* ]] && kv_bytes=1
  [ -n "$seconds" ] && python benchmarks/roofline.py --kv-bytes $kv_bytes --measured "$seconds" | tail -1
}
batch1_fraction() {
  local tps
  tps=$(grep -o 'Batch-1 decode: [0-9.]*' "$OUT/$1" | cut -d' ' -f3)
  [ -n "$tps" ] && python benchmarks/roofline.py --batch1 --measured "$tps" | tail -1
}

if has tests || has tests1 || has tests2; then
  mapfile -t files < <(grep -l "cuda.is_available\|mark.cuda" tests/test_*.py)
  half=$(( (${#files[@]} + 1) / 2 ))
  if ! has tests && ! (has tests1 && has tests2); then     # one half only
    if has tests1; then files=("${files[@]:0:half}"); else files=("${files[@]:half}"); fi
  fi
  # (tests.gpu_memory_trace logs each test's GPU memory: which test leaves memory taken, if one does)
  GPU_MEMORY_TRACE=$OUT/gpu_memory_trace.log python -m pytest -q -rs -p no:logging -p tests.gpu_memory_trace \
    "${files[@]}" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
fi
if has bench; then
  bench bench_bf16.log
  batch1_fraction bench_bf16.log
fi
if has old; then
  if [ -d .old ]; then
    # shellcheck disable=SC2086
    (cd .old && PYTHONPATH=. python bench.py --dummy $BENCH_ARGS) 2>&1 | tee "$OUT/bench_old.log"
  else
    echo "stage old: no .old/ here (copy the tree to compare against to .old/)"
  fi
fi
if has fp8; then
  bench bench_fp8.log --kv-cache-dtype fp8
fi
if has accuracy; then
  python benchmarks/fp8_accuracy.py 2>&1 | grep -v "Writing model" | tee "$OUT/fp8_accuracy.log"
fi
if has kernels; then
  python benchmarks/attention_kernels.py 2>&1 | tee "$OUT/attention_kernels.log" | tail -20
  python benchmarks/decode_sweep.py 2>&1 | tee "$OUT/decode_sweep.log"
fi
if has serve; then
  # the device image lacks the server's packages: their wheels travel in .srvwhl/ (serve_prefill_rows.sh says how)
  python -c "import fastapi, uvicorn" 2>/dev/null || pip install -q --no-index --find-links .srvwhl fastapi uvicorn
  dir=/tmp/qwen3-0.6b-tok
  python benchmarks/byte_tokenizer.py nanovllm/configs/qwen3-0.6b $dir
  python bench.py --dummy --model $dir --skip-batch1 --repeat 2 2>&1 | tee "$OUT/serve_offline.log"
  # SERVE_SWITCH_INTERVALS: the server's sys.setswitchinterval, one server each (a comparison of GIL hand-offs)
  for interval in ${SERVE_SWITCH_INTERVALS:-none}; do
    set_interval=$([ "$interval" = none ] || echo "sys.setswitchinterval($interval); ")
    python -c "import sys; ${set_interval}from nanovllm.serve import main; sys.exit(main(sys.argv[1:]))" \
      $dir --load-format dummy --max-model-len 4096 --disable-uvicorn-access-log --uvicorn-log-level warning \
      > "$OUT/serve_server.log" 2>&1 &
    server=$!
    python benchmarks/wait_for_server.py $server \
      || { tail -20 "$OUT/serve_server.log"; kill $server 2>/dev/null; continue; }
    runs=("" "--stream" "--stream")
    for rate in ${SERVE_RATES-8 32 128}; do runs+=("--stream --request-rate $rate"); done
    for run in "${runs[@]}"; do
      echo "== switch interval $interval: serve_bench.py $run" | tee -a "$OUT/serve_bench.log"
      # shellcheck disable=SC2086
      timeout 120 python benchmarks/serve_bench.py $run 2>&1 | tee -a "$OUT/serve_bench.log"
    done
    kill -TERM $server; wait $server; echo "server exit code $?"
  done
fi
if has timeline; then
  for cfg in qwen3-0.6b smollm2-135m; do
    python benchmarks/lab/step_timeline.py --model-config $cfg 2>&1 | tee -a "$OUT/timeline.log"
  done
fi
if has startup; then
  python benchmarks/lab/startup_profile.py 2>&1 | tee "$OUT/startup.log" | tail -8
fi
if has tp; then
  timeout 600 python -m pytest -q -rs -p no:logging tests/test_tensor_parallel.py -k cuda 2>&1 \
    | tee "$OUT/pytest_tp.log" | tail -8
  # shellcheck disable=SC2086
  python bench.py --dummy --tensor-parallel-size 2 $BENCH_ARGS 2>&1 | tee "$OUT/bench_tp2.log"
fi
