#!/usr/bin/env bash
# bench.py's workload cut to fewer requests (the tail of a batch), upstream nano-vllm and this project on one GPU,
# same checkpoint and kernels (the anchor's shim). Needs ../shared/anchor copied to .anchor/ and carried.
#   bash benchmarks/num_seqs_check.sh 64 16
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
P=$PWD; A=$P/.anchor; export NANOVLLM_CLONE_DIR=$P
MODEL=$HOME/huggingface/Qwen3-0.6B
[ -f "$MODEL/config.json" ] || python3 "$A/make_ckpt.py" "$MODEL" "$P/nanovllm/configs/qwen3-0.6b/config.json" | tail -1
for n in "$@"; do
  # Upstream's bench.py with only its request count changed (num_seqs = 256 -> n): same seed, same draws.
  sed "s/num_seqs = 256/num_seqs = $n/" "$A/nano-vllm/bench.py" > /tmp/upstream_bench_$n.py
  echo "== $n requests: upstream nano-vllm"
  (cd "$A/nano-vllm" && PYTHONPATH="$A/shim:$A/nano-vllm" timeout 200 python3 /tmp/upstream_bench_$n.py 2>&1 | grep -E "^Total")
  echo "== $n requests: this project"
  PYTHONPATH=$P timeout 200 python3 bench.py --model "$MODEL" --attention-backend triton --num-seqs $n --repeat 2 \
    --skip-batch1 2>&1 | grep -E "^(Startup|Total)"
done
