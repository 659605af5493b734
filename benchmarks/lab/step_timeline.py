"""Where a decode step's time goes at small batches: wall time per step against the GPU's kernel time per step, and
the kernels of one step (count, mean and total time), from torch.profiler (CUPTI sees kernels inside CUDA graphs).

    PYTHONPATH=. python benchmarks/lab/step_timeline.py [--model-config qwen3-0.6b] [--batch 1] [--eager]
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import MODEL_CONFIGS
from nanovllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
