"""Triton device code for the paged KV cache (launched by paged_attention_triton.py): store, causal varlen prefill,
split-KV decode and its merge, in the plain Triton language shared by Triton 3.6 and 3.9.

Conventions shared by every kernel:
- Caches are [num_blocks, block_size, kv_heads, head_dim], last dimension contiguous; a KV tile of BLOCK_N tokens
  never straddles a page (BLOCK_N divides BLOCK_SIZE, both powers of two): one block-table load finds its page.
- Scores are kept in the log2 domain (multiplied by scale * log2(e)) so the softmax uses exp2, a single
  hardware instruction; running max, sum and output accumulate in float32.
- Every load that could reach past a sequence's context is masked: cache rows beyond it may hold anything
  (stale tokens, uninitialised memory, NaN), and block-table entries beyond it may be stale (CUDA-graph replay)."""
import os

import triton
import triton.language as tl

from nanovllm.kernels import pdl

# KV_FP8 (a constexpr: other caches compile exactly as without it, their scale pointers may be None) marks a
# float8_e4m3fn cache holding K / k_scale and V / v_scale, the scales read through pointers so CUDA graphs see
# calibrated values. Readers widen fp8 to q's dtype, which is exact, and fold the scales in: scores are multiplied
# by k_scale and the output by v_scale, the same as dequantizing every element (x * scale), with one multiply per
# row instead of one per element.
FP8_MAX = tl.constexpr(448.0)     # float8_e4m3fn's largest finite value; it has no inf
# Softmax weights (at most 1) scaled by this before they are rounded to e4m3: weights down to 2**-14 keep its normal
# precision, instead of 2**-6, and a power of two leaves the scaling exact.
WEIGHTS_FP8_SCALE = tl.constexpr(256.0)

# Triton compiles a kernel again for an integer argument that turns 1 or a multiple of 16: the block table's width,
# the split count and the strides it sets change from step to step, so a request could meet a variant start-up never
# launched and wait for its compile (seconds on a fresh machine). Their divisibility buys these kernels nothing, so
# they are not specialized on (do_not_specialize below).


@triton.jit
def _query_for_fp8_cache(q):
    """A 16-bit query in float16 for an fp8 cache; float32 stays."""
    # e4m3 widens to float16 in one instruction per pair (to bfloat16 it goes through float32), and the widening is a
    # large share of the decode kernel's work. Exact for bf16 values of magnitude 6e-5..65504 (float16 has more
    # mantissa bits); a normed query lies well inside.
    return q.to(tl.float16 if q.dtype == tl.bfloat16 else q.dtype)


@triton.jit
def store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                         key_stride_n, key_stride_h, value_stride_n, value_stride_h, NUM_KV_HEADS: tl.constexpr,
                         HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, KV_FP8: tl.constexpr):
    """One program per token: copy (KV_FP8: quantize) its K and V rows to cache slot slot_mapping[token]."""
    token = tl.program_id(0)
    store_token_kv(key_ptr + token * key_stride_n, key_stride_h, value_ptr + token * value_stride_n, value_stride_h,
                   k_cache_ptr, v_cache_ptr, tl.load(slot_mapping_ptr + token), k_scale_ptr, v_scale_ptr,
                   NUM_KV_HEADS, HEADS_PAD, HEAD_DIM, KV_FP8)


