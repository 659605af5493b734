"""Decode and prefill attention over the same cache contents in two layouts: token-major pages
[blocks, block_size, kv_heads, head_dim] (shipped: a (page, KV head) pair's rows lie head_dim elements apart in
strides of kv_heads * head_dim) and head-major pages [blocks, kv_heads, block_size, head_dim] (each (page, KV head)
one contiguous run). The kernels take the cache's strides, so the head-major one is passed as a permuted view.

    PYTHONPATH=. python benchmarks/lab/cache_layout.py [--batches 1 8 32 64 128 256] [--configs 128,4,2,v,r168 ...]

Qwen3-0.6B heads, 256-token pages, contexts uniform in 100..2048, random page order; each launch timed in a CUDA
graph (the engine's decode launch, its longest-first order included), the two layouts alternating twice.
"""
import argparse
import os
import random
import sys

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from decode_sweep import describe, launched_as, parse_config  # noqa: E402

from nanovllm.kernels import paged_attention_triton as tk  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, WIDTH = 16, 8, 128, 256, 16


def _shapes_only(q, k_cache):       # the shipped check also asks for a contiguous (token-major) cache
    tk.check_block_size(k_cache.shape[1])


tk._check_shapes = _shapes_only


def caches(blocks: int, kv_dtype: torch.dtype):
    """The same contents twice: token-major, and head-major seen through a token-major view."""
    k = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
    v = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
    head_major = [x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for x in (k, v)]
    return {"token-major": (k, v), "head-major": tuple(head_major)}


def alternate(layouts, launch):
    """Each layout's launch(k, v) timed in a CUDA graph, the layouts alternating twice: (times in us a layout,
    the largest difference between the layouts' outputs)."""
    outs, times = {}, {name: [] for name in layouts}
    for _ in range(2):
        for name, (k, v) in layouts.items():
            outs[name] = launch(k, v)
            times[name].append(do_bench_cudagraph(lambda: launch(k, v), rep=100) * 1e3)  # noqa: B023
    return times, (outs["token-major"].float() - outs["head-major"].float()).abs().max().item()


def time_decode(batch: int, kv_dtype: torch.dtype, configs):
    rng = random.Random(batch)
    lens = torch.tensor([rng.randint(100, 2048) for _ in range(batch)], device="cuda")
    tables = torch.randperm(batch * WIDTH, device="cuda").view(batch, WIDTH)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    nbytes = int(lens.sum()) * KV_HEADS * HEAD_DIM * 2 * kv_dtype.itemsize
    scale = torch.ones(1, device="cuda")
    scales = dict(k_scale=scale, v_scale=scale) if kv_dtype == torch.float8_e4m3fn else {}
    order = tk.decode_order(lens)
    layouts = caches(batch * WIDTH, kv_dtype)
    for config in configs:
        with launched_as(kv_dtype, config):
            times, diff = alternate(layouts, lambda k, v: tk.paged_decode_attention(
                q, k, v, lens, tables, HEAD_DIM ** -0.5, seq_order=order, **scales))
            line = "  ".join(f"{name} {min(t):7.1f} us ({nbytes / min(t) / 1e6:4.2f} TB/s)"
                             for name, t in times.items())
            print(f"decode {str(kv_dtype).split('.')[1]:13} B={batch:3d} {describe(config)}: {line}  diff {diff:.1e}",
                  flush=True)


def time_prefill(num_seqs: int, q_len: int, cached: int, kv_dtype: torch.dtype):
    context = cached + q_len
    width = -(-context // BLOCK)
    tables = torch.randperm(num_seqs * width, device="cuda", dtype=torch.int32).view(num_seqs, width)
    q = torch.randn(num_seqs * q_len, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * q_len
    lens = torch.full((num_seqs,), context, device="cuda", dtype=torch.int32)
    scale = torch.ones(1, device="cuda")
    scales = dict(k_scale=scale, v_scale=scale) if kv_dtype == torch.float8_e4m3fn else {}
    layouts = caches(num_seqs * width, kv_dtype)
    times, diff = alternate(layouts, lambda k, v: tk.paged_prefill_attention(
        q, k, v, cu, lens, tables, HEAD_DIM ** -0.5, q_len, **scales))
    line = "  ".join(f"{name} {min(t):8.1f} us" for name, t in times.items())
    print(f"prefill {str(kv_dtype).split('.')[1]:13} {num_seqs} x {q_len} new after {cached}: {line}  diff {diff:.1e}",
          flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--kv", choices=["bf16", "fp8"], nargs="+", default=["bf16", "fp8"])
    p.add_argument("--configs", nargs="*", default=[], help="extra decode launches, tile,warps,stages[,widen][,rN]")
    args = p.parse_args()
    for name in args.kv:
        kv_dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[name]
        configs = [tk.decode_launch(kv_dtype)] + [parse_config(c) for c in args.configs]
        for batch in args.batches:
            time_decode(batch, kv_dtype, configs if batch >= 64 else configs[:1])
        for num_seqs, q_len, cached in [(1, 4096, 0), (8, 512, 1024), (4, 128, 2048)]:
            time_prefill(num_seqs, q_len, cached, kv_dtype)


if __name__ == "__main__":
    main()
