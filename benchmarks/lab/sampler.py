"""Time the sampler on the GPU at bench.py's batch and Qwen3's vocabulary: the fast path, and what each
control adds. Run `python benchmarks/lab/sampler.py [batch]`; compare the fast path's time with a bench.py decode
step. The sampler runs once per step; on one GPU its temperature-only path runs inside the decode CUDA graph (so
there it costs GPU time, not launches), and rows that need the other controls are sampled from the graph's logits.
"""
import sys

import torch

from nanovllm.layers.sampler import Sampler, SamplingTensors, seed_key


def time_ms(fn, iters: int = 50) -> float:
    for _ in range(5):      # warm-up, torch.compile included
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(batch: int = 256, vocab: int = 151936):
    torch.manual_seed(0)
    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16) * 4
    temperatures = torch.full((batch,), 0.6, device="cuda")
    rows = torch.arange(batch, device="cuda")
    keys = torch.tensor([seed_key(i, 0) for i in range(batch)], device="cuda")
    cases = {
        "fast path (temperature only)": None,
        "logprobs=0 (no filter)": SamplingTensors(num_logprobs=0),
        "min_p=0.05": SamplingTensors(min_ps=torch.full((batch,), 0.05, device="cuda")),
        "top_k=50, top_p=0.9 (the sort)": SamplingTensors(top_ks=torch.full_like(rows, 50),
                                                          top_ps=torch.full((batch,), 0.9, device="cuda")),
        "seed on every row": SamplingTensors(seed_rows=rows, seed_keys=keys),
        "logprobs=5": SamplingTensors(num_logprobs=5),
        "min_tokens mask (1 id per row)": SamplingTensors(banned_rows=rows, banned_ids=torch.zeros_like(rows)),
    }
    sampler = Sampler()
    print(f"batch {batch}, vocab {vocab}, bf16 logits, {torch.cuda.get_device_name()}")
    with torch.inference_mode():
        for name, extras in cases.items():
            ms = time_ms(lambda: sampler(logits, temperatures, extras))
            print(f"{name:34s} {ms * 1000:8.0f} us")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
