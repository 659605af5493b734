"""bench.py with the decode kernel launched another way, to try a launch end to end before making it the default:

    python benchmarks/bench_with_launch.py fp8 128,4,3,v -- --dummy --kv-cache-dtype fp8

The launch (decode_sweep.py's tile,warps,stages[,widen]) replaces DECODE_LAUNCH for that cache's element size.
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.decode_sweep import parse_config  # noqa: E402
from nanovllm.kernels import paged_attention_triton as tk  # noqa: E402

if __name__ == "__main__":
    dash = sys.argv.index("--")
    kv, config = sys.argv[1:dash]
    bench_args = sys.argv[dash + 1:]
    assert kv in ("bf16", "fp8"), __doc__
    tk.DECODE_LAUNCH[1 if kv == "fp8" else 2] = parse_config(config)
    print("decode launch:", parse_config(config))
    sys.argv = ["bench.py", *bench_args]
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py"),
                   run_name="__main__")
