"""Paged attention in plain PyTorch (the cache layout of attention_backends.py): runs on any device, and is the
reference the fast kernels are tested against."""
import torch
import torch.nn.functional as F


# An fp8 cache holds K / k_scale and V / v_scale (per-layer float32 tensors, chosen by
# nanovllm.layers.attention.set_kv_scales); readers multiply by the scale. Other caches ignore the scales.
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max      # 448; e4m3fn has no inf, so anything larger must be clamped, not cast


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in fp8, clamped so an outlier saturates at +-448 instead of becoming NaN."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def round_query_fp8(q: torch.Tensor) -> torch.Tensor:
    """q [..., head_dim] rounded through e4m3 with one scale per row (its |max| / 448), as the Triton decode holds
    it with DecodeLaunch.query_fp8."""
    scale = q.float().abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, 1.0)
    return ((q.float() / scale).to(FP8).float() * scale).to(q.dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.float() * scale if x.dtype == FP8 else x


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Write row j of key/value ([N, kv_heads, head_dim]), quantized if fp8, to slot slot_mapping[j]; -1 skips."""
    valid = slot_mapping >= 0       # boolean indexing syncs with the host: this path is not graph-captured
    slots = slot_mapping[valid].long()
    for x, cache, scale in ((key[valid], k_cache, k_scale), (value[valid], v_cache, v_scale)):
        if cache.dtype == FP8:      # index_copy_ has no fp8 kernel on CPU: copy the bytes
            x, cache = quantize_fp8(x, scale).view(torch.uint8), cache.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)


def gather_kv(k_cache, v_cache, block_table, length: int, k_scale, v_scale) -> list[torch.Tensor]:
    """The first `length` tokens of one sequence's K and V, dequantized, in float32: [kv_heads, length, head_dim]."""
    blocks = block_table[:(length + k_cache.shape[1] - 1) // k_cache.shape[1]].long()
    return [dequantize(cache[blocks].flatten(0, 1)[:length], scale).transpose(0, 1).float()
            for cache, scale in ((k_cache, k_scale), (v_cache, v_scale))]


def _attend(q, k, v, scale, offset: int | None = 0):
    """Attention of q [Hq, Lq, D] over k/v [Hkv, Lk, D] (Hq a multiple of Hkv) through torch's fused kernel. Query j
    sits at key position offset + j and sees keys up to it (causal); offset None: sees all keys."""
    # Torch's fused kernels, flash on CUDA and on the CPU, take only 4-D inputs with as many K/V heads as query heads;
    # anything else, enable_gqa included, falls back to the math path, which builds every [Lq, Lk] score matrix: ~8x
    # slower on CPU.
    group = q.shape[0] // k.shape[0]
    q, k, v = q[None], k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None]
    mask = None if not offset else (
        torch.arange(q.shape[-2], device=q.device)[:, None] + offset >= torch.arange(k.shape[-2], device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=offset == 0, scale=scale)[0]


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, max_seqlen_q: int | None = None, *, out: torch.Tensor | None = None,
                            k_scale=None, v_scale=None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (q: [N, heads, head_dim]) over its cached + new K/V, into
    `out` if given. (max_seqlen_q: unused, as the Triton version takes it.)"""
    out = torch.empty_like(q) if out is None else out
    starts = cu_seqlens_q.tolist()
    for i, (start, end, context_len) in enumerate(zip(starts, starts[1:], context_lens.tolist())):
        k, v = gather_kv(k_cache, v_cache, block_tables[i], context_len, k_scale, v_scale)
        q_seq = q[start:end].transpose(0, 1).float()
        out[start:end] = _attend(q_seq, k, v, scale, context_len - (end - start)).transpose(0, 1)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, *,
                           out: torch.Tensor | None = None, k_scale=None, v_scale=None, seq_order=None
                           ) -> torch.Tensor:
    """One query token per sequence (q: [B, heads, head_dim]) over its first context_lens[b] cached tokens, into
    `out` if given; a row with no context gives zeros. Sequence by sequence: gathering only each one's blocks moves
    far fewer bytes than a batch padded to the longest. (seq_order: unused, as the Triton version takes it.)"""
    out = torch.zeros_like(q) if out is None else out.zero_()
    for i, context_len in enumerate(context_lens.tolist()):
        if context_len > 0:
            k, v = gather_kv(k_cache, v_cache, block_tables[i], context_len, k_scale, v_scale)
            out[i] = _attend(q[i].unsqueeze(1).float(), k, v, scale, None).squeeze(1)
    return out


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention over packed sequences with no cache at all, in their dtype; used by the memory-profiling
    warm-up, where the math path's score matrices (see _attend) would be a peak of activation memory that real steps
    never reach, which the KV cache would then be sized around."""
    out = torch.empty_like(q)
    starts = cu_seqlens.tolist()
    for start, end in zip(starts, starts[1:]):
        out[start:end] = _attend(*(x[start:end].transpose(0, 1) for x in (q, k, v)), scale).transpose(0, 1)
    return out
