import importlib

import torch
from torch import nn

from nanovllm.kernels import paged_attention_torch
from nanovllm.utils.context import get_context

BACKEND_MODULES = {
    "torch": "nanovllm.kernels.paged_attention_torch",
    "triton": "nanovllm.kernels.paged_attention_triton",
    "flash_attn": "nanovllm.kernels.paged_attention_flash",
}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention_backend(name: str, device: str) -> str:
    """Turn `attention_backend="auto"` into a concrete backend and refuse one that cannot run here."""
    if name == "auto":
        if device != "cuda":
            return "torch"
        return "flash_attn" if flash_attn_available() else "triton"
    if name in ("triton", "flash_attn") and device != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA GPU; on {device} use 'torch' or 'auto'")
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention_backend='flash_attn' needs the flash-attn package, which is not installed; "
                         "use 'triton' or 'auto'")
    return name


def load_attention_backend(name: str):
    """The module implementing `store_kvcache`, `prefill`, `decode` and `check_block_size` for a backend."""
    return importlib.import_module(BACKEND_MODULES[name])


class Attention(nn.Module):
    """Attention over the paged KV cache: stores this step's K/V, then attends through the block tables."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.backend = paged_attention_torch
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]."""
        ctx = get_context()
        if self.k_cache.numel() == 0:   # the warm-up that measures activation memory runs before the cache exists
            return paged_attention_torch.varlen_causal_attention(q, k, v, ctx.cu_seqlens_q, self.scale)
        self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, ctx, self.scale)
        return self.backend.decode(q, self.k_cache, self.v_cache, ctx, self.scale)
