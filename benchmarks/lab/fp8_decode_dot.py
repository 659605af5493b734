"""An experiment for the fp8 cache's decode attention: scores on fp8 tensor cores instead of widening K.

The shipped fp8 decode kernel reads half the bytes of the bf16 one but reaches only ~2.7 TB/s against its ~4.0:
every K and V element is widened to float16 before its tl.dot. Here the query is split per row into two e4m3
parts, q * s = hi + lo / 16, and the scores are dot(hi, K) + dot(lo, K) / 16 on fp8 operands, so K is never
widened (V still is, in registers). hi alone keeps e4m3's 2^-4 relative error on q (as much as K's own); hi + lo
brings q's to ~2^-8, below bf16's rounding of the scores. Prints time, bandwidth and the largest difference from a
float32 reference on the dequantized cache, beside the shipped kernel's.

    PYTHONPATH=. python benchmarks/lab/fp8_decode_dot.py [--batches 256 64] [--configs 128,4,2 ...]
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from benchmarks.decode_sweep import HEAD_DIM, inputs
from nanovllm.kernels import paged_attention_torch as reference
from nanovllm.kernels import paged_attention_triton as tk
from nanovllm.kernels.triton_attention_kernels import FP8_MAX, _load_kv_tile, _widen


@triton.jit
def fp8_dot_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, context_lens_ptr, block_tables_ptr, k_scale_ptr,
                          v_scale_ptr, qk_scale, q_stride_b, q_stride_h, stride_page, stride_row, stride_head,
                          table_stride, out_stride_b, out_stride_h, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                          LO: tl.constexpr, WIDEN_V: tl.constexpr, FP8_DOT: tl.constexpr,
                          PREFETCH: tl.constexpr):
    """Grid (sequences, KV heads): one program attends the group's query heads over the whole context."""
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=row_valid[:, None],
                other=0.0)
    q16 = q.to(tl.float16)
    q = q.to(tl.float32)
    amax = tl.max(tl.abs(q), 1)
    row_scale = tl.where(amax > 0, FP8_MAX / amax, 1.0)
    q = q * row_scale[:, None]
    q_hi = q.to(tl.float8e4nv)
    q_lo = ((q - q_hi.to(tl.float32)) * 16.0).to(tl.float8e4nv)
    score_scale = qk_scale * tl.load(k_scale_ptr) / row_scale
    table_ptr = block_tables_ptr + seq * table_stride

    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, 0, context_len, kv_head, stride_page, stride_row,
                         stride_head, BLOCK_SIZE, BLOCK_N, HEAD_DIM)
    for start in range(0, context_len, BLOCK_N):
        if PREFETCH:    # the next tile's loads are issued before this tile's math (past the end: masked, no reads)
            k_next, v_next = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, start + BLOCK_N, context_len,
                                           kv_head, stride_page, stride_row, stride_head, BLOCK_SIZE, BLOCK_N,
                                           HEAD_DIM)
        else:
            k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, start, context_len, kv_head, stride_page,
                                 stride_row, stride_head, BLOCK_SIZE, BLOCK_N, HEAD_DIM)
        if FP8_DOT:
            qk = tl.dot(q_hi, tl.trans(k))
            if LO:
                qk += tl.dot(q_lo, tl.trans(k)) * 0.0625
            qk = qk * score_scale[:, None]
        else:
            qk = tl.dot(q16, tl.trans(_widen(k, tl.float16, False))) * (qk_scale * tl.load(k_scale_ptr))
        qk = tl.where(((start + tl.arange(0, BLOCK_N)) < context_len)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), _widen(v, tl.float16, WIDEN_V))
        m_i = m_new
        if PREFETCH:
            k, v = k_next, v_next
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * tl.load(v_scale_ptr)
    tl.store(out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + dims[None, :], out,
             mask=row_valid[:, None])


def fp8_dot_decode(q, k_cache, v_cache, lens, tables, scale, k_scale, v_scale, config, lo, fp8_dot=True,
                   prefetch=False):
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    group = num_heads // kv_heads
    fp8_dot_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, lens, tables, k_scale, v_scale, scale * tk.LOG2E, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_N=min(config.block_n, block_size), LO=lo, WIDEN_V="v" in config.widen, FP8_DOT=fp8_dot,
        PREFETCH=prefetch, num_warps=config.warps,
        num_stages=config.stages, **({"maxnreg": config.max_registers} if config.max_registers else {}))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 64])
    p.add_argument("--configs", nargs="+", default=["128,4,2,v,r168", "128,4,1,v", "128,8,1,v", "64,4,1,v", "64,4,2,v"])
    args = p.parse_args()
    from benchmarks.decode_sweep import describe, parse_config
    scale, ones = HEAD_DIM ** -0.5, torch.ones(1, device="cuda")
    for batch in args.batches:
        q, k, v, lens, tables, nbytes = inputs(batch, torch.float8_e4m3fn)
        # The exact answer for this cache: float32 attention over the dequantized values (scales 1).
        ref = reference.paged_decode_attention(q.float(), k.float(), v.float(), lens, tables, scale)
        ref_scale = ref.abs().max().item()

        def report(name, run):
            out = run()
            ms = do_bench(run, warmup=10, rep=50)
            err = (out.float() - ref).abs().max().item() / ref_scale
            print(f"B={batch:3d} {name:50}: {ms * 1e3:7.1f} us  {nbytes / ms / 1e9:5.2f} TB/s  "
                  f"max error {err:.2e} of max |out|", flush=True)

        report("shipped (split-KV, widened K and V)",
               lambda: tk.paged_decode_attention(q, k, v, lens, tables, scale, k_scale=ones, v_scale=ones))
        if batch <= 64:     # the shipped kernel with its split count forced: is the heuristic's choice right here?
            for splits in (1, 2, 4):
                report(f"shipped, {splits} splits", lambda: tk.paged_decode_attention(
                    q, k, v, lens, tables, scale, k_scale=ones, v_scale=ones, num_splits=splits))
        for text in args.configs:
            config = parse_config(text)
            for fp8_dot, lo, prefetch in ((False, False, False), (False, False, True), (True, False, True),
                                          (True, True, True)):
                name = (("fp8 dot hi+lo" if lo else "fp8 dot hi") if fp8_dot else "widened K") + \
                    (" prefetch" if prefetch else "")
                try:
                    report(f"{name} {describe(config)}", lambda: fp8_dot_decode(
                        q, k, v, lens, tables, scale, ones, ones, config, lo, fp8_dot, prefetch))
                except Exception as e:      # a configuration may not compile or fit: say so, go on
                    print(f"B={batch} {name} {describe(config)}: {type(e).__name__}: {str(e)[:200]}")

    for batch in args.batches:      # the same split question for a bf16 cache
        if batch <= 64:
            q, k, v, lens, tables, nbytes = inputs(batch, torch.bfloat16)
            for splits in (None, 1, 2, 4):
                run = lambda: tk.paged_decode_attention(q, k, v, lens, tables, scale, num_splits=splits)  # noqa
                ms = do_bench(run, warmup=10, rep=50)
                print(f"bf16 B={batch:3d} shipped, {splits or 'heuristic'} splits: {ms * 1e3:7.1f} us  "
                      f"{nbytes / ms / 1e9:5.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
