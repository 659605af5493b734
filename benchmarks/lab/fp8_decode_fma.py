"""An fp8 cache's split decode without tensor cores: scores and the weighted sum of V as float32 multiply-adds.

Why try it: the shipped fp8 decode (tl.dot on float16-widened tiles) is bound by its own instructions on the H200,
not by bytes (2.7-2.8 TB/s of fp8 bytes against 4.0 for the bf16 cache): the widened tiles are staged through
shared memory for the tensor cores, which for a GQA group of two query heads pad 2 rows to 16. Here each K/V tile
is widened in registers and used there: a group of G heads costs 2 * G * head_dim multiply-adds a token, no
staging. Prediction: bound by bytes at batch 256 (~150 us a layer at bench.py-like contexts against ~200).

    PYTHONPATH=. python benchmarks/lab/fp8_decode_fma.py [--batches 256 64 16] [--configs 32,4 64,4 64,8]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/lab/fp8_decode_fma.py --check     (CPU: correctness only)
"""
import argparse
import random

import torch
import triton
import triton.language as tl

from nanovllm.kernels import paged_attention_torch as ref
from nanovllm.kernels import paged_attention_triton as tk
from nanovllm.kernels.triton_attention_kernels import _load_kv_tile

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 256


@triton.jit
def decode_split_fma_kernel(q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr, context_lens_ptr,
                            block_tables_ptr, k_scale_ptr, v_scale_ptr, qk_scale, num_splits, q_stride_b,
                            q_stride_h, stride_page, stride_row, stride_head, table_stride,
                            part_stride_b, part_stride_h, part_stride_s, lse_stride_b, lse_stride_h,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """decode_split_kernel's contract, for an fp8 cache: grid (sequences, KV heads, splits).

    Every tensor is 2-D, rows = (query head of the group, token of the tile), [GROUP_PAD * BLOCK_N, HEAD_DIM], in
    the layout of a 16-byte-vector load: each thread holds 16 contiguous elements of a row, so a score sums 16
    products in the thread and 8 across lanes. K and V rows are loaded once per query head of the group (the
    repeats hit L1). A head's running max and sum are kept in each of its rows; V's weighted sum is kept per row
    and summed over the head's rows once, after the loop."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    num_tiles = (context_len + BLOCK_N - 1) // BLOCK_N
    split_len = (num_tiles + num_splits - 1) // num_splits * BLOCK_N
    start = split * split_len
    end = tl.minimum(context_len, start + split_len)

    ROWS: tl.constexpr = GROUP_PAD * BLOCK_N
    rows = tl.arange(0, ROWS)
    row_head = rows // BLOCK_N
    row_token = rows % BLOCK_N
    dims = tl.arange(0, HEAD_DIM)
    head_valid = row_head < GROUP
    q = tl.load(q_ptr + seq * q_stride_b + (kv_head * GROUP + row_head)[:, None] * q_stride_h + dims[None, :],
                mask=head_valid[:, None], other=0.0).to(tl.float32)
    q = q * (qk_scale * tl.load(k_scale_ptr))
    table_ptr = block_tables_ptr + seq * table_stride

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        page = tl.load(table_ptr + tile_start // BLOCK_SIZE).to(tl.int64)
        tokens = tile_start + row_token
        valid = tokens < context_len
        offsets = (page * stride_page + (tile_start % BLOCK_SIZE + row_token)[:, None] * stride_row
                   + kv_head * stride_head + dims[None, :])
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        qk = tl.sum(q * k.to(tl.float32), axis=1)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = m_i
        for h in tl.static_range(GROUP_PAD):
            in_head = row_head == h
            m_new = tl.where(in_head, tl.maximum(m_new, tl.max(tl.where(in_head, qk, float("-inf")), 0)), m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + p       # per row; summed over the head's rows after the loop
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new

    v_scale = tl.load(v_scale_ptr)
    for h in tl.static_range(GROUP):
        in_head = row_head == h
        l_h = tl.sum(tl.where(in_head, l_i, 0.0), 0)
        m_h = tl.max(tl.where(in_head, m_i, float("-inf")), 0)
        l_safe = tl.where(l_h > 0, l_h, 1.0)
        out = tl.sum(tl.where(in_head[:, None], acc, 0.0), 0) / l_safe * v_scale
        head = kv_head * GROUP + h
        tl.store(part_out_ptr + seq * part_stride_b + head * part_stride_h + split * part_stride_s + dims, out)
        tl.store(part_lse_ptr + seq * lse_stride_b + head * lse_stride_h + split, m_h + tl.log2(l_safe))


def fma_decode(q, k_cache, v_cache, context_lens, block_tables, scale, k_scale, v_scale, block_n=32, warps=4,
               num_splits=None):
    """paged_decode_attention's contract (fp8 cache) with the kernel above and the shipped merge."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = tk.decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, block_n,
                                          q.device)
    out = torch.empty_like(q)
    part_out = (out.unsqueeze(2) if num_splits == 1 else
                torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device))
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    decode_split_fma_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, context_lens, block_tables, k_scale, v_scale, scale * tk.LOG2E,
        num_splits, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
        part_lse.stride(1), GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, BLOCK_N=block_n, num_warps=warps)
    if num_splits > 1:
        tk.kernels.decode_merge_kernel[(batch, num_heads)](
            part_out, part_lse, out, num_splits, part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim)
    return out


