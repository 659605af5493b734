#!/usr/bin/env bash
# The whole GPU check in one call (device time is scarce).
# Stages: tests | kernels | bench | nooverlap | startup | coldstart | tokenizer | gemv | batch1 | sweep | old | fp8 | eager | all
# coldstart makes the anchor's checkpoint (.anchor carried) and times start-up loading it, first on this machine.
#   bash benchmarks/gpu_check.sh tests kernels bench
# "old" runs bench.py of another tree copied to .old/ (git-ignored, carried), in the same call, for before/after.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stages=" ${*:-all} "
has() { [[ $stages == *" $1 "* || $stages == *" all "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if has coldstart && [ -f .anchor/make_ckpt.py ]; then     # first: the machine's caches are cold
  MODEL=$HOME/huggingface/Qwen3-0.6B
  python .anchor/make_ckpt.py "$MODEL" nanovllm/configs/qwen3-0.6b/config.json > "$OUT/make_ckpt.log" 2>&1
  for i in 1 2; do python benchmarks/startup_profile.py --model "$MODEL" 2>&1 | tee -a "$OUT/coldstart.log" | tail -1; done
fi
if has tokenizer && [ -f .anchor/make_ckpt.py ]; then   # why does loading the checkpoint's tokenizer take seconds?
  MODEL=$HOME/huggingface/Qwen3-0.6B
  [ -f "$MODEL/config.json" ] || python .anchor/make_ckpt.py "$MODEL" nanovllm/configs/qwen3-0.6b/config.json > /dev/null 2>&1
  python -X importtime -c "from transformers import AutoTokenizer" 2> "$OUT/importtime.log"
  sort -t'|' -k2 -n -r "$OUT/importtime.log" | head -30
  for offline in 1; do
    HF_HUB_OFFLINE=$offline python -c "
import cProfile, pstats, sys, time
t = time.perf_counter(); from transformers import AutoTokenizer; print('import transformers', round(time.perf_counter() - t, 2))
p = cProfile.Profile(); t = time.perf_counter(); p.enable(); AutoTokenizer.from_pretrained(sys.argv[1]); p.disable()
print('HF_HUB_OFFLINE=$offline from_pretrained', round(time.perf_counter() - t, 2), 's')
pstats.Stats(p).sort_stats('cumtime').print_stats(18)" "$MODEL" 2>&1 | tee -a "$OUT/tokenizer.log" | head -40
  done
fi
if has gemv; then
  python benchmarks/gemv_sweep.py 2>&1 | tee "$OUT/gemv.log"
fi
if has tests; then
  python -m pytest -q -rs -p no:logging tests/test_triton_kernels.py tests/test_cuda.py tests/test_engine_edges.py \
    tests/test_overlap.py tests/test_gemv.py tests/test_sampling.py \
    $(ls tests/test_fused_layers.py tests/test_fp8_kv_cache.py 2>/dev/null) -m "" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -12
  python -m pytest -q -rs -p no:logging tests -m cuda 2>&1 | tee "$OUT/pytest_cuda_marked.log" | tail -6
fi
if has kernels; then
  python benchmarks/attention_kernels.py --no-sweep 2>&1 | tee "$OUT/kernels.log" | tail -25
  python benchmarks/sampler.py 256 2>&1 | tee "$OUT/sampler.log" | tail -12
  python benchmarks/layer_kernels.py 2>&1 | tee "$OUT/layer_kernels.log" | tail -45
fi
if has bench; then
  python bench.py --dummy --attention-backend triton --repeat 2 2>&1 | tee "$OUT/bench_triton.log"
fi
if has nooverlap; then
  python bench.py --dummy --attention-backend triton --repeat 2 --no-overlap 2>&1 | tee "$OUT/bench_nooverlap.log"
fi
if has startup; then
  python benchmarks/startup_profile.py 2>&1 | tee "$OUT/startup.log" | tail -3
fi
if has batch1; then
  python benchmarks/overlap_profile.py --batches 1 --steps 200 --kernels --cprofile 1 2>&1 | tee "$OUT/batch1.log" \
    | head -120
fi
if has sweep; then
  python benchmarks/decode_sweep.py 2>&1 | tee "$OUT/decode_sweep.log"
fi
if has old && [ -d .old ]; then
  (cd .old && PYTHONPATH=. python bench.py --dummy --attention-backend triton --repeat 2) 2>&1 | tee "$OUT/bench_old.log"
fi
if has fp8; then
  python bench.py --dummy --attention-backend triton --repeat 2 --kv-cache-dtype fp8 2>&1 | tee "$OUT/bench_fp8.log"
  python benchmarks/fp8_accuracy.py 2>&1 | tee "$OUT/fp8_accuracy.log" | tail -30
fi
if has eager; then
  python bench.py --dummy --attention-backend triton --enforce-eager --skip-batch1 2>&1 | tee "$OUT/bench_triton_eager.log"
fi
