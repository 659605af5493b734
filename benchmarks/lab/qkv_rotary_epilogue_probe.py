"""Whether a batch-1 layer gets faster when the qkv GEMV also does q/k RMSNorm, rotary and the K/V store, so that
the separate rotary kernel (one dependent phase of seven a layer) goes. Each GEMV program owns 4 columns, a head
needs all 128 of its own: the program that finishes a head last (a per-head counter) norms, rotates and stores it.

Chains of 28 layers in one CUDA graph, PDL on (microseconds a layer):
    today    norm+qkv GEMV, q/k norm + rotary + K/V store kernel, decode attention (split + merge, 32 splits as a
             batch-1 graph has them, a 300-token context), o GEMV, norm+gate_up GEMV, gated down GEMV
    fused    the same with the qkv GEMV doing the rotary kernel's work
(--no-attention leaves attention out).
First it checks the fused kernel's q, k and cache rows against today's kernels (also on the CPU, under
TRITON_INTERPRET=1, at toy sizes: `--check-only`).

    PYTHONPATH=. python benchmarks/lab/qkv_rotary_epilogue_probe.py [--model-config qwen3-0.6b]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/lab/qkv_rotary_epilogue_probe.py --check-only
"""
import argparse
import json
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from nanovllm.kernels import fused_layers, gemv as g, paged_attention_triton, pdl


