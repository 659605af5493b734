"""Paged attention through flash-attn (used only when the flash_attn package is installed).

flash-attn's paged KV cache uses the same layout as ours ([num_blocks, block_size, kv_heads, head_dim] with
int32 block tables), so the caches and the Context's tensors are passed straight through. Storing K/V reuses
our Triton kernel. With causal=True and more keys than queries, flash-attn aligns the causal mask to the
bottom-right corner, which is exactly "query j of a sequence sits at position context_len - q_len + j".
"""
import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from nanovllm.kernels.paged_attention_triton import store_kvcache  # noqa: F401  (part of the backend interface)
from nanovllm.utils.context import Context


def check_block_size(block_size: int) -> None:
    """flash-attn's paged KV cache needs pages of a multiple of 256 tokens."""
    if block_size <= 0 or block_size % 256:
        raise ValueError(f"the flash_attn backend needs kvcache_block_size to be a multiple of 256 "
                         f"(flash-attn's paged-KV requirement), got {block_size}; use attention_backend='triton'")


def _cu_seqlens_k(ctx: Context) -> torch.Tensor:
    """Offsets of each sequence's keys, [0, len0, len0 + len1, ...] as int32, from the context lengths."""
    return F.pad(torch.cumsum(ctx.context_lens, 0, dtype=torch.int32), (1, 0))


# An fp8 cache is refused before this backend runs (layers.attention.kv_cache_torch_dtype): k_scale, v_scale
# are part of the interface but unused here.
def prefill(q, k, v, k_cache, v_cache, ctx: Context, scale: float, k_scale=None, v_scale=None) -> torch.Tensor:
    """Without any cached prefix the new K/V are all the keys: attend to them directly, no cache reads.
    Otherwise attend through the block tables to the cached prefix and the new tokens (stored just before)."""
    if not ctx.has_cached_prefix:
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=ctx.cu_seqlens_q,
                                      max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_q,
                                      softmax_scale=scale, causal=True)
    return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=_cu_seqlens_k(ctx),
                                  max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k,
                                  softmax_scale=scale, causal=True, block_table=ctx.block_tables)


def decode(q, k_cache, v_cache, ctx: Context, scale: float, k_scale=None, v_scale=None) -> torch.Tensor:
    """One query per sequence over its cached tokens; graph-capturable (no host sync)."""
    # The runner's decode inputs are int64 (one buffer); flash-attn takes int32 (a no-op when they are already).
    out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.context_lens.int(),
                                  block_table=ctx.block_tables.int(), softmax_scale=scale, causal=True)
    return out.squeeze(1)
