"""Where bench.py's run leaves the GPU idle, without a profiler (which stretches the run 2.5x): a CUDA event is
recorded on the stream just before and just after each step's launch (`Executor.run`), so the GPU reaches the
"before" event only once the previous step is done *and* the host has got round to the next one. The time from a
step's "after" to the next step's "before" is GPU time with nothing queued: idle, waiting for the host.

    PYTHONPATH=. python benchmarks/lab/gpu_idle.py [--kv-cache-dtype fp8] [--no-overlap] [--batch1]
        [--model-config smollm2-135m]

--batch1 runs bench.py's `Batch-1 decode:` workload (1,024 tokens after a 16-token prompt) instead of its batch.

Prints the run's wall time, the GPU time inside steps and the idle time between them, by step kind and decode
batch size, and the host's time per step (from one launch to the next) for the same groups.
"""
import argparse
import time
from collections import defaultdict

import torch

from bench import MODEL_CONFIGS, make_workload, small_batch_workload
from nanovllm import LLM


def bucket(is_prefill: bool, num_seqs: int) -> str:
    if is_prefill:
        return "prefill"
    for top in (1, 4, 16, 64, 128, 192):
        if num_seqs <= top:
            return f"decode <= {top}"
    return "decode > 192"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--batch1", action="store_true", help="bench.py's batch-1 workload instead of its 256 requests")
    args = p.parse_args()
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096,
              kv_cache_dtype=args.kv_cache_dtype, overlap_scheduling=not args.no_overlap)
    if args.batch1:
        prompts, params = small_batch_workload()
        params = [params]
    else:
        prompts, params = make_workload()
    tokens = sum(sp.max_tokens for sp in params)
    llm.generate(prompts, params, use_tqdm=False)      # the first run pays first launches
    steps = []
    run = llm.executor.run

    def timed_run(batch):
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        before.record()
        out = run(batch)
        after.record()
        steps.append((bucket(batch.is_prefill, batch.num_seqs), before, after, host))
        return out

    llm.executor.run = timed_run
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    busy, idle, host = (defaultdict(float) for _ in range(3))
    count = defaultdict(int)
    for i, (kind, before, after, launched) in enumerate(steps):
        busy[kind] += before.elapsed_time(after) / 1e3
        count[kind] += 1
        if i:
            idle[kind] += steps[i - 1][2].elapsed_time(before) / 1e3
            host[kind] += launched - steps[i - 1][3]
    first_gap = steps[0][3] - t
    print(f"{args.model_config}, kv {args.kv_cache_dtype}, overlap {not args.no_overlap}: {wall:.3f} s wall, "
          f"{tokens / wall:,.0f} tok/s, {len(steps)} steps; GPU in steps {sum(busy.values()):.3f} s, idle between "
          f"steps {sum(idle.values()):.3f} s; host before the first launch {first_gap * 1e3:.1f} ms")
    print(f"{'steps':<14} {'count':>6} {'GPU s':>8} {'idle s':>8} {'GPU ms/step':>12} {'idle ms/step':>13} "
          f"{'host ms/step':>13}")
    for kind in sorted(count, key=lambda k: -busy[k]):
        n = count[kind]
        print(f"{kind:<14} {n:6d} {busy[kind]:8.3f} {idle[kind]:8.3f} {busy[kind] / n * 1e3:12.3f} "
              f"{idle[kind] / n * 1e3:13.3f} {host[kind] / n * 1e3:13.3f}")
    llm.exit()


if __name__ == "__main__":
    main()
