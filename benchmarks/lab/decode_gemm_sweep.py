"""Decoder blocks' four linear layers at decode batch sizes 3..256, chained as the model runs them (x 28 layers with
distinct weights, one CUDA graph, attention left out): cuBLAS behind the separate RMSNorm and SiLU-and-mul kernels
(today's path from 3 rows), against a Triton GEMM (tensor cores, Triton's software pipelining, launched with PDL) with
the norm, residual add and gate fused, over its launch parameters. Microseconds per layer.

Measured on the H200 (docs/H200_LOG.md, 2026-12-03 fourth session): 2.6x slower than cuBLAS at 16 rows. gemv.py's
kernel on tensor cores (commit before this file's last, `DOT`), its weight slices held in registers ahead of the
PDL wait, was 2-7x slower at 4-256 rows with slices of 64-256 and 3.5-4.3x with 512-2048.

    PYTHONPATH=. python benchmarks/lab/decode_gemm_sweep.py [--model-config qwen3-0.6b] [--rows 4 16 64 128]
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from nanovllm.engine.compile_ahead import compile_ahead
from nanovllm.kernels import pdl
from nanovllm.kernels.fused_layers import rms_norm, silu_and_mul

ROLES = ("qkv", "o", "gate_up", "down")


@triton.jit
def gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, residual_ptr, norm_weight_ptr,
                residual_out_ptr, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STAGES: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                PDL: tl.constexpr = True):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows[:, None] < M
    dtype = out_ptr.dtype.element_ty
    pdl.launch_dependents(PDL)
    pdl.wait_for_inputs(PDL)
    if NORM:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks, mask=row_valid & (ks < K), other=0.0).to(tl.float32)
            if ADD_RESIDUAL:
                x = (x + tl.load(residual_ptr + rows[:, None] * stride_xm + ks, mask=row_valid & (ks < K),
                                 other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_sq / K + eps)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_valid & (ks[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
        if NORM:
            x = x.to(tl.float32)
            if ADD_RESIDUAL:
                x = (x + tl.load(residual_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask,
                                 other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
                if pid_n == 0:
                    tl.store(residual_out_ptr + rows[:, None] * stride_xm + ks[None, :], x.to(dtype), mask=mask)
            weight = tl.load(norm_weight_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
            x = ((x * rstd).to(dtype).to(tl.float32) * weight).to(dtype)
        if GATED:
            gate = x.to(tl.float32)
            up = tl.load(x_ptr + rows[:, None] * stride_xm + K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            x = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype), mask=row_valid & (cols[None, :] < N))


def launch(x, w, out, residual=None, norm_weight=None, residual_out=None, *, m, gated=False, norm=False, bm, bn, bk,
           stages, warps):
    n, k = w.shape
    gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), residual, norm_weight, residual_out, 1e-6,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, GATED=gated, NORM=norm, ADD_RESIDUAL=residual is not None,
        num_warps=warps, **pdl.launch_kwargs(x.device))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rows", type=int, nargs="+", default=[4, 16, 32, 64, 128, 256])
    args = p.parse_args()
    cfg = json.load(open(f"nanovllm/configs/{args.model_config}/config.json"))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    qkv_n, attn = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd, cfg["num_attention_heads"] * hd
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layers = [dict(qkv=torch.randn(qkv_n, h, device=dev, dtype=dt) * 0.02, o=torch.randn(h, attn, device=dev, dtype=dt) * 0.02,
                   gu=torch.randn(2 * inter, h, device=dev, dtype=dt) * 0.02, down=torch.randn(h, inter, device=dev, dtype=dt) * 0.02,
                   n1=torch.ones(h, device=dev, dtype=dt), n2=torch.ones(h, device=dev, dtype=dt)) for _ in range(args.layers)]
    nbytes = sum(t.numel() * 2 for t in layers[0].values())
    grid = [dict(bn=bn, bk=bk, stages=s, warps=w) for bn, bk, s, w in itertools.product((32, 64, 128), (64, 128),
                                                                                      (3, 4), (4,))]

    for m in args.rows:
        hidden, residual = torch.randn(m, h, device=dev, dtype=dt), torch.randn(m, h, device=dev, dtype=dt)
        qkv, a, o, gu, down = (torch.empty(m, n, device=dev, dtype=dt) for n in (qkv_n, attn, h, 2 * inter, h))
        a.normal_()
        res1, res2 = torch.empty_like(residual), torch.empty_like(residual)
        fits = [dict(c, bm=bm) for c in grid for bm in {min(64, max(16, triton.next_power_of_2(m))),
                                                        min(128, max(16, triton.next_power_of_2(m)))}]

        def chain(cfgs):
            c_qkv, c_o, c_gu, c_down = cfgs
            for L in layers:
                launch(hidden, L["qkv"], qkv, residual, L["n1"], res1, m=m, norm=True, **c_qkv)
                launch(a, L["o"], o, m=m, **c_o)
                launch(o, L["gu"], gu, res1, L["n2"], res2, m=m, norm=True, **c_gu)
                launch(gu, L["down"], down, m=m, gated=True, **c_down)

        def cublas():      # the model's path from 3 rows today
            for L in layers:
                normed, r1 = rms_norm(hidden, L["n1"], 1e-6, residual)
                F.linear(normed, L["qkv"], out=qkv)
                F.linear(a, L["o"], out=o)
                normed, r2 = rms_norm(o, L["n2"], 1e-6, r1)
                F.linear(normed, L["gu"], out=gu)
                F.linear(silu_and_mul(gu), L["down"], out=down)

        compile_ahead(dev, *(lambda c=c: chain([c] * 4) for c in fits))    # compile every variant in parallel

        def us(fn):     # inf for a configuration that does not fit (shared memory, registers)
            try:
                return do_bench_cudagraph(fn, rep=25) * 1e3 / args.layers
            except Exception:
                return float("inf")

        # check one configuration against the cuBLAS path's outputs (the chain's last layer)
        chain([min(fits, key=lambda c: c["bk"])] * 4)
        mine = [t.clone() for t in (qkv, gu, down)]
        cublas()
        err = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(mine, (qkv, gu, down)))
        base = us(cublas)
        results = sorted(((us(lambda c=c: chain([c] * 4)), c) for c in fits), key=lambda r: r[0])
        best = [results[0][1]] * 4
        for pos in range(4):        # then each role on its own over the best six, the others at their best so far
            trials = []
            for _, c in results[:6]:
                cfgs = list(best)
                cfgs[pos] = c
                trials.append((us(lambda cfgs=cfgs: chain(cfgs)), c))
            best[pos] = min(trials, key=lambda r: r[0])[1]
        t = us(lambda: chain(best))
        print(f"{args.model_config} rows {m}: cuBLAS + norm/SiLU kernels {base:.2f} us/layer; fused DOT kernel best "
              f"uniform {results[0][0]:.2f} {results[0][1]}, best per role {t:.2f} "
              f"{dict(zip(ROLES, best))}; ({nbytes / 1e6:.1f} MB a layer: {nbytes / t / 1e6:.2f} TB/s); "
              f"largest difference {err:.1e} of the largest output", flush=True)


if __name__ == "__main__":
    main()