@triton.jit
def norm_qkv_rotary_kernel(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, w_ptr, qkv_ptr, K, N, stride_wn,
                           eps, counters_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr,
                           k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, Q_HEADS: tl.constexpr,
                           KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = qkv_ptr.dtype.element_ty
    pdl.launch_dependents(PDL)
    w = g._load_weight_slice(w_ptr, cols, cols < N, 0, K, stride_wn, BLOCK_K)      # the whole row: K <= BLOCK_K
    pdl.wait_for_inputs(PDL)
    rows = tl.arange(0, 1)
    x = g._load_row_slice(x_ptr, residual_ptr, rows, 0, K, K, rows[:, None] < 1, dtype, BLOCK_K, True)
    ks = tl.arange(0, BLOCK_K)
    if pid == 0:
        tl.store(residual_out_ptr + ks[None, :], x.to(dtype), mask=ks[None, :] < K)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / K + eps)[:, None]
    weight = tl.load(norm_weight_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
    x = ((x * rstd).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
    acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(qkv_ptr + rows[:, None] * 0 + cols[None, :], acc.to(dtype))

    # The last program of this head (acq_rel: the others' columns are visible to it) norms, rotates and stores it.
    tl.debug_barrier()
    head = pid * BLOCK_N // HEAD_DIM
    arrived = tl.atomic_add(counters_ptr + head, 1)
    if arrived == HEAD_DIM // BLOCK_N - 1:
        tl.atomic_xchg(counters_ptr + head, 0)     # ready for the next launch
        HALF: tl.constexpr = HEAD_DIM // 2
        dims = tl.arange(0, HALF)
        src = qkv_ptr + head * HEAD_DIM + dims
        x1 = tl.load(src, cache_modifier=".cg").to(tl.float32)
        x2 = tl.load(src + HALF, cache_modifier=".cg").to(tl.float32)
        slot = tl.load(slot_ptr).to(tl.int64)
        if head < Q_HEADS + KV_HEADS:
            table = tl.load(positions_ptr) * HALF + dims
            cos, sin = tl.load(cos_ptr + table), tl.load(sin_ptr + table)
            is_q = head < Q_HEADS
            norm_ptr = q_norm_ptr if is_q else k_norm_ptr
            r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM + eps)
            x1 = ((x1 * r).to(dtype).to(tl.float32) * tl.load(norm_ptr + dims).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = ((x2 * r).to(dtype).to(tl.float32) * tl.load(norm_ptr + HALF + dims).to(tl.float32)).to(dtype).to(
                tl.float32)
            y1, y2 = (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)
            if is_q:
                tl.store(q_out_ptr + head * HEAD_DIM + dims, y1)
                tl.store(q_out_ptr + head * HEAD_DIM + HALF + dims, y2)
            else:
                kv_head = head - Q_HEADS
                tl.store(k_out_ptr + kv_head * HEAD_DIM + dims, y1)
                tl.store(k_out_ptr + kv_head * HEAD_DIM + HALF + dims, y2)
                dst = k_cache_ptr + (slot * KV_HEADS + kv_head) * HEAD_DIM + dims
                tl.store(dst, y1)
                tl.store(dst + HALF, y2)
        else:
            dst = v_cache_ptr + (slot * KV_HEADS + head - Q_HEADS - KV_HEADS) * HEAD_DIM + dims
            tl.store(dst, x1.to(dtype))
            tl.store(dst + HALF, x2.to(dtype))


def fused(x, residual, norm_weight, eps, w, counters, positions, cos, sin, q_norm, k_norm, kv, slot, heads, kv_heads,
          head_dim):
    k, n = w.shape[1], w.shape[0]
    qkv = torch.empty(1, n, dtype=x.dtype, device=x.device)
    q_out = torch.empty(1, heads, head_dim, dtype=x.dtype, device=x.device)
    k_out = torch.empty(1, kv_heads, head_dim, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(x)
    norm_qkv_rotary_kernel[(triton.cdiv(n, g.GEMV_BLOCK_N),)](
        x, residual, norm_weight, residual_out, w, qkv, k, n, w.stride(0), eps, counters, positions, cos, sin, q_norm,
        k_norm, q_out, k_out, kv.k_cache, kv.v_cache, slot, Q_HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_N=g.GEMV_BLOCK_N, BLOCK_K=triton.next_power_of_2(k), num_warps=g.GEMV_WARPS, num_stages=1,
        **pdl.launch_kwargs(x.device))
    return qkv, q_out, k_out, residual_out


def today(x, residual, norm_weight, eps, w, positions, cos, sin, q_norm, k_norm, kv, slot, heads, kv_heads,
          head_dim):
    qkv, residual_out = g.norm_gemv(x, residual, norm_weight, eps, w)
    q, k, v = qkv.view(1, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    q_out, k_out = fused_layers.qk_norm_rotary(positions, q, k, cos, sin, q_norm, k_norm, eps, store=(v, kv, slot))
    return qkv, q_out, k_out, residual_out


def make_layer(hidden, heads, kv_heads, head_dim, inter, device, dtype):
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 0.02     # noqa: E731
    return dict(qkv=rand((heads + 2 * kv_heads) * head_dim, hidden), o=rand(hidden, heads * head_dim),
                gu=rand(2 * inter, hidden), down=rand(hidden, inter), n1=1 + rand(hidden), n2=1 + rand(hidden),
                qn=1 + rand(head_dim), kn=1 + rand(head_dim), counters=torch.zeros(heads + 2 * kv_heads,
                                                                                  dtype=torch.int32, device=device))


def check(hidden, heads, kv_heads, head_dim, device, dtype):
    """The fused kernel against today's two, twice in a row (the counters must have reset)."""
    torch.manual_seed(0)
    L = make_layer(hidden, heads, kv_heads, head_dim, 8, device, dtype)
    cos, sin = (torch.randn(64, head_dim // 2, device=device) for _ in range(2))
    caches = [SimpleNamespace(k_cache=torch.zeros(4, 16, kv_heads, head_dim, device=device, dtype=dtype),
                              v_cache=torch.zeros(4, 16, kv_heads, head_dim, device=device, dtype=dtype),
                              k_scale=None, v_scale=None) for _ in range(2)]
    for step in range(2):
        x, residual = (torch.randn(1, hidden, device=device, dtype=dtype) for _ in range(2))
        positions = torch.tensor([7 + step], device=device)
        slot = torch.tensor([21 + step], device=device)
        a = today(x, residual, L["n1"], 1e-6, L["qkv"], positions, cos, sin, L["qn"], L["kn"], caches[0], slot,
                  heads, kv_heads, head_dim)
        b = fused(x, residual, L["n1"], 1e-6, L["qkv"], L["counters"], positions, cos, sin, L["qn"], L["kn"],
                  caches[1], slot, heads, kv_heads, head_dim)
        for name, u, v in zip(("qkv", "q", "k", "residual"), a, b):
            torch.testing.assert_close(u, v, atol=2e-2, rtol=2e-2, msg=f"step {step}: {name}")
        torch.testing.assert_close(caches[0].k_cache, caches[1].k_cache, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(caches[0].v_cache, caches[1].v_cache, atol=2e-2, rtol=2e-2)
        assert caches[1].k_cache.flatten(0, 1)[21 + step].abs().sum() > 0 and int(L["counters"].sum()) == 0
    print(f"check passed ({device}, {dtype}, {heads} heads / {kv_heads} KV heads of {head_dim})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--check-only", action="store_true", help="only the toy-size check (runs on the CPU too)")
    p.add_argument("--no-attention", action="store_true", help="leave the decode attention kernels out")
    args = p.parse_args()
    if args.check_only:
        return check(64, 4, 2, 16, "cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    from triton.testing import do_bench_cudagraph
    cfg = json.load(open(f"nanovllm/configs/{args.model_config}/config.json"))
    h, inter, heads, kv_heads = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                 cfg["num_key_value_heads"])
    hd = cfg.get("head_dim") or h // heads
    dev, dt = "cuda", torch.bfloat16
    check(h, heads, kv_heads, hd, dev, dt)
    layers = [make_layer(h, heads, kv_heads, hd, inter, dev, dt) for _ in range(args.layers)]
    cos, sin = (torch.randn(4096, hd // 2, device=dev) for _ in range(2))
    kv = SimpleNamespace(k_cache=torch.zeros(64, 256, kv_heads, hd, device=dev, dtype=dt),
                         v_cache=torch.zeros(64, 256, kv_heads, hd, device=dev, dtype=dt), k_scale=None, v_scale=None)
    x, residual = (torch.randn(1, h, device=dev, dtype=dt) for _ in range(2))
    positions, slot = torch.tensor([300], device=dev), torch.tensor([300], device=dev)
    kv.k_cache.normal_(), kv.v_cache.normal_()
    context_lens = torch.tensor([301], device=dev, dtype=torch.int32)
    block_tables = torch.arange(16, device=dev, dtype=torch.int32)[None]     # 4,096 tokens: 32 splits of 128
    attn = torch.randn(1, heads * hd, device=dev, dtype=dt)

    def attention(q):
        if args.no_attention:
            return attn
        return paged_attention_triton.paged_decode_attention(q, kv.k_cache, kv.v_cache, context_lens, block_tables,
                                                             hd ** -0.5).view(1, -1)

    def chain(fuse):
        res = residual
        for L in layers:
            if fuse:
                _, q, _, res = fused(x, res, L["n1"], 1e-6, L["qkv"], L["counters"], positions, cos, sin, L["qn"],
                                     L["kn"], kv, slot, heads, kv_heads, hd)
            else:
                _, q, _, res = today(x, res, L["n1"], 1e-6, L["qkv"], positions, cos, sin, L["qn"], L["kn"], kv,
                                     slot, heads, kv_heads, hd)
            o = g.gemv(attention(q), L["o"])
            gu, res = g.norm_gemv(o, res, L["n2"], 1e-6, L["gu"])
            g.gemv(gu, L["down"], gated=True)

    for rep in range(2):
        t = {name: do_bench_cudagraph(lambda: chain(fuse), rep=50) * 1e3 / args.layers
             for name, fuse in (("today", False), ("fused", True))}
        print(f"{args.model_config}: today {t['today']:.2f} us/layer, fused {t['fused']:.2f} us/layer", flush=True)


if __name__ == "__main__":
    main()
