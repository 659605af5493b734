"""x @ W.T for one or two rows (a batch-1 or -2 decode step): a Triton GEMV, optionally behind the block's RMSNorm
(and residual add) or SwiGLU's gate, so that a batch-1 decoder block's linear layers are four launches.

At batch 1 the linear layers only stream their weights, and each is a few microseconds: the cost is the launch,
ramp and tail, not the bytes. Each program owns BLOCK_N output columns and walks K in BLOCK_K slices on the CUDA
cores (no padding of one row to a 16-row tensor-core tile). The weights depend on no earlier kernel, so a program
requests its first slice before it waits for x: launched with programmatic dependent launch (kernels/pdl.py) that
load runs while the kernel before it still computes. cuBLAS is as fast or faster from 3 rows, and for many output
columns without a fused norm.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import pdl

GEMV_MAX_ROWS = 2       # more rows are a GEMM's job (cuBLAS)
GEMV_MAX_COLUMNS = 2048     # with more output columns (and no norm to fuse) cuBLAS needs no split-K and is as fast
# A program takes 4 columns and up to 4,096 of K at once (the whole row for these models: every weight byte it
# needs is requested before the wait), 4 warps: the fastest uniform choice for Qwen3-0.6B's and SmolLM2-135M's
# four GEMVs of a block chained with PDL (benchmarks/lab/gemv_chain_sweep.py).
GEMV_BLOCK_N, GEMV_MAX_BLOCK_K, GEMV_WARPS = 4, 4096, 4
# norm_gemv's registers a thread (Triton's maxnreg) where K fits 1,024: Triton 3.6 gives that kernel 128 (3.9: 115),
# so four programs share an SM; under the cap five do, for a few spilled values, and the wide qkv and gate/up
# projections of a batch-1 step need fewer rounds of programs (docs/H200_LOG.md has the measurements).
# With a longer K the same cap spills far more: left to Triton. None: no cap.
NORM_GEMV_MAX_REGISTERS, NORM_GEMV_CAPPED_MAX_K = 96, 1024


@triton.jit
def gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, residual_ptr=None,
                norm_weight_ptr=None, residual_out_ptr=None, eps=0.0, M_PAD: tl.constexpr = 1,
                BLOCK_N: tl.constexpr = 4, BLOCK_K: tl.constexpr = 4096, GATED: tl.constexpr = False,
                NORM: tl.constexpr = False, ADD_RESIDUAL: tl.constexpr = False, PDL: tl.constexpr = False):
    """Program n: out[:M, n * BLOCK_N : (n + 1) * BLOCK_N] = x[:M] @ W[those rows].T, accumulated in float32.
    GATED: x holds [gate | up] (2K columns) and the input is silu(gate) * up, rounded where the torch code and
    fused_layers.silu_and_mul round it, so the MLP needs no separate activation kernel.
    NORM: the input is RMSNorm(x (+ residual)) * norm_weight, rounded as fused_layers.rms_norm rounds it; every
    program computes the rows' RMS itself (a first pass over x), program 0 stores x + residual as the new residual."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    rows = tl.arange(0, M_PAD)
    row_valid = rows[:, None] < M
    dtype = out_ptr.dtype.element_ty
    pdl.launch_dependents(PDL)
    w = _load_weight_slice(w_ptr, cols, col_valid, 0, K, stride_wn, BLOCK_K)
    if NORM:    # a fixed weight too: the first slice's is read before the wait, off the path that follows it
        norm_weight = _load_norm_weight(norm_weight_ptr, 0, K, BLOCK_K)
    pdl.wait_for_inputs(PDL)
    if NORM:
        sum_sq = tl.zeros([M_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_row_slice(x_ptr, residual_ptr, rows, k0, K, stride_xm, row_valid, dtype, BLOCK_K, ADD_RESIDUAL)
            sum_sq += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_sq / K + eps)[:, None]
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_next = _load_weight_slice(w_ptr, cols, col_valid, k0 + BLOCK_K, K, stride_wn, BLOCK_K)  # past K: no load
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _load_row_slice(x_ptr, residual_ptr, rows, k0, K, stride_xm, row_valid, dtype, BLOCK_K, ADD_RESIDUAL)
        if NORM:
            if ADD_RESIDUAL:
                if pid == 0:
                    tl.store(residual_out_ptr + rows[:, None] * stride_xm + ks[None, :], x.to(dtype),
                             mask=row_valid & (ks[None, :] < K))
            if k0 > 0:
                norm_weight = _load_norm_weight(norm_weight_ptr, k0, K, BLOCK_K)
            x = ((x * rstd).to(dtype).to(tl.float32) * norm_weight).to(dtype).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + rows[:, None] * stride_xm + K + ks[None, :], mask=row_valid & (ks[None, :] < K),
                         other=0.0)
            silu = (x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32)
            x = (silu * up.to(tl.float32)).to(dtype).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w = w_next
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype), mask=row_valid & col_valid[None, :])


