#!/usr/bin/env bash
# The decode kernel with the keys on its dots' rows (DecodeLaunch.keys_major) and, for an fp8 cache, the query and
# the softmax weights in fp8 (query_fp8, weights_fp8), against the shipped launches, in one device call
# (benchmarks/lab/fp8_query.py says why):
#   bash benchmarks/lab/keys_major_ab.sh [CANDIDATE ...]     (decode_sweep.py configurations for bench.py's fp8 runs;
#                                                           default 128,8,2,v,q8,km 128,8,2,q8,km,p8)
# First the decode kernel tests compiled on the GPU, then decode_sweep.py over both caches, then bench.py with the
# fp8 cache, shipped and each candidate in turn, twice.
set -u
cd "$(dirname "$0")/../.."
candidates=${*:-128,8,2,v,q8,km 128,8,2,q8,km,p8}
echo "== kernel tests"
PYTHONPATH=. timeout 300 python -m pytest -q tests/test_triton_kernels.py -k "decode" 2>&1 | tail -3
echo "== fp8 decode"
PYTHONPATH=. timeout 240 python benchmarks/decode_sweep.py --kv fp8 --batches 256 128 64 16 --configs 128,4,2,v,r168 \
  128,4,2,v,r168,q8 128,4,2,v,q8,km 64,4,2,v,q8,km 128,8,2,v,q8,km 64,4,3,v,q8,km 128,4,2,q8,km,p8 \
  128,8,2,q8,km,p8 64,4,2,q8,km,p8 64,4,3,q8,km,p8 2>&1 | grep -v -i warn
echo "== bf16 decode"
PYTHONPATH=. timeout 120 python benchmarks/decode_sweep.py --kv bf16 --batches 256 128 64 16 \
  --configs 128,4,2 128,4,2,km 64,4,2,km 128,8,2,km 2>&1 | grep -v -i warn
for round in 1 2; do
  echo "== bench.py --kv-cache-dtype fp8, shipped (round $round)"
  python bench.py --dummy --repeat 2 --skip-batch1 --kv-cache-dtype fp8 2>&1 | grep -E "Throughput"
  for candidate in $candidates; do
    echo "== the same, fp8 decode launched as $candidate (round $round)"
    PYTHONPATH=. python benchmarks/lab/fp8_query.py bench --config "$candidate" -- --dummy --repeat 2 \
      --skip-batch1 --kv-cache-dtype fp8 2>&1 | grep -E "Throughput"
  done
done
