#!/usr/bin/env bash
# The server's latencies with short prefills as decode-graph rows (shipped) and eagerly
# (model_runner.PREFILL_ROWS_MAX_KEYS = 0), one server each, in one device call (~5 min):
#   bash benchmarks/lab/serve_prefill_rows.sh [RATES...]     (request rates, default 8 32)
# Under Poisson arrivals each new request's prefill is a step of its own that every running stream waits for, so
# the rows should shorten TTFT and, less, TPOT and the p99 inter-token gap.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
# The device image lacks the server's packages: carry their wheels in .srvwhl/ (pip download fastapi uvicorn
# --python-version 3.12 --only-binary=:all: -d .srvwhl) and they are installed from there.
python -c "import fastapi, uvicorn" 2>/dev/null || pip install -q --no-index --find-links .srvwhl fastapi uvicorn
dir=/tmp/qwen3-0.6b-tok
python benchmarks/byte_tokenizer.py nanovllm/configs/qwen3-0.6b $dir > /dev/null
for limit in shipped 0; do
  set_limit=$([ $limit = shipped ] || echo "import nanovllm.engine.model_runner as m; m.PREFILL_ROWS_MAX_KEYS = $limit; ")
  python -c "import sys; ${set_limit}from nanovllm.serve import main; sys.exit(main(sys.argv[1:]))" \
    $dir --load-format dummy --max-model-len 4096 --disable-uvicorn-access-log --uvicorn-log-level warning \
    > /tmp/serve_server_$limit.log 2>&1 &
  server=$!
  python benchmarks/wait_for_server.py $server \
    || { echo "server did not start:"; tail -20 /tmp/serve_server_$limit.log; kill $server 2>/dev/null; continue; }
  for rate in ${*:-8 32}; do
    echo "== PREFILL_ROWS_MAX_KEYS $limit, --stream --request-rate $rate"
    timeout 120 python benchmarks/serve_bench.py --stream --request-rate "$rate" 2>&1 | tail -6
  done
  kill -TERM $server; wait $server
done
