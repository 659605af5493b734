"""x @ W.T for one or two rows (a batch-1 or -2 decode step) and few output columns: a Triton GEMV.

At batch 1 the linear layers only stream their weights. For the row-parallel layers (o_proj, down_proj: 1024 outputs
from 2048 or 3072 inputs) cuBLAS picks 64x8 GEMM tiles with split-K and a separate reduction kernel, 5.75 and 7.84 us a
layer on the H100, where this kernel takes 4.39 and 5.57 (benchmarks/lab/gemv_sweep.py; with 3 or more rows, or many
output columns as in qkv_proj and gate_up_proj, cuBLAS is as fast or faster). Each program owns BLOCK_N output columns
and walks K in BLOCK_K slices on the CUDA cores (no padding of one row to a 16-row tensor-core tile); 512 programs keep
enough loads in flight.
"""
import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 2       # more rows are a GEMM's job (cuBLAS)
GEMV_MAX_COLUMNS = 2048     # with more output columns cuBLAS needs no split-K and is as fast
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS, GEMV_STAGES = 2, 1024, 4, 3


@triton.jit
def gemv_kernel(x_ptr, w_ptr, out_ptr, M, K, stride_xm, stride_wn, stride_om, residual_ptr=None, norm_weight_ptr=None,
                residual_out_ptr=None, eps=0.0, M_PAD: tl.constexpr = 1, BLOCK_N: tl.constexpr = 2,
                BLOCK_K: tl.constexpr = 1024, GATED: tl.constexpr = False, NORM: tl.constexpr = False,
                ADD_RESIDUAL: tl.constexpr = False):
    """Program n: out[:M, n * BLOCK_N : (n + 1) * BLOCK_N] = x[:M] @ W[those rows].T, accumulated in float32.
    GATED: x holds [gate | up] (2K columns) and the input is silu(gate) * up, rounded where the torch code and
    fused_layers.silu_and_mul round it, so the MLP needs no separate activation kernel.
    NORM: the input is RMSNorm(x (+ residual)) * norm_weight, rounded as fused_layers.rms_norm rounds it; every
    program computes the rows' RMS itself (a first pass over x), program 0 stores x + residual as the new residual.
    K must be a multiple of BLOCK_K and N of BLOCK_N (checked by the caller)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, M_PAD)
    row_valid = rows[:, None] < M
    dtype = out_ptr.dtype.element_ty
    if NORM:
        sum_sq = tl.zeros([M_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_row_slice(x_ptr, residual_ptr, rows, k0, stride_xm, row_valid, dtype, BLOCK_K, ADD_RESIDUAL)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_sq / K + eps)[:, None]
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]).to(tl.float32)
        x = _load_row_slice(x_ptr, residual_ptr, rows, k0, stride_xm, row_valid, dtype, BLOCK_K, ADD_RESIDUAL)
        if NORM:
            if ADD_RESIDUAL:
                if pid == 0:
                    tl.store(residual_out_ptr + rows[:, None] * stride_xm + ks[None, :], x.to(dtype), mask=row_valid)
            weight = tl.load(norm_weight_ptr + ks).to(tl.float32)[None, :]
            x = ((x * rstd).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + rows[:, None] * stride_xm + K + ks[None, :], mask=row_valid, other=0.0)
            silu = (x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32)
            x = (silu * up.to(tl.float32)).to(dtype).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype), mask=row_valid)


@triton.jit
def _load_row_slice(x_ptr, residual_ptr, rows, k0, stride_xm, row_valid, dtype: tl.constexpr, BLOCK_K: tl.constexpr,
                    ADD_RESIDUAL: tl.constexpr):
    # x[:, k0:k0 + BLOCK_K] (+ residual, the sum rounded to dtype as torch adds) in float32
    offsets = rows[:, None] * stride_xm + k0 + tl.arange(0, BLOCK_K)[None, :]
    x = tl.load(x_ptr + offsets, mask=row_valid, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        x = (x + tl.load(residual_ptr + offsets, mask=row_valid, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    return x


def gemv_is_faster(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> bool:
    """Whether `gemv` computes F.linear(x, weight) (gated: of silu_and_mul(x)) faster than cuBLAS: one or two rows,
    few output columns, tile-aligned shapes and contiguous rows."""
    n, k = weight.shape
    return (x.dim() == 2 and x.size(0) <= GEMV_MAX_ROWS and x.size(1) == (2 * k if gated else k)
            and n <= GEMV_MAX_COLUMNS and x.stride(-1) == 1 and weight.stride(-1) == 1 and n % GEMV_BLOCK_N == 0
            and k % GEMV_BLOCK_K == 0)


def gemv_fuses_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` with a norm beats RMSNorm's kernel then cuBLAS: a single row (a batch-1 decode step), where
    the saved launch outweighs this kernel's ~5% over cuBLAS on the wide qkv and gate_up projections."""
    return (x.dim() == 2 and x.size(0) == 1 and x.is_contiguous() and weight.stride(-1) == 1
            and weight.size(0) % GEMV_BLOCK_N == 0 and weight.size(1) % GEMV_BLOCK_K == 0)


def gemv(x: torch.Tensor, weight: torch.Tensor, gated: bool = False, block_n: int = GEMV_BLOCK_N,
         block_k: int = GEMV_BLOCK_K, num_warps: int = GEMV_WARPS, num_stages: int = GEMV_STAGES) -> torch.Tensor:
    """F.linear(x, weight), no bias, for x [M, K] (a few rows) and weight [N, K] (gated: of silu_and_mul(x [M, 2K]))."""
    m, n, k = x.size(0), weight.size(0), weight.size(1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gemv_kernel[(n // block_n,)](x, weight, out, m, k, x.stride(0), weight.stride(0), out.stride(0),
                                 M_PAD=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated,
                                 num_warps=num_warps, num_stages=num_stages)
    return out


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rms_norm(x (+ residual)), weight), x (+ residual)) in one kernel, for `gemv_fuses_norm` shapes."""
    m, n, k = x.size(0), weight.size(0), weight.size(1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual_out = x if residual is None else torch.empty_like(x)
    gemv_kernel[(n // GEMV_BLOCK_N,)](x, weight, out, m, k, x.stride(0), weight.stride(0), out.stride(0), residual,
                                      norm_weight, residual_out, eps, M_PAD=triton.next_power_of_2(m), NORM=True,
                                      ADD_RESIDUAL=residual is not None, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K,
                                      num_warps=GEMV_WARPS, num_stages=GEMV_STAGES)
    return out, residual_out
