"""Does the host hide behind the GPU? Decode steps at fixed batch sizes, overlap scheduling on and off: wall time
per step, GPU busy time per step (the union of kernel intervals, from torch.profiler), and host time per step
(wall less the time the host sat waiting for sampled ids). With overlap, busy ~= wall means the host work of
step N+1 ran inside step N's GPU time.

    python benchmarks/overlap_profile.py [--batches 1 16 64 256] [--steps 40] [--workload] [--cprofile B]

--workload also profiles bench.py's whole workload (its second run): GPU busy share and the top kernels.
--cprofile B: the host's Python functions over 200 decode steps at batch B (cProfile), to see what the host does.
--kernels: per batch (overlap on), the GPU kernels of a step: count and microseconds per step, largest first.
"""
import cProfile
import pstats
import argparse
import time
from random import randint, seed

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.configs import QWEN3_0_6B
from nanovllm.engine.model_runner import SampledTokens


def busy_time_us(prof) -> float:
    """The union of the GPU kernel and copy intervals, in microseconds."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy, end = busy + e - s, e
        elif e > end:
            busy, end = busy + e - end, e
    return busy


def host_profile(llm: LLM, batch: int, steps: int = 200):
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps + 50)
    for _ in range(batch):
        llm.add_request([randint(0, 10000) for _ in range(512)], sp)
    for _ in range(20):
        llm.step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        llm.step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(28)
    for seq in list(llm.scheduler.running):
        llm.scheduler.abort(seq)
    llm._book(0)


def kernel_totals(prof) -> list[tuple[str, float, int]]:
    """(kernel name, total us, count) over a profile, largest total first."""
    totals: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(e.name[:60], [0.0, 0])
            entry[0] += e.time_range.end - e.time_range.start
            entry[1] += 1
    return sorted(((name, us, n) for name, (us, n) in totals.items()), key=lambda t: -t[1])


def measure(llm: LLM, batch: int, steps: int, overlap: bool, kernels: bool = False) -> tuple[float, float, float]:
    llm._steps_ahead = 1 if overlap else 0
    seed(batch)
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=3 * steps + 8)
    for _ in range(batch):
        llm.add_request([randint(0, 10000) for _ in range(512)], sp)
    while llm.scheduler.waiting:
        llm.step()
    for _ in range(steps):      # warm: the graph for this batch and the pinned buffers
        llm.step()
    waited = [0.0]
    real_result = SampledTokens.result

    def timed_result(self):
        t = time.perf_counter()
        try:
            return real_result(self)
        finally:
            waited[0] += time.perf_counter() - t
    SampledTokens.result = timed_result
    try:    # timed without the profiler, whose own host work would slow the host down
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    finally:
        SampledTokens.result = real_result
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    for seq in list(llm.scheduler.running):
        llm.scheduler.abort(seq)
    llm._book(0)
    if kernels:
        rows = kernel_totals(prof)
        print(f"  batch {batch}: {sum(n for _, _, n in rows) / steps:.0f} kernels and copies per step")
        for name, us, n in rows[:22]:
            print(f"  {us / steps:8.1f} us/step  x{n / steps:5.1f}  {name}")
    return wall / steps * 1e3, busy_time_us(prof) / steps / 1e3, (wall - waited[0]) / steps * 1e3


def profile_workload(llm: LLM):
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024)) for _ in range(256)]
    llm.generate(prompts, params, use_tqdm=False)      # the first run; the profiled one is bench.py's second
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    busy = busy_time_us(prof) / 1e6
    print(f"workload: wall {wall:.2f} s (under the profiler), GPU busy {busy:.2f} s ({100 * busy / wall:.1f}%)")
    for name, us, n in kernel_totals(prof)[:18]:
        print(f"  {us / 1e6:6.3f} s {100 * us / 1e6 / wall:5.1f}%  x{n:6d}  {name}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workload", action="store_true")
    p.add_argument("--cprofile", type=int, default=0)
    p.add_argument("--kernels", action="store_true")
    args = p.parse_args()
    llm = LLM(QWEN3_0_6B, load_format="dummy", max_model_len=4096, attention_backend="triton")
    print(f"{'batch':>5} {'overlap':>7} {'wall ms/step':>12} {'GPU busy ms':>11} {'busy %':>6} {'host ms':>8}")
    for batch in args.batches:
        for overlap in (False, True):
            wall, busy, host = measure(llm, batch, args.steps, overlap, args.kernels and overlap)
            print(f"{batch:5d} {'on' if overlap else 'off':>7} {wall:12.3f} {busy:11.3f} {100 * busy / wall:5.1f}% "
                  f"{host:8.3f}")
    if args.cprofile:
        host_profile(llm, args.cprofile)
    if args.workload:
        profile_workload(llm)
    llm.exit()


if __name__ == "__main__":
    main()
