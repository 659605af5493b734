"""Decode attention's bandwidth for a bf16 and an fp8 cache over launch parameters (tile, warps, stages), at
bench.py-like batches: Qwen3-0.6B shapes, 256-token pages, contexts uniform in 100..2048.

    python benchmarks/decode_sweep.py [--kv fp8] [--configs 128,4,2 128,4,2,v,r168] [--batches 256]
    python benchmarks/decode_sweep.py --splits 1 2 3 4 6 8 --batches 8 16 32 64 128   # the shipped launch, each
        batch at forced split counts against the heuristic's choice, timed in a CUDA graph (small batches are
        shorter than their launches)

A configuration is tile,warps,stages[,widen][,rN][,q8][,km][,p8] (a DecodeLaunch): widen names the fp8 tiles ("k",
"v", "kv") widened in registers, rN caps the registers per thread at N, q8 rounds the query to fp8 (an fp8 cache's
q @ K^T an fp8 dot), km puts the keys on the dots' rows (keys_major), p8 the softmax weights in fp8 (with km).
Each cache's sweep starts with its shipped launch (paged_attention_triton.DECODE_LAUNCH, marked "shipped"); a
configuration replaces that launch while it is timed, and the shipped one is put back after.

Bytes counted: each sequence's K and V (context * kv_heads * head_dim * element size * 2). Each configuration's
output is compared with the shipped one's (max abs difference), so a fast wrong configuration shows.
"""
import argparse
import contextlib
import random

import torch
from triton.testing import do_bench, do_bench_cudagraph

from nanovllm.kernels import paged_attention_triton as tk

HEADS, KV_HEADS, HEAD_DIM, BLOCK, WIDTH = 16, 8, 128, 256, 16
CONFIGS = [tk.DecodeLaunch(*c) for c in [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 4, 2), (128, 8, 2),
                                          (32, 4, 4), (256, 8, 2), (128, 4, 3, "v"), (128, 4, 3, "k"),
                                          (128, 4, 2, "v", 168)]]


def inputs(batch: int, kv_dtype: torch.dtype, order: str = "random"):
    rng = random.Random(batch)
    lens = [rng.randint(100, 2048) for _ in range(batch)]
    if order != "random":       # the same lengths, longest or shortest first: how much the programs' order matters
        lens.sort(reverse=order == "longest-first")
    blocks = batch * WIDTH
    k = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.randperm(blocks, device="cuda").view(batch, WIDTH)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(lens) * KV_HEADS * HEAD_DIM * 2 * kv_dtype.itemsize
    return q, k.to(kv_dtype), v.to(kv_dtype), torch.tensor(lens, device="cuda"), tables, nbytes


def describe(c: tk.DecodeLaunch) -> str:
    return (f"tile {c.block_n:3d} warps {c.warps} stages {c.stages}" + (f" widen {c.widen}" if c.widen else "")
            + (f" r{c.max_registers}" if c.max_registers else "") + (" q8" if c.query_fp8 else "")
            + (" km" if c.keys_major else "") + (" p8" if c.weights_fp8 else ""))


def parse_config(text: str) -> tk.DecodeLaunch:
    fields = text.split(",")
    registers = [int(f[1:]) for f in fields[3:] if f.startswith("r")]
    return tk.DecodeLaunch(*map(int, fields[:3]), widen="".join(f for f in fields[3:] if f in ("k", "v", "kv")),
                           max_registers=registers[0] if registers else None, query_fp8="q8" in fields[3:],
                           keys_major="km" in fields[3:], weights_fp8="p8" in fields[3:])


@contextlib.contextmanager
def launched_as(kv_dtype: torch.dtype, config: tk.DecodeLaunch):
    """paged_decode_attention launches a cache of `kv_dtype` with `config` inside the block."""
    shipped = tk.DECODE_LAUNCH[kv_dtype.itemsize]
    tk.DECODE_LAUNCH[kv_dtype.itemsize] = config
    try:
        yield
    finally:
        tk.DECODE_LAUNCH[kv_dtype.itemsize] = shipped


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kv", choices=["both", "bf16", "fp8"], default="both")
    p.add_argument("--configs", nargs="+", help="tile,warps,stages[,widen][,rN][,q8][,km][,p8] (default: a fixed "
                   "list)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 64])
    p.add_argument("--splits", type=int, nargs="+", help="time these split counts instead of launch parameters")
    p.add_argument("--order", choices=["random", "longest-first", "shortest-first"], default="random",
                   help="the sequences' order in the batch (the grid launches them in this order)")
    args = p.parse_args()
    configs = [parse_config(c) for c in args.configs] if args.configs else CONFIGS
    kv_dtypes = {"both": (torch.bfloat16, torch.float8_e4m3fn), "bf16": (torch.bfloat16,),
                 "fp8": (torch.float8_e4m3fn,)}[args.kv]
    scale = torch.ones(1, device="cuda")
    for kv_dtype in kv_dtypes:
        shipped = tk.decode_launch(kv_dtype)
        for batch in args.batches:
            q, k, v, lens, tables, nbytes = inputs(batch, kv_dtype, args.order)
            scales = dict(k_scale=scale, v_scale=scale) if kv_dtype == torch.float8_e4m3fn else {}
            if args.splits:
                sweep_splits(q, k, v, lens, tables, nbytes, scales, args.splits)
                continue
            reference = None
            for config in [shipped] + [c for c in configs if c != shipped]:
                try:
                    run = lambda: tk.paged_decode_attention(q, k, v, lens, tables, HEAD_DIM ** -0.5, **scales)  # noqa
                    with launched_as(kv_dtype, config):
                        out = run()
                        reference = out if reference is None else reference
                        ms = do_bench(run, warmup=10, rep=50)
                    err = (out.float() - reference.float()).abs().max().item()
                    print(f"{str(kv_dtype).split('.')[1]:14} B={batch:3d} {describe(config)}:"
                          f" {ms * 1e3:7.1f} us  {nbytes / ms / 1e9:5.2f} TB/s  diff {err:.1e}"
                          + ("  (shipped)" if config == shipped else ""))
                except Exception as e:      # a configuration may not fit (shared memory): say so, go on
                    print(f"{kv_dtype} B={batch} {describe(config)}: {type(e).__name__}")


def sweep_splits(q, k, v, lens, tables, nbytes, scales, counts):
    batch, kv_dtype = q.size(0), k.dtype
    chosen = tk.decode_num_splits(batch, KV_HEADS, WIDTH * BLOCK, tk.decode_launch(kv_dtype).block_n, q.device)
    reference = tk.paged_decode_attention(q, k, v, lens, tables, HEAD_DIM ** -0.5, **scales).float()
    for n in sorted(set(counts) | {chosen}):
        run = lambda: tk.paged_decode_attention(q, k, v, lens, tables, HEAD_DIM ** -0.5, num_splits=n, **scales)  # noqa
        err = (run().float() - reference).abs().max().item()
        ms = do_bench_cudagraph(run, rep=50)
        print(f"{str(kv_dtype).split('.')[1]:14} B={batch:3d} splits {n:2d}: {ms * 1e3:7.1f} us  "
              f"{nbytes / ms / 1e9:5.2f} TB/s  diff {err:.1e}" + ("  (heuristic)" if n == chosen else ""), flush=True)


if __name__ == "__main__":
    main()
