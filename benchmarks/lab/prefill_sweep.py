"""Prefill attention over a bf16 and an fp8 cache at bench.py-like steps: Qwen3-0.6B shapes, 256-token pages,
fresh prompts of 100..1024 tokens filling 16,384 batched tokens, over launch parameters.

    python benchmarks/lab/prefill_sweep.py [--configs 64,64,4,3 128,64,8,3]     (block_m,block_n,warps,stages)

TFLOP/s counts causal work only (4 * head_dim * heads * attended keys, summed over query rows). Each variant's
output is compared with the first one's (max abs difference), so a fast wrong variant shows.
"""
import argparse
import random

import torch
from triton.testing import do_bench

from nanovllm.kernels import paged_attention_triton as tk

HEADS, KV_HEADS, HEAD_DIM, BLOCK, TOKENS = 16, 8, 128, 256, 16384


def inputs(kv_dtype: torch.dtype):
    rng = random.Random(0)
    lens = []
    while sum(lens) < TOKENS:
        lens.append(min(rng.randint(100, 1024), TOKENS - sum(lens)))
    pages = [-(-n // BLOCK) for n in lens]
    width = max(pages)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    order = torch.randperm(sum(pages)).int()
    used = 0
    for i, n in enumerate(pages):
        tables[i, :n] = order[used:used + n]
        used += n
    k = torch.randn(sum(pages), BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
    v = torch.randn_like(k, dtype=torch.bfloat16).to(kv_dtype)
    q = torch.randn(TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).int()
    flops = sum(4 * HEAD_DIM * HEADS * n * (n + 1) // 2 for n in lens)
    return q, k, v, cu, torch.tensor(lens, device="cuda").int(), tables.cuda(), max(lens), flops


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["64,64,4,3", "64,64,4,2", "64,64,4,4", "128,64,8,3",
                                                    "64,32,4,3", "128,128,8,2"])
    args = p.parse_args()
    scale = torch.ones(1, device="cuda")
    names = ("PREFILL_BLOCK_M", "PREFILL_BLOCK_N", "PREFILL_WARPS", "PREFILL_STAGES")
    default = [getattr(tk, n) for n in names]
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        q, k, v, cu, lens, tables, max_len, flops = inputs(kv_dtype)
        scales = dict(k_scale=scale, v_scale=scale) if kv_dtype == torch.float8_e4m3fn else {}
        reference = None
        for config in args.configs:
            for name, value in zip(names, map(int, config.split(","))):
                setattr(tk, name, value)
            run = lambda: tk.paged_prefill_attention(q, k, v, cu, lens, tables, HEAD_DIM ** -0.5,  # noqa: E731
                                                     max_seqlen_q=max_len, **scales)
            try:
                out = run()
                reference = out if reference is None else reference
                ms = do_bench(run, warmup=10, rep=50)
            except Exception as e:      # a configuration may not fit (shared memory): say so, go on
                print(f"{str(kv_dtype).split('.')[1]:14} prefill {config}: {type(e).__name__}")
                continue
            err = (out.float() - reference.float()).abs().max().item()
            print(f"{str(kv_dtype).split('.')[1]:14} prefill {TOKENS} tokens {config:12}: {ms * 1e3:8.1f} us"
                  f"  {flops / ms / 1e9:6.1f} TFLOP/s  diff {err:.1e}")
    for name, value in zip(names, default):
        setattr(tk, name, value)


if __name__ == "__main__":
    main()
