"""Triton kernels for RMSNorm (+ residual add), silu-and-mul and Qwen3's q/k RMSNorm + rotary embedding on CUDA.
Their reference and CPU path is the torch code in layers/: float32 math, rounded to the activation dtype as it does."""
# No argument depends on the number of tokens (the grid carries it): Triton, which specialises integers equal to 1
# or divisible by 16, then compiles each kernel once per model instead of once per batch size, and a launch does
# nothing else, so it is safe inside CUDA-graph capture.
import torch
import triton
import triton.language as tl

from nanovllm.kernels import pdl
from nanovllm.kernels.triton_attention_kernels import store_cache_rows

SILU_BLOCK = 1024   # columns per silu program: several programs per row keep a 1-token decode from using one SM


@triton.jit
def _round(x, dtype: tl.constexpr):     # x (float32) as the torch code holds it in `dtype`, back in float32
    return x.to(dtype).to(tl.float32)


@triton.jit
def rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps, N: tl.constexpr,
                    BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PDL: tl.constexpr = False):
    """One program per row of N: out = weight * rms_norm(x (+ residual)); the sum is also stored as the new residual."""
    pdl.launch_dependents(PDL)
    pdl.wait_for_inputs(PDL)
    dtype = out_ptr.dtype.element_ty
    offsets = tl.program_id(0).to(tl.int64) * N + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < N
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        x = _round(x + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32), dtype)
        tl.store(residual_out_ptr + offsets, x.to(dtype), mask=mask)
    normed = _round(x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps), dtype)
    weight = tl.load(weight_ptr + tl.arange(0, BLOCK), mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, (normed * weight).to(dtype), mask=mask)


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Program (row, column block): out[row, cols] = silu(x[row, cols]) * x[row, D + cols]."""
    pdl.launch_dependents(PDL)
    pdl.wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(x_ptr + row * 2 * D + cols, mask=cols < D).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * D + D + cols, mask=cols < D).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), out_ptr.dtype.element_ty)    # torch rounds it before the product
    tl.store(out_ptr + row * D + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _norm_rotate_heads(x_ptr, stride_t, stride_h, weight1, weight2, cos, sin, eps, token, HEADS: tl.constexpr,
                       HEADS_PAD: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, dtype: tl.constexpr):
    # The HEADS heads of one token rotated (rotate-half form), each RMS-normed over head_dim first when NORM: the
    # halves [:HALF] and [HALF:] of every head, rounded to dtype, in float32.
    heads, dims = tl.arange(0, HEADS_PAD)[:, None], tl.arange(0, HALF)[None, :]
    src = x_ptr + token * stride_t + heads * stride_h + dims
    x1 = tl.load(src, mask=heads < HEADS, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=heads < HEADS, other=0.0).to(tl.float32)
    if NORM:    # as layers/layernorm.py: normed rounded to dtype, times the weight rounded again
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        x1 = _round(_round(x1 * rstd, dtype) * weight1, dtype)
        x2 = _round(_round(x2 * rstd, dtype) * weight2, dtype)
    return _round(x1 * cos - x2 * sin, dtype), _round(x2 * cos + x1 * sin, dtype)


@triton.jit
def _store_heads(out_ptr, token, rotated1, rotated2, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                 HALF: tl.constexpr):
    heads, dims = tl.arange(0, HEADS_PAD)[:, None], tl.arange(0, HALF)[None, :]
    dst = out_ptr + token * (HEADS * 2 * HALF) + heads * (2 * HALF) + dims
    tl.store(dst, rotated1.to(out_ptr.dtype.element_ty), mask=heads < HEADS)
    tl.store(dst + HALF, rotated2.to(out_ptr.dtype.element_ty), mask=heads < HEADS)


@triton.jit
def qk_norm_rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_ptr, sin_ptr, q_weight_ptr,
                          k_weight_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h, eps,
                          v_ptr, v_stride_t, v_stride_h, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr,
                          v_scale_ptr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                          KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                          STORE_KV: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token, 0): the token's q heads, (token, 1): its k heads, normed (Qwen3) and rotated by its position's
    float32 cos/sin; with STORE_KV program 1 also writes the rotated k and the v row to the cache. (Two programs a
    token, not one: a batch-1 decode step then spreads over two SMs.)"""
    pdl.launch_dependents(PDL)
    dtype = q_out_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    is_q = tl.program_id(1) == 0
    # Before the wait, what no kernel of the step writes (positions and slots are copied in before its first kernel;
    # tables and weights are fixed): at batch 1 these dependent loads then overlap the kernel before.
    dims = tl.arange(0, HALF)[None, :]
    table = tl.load(positions_ptr + token) * HALF + dims
    cos, sin = tl.load(cos_ptr + table), tl.load(sin_ptr + table)
    weight1, weight2 = 1.0, 1.0
    if NORM:
        weight_ptr = tl.where(is_q, q_weight_ptr, k_weight_ptr)
        weight1, weight2 = (tl.load(weight_ptr + dims).to(tl.float32),
                            tl.load(weight_ptr + HALF + dims).to(tl.float32))
    if STORE_KV:    # (the fp8 scales too: calibrated at start-up)
        slot = tl.load(slot_mapping_ptr + token)
        k_scale, v_scale = (tl.load(k_scale_ptr), tl.load(v_scale_ptr)) if KV_FP8 else (1.0, 1.0)
    pdl.wait_for_inputs(PDL)
    if is_q:
        q1, q2 = _norm_rotate_heads(q_ptr, q_stride_t, q_stride_h, weight1, weight2, cos, sin, eps, token, HEADS,
                                    HEADS_PAD, HALF, NORM, dtype)
        _store_heads(q_out_ptr, token, q1, q2, HEADS, HEADS_PAD, HALF)
    else:
        heads = tl.arange(0, KV_HEADS_PAD)[:, None]
        mask = heads < KV_HEADS
        full = tl.arange(0, 2 * HALF)[None, :]
        if STORE_KV:    # v's row with k's, not after k's stores (which the compiler may not reorder it past)
            value = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + full, mask=mask)
        k1, k2 = _norm_rotate_heads(k_ptr, k_stride_t, k_stride_h, weight1, weight2, cos, sin, eps, token,
                                    KV_HEADS, KV_HEADS_PAD, HALF, NORM, dtype)
        _store_heads(k_out_ptr, token, k1, k2, KV_HEADS, KV_HEADS_PAD, HALF)
        if STORE_KV:
            if slot >= 0:   # from registers: no round trip through k_out
                store_cache_rows(k_cache_ptr, slot, k1, heads, dims, mask, k_scale, KV_HEADS, 2 * HALF, KV_FP8)
                store_cache_rows(k_cache_ptr, slot, k2, heads, HALF + dims, mask, k_scale, KV_HEADS, 2 * HALF, KV_FP8)
                store_cache_rows(v_cache_ptr, slot, value, heads, full, mask, v_scale, KV_HEADS, 2 * HALF, KV_FP8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * RMSNorm(x) over the last dimension; with `residual`, (that of x + residual, x + residual)."""
    x, n, add = x.contiguous(), x.shape[-1], residual is not None
    out, residual_out = torch.empty_like(x), torch.empty_like(x) if add else None
    rms_norm_kernel[(x.numel() // n,)](x, residual.contiguous() if add else None, weight, out, residual_out, eps,
                                       N=n, BLOCK=triton.next_power_of_2(n), ADD_RESIDUAL=add,
                                       **pdl.launch_kwargs(x.device))
    return (out, residual_out) if add else out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for the packed gate/up projection."""
    x, d = x.contiguous(), x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    silu_and_mul_kernel[(x.numel() // (2 * d), triton.cdiv(d, SILU_BLOCK))](x, out, D=d, BLOCK=SILU_BLOCK,
                                                                            **pdl.launch_kwargs(x.device))
    return out


def qk_norm_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                   eps: float = 0.0, store: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] (views of the packed qkv:
    any token and head strides, the last dimension contiguous, a power of two) at `positions`, from float32 cos/sin
    tables [max_position, head_dim / 2]; with q_weight/k_weight each head is RMS-normed first. With `store`,
    (v, kv, slot_mapping), the rotated k and v are also written to the paged cache `kv` (a PagedKV, see
    layers/attention_backends.py) at slot_mapping[token] (-1: nowhere), in place of the backend's store kernel."""
    q_out, k_out = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k))
    (tokens, heads, head_dim), kv_heads = q.shape, k.shape[1]
    v, kv, slot_mapping = store if store is not None else (None, None, None)
    cache_args = (None, 0, 0, None, None, None, None, None) if store is None else (
        v, v.stride(0), v.stride(1), kv.k_cache, kv.v_cache, slot_mapping, kv.k_scale, kv.v_scale)
    qk_norm_rotary_kernel[(tokens, 2)](
        q, k, q_out, k_out, positions, cos, sin, q_weight, k_weight, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), eps, *cache_args, HEADS=heads, KV_HEADS=kv_heads, HEADS_PAD=triton.next_power_of_2(heads),
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads), HALF=head_dim // 2, NORM=q_weight is not None,
        STORE_KV=store is not None, KV_FP8=store is not None and kv.k_cache.dtype == torch.float8_e4m3fn,
        **pdl.launch_kwargs(q.device))
    return q_out, k_out