@triton.jit
def store_token_kv(key_ptr, key_stride_h, value_ptr, value_stride_h, k_cache_ptr, v_cache_ptr, slot, k_scale_ptr,
                   v_scale_ptr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   KV_FP8: tl.constexpr):
    """Copy (KV_FP8: quantize) one token's K and V rows (key_ptr, value_ptr: its head 0) to cache slot `slot`;
    a slot < 0 (a padding row) writes nothing."""
    if slot < 0:
        return
    heads, dims = tl.arange(0, HEADS_PAD)[:, None], tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_KV_HEADS
    key = tl.load(key_ptr + heads * key_stride_h + dims, mask=mask)
    value = tl.load(value_ptr + heads * value_stride_h + dims, mask=mask)
    k_scale, v_scale = (tl.load(k_scale_ptr), tl.load(v_scale_ptr)) if KV_FP8 else (1.0, 1.0)
    store_cache_rows(k_cache_ptr, slot, key, heads, dims, mask, k_scale, NUM_KV_HEADS, HEAD_DIM, KV_FP8)
    store_cache_rows(v_cache_ptr, slot, value, heads, dims, mask, v_scale, NUM_KV_HEADS, HEAD_DIM, KV_FP8)


@triton.jit
def store_cache_rows(cache_ptr, slot, x, heads, dims, mask, scale, NUM_KV_HEADS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, KV_FP8: tl.constexpr):
    """Write x, the [heads, dims] elements of one token's K or V, to cache slot `slot` (>= 0); KV_FP8: x / scale."""
    # `scale` is a value, not a pointer: fixed after start-up, so a caller may load it before its PDL wait.
    if KV_FP8:  # IEEE division (not the approximate default), as torch divides; clamped, so outliers saturate
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)
    dst = slot.to(tl.int64) * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    tl.store(cache_ptr + dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


# A plain fp8 -> float16 conversion before tl.dot is moved by Triton past the shared-memory staging of the dot's
# operand, so the tensor cores are fed by 8-bit scalar shared loads. That hurts most for V, whose dot pairs
# elements along tokens, 1 KB apart in the cache (decode, sm_90: 181 LDS + 136 F2FP against the bf16 kernel's 48
# ldmatrix, read off the compiled SASS). The same conversion as opaque inline PTX stays where it is written: the
# tile is widened in registers, staged as float16 and read with ldmatrix. Done for V only, since K's tile then
# loses Triton's cp.async pipeline (both: 1.9 TB/s, V only: 2.2, plain: 2.2, and V only leaves the room for
# three programs an SM; paged_attention_triton.DECODE_LAUNCH). The interpreter cannot run PTX: plain conversion.
WIDEN_FP8_IN_REGISTERS = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _widen(x, dtype: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """x (a K or V tile) in `dtype` for tl.dot; IN_REGISTERS: an e4m3 tile is widened by inline PTX, as above."""
    if IN_REGISTERS and WIDEN_FP8_IN_REGISTERS and x.dtype == tl.float8e4nv and dtype == tl.float16:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
    return x.to(dtype)


@triton.jit
def _query_in_fp8(q):
    """(q as e4m3, each row's scale [rows]): one scale per row, its |max| / 448. Then q @ K^T is an fp8 dot of the
    cache's tiles as stored (vLLM's FlashAttention backend rounds the query so for an fp8 cache)."""
    amax = tl.max(tl.abs(q.to(tl.float32)), 1)
    row_scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = tl.clamp(q.to(tl.float32) / row_scale[:, None], -FP8_MAX, FP8_MAX)     # |max| / its scale may round past
    return q.to(tl.float8e4nv), row_scale


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, kv_len, stride_page, stride_row, stride_head,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(K, V, their positions, which are below kv_len) of the BLOCK_N tokens from `start`: [BLOCK_N, HEAD_DIM] tiles
    whose rows past kv_len read as 0."""
    page = tl.load(table_ptr + start // BLOCK_SIZE).to(tl.int64)    # int64: a layer's cache can pass 2**31 elements
    rows = start % BLOCK_SIZE + tl.arange(0, BLOCK_N)
    keys = start + tl.arange(0, BLOCK_N)
    key_valid = keys < kv_len
    offsets = page * stride_page + rows[:, None] * stride_row + kv_head * stride_head + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=key_valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offsets, mask=key_valid[:, None], other=0.0)
    return k, v, keys, key_valid


@triton.jit
def _attend_kv_tiles(acc, m_i, l_i, q, q_pos, qk_scale, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, begin, end,
                     kv_len, stride_page, stride_row, stride_head, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     WIDEN_K: tl.constexpr = False, WIDEN_V: tl.constexpr = False):
    """Fold the K/V tiles of tokens [begin, end) of one sequence, end <= kv_len, into an online softmax; the cache's
    tiles are widened to q's dtype (`_widen`: exact, and a no-op unless fp8; an e4m3 q leaves K as it is and widens V
    to float16). q: [M, HEAD_DIM] query rows, qk_scale a scalar or [M, 1]; acc [M, HEAD_DIM], m_i and l_i [M]:
    running output, max and sum (log2 domain). Keys at or beyond kv_len are masked out; with CAUSAL, so are keys after
    each row's position q_pos [M]. Every tile starts below kv_len, so every row sees at least one finite score once
    key 0 was seen."""
    for start in range(begin, end, BLOCK_N):
        k, v, keys, key_valid = _kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, kv_len, stride_page,
                                         stride_row, stride_head, BLOCK_SIZE, BLOCK_N, HEAD_DIM)
        k, v = _widen(k, q.dtype, WIDEN_K), _widen(v, tl.float16 if q.dtype == tl.float8e4nv else q.dtype, WIDEN_V)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        allowed = key_valid[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= q_pos[:, None])
        qk = tl.where(allowed, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)                 # rescales what was accumulated under the old max
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_kv_tiles_keys_major(acc_t, m_i, l_i, q, qk_scale, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, begin,
                                end, kv_len, stride_page, stride_row, stride_head, BLOCK_SIZE: tl.constexpr,
                                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                WIDEN_K: tl.constexpr = False, WIDEN_V: tl.constexpr = False,
                                WEIGHTS_FP8: tl.constexpr = False):
    """_attend_kv_tiles (not causal) with the keys as the dots' rows: scores [BLOCK_N, M] = K q^T and the output
    transposed, acc_t [HEAD_DIM, M] += V^T P. A decode's few query rows are then the dots' narrow side, which
    Hopper's wgmma takes at 16 (its rows must be 64: K's tile, or V^T's head dimension, fill them), so an e4m3
    query meets the fp8 K tile in an fp8 wgmma without rows of padding. qk_scale: a scalar or [1, M].
    WEIGHTS_FP8 (an fp8 cache): the softmax weights in e4m3 too, times WEIGHTS_FP8_SCALE, so that P meets the V
    tile as stored in an fp8 wgmma (FlashAttention-3's fp8 path rounds P the same way)."""
    for start in range(begin, end, BLOCK_N):
        k, v, keys, key_valid = _kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, kv_len, stride_page,
                                         stride_row, stride_head, BLOCK_SIZE, BLOCK_N, HEAD_DIM)
        k = _widen(k, q.dtype, WIDEN_K)
        if not WEIGHTS_FP8:
            v = _widen(v, tl.float16 if q.dtype == tl.float8e4nv else q.dtype, WIDEN_V)
        scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(key_valid[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        if WEIGHTS_FP8:
            pv = tl.dot(tl.trans(v), (p * WEIGHTS_FP8_SCALE).to(tl.float8e4nv)) * (1.0 / WEIGHTS_FP8_SCALE)
        else:
            pv = tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)
        acc_t = acc_t * alpha[None, :] + pv
        m_i = m_new
    return acc_t, m_i, l_i


@triton.jit(do_not_specialize=["table_stride"])
def prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
                   qk_scale, q_stride_n, q_stride_h, out_stride_n, out_stride_h,
                   stride_page, stride_row, stride_head, table_stride,
                   GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   # the fp8 arguments last, with defaults: the anchor's flash_attn shim calls the bf16 signature
                   k_scale_ptr=None, v_scale_ptr=None, KV_FP8: tl.constexpr = False):
    """Grid (query tiles, sequences, query heads): BLOCK_M new tokens of one sequence and head, causal over its cache.
    Query row j of sequence i sits at absolute position context_len - q_len + j, so a cached prefix or earlier chunks
    (already in the cache) are attended without any copy."""
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:      # the grid is sized by the longest sequence; shorter ones have spare tiles
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_pos = context_len - q_len + m_block * BLOCK_M
    q_rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = q_rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_start + q_rows)[:, None] * q_stride_n + head * q_stride_h + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None], other=0.0)
    q_pos = first_pos + tl.arange(0, BLOCK_M)
    kv_head = head // GROUP
    table_ptr = block_tables_ptr + seq * table_stride
    if KV_FP8:
        qk_scale *= tl.load(k_scale_ptr)
        q = _query_for_fp8_cache(q)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys before first_pos + 1 are visible to every row of the tile: those tiles skip the causal mask.
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_kv_tiles(acc, m_i, l_i, q, q_pos, qk_scale, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, 0,
                                     unmasked_end, context_len, stride_page, stride_row, stride_head, False,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    causal_end = tl.minimum(context_len, first_pos + BLOCK_M)
    acc, m_i, l_i = _attend_kv_tiles(acc, m_i, l_i, q, q_pos, qk_scale, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
                                     unmasked_end, causal_end, context_len, stride_page, stride_row, stride_head, True,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, DOT_PRECISION)

    out = acc / l_i[:, None]
    if KV_FP8:
        out *= tl.load(v_scale_ptr)
    out_offsets = (q_start + q_rows)[:, None] * out_stride_n + head * out_stride_h + dims[None, :]
    tl.store(out_ptr + out_offsets, out, mask=row_valid[:, None])


@triton.jit(do_not_specialize=["table_stride", "num_splits", "lse_stride_b", "lse_stride_h"])
def decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr, context_lens_ptr,
                        block_tables_ptr, k_scale_ptr, v_scale_ptr, qk_scale, num_splits, q_stride_b, q_stride_h,
                        stride_page, stride_row, stride_head, table_stride,
                        part_stride_b, part_stride_h, part_stride_s, lse_stride_b, lse_stride_h,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                        WIDEN_K: tl.constexpr = False, WIDEN_V: tl.constexpr = False,
                        seq_order_ptr=None, ORDERED: tl.constexpr = False, PDL: tl.constexpr = False,
                        QUERY_FP8: tl.constexpr = False, KEYS_MAJOR: tl.constexpr = False,
                        WEIGHTS_FP8: tl.constexpr = False):
    """Grid (sequences, KV heads, splits): all query heads of one KV group against one split of the KV range.
    Writes the split's normalised output and its log2-sum-exp; a split with no keys returns (the merge skips it) but
    split 0, which writes 0 and -inf (context_len 0: a padded graph row). ORDERED: row i is sequence seq_order[i]."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pdl.launch_dependents(PDL)
    # The GPU dispatches blocks in about grid order (observed, not promised by CUDA), so with seq_order (a permutation
    # of the rows, sorted by a kernel of the step) the caller can start the longest contexts first.
    if ORDERED:
        pdl.wait_for_inputs(PDL)
        seq = tl.load(seq_order_ptr + seq)
    context_len = tl.load(context_lens_ptr + seq)   # a step input: read before the wait (pdl.py)
    start = split * _split_len(context_len, num_splits, BLOCK_N)
    end = tl.minimum(context_len, start + _split_len(context_len, num_splits, BLOCK_N))
    if split > 0 and start >= end:     # short contexts leave most splits of a small batch empty: they cost nothing
        return

    # The group's query heads are the rows of one tile, padded to GROUP_PAD (>= 16) rows for tl.dot:
    # each K/V tile is read once for all of them.
    group_rows = tl.arange(0, GROUP_PAD)
    row_valid = group_rows < GROUP
    heads = kv_head * GROUP + group_rows
    dims = tl.arange(0, HEAD_DIM)
    pdl.wait_for_inputs(PDL)
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    table_ptr = block_tables_ptr + seq * table_stride
    if KV_FP8:
        qk_scale *= tl.load(k_scale_ptr)
        q = _query_for_fp8_cache(q)
        if QUERY_FP8:   # the rows' scales along the scores' query axis
            q, row_scale = _query_in_fp8(q)
            qk_scale = qk_scale * (row_scale[None, :] if KEYS_MAJOR else row_scale[:, None])

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    if KEYS_MAJOR:
        acc_t = tl.zeros([HEAD_DIM, GROUP_PAD], dtype=tl.float32)
        acc_t, m_i, l_i = _attend_kv_tiles_keys_major(acc_t, m_i, l_i, q, qk_scale, k_cache_ptr, v_cache_ptr,
                                                      table_ptr, kv_head, start, end, context_len, stride_page,
                                                      stride_row, stride_head, BLOCK_SIZE, BLOCK_N, HEAD_DIM,
                                                      DOT_PRECISION, WIDEN_K, WIDEN_V, WEIGHTS_FP8)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        acc, m_i, l_i = _attend_kv_tiles(acc, m_i, l_i, q, group_rows, qk_scale, k_cache_ptr, v_cache_ptr, table_ptr,
                                         kv_head, start, end, context_len, stride_page, stride_row, stride_head,
                                         False, BLOCK_SIZE, BLOCK_N, HEAD_DIM, DOT_PRECISION, WIDEN_K, WIDEN_V)

    l_safe = tl.where(l_i > 0, l_i, 1.0)       # no keys: acc is 0, m_i is -inf, so out = 0 and lse = -inf
    out = acc / l_safe[:, None]
    if KV_FP8:
        out *= tl.load(v_scale_ptr)
    lse = m_i + tl.log2(l_safe)
    part_offsets = seq * part_stride_b + heads[:, None] * part_stride_h + split * part_stride_s + dims[None, :]
    tl.store(part_out_ptr + part_offsets, out, mask=row_valid[:, None])
    tl.store(part_lse_ptr + seq * lse_stride_b + heads * lse_stride_h + split, lse, mask=row_valid)


@triton.jit
def _split_len(context_len, num_splits, BLOCK_N: tl.constexpr):
    # Each sequence's own context is cut into num_splits equal runs of whole tiles, so every program of a sequence
    # gets the same share whatever its length.
    return ((context_len + BLOCK_N - 1) // BLOCK_N + num_splits - 1) // num_splits * BLOCK_N


@triton.jit(do_not_specialize=["num_splits", "lse_stride_b", "lse_stride_h"])
def decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, context_lens_ptr, num_splits,
                        part_stride_b, part_stride_h, part_stride_s, lse_stride_b, lse_stride_h,
                        out_stride_b, out_stride_h, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (sequences, query heads): combine the splits that hold keys (split 0 always), each output weighted by its
    share of the softmax sum."""
    seq, head = tl.program_id(0), tl.program_id(1)
    pdl.launch_dependents(PDL)
    splits = tl.arange(0, SPLITS_PAD)
    context_len = tl.load(context_lens_ptr + seq)   # a step input: read before the wait (pdl.py)
    split_valid = (splits == 0) | (splits * _split_len(context_len, num_splits, BLOCK_N) < context_len)
    pdl.wait_for_inputs(PDL)
    lse = tl.load(part_lse_ptr + seq * lse_stride_b + head * lse_stride_h + splits, mask=split_valid,
                  other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)    # no keys at all (padded row): all weights 0
    weights = tl.exp2(lse - lse_max)
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + seq * part_stride_b + head * part_stride_h + splits[:, None] * part_stride_s
                    + dims[None, :], mask=split_valid[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * out_stride_b + head * out_stride_h + dims, out)
