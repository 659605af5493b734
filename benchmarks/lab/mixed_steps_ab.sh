#!/usr/bin/env bash
# Mixed steps (each step decodes every running request, then admits prompts with the token budget left) against
# the tree before them, copied to .old/ (git archive <commit> | tar -x -C .old), in one device call:
#   bash benchmarks/lab/mixed_steps_ab.sh [RATES...]      (request rates, default 16 64)
# First the server under Poisson arrivals (serve_bench.py --stream), one server per tree, each rate in turn; then
# bench.py's offline run, the trees alternating twice. Carry .old and .srvwhl (the server's wheels: see
# serve_prefill_rows.sh).
set -u
cd "$(dirname "$0")/../.."
root=$PWD
python -c "import fastapi, uvicorn" 2>/dev/null || pip install -q --no-index --find-links .srvwhl fastapi uvicorn
dir=/tmp/qwen3-0.6b-tok
PYTHONPATH=. python benchmarks/byte_tokenizer.py nanovllm/configs/qwen3-0.6b $dir > /dev/null
for tree in .old .; do
  (cd $tree && PYTHONPATH=. exec python -m nanovllm.serve $dir --load-format dummy --max-model-len 4096 \
     --disable-uvicorn-access-log --uvicorn-log-level warning) > /tmp/serve_$$.log 2>&1 &
  server=$!
  PYTHONPATH=. python benchmarks/wait_for_server.py $server \
    || { echo "server of $tree did not start:"; tail -20 /tmp/serve_$$.log; kill $server 2>/dev/null; continue; }
  for rate in ${*:-16 64}; do
    echo "== tree $tree, serve_bench.py --stream --request-rate $rate"
    PYTHONPATH=. timeout 150 python benchmarks/serve_bench.py --stream --request-rate "$rate" 2>&1 | tail -6
  done
  kill -TERM $server; wait $server
done
for round in 1 2; do
  for tree in .old .; do
    echo "== tree $tree, bench.py --dummy --repeat 2 --skip-batch1 (round $round)"
    (cd $tree && PYTHONPATH=. python bench.py --dummy --repeat 2 --skip-batch1 2>&1 | grep -E "Throughput|Startup|TPOT")
  done
done
