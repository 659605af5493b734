"""Where a decode step's time goes at small batches: wall time per step against the GPU's kernel time per step, and
the kernels of one step (count, mean and total time), from torch.profiler (CUPTI sees kernels inside CUDA graphs).

    PYTHONPATH=. python benchmarks/lab/step_timeline.py [--model-config qwen3-0.6b] [--batch 1] [--eager]
    PYTHONPATH=. python benchmarks/lab/step_timeline.py --bench [--kv-cache-dtype fp8]

--bench profiles bench.py's whole workload instead (its second run): kernel time grouped by kind, and the time the
GPU ran no kernel at all (host gaps, copies), against the run's wall time.
"""
import argparse
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import MODEL_CONFIGS, make_workload
from nanovllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--bench", action="store_true", help="bench.py's workload, kernels grouped by kind")
    p.add_argument("--kv-cache-dtype", default="auto")
    args = p.parse_args()
    if args.bench:
        return profile_bench(args)
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096, enforce_eager=args.eager)
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(16)] for i in range(args.batch)]
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.tokens)
    llm.generate(prompts, sp, use_tqdm=False)      # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
    steps = args.tokens     # one prefill step, then tokens - 1 decode steps; per-step figures divide by tokens
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels)    # us
    count = sum(e.count for e in kernels)
    print(f"{args.model_config} batch {args.batch} {'eager' if args.eager else 'graphs'}: "
          f"{args.batch * args.tokens / wall:.0f} tok/s, {wall / steps * 1e6:.1f} us per step (unprofiled); "
          f"GPU kernel time {busy / steps:.1f} us per step, {count / steps:.1f} kernels per step")
    print(f"{'kernel':<90} {'per step':>8} {'mean us':>8} {'us/step':>8}")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:args.rows]:
        print(f"{e.key[:90]:<90} {e.count / steps:8.2f} {e.device_time_total / e.count:8.2f} "
              f"{e.device_time_total / steps:8.2f}")
    llm.exit()


KINDS = (   # first match wins; kernel names of cuBLAS, torch and this project's Triton kernels
    ("decode attention", r"decode|split|merge"), ("prefill attention", r"prefill|flash|attention|sdpa"),
    ("GEMV", r"gemv"), ("GEMM (cuBLAS)", r"gemm|cutlass|sm90_xmma|nvjet"), ("sampler", r"gumbel|sampl|argmax"),
    ("rotary / K,V store", r"rotary|store|rope"), ("norm", r"norm"), ("SiLU and mul", r"silu"),
    ("copies and fills", r"copy|fill|memcpy|memset|cat|index"), ("other", r""))


def profile_bench(args):
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096,
              kv_cache_dtype=args.kv_cache_dtype)
    prompts, params = make_workload()
    tokens = sum(sp.max_tokens for sp in params)
    llm.generate(prompts, params, use_tqdm=False)      # warm-up: the first run pays first launches
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind = dict.fromkeys((k for k, _ in KINDS), 0.0)
    for e in events:
        name = e.name.lower()
        by_kind[next(k for k, pattern in KINDS if re.search(pattern, name))] += e.time_range.elapsed_us() / 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)     # us; kernels overlap under PDL
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    busy /= 1e6
    print(f"bench.py workload, {args.model_config}, kv cache {args.kv_cache_dtype}, profiled: {wall:.2f} s wall, "
          f"{tokens / wall:,.0f} tok/s; GPU running a kernel {busy:.2f} s ({busy / wall:.0%}), {len(events)} kernels")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<22} {seconds:7.3f} s  {seconds / wall:5.1%} of the wall time")
    names = {}
    for e in events:
        names[e.name] = names.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
    for name, seconds in sorted(names.items(), key=lambda kv: -kv[1])[:args.rows]:
        print(f"    {seconds:7.3f} s  {name[:110]}")
    llm.exit()


if __name__ == "__main__":
    main()