def make_inputs(batch, max_context, device, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block=BLOCK):
    rng = random.Random(batch)
    lens = [rng.randint(min(100, max_context), max_context) for _ in range(batch)]
    width = -(-max_context // block)
    blocks = batch * width
    k = torch.randn(blocks, block, kv_heads, head_dim, device=device) * 2
    v = torch.randn_like(k)
    k_scale = torch.tensor(k.abs().max().item() / 448, device=device)
    v_scale = torch.tensor(v.abs().max().item() / 448, device=device)
    k8, v8 = (k / k_scale).to(torch.float8_e4m3fn), (v / v_scale).to(torch.float8_e4m3fn)
    tables = torch.randperm(blocks, device=device).view(batch, width).int()
    q = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    lens_t = torch.tensor(lens, device=device, dtype=torch.int32)
    nbytes = sum(lens) * kv_heads * head_dim * 2
    return q, k8, v8, lens_t, tables, k_scale, v_scale, nbytes


def check(device):
    """Against the PyTorch reference over the dequantized cache, GQA groups 1, 2 and 3, one and several splits."""
    worst = 0.0
    for heads, kv_heads, splits in ((16, 8, None), (16, 8, 1), (8, 8, 3), (9, 3, None), (4, 4, 2)):
        q, k8, v8, lens, tables, ks, vs, _ = make_inputs(3, 300, device, heads, kv_heads, 32, 64)
        lens[0] = 0     # a padded CUDA-graph row: zeros
        want = ref.paged_decode_attention(q.float(), k8, v8, lens, tables, 32 ** -0.5, k_scale=ks, v_scale=vs)
        for block_n in (16, 32):
            got = fma_decode(q, k8, v8, lens, tables, 32 ** -0.5, ks, vs, block_n=block_n, num_splits=splits).float()
            err = (got - want).abs().max().item() / want.abs().max().item()
            worst = max(worst, err)
            assert err < 2e-2, (heads, kv_heads, splits, block_n, err)
            assert got[0].abs().max().item() == 0
    print(f"check: PASS (largest difference {worst:.2e} of the largest output)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true", help="correctness only (runs under TRITON_INTERPRET=1)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 64, 16])
    p.add_argument("--configs", nargs="+", default=["16,4", "32,4", "32,8", "64,4", "64,8"])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(device)
    if args.check or device == "cpu":
        return
    from triton.testing import do_bench
    for batch in args.batches:
        q, k8, v8, lens, tables, ks, vs, nbytes = make_inputs(batch, 2048, device)
        scale = HEAD_DIM ** -0.5
        shipped = lambda: tk.paged_decode_attention(q, k8, v8, lens, tables, scale, k_scale=ks, v_scale=vs)
        base = shipped()
        us = do_bench(shipped, warmup=50, rep=300) * 1e3
        print(f"batch {batch:3d} shipped (tl.dot)  {us:7.1f} us  {nbytes / us / 1e6:5.2f} TB/s")
        for config in args.configs:
            block_n, warps = map(int, config.split(","))
            run = lambda: fma_decode(q, k8, v8, lens, tables, scale, ks, vs, block_n=block_n, warps=warps)
            diff = (run().float() - base.float()).abs().max().item()
            us = do_bench(run, warmup=50, rep=300) * 1e3
            print(f"batch {batch:3d} fma tile {block_n:3d} warps {warps}  {us:7.1f} us  "
                  f"{nbytes / us / 1e6:5.2f} TB/s  max diff vs shipped {diff:.1e}")


if __name__ == "__main__":
    main()
