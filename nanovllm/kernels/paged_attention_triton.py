"""The launch side of the "triton" backend (the default on CUDA): paged_attention_torch's functions (the reference
they are tested against) on our kernels in triton_attention_kernels.py, choosing their tiles, grids and splits.

Rules the kernels rely on (checked here, with a ValueError that says which):
- kvcache_block_size is a power of two >= 16: KV tiles (a power of two, at most a page) then never straddle a
  page, so each tile needs a single block-table lookup, and tl.dot gets tiles of at least 16 rows.
- head_dim is a power of two >= 16 (tl.arange needs a power of two; tl.dot needs an inner dimension >= 16).
- Caches have a contiguous layout (k_cache/v_cache as allocated by the ModelRunner).
- An fp8 (float8_e4m3fn) cache needs k_scale and v_scale, float32 device tensors; the other caches ignore them."""
import functools
from typing import NamedTuple

import torch
import triton

from nanovllm.kernels import pdl, triton_attention_kernels as kernels

LOG2E = 1.4426950408889634

# Launch parameters, chosen for head_dim 128 / bf16 on an H100 (benchmarks/lab/prefill_sweep.py times prefill's).
# Prefill is compute-bound: 64x64 tiles keep short prompts from wasting rows and fit 3 pipeline stages.
PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_WARPS, PREFILL_STAGES = 64, 64, 4, 3


class DecodeLaunch(NamedTuple):
    block_n: int                    # KV tile, tokens
    warps: int
    stages: int                     # Triton's shared-memory pipeline depth
    widen: str = ""                 # fp8: which of "k", "v" are widened in registers (kernels._widen)
    max_registers: int | None = None    # a thread's registers (Triton's maxnreg): below Triton's choice, values
                                        # spill, but more programs fit an SM's 64K registers
    query_fp8: bool = False         # fp8: the query rounded to e4m3 (kernels._query_in_fp8), so q @ K^T is an fp8 dot
    keys_major: bool = False        # the dots with the keys as rows (kernels._attend_kv_tiles_keys_major)
    weights_fp8: bool = False       # fp8 and keys_major: the softmax weights in e4m3, so P V is an fp8 dot


# Decode is bandwidth-bound; launch by the cache's element size, from benchmarks/decode_sweep.py on the H100 at
# batches 256..32 (docs/BENCHMARK_LOG.md): a 16-bit cache 128-token tiles, 2 stages (the next tile loads during the
# current one), 2.81 TB/s at batch 256. An fp8 cache: 128-token tiles whose V is widened in registers, 168
# registers a thread so that three programs share an SM (two at the 180-207 Triton picks; a few spill), 2.34 TB/s
# of fp8 bytes at batch 256 against 2.17-2.20 without. float32 needs the smaller tiles to fit shared memory.
DECODE_LAUNCH = {2: DecodeLaunch(128, 4, 2), 1: DecodeLaunch(128, 4, 2, widen="v", max_registers=168),
                 4: DecodeLaunch(64, 4, 3)}
