import torch
from torch import nn

from nanovllm.kernels.paged_attention_torch import FP8_MAX, varlen_causal_attention
from nanovllm.layers.attention_backends import PagedKV
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Self-attention over the paged KV cache, from q, k, v to the heads' outputs: q/k RMSNorm per head (Qwen3),
    the rotary embedding, the store of this step's K/V, and attention through the step's backend. On CUDA one
    kernel norms and rotates q and k, and also stores K/V where the backend's store is ours (`fuses_kv_store`)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary_emb: RotaryEmbedding,
                 qk_norm_eps: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rotary_emb = rotary_emb
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.kv: PagedKV | None = None      # this layer's share of the cache, once the runner has allocated it
        # An fp8 cache holds K / k_scale and V / v_scale (see set_kv_scales): two views of kv_scales, which one
        # copy_ sets; kv_amax is what the warm-up forwards measured of K and V.
        self.kv_scales = torch.ones(2, dtype=torch.float32)
        self.k_scale, self.v_scale = self.kv_scales.unbind()
        self.kv_amax = torch.zeros(2, dtype=torch.float32)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [tokens, heads * head_dim], k and v [tokens, kv_heads * head_dim] (views of the packed qkv
        projection are fine) -> [tokens, heads * head_dim]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k, v = (x.view(-1, self.num_kv_heads, self.head_dim) for x in (k, v))
        ctx = get_context()
        stored = q.is_cuda and self.kv is not None and ctx.backend.fuses_kv_store
        q, k = self._norm_and_rotate(positions, q, k, (v, self.kv, ctx.slot_mapping) if stored else None)
        if self.kv is None:     # the warm-up that measures activation memory (and K/V for fp8) runs before the cache
            self.kv_amax = torch.maximum(self.kv_amax, torch.stack([k.abs().amax(), v.abs().amax()]).float())
            return varlen_causal_attention(q, k, v, ctx.cu_seqlens_q, self.scale).flatten(1)
        if not stored:
            ctx.backend.store_kvcache(k, v, self.kv, ctx.slot_mapping)
        if ctx.is_prefill:
            return ctx.backend.prefill(q, k, v, self.kv, ctx, self.scale).flatten(1)
        return ctx.backend.decode(q, self.kv, ctx, self.scale).flatten(1)

    def _norm_and_rotate(self, positions, q, k, store) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.rotary_emb
        if q.is_cuda:   # imported here: Triton is installed only on Linux, and only CUDA needs it
            from nanovllm.kernels import fused_layers
            norm = {} if self.q_norm is None else dict(q_weight=self.q_norm.weight, k_weight=self.k_norm.weight,
                                                       eps=self.q_norm.eps)
            return fused_layers.qk_norm_rotary(positions, q, k, rotary.cos, rotary.sin, store=store, **norm)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotary(positions, q, k)

    def set_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.kv = PagedKV(k_cache, v_cache, self.k_scale, self.v_scale)


# e4m3 rounds its whole normal range with the same relative error (at most 2^-4), so a power-of-two headroom changes
# no rounding there; it only lets values ~28,000 / headroom x below the largest fall into subnormals, while a value
# past 448 * scale would saturate: activations may exceed the warm-up's amax 4x unclipped.
KV_SCALE_HEADROOM = 4.0


def set_kv_scales(layers: list[Attention]) -> None:
    """Per layer, scales mapping KV_SCALE_HEADROOM x the amax of K (of V) seen by the warm-up forward to 448, fp8's
    largest value; 1.0 (vLLM's default) where nothing was measured. Only fp8 caches read them. Per tensor, not per
    head: one multiply per row in the kernels."""
    for layer in layers:
        layer.kv_scales.copy_(torch.where(layer.kv_amax > 0, layer.kv_amax * KV_SCALE_HEADROOM / FP8_MAX, 1.0))
