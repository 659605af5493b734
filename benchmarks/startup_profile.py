"""Where start-up goes: the engine is built as bench.py builds it, with each start-up phase of the ModelRunner
timed (the GPU synchronised at its end), so the slow part is measured rather than guessed.

    python benchmarks/startup_profile.py [--kv-cache-dtype fp8] [--model DIR]

With --model the checkpoint's safetensors are read (load_model) and its tokenizer loaded; without, dummy weights.
The import of the package (torch, triton, transformers) is timed too: on a fresh machine it is part of start-up.
"""
import time

_t_import = time.perf_counter()
import argparse  # noqa: E402
import functools  # noqa: E402

import torch  # noqa: E402

import nanovllm.engine.llm_engine as llm_engine  # noqa: E402
import nanovllm.engine.model_runner as model_runner  # noqa: E402
from nanovllm import LLM  # noqa: E402
from nanovllm.configs import QWEN3_0_6B  # noqa: E402
from nanovllm.engine.cuda_graph import CUDAGraphs  # noqa: E402

IMPORT_S = time.perf_counter() - _t_import
PHASES = [(llm_engine, "load_tokenizer"), (model_runner, "load_model"), (model_runner.ModelRunner, "warmup_model"),
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
    p.add_argument("--model", help="a checkpoint directory (default: dummy weights in the shipped config)")
    args = p.parse_args()
    times: dict[str, float] = {}
    for owner, name in PHASES:
        timed(owner, name, times)
    t = time.perf_counter()
    llm = LLM(args.model or QWEN3_0_6B, load_format="auto" if args.model else "dummy", max_model_len=4096,
              attention_backend="triton", kv_cache_dtype=args.kv_cache_dtype)
    total = time.perf_counter() - t
    accounted = sum(times.values())
    print(f"imports {IMPORT_S:.2f} s; start-up {total:.2f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
          + f", other {total - accounted:.2f} s; {len(llm.executor.runner.graphs.graphs)} graphs")
    llm.exit()


if __name__ == "__main__":
    main()