# Up to DECODE_FEW_PROGRAMS (sequence, KV head) pairs a decode step is latency-bound (a batch-1 step's few programs
# each wait on one tile's load): tiles of at most DECODE_FEW_PROGRAMS_TILE_BYTES of K (64 tokens of a 128-dim
# bfloat16 head) finish sooner, though a bandwidth-bound step is faster with the launch's tiles.
DECODE_FEW_PROGRAMS, DECODE_FEW_PROGRAMS_TILE_BYTES = 32, 16384
DECODE_PROGRAMS_PER_SM = 4      # split decode until batch * kv_heads * splits covers this many programs per SM
DECODE_MAX_SPLITS = 64
DECODE_ORDER_MIN_BATCH = 32     # decode_order: below this the rows are not sorted (one sort a step for no tail)


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton attention backend needs kvcache_block_size to be a power of two >= 16 "
                         f"(KV tiles must not straddle a page and tl.dot needs 16-row tiles), got {block_size}")


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton attention backend needs head_dim to be a power of two >= 16, got {head_dim}")
    check_block_size(k_cache.shape[1])
    if q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[-2]} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if not k_cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous")


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models (the tiny test checkpoints) must not lose bits to TF32; other dtypes ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Write row j of key/value ([N, kv_heads, head_dim], any row/head strides) to cache slot slot_mapping[j];
    slot -1 (padding) is skipped on the GPU, without a host sync, so the call can be graph-captured."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    kernels.store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, KV_FP8=k_cache.dtype == torch.float8_e4m3fn)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_seqlen_q: int | None = None, *, out: torch.Tensor | None = None,
                            k_scale=None, v_scale=None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (q: [N, heads, head_dim]) over its cached + new K/V, into
    `out` if given (q's shape, contiguous). max_seqlen_q (the longest q_len, which the step's Context carries) sizes
    the grid; without it it is read from cu_seqlens_q at the cost of one host sync."""
    _check_shapes(q, k_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, block_size = cu_seqlens_q.numel() - 1, k_cache.shape[1]
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    q = _last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    kernels.prefill_kernel[(triton.cdiv(max_seqlen_q, PREFILL_BLOCK_M), num_seqs, num_heads)](
        q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables,
        scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=min(PREFILL_BLOCK_N, block_size), DOT_PRECISION=_dot_precision(q.dtype),
        k_scale_ptr=k_scale, v_scale_ptr=v_scale, KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES)
    return out


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1        # the CPU interpreter runs programs one by one; more splits would only cost time
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_launch(kv_dtype: torch.dtype) -> DecodeLaunch:
    return DECODE_LAUNCH[kv_dtype.itemsize]


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """How many programs share each sequence's KV range, from shapes only (so a CUDA graph can capture it).
    One program per (sequence, KV head) leaves most SMs idle at small batch (8 x 8 = 64 programs on 132 SMs);
    splitting until about DECODE_PROGRAMS_PER_SM programs per SM exist keeps memory busy, and costs only a small
    merge. No more splits than KV tiles in the longest possible context, so a split is never empty by shape."""
    splits = triton.cdiv(DECODE_PROGRAMS_PER_SM * _num_sms(device), batch * num_kv_heads)
    return max(1, min(splits, triton.cdiv(max_context, block_n), DECODE_MAX_SPLITS))


def decode_order(context_lens: torch.Tensor) -> torch.Tensor | None:
    """The rows longest context first, for paged_decode_attention's seq_order, or None where the order cannot
    matter. A batch's decode programs run in several waves from DECODE_ORDER_MIN_BATCH sequences on; started in
    row order, a long context drawn late runs alone at the end (longest-processing-time-first scheduling keeps
    that tail short). A device sort, one kernel a step: no host sync, so it can be captured in a CUDA graph."""
    return torch.argsort(context_lens, descending=True) if context_lens.numel() >= DECODE_ORDER_MIN_BATCH else None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, *,
                           out: torch.Tensor | None = None, num_splits: int | None = None, k_scale=None,
                           v_scale=None, seq_order: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence (q: [B, heads, head_dim]) over its first context_lens[b] cached tokens.
    Split-KV (flash-decoding): num_splits (decode_num_splits' unless given) partial results per row, merged by
    log-sum-exp in a second kernel. No host sync and a grid from shapes only, so it is graph-capturable; rows with
    context_len 0 (graph padding) give zeros. seq_order (decode_order's) only sets the order the rows start in."""
    _check_shapes(q, k_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    launch = decode_launch(k_cache.dtype)
    block_n = min(launch.block_n, block_size)
    if batch * num_kv_heads <= DECODE_FEW_PROGRAMS:     # latency-bound: smaller tiles (see the constant)
        block_n = min(block_n, max(16, DECODE_FEW_PROGRAMS_TILE_BYTES // (head_dim * k_cache.element_size())))
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, block_n, q.device)
    q = _last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    # One split: its normalised output is the answer, written in place with no merge.
    part_out = out.unsqueeze(2) if num_splits == 1 else torch.empty(batch, num_heads, num_splits, head_dim,
                                                                    dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    kernels.decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, context_lens, block_tables, k_scale, v_scale, scale * LOG2E,
        num_splits, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
        part_lse.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype),
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn, WIDEN_K="k" in launch.widen, WIDEN_V="v" in launch.widen,
        seq_order_ptr=seq_order, ORDERED=seq_order is not None, QUERY_FP8=launch.query_fp8,
        KEYS_MAJOR=launch.keys_major, WEIGHTS_FP8=launch.weights_fp8, num_warps=launch.warps,
        num_stages=launch.stages, **({"maxnreg": launch.max_registers} if launch.max_registers else {}),
        **pdl.launch_kwargs(q.device))
    if num_splits > 1:
        kernels.decode_merge_kernel[(batch, num_heads)](
            part_out, part_lse, out, context_lens, num_splits, part_out.stride(0), part_out.stride(1),
            part_out.stride(2), part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_N=block_n,
            **pdl.launch_kwargs(q.device))
    return out