@triton.jit
def _load_weight_slice(w_ptr, cols, col_valid, k0, K, stride_wn, BLOCK_K: tl.constexpr):
    # W[cols, k0:k0 + BLOCK_K], zeros past N and K (a slice wholly past K reads nothing)
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                   mask=col_valid[:, None] & (ks[None, :] < K), other=0.0)


@triton.jit
def _load_norm_weight(norm_weight_ptr, k0, K, BLOCK_K: tl.constexpr):
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(norm_weight_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _load_row_slice(x_ptr, residual_ptr, rows, k0, K, stride_xm, row_valid, dtype: tl.constexpr,
                    BLOCK_K: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    # x[:, k0:k0 + BLOCK_K] (+ residual, the sum rounded to dtype as torch adds) in float32, zeros past K
    ks = k0 + tl.arange(0, BLOCK_K)[None, :]
    offsets = rows[:, None] * stride_xm + ks
    mask = row_valid & (ks < K)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        x = (x + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    return x


def gemv_is_faster(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> bool:
    """Whether `gemv` computes F.linear(x, weight) (gated: of silu_and_mul(x)) faster than cuBLAS: one or two rows,
    few output columns, contiguous rows."""
    n, k = weight.shape
    return (x.dim() == 2 and x.size(0) <= GEMV_MAX_ROWS and x.size(1) == (2 * k if gated else k)
            and n <= GEMV_MAX_COLUMNS and x.stride(-1) == 1 and weight.stride(-1) == 1)


def gemv_fuses_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` with a norm beats RMSNorm's kernel then cuBLAS: a single row (a batch-1 decode step), where
    the saved launch outweighs cuBLAS's edge on the wide qkv and gate_up projections."""
    return x.dim() == 2 and x.size(0) == 1 and x.is_contiguous() and weight.stride(-1) == 1


def _block_k(k: int) -> int:
    return min(GEMV_MAX_BLOCK_K, triton.next_power_of_2(k))


def gemv(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """F.linear(x, weight), no bias, for x [M, K] (a few rows) and weight [N, K] (gated: of silu_and_mul(x [M, 2K]))."""
    m, n, k = x.size(0), weight.size(0), weight.size(1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), M_PAD=triton.next_power_of_2(m),
        BLOCK_N=GEMV_BLOCK_N, BLOCK_K=_block_k(k), GATED=gated, num_warps=GEMV_WARPS, num_stages=1,
        **pdl.launch_kwargs(x.device))
    return out


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rms_norm(x (+ residual)), weight), x (+ residual)) in one kernel, for `gemv_fuses_norm` shapes."""
    m, n, k = x.size(0), weight.size(0), weight.size(1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual_out = x if residual is None else torch.empty_like(x)
    gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), residual, norm_weight, residual_out,
        eps, M_PAD=triton.next_power_of_2(m), NORM=True, ADD_RESIDUAL=residual is not None, BLOCK_N=GEMV_BLOCK_N,
        BLOCK_K=_block_k(k), num_warps=GEMV_WARPS, num_stages=1, **pdl.launch_kwargs(x.device),
        **({"maxnreg": NORM_GEMV_MAX_REGISTERS} if NORM_GEMV_MAX_REGISTERS and k <= NORM_GEMV_CAPPED_MAX_K else {}))
    return out, residual_out
