"""Where a batch-1 decode step's time goes on its critical path: each kernel's marginal cost (its end minus the
previous kernel's end), which under programmatic dependent launch is what the kernel adds to the step, unlike its
duration (its prologue overlaps the kernel before it). From torch.profiler's trace of CUDA-graph replays.

    PYTHONPATH=. python benchmarks/lab/critical_path.py [--model-config qwen3-0.6b] [--batch 1] [--tokens 128]
        [--prefetch-gemv "n8 w4"] [--kv-cache-dtype fp8]

The kernels outside the layers' pattern are listed with their full names (truncated), to tell torch's own apart.
"""
import argparse
import json
import os
import statistics
import tempfile
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench import MODEL_CONFIGS
from nanovllm import LLM, SamplingParams


def kernel_events(prof) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    kernels = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
               if e.get("cat") == "kernel" and e.get("ph") == "X"]

    return sorted(kernels, key=lambda k: k[1])


def split_steps(kernels, gap_us: float):
    steps, current = [], [kernels[0]]
    for prev, k in zip(kernels, kernels[1:]):
        if k[1] - prev[2] > gap_us:
            steps.append(current)
            current = []
        current.append(k)
    steps.append(current)
    return steps


def short(name: str) -> str:
    for key in ("gemv", "qk_norm_rotary", "decode_split", "decode_merge", "rms_norm", "silu", "embedding", "gemm",
                "nvjet", "sm90", "cutlass", "argmax", "sampl", "gumbel", "exponential", "copy", "fill"):
        if key in name.lower():
            return key + ("" if key in name else "*")
    return name[:40]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--gap-us", type=float, default=8.0, help="a pause longer than this starts a new step")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--prefetch-gemv", help='"nB wW": route the batch-1 GEMVs to benchmarks/lab/prefetch_gemv.py')
    args = p.parse_args()
    if args.prefetch_gemv:
        from benchmarks.lab.prefetch_gemv import install
        install(*(int(part[1:]) for part in args.prefetch_gemv.split()))
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096,
              kv_cache_dtype=args.kv_cache_dtype)
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(16)] for i in range(args.batch)]
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.tokens)
    llm.generate(prompts, sp, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
        torch.cuda.synchronize()
    steps = split_steps(kernel_events(prof), args.gap_us)
    length = Counter(len(s) for s in steps if len(s) > 20).most_common(1)[0][0]   # decode steps, not stray copies
    steps = [s for s in steps if len(s) == length]
    marginal, duration = defaultdict(list), defaultdict(list)
    spans = []
    for s in steps:
        spans.append(s[-1][2] - s[0][1])
        for i, (name, start, end) in enumerate(s):
            marginal[i].append(end - (s[i - 1][2] if i else start))
            duration[i].append(end - start)
    names = [short(n) for n, _, _ in steps[0]]
    med = {i: statistics.median(v) for i, v in marginal.items()}
    dur = {i: statistics.median(v) for i, v in duration.items()}
    print(f"{args.model_config} batch {args.batch}: {len(steps)} decode steps of {length} kernels, "
          f"step span median {statistics.median(spans):.1f} us (first kernel's start to last kernel's end)")
    # The layers repeat one pattern; find its period from the kernel names.
    first_gemv = names.index(next(n for n in names if n.startswith("gemv") or n in ("rms_norm",)))
    period = next(p for p in range(2, 16) if names[first_gemv:first_gemv + p] == names[first_gemv + p:first_gemv + 2 * p])
    layers = (len(names) - first_gemv) // period
    print(f"layer pattern: {period} kernels from index {first_gemv}, ~{layers} layers")
    print(f"{'pos':>3} {'kernel':<18} {'marginal us (mean over layers)':>32} {'duration us':>12}")
    total_layer = 0.0
    for j in range(period):
        idx = [first_gemv + j + period * l for l in range(1, layers - 1)]   # skip the first and last layer
        m = statistics.mean(med[i] for i in idx)
        d = statistics.mean(dur[i] for i in idx)
        total_layer += m
        print(f"{j:3d} {names[first_gemv + j]:<18} {m:32.2f} {d:12.2f}")
    print(f"    a layer: {total_layer:.2f} us")
    print("outside the layer pattern (index, kernel, marginal, duration):")
    for i in list(range(first_gemv)) + list(range(first_gemv + period * layers, length)):
        print(f"  {i:3d} {names[i]:<18} {med[i]:8.2f} {dur[i]:8.2f}  {steps[0][i][0][:100]}")
    llm.exit()


if __name__ == "__main__":
    main()
