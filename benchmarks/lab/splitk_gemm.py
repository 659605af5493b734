"""A split-K GEMM for the decode step's narrow linear layers (o_proj, down_proj: 1,024 output columns, K 2,048 / 3,072
for Qwen3-0.6B), against cuBLAS. At decode batches cuBLAS takes 5-7 us for them, 3-4x their bytes' time: with 1,024
columns a 128x128 tiling has 8-16 tiles for 132 SMs. Here S programs share each output tile's K range; each writes
its float32 partial to a workspace and bumps the tile's counter, and the last to arrive sums the S partials in a fixed
order (deterministic), writes the bf16 tile and resets the counter (graph-safe).

    PYTHONPATH=. python benchmarks/lab/splitk_gemm.py [--rows 16 64 256] [--check]
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def splitk_gemm_kernel(x_ptr, w_ptr, out_ptr, ws_ptr, counter_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       K_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = split * K_PER_SPLIT
    for k0 in tl.range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLITS == 1:
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        return
    tile = pid_m * tl.num_programs(0) + pid_n
    tile_ws = ws_ptr + tile * (SPLITS * BLOCK_M * BLOCK_N)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(tile_ws + split * (BLOCK_M * BLOCK_N) + offs, acc)
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")     # releases the partial, acquires the others
    if arrived == SPLITS - 1:
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            total += tl.load(tile_ws + s * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
        tl.store(counter_ptr + tile, 0)


class SplitK:
    def __init__(self, max_tiles: int, max_splits: int, bm: int, bn: int, device):
        self.ws = torch.empty(max_tiles * max_splits * bm * bn, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_tiles, dtype=torch.int32, device=device)

    def __call__(self, x, w, out, *, bm, bn, bk, splits, warps, stages):
        m, k = x.shape
        n = w.shape[0]
        k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
        splitk_gemm_kernel[grid](x, w, out, self.ws, self.counters, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                                 K_PER_SPLIT=k_per_split, SPLITS=splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                 STAGES=stages, num_warps=warps, num_stages=stages)
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--top", type=int, default=4)
    args = p.parse_args()
    cfg = json.load(open(f"nanovllm/configs/{args.model_config}/config.json"))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    attn = cfg["num_attention_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    shapes = {"o": (h, attn), "down": (h, inter)}
    torch.manual_seed(0)
    splitk = SplitK(256, 8, 128, 128, "cuda")
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            cublas = do_bench_cudagraph(lambda: F.linear(x, w), rep=30) * 1e3
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            results = []
            bms = [min(64, max(16, triton.next_power_of_2(m)))] + ([128] if m >= 256 else [])
            for bm, bn, bk, splits, stages in itertools.product(bms, [64, 128], [128], [1, 2, 4, 8], [3, 4]):
                warps = 8 if bm * bn >= 128 * 128 else 4
                if triton.cdiv(k, splits) < bk:
                    continue
                cfg_ = dict(bm=bm, bn=bn, bk=bk, splits=splits, warps=warps, stages=stages)
                try:
                    out.zero_()
                    splitk(x, w, out, **cfg_)
                    err = (out.float() - ref.float()).abs().max().item()
                    us = do_bench_cudagraph(lambda: splitk(x, w, out, **cfg_), rep=20) * 1e3
                    splitk(x, w, out, **cfg_)     # after many replays: still right (counters reset)
                    err = max(err, (out.float() - ref.float()).abs().max().item())
                except Exception as e:      # out of resources
                    continue
                results.append((us, err, cfg_))
            results.sort(key=lambda r: r[0])
            print(f"{name} M={m:4d} cuBLAS {cublas:6.2f} us | " + " | ".join(
                f"{us:6.2f} us err {err:.1e} {c}" for us, err, c in results[:args.top]), flush=True)


if __name__ == "__main__":
    main()
