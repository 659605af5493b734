"""Where start-up goes: the engine is built as bench.py builds it, with each start-up phase of the ModelRunner
timed (the GPU synchronised at its end), so the slow part is measured rather than guessed.

    python benchmarks/startup_profile.py [--kv-cache-dtype fp8]
"""
import argparse
import functools
import time

import torch

import nanovllm.engine.model_runner as model_runner
from nanovllm import LLM
from nanovllm.configs import QWEN3_0_6B
from nanovllm.engine.cuda_graph import CUDAGraphs

PHASES = [(model_runner, "load_model"), (model_runner.ModelRunner, "warmup_model"),
          (model_runner.ModelRunner, "allocate_kv_cache"), (model_runner.ModelRunner, "warmup_kernels"),
          (CUDAGraphs, "capture")]


def timed(owner, name, times):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kv-cache-dtype", default="auto")
    args = p.parse_args()
    times: dict[str, float] = {}
    for owner, name in PHASES:
        timed(owner, name, times)
    t = time.perf_counter()
    llm = LLM(QWEN3_0_6B, load_format="dummy", max_model_len=4096, attention_backend="triton",
              kv_cache_dtype=args.kv_cache_dtype)
    total = time.perf_counter() - t
    accounted = sum(times.values())
    print(f"start-up {total:.2f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
          + f", other {total - accounted:.2f} s; {len(llm.executor.runner.graphs.graphs)} graphs")
    llm.exit()


if __name__ == "__main__":
    main()
