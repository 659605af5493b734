"""The sampler's Triton pass (kernels/sampling.py) over chunk sizes, at Qwen3's vocabulary: microseconds a call
in a CUDA graph, both kernels and the seed draw (a lab measurement, issue #24: ~9.5 us of a batch-1 step).

    PYTHONPATH=. python benchmarks/lab/sampler_chunks.py
"""
import torch
from triton.testing import do_bench_cudagraph

from nanovllm.kernels import sampling


def main():
    vocab = 151936
    for rows in (1, 16, 256):
        logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
        temperatures = torch.full((rows,), 0.6, device="cuda", dtype=torch.float64)
        out = torch.empty(rows, dtype=torch.int64, device="cuda")
        cells = []
        for chunk in (8192, 4096, 2048):
            sampling.SAMPLE_CHUNK, sampling.SAMPLE_BLOCK = chunk, min(2048, chunk)
            us = do_bench_cudagraph(lambda: sampling.gumbel_sample(logits, temperatures, out), rep=50) * 1e3
            cells.append(f"chunk {chunk}: {us:6.2f}")
        print(f"{rows:3d} rows  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
