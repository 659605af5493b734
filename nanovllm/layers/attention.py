import importlib
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels import paged_attention_torch
from nanovllm.kernels.paged_attention_torch import FP8, FP8_MAX
from nanovllm.utils.context import get_context

BACKEND_MODULES = {
    "torch": "nanovllm.kernels.paged_attention_torch",
    "triton": "nanovllm.kernels.paged_attention_triton",
    "flash_attn": "nanovllm.kernels.paged_attention_flash",
}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention_backend(name: str, device: str, kv_cache_dtype: str = "auto") -> str:
    """Turn `attention_backend="auto"` into a concrete backend and refuse one that cannot run here."""
    if name == "auto":
        if device != "cuda":
            return "torch"
        return "flash_attn" if flash_attn_available() and kv_cache_dtype != "fp8" else "triton"
    if name in ("triton", "flash_attn") and device != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA GPU; on {device} use 'torch' or 'auto'")
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention_backend='flash_attn' needs the flash-attn package, which is not installed; "
                         "use 'triton' or 'auto'")
    return name


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, backend: str) -> torch.dtype:
    """The KV cache's element type: the model's for "auto", float8_e4m3fn for "fp8" where the backend can run it."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if backend == "flash_attn":
        raise ValueError("kv_cache_dtype='fp8' does not run on the flash_attn backend; use attention_backend='triton'")
    if backend == "triton" and (capability := torch.cuda.get_device_capability()) < (8, 9):
        raise ValueError(f"kv_cache_dtype='fp8' on the Triton backend needs a GPU of compute capability 8.9 or newer "
                         f"(Ada, Hopper), this one is {capability}; use kv_cache_dtype='auto'")
    return FP8


def load_attention_backend(name: str):
    """The module implementing `store_kvcache`, `prefill`, `decode` and `check_block_size` for a backend."""
    return importlib.import_module(BACKEND_MODULES[name])


@dataclass(slots=True)
class KVStore:
    """What a kernel needs to write one step's K and V (rotated K, and v) to a layer's paged cache: slot
    slot_mapping[i] for token i (-1: none); an fp8 cache holds K / k_scale and V / v_scale."""
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor


class Attention(nn.Module):
    """Attention over the paged KV cache: stores this step's K/V, then attends through the block tables."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.backend = paged_attention_torch
        self.k_cache = self.v_cache = torch.tensor([])
        # An fp8 cache holds K / k_scale and V / v_scale (see set_kv_scales): device tensors, not Python floats,
        # so that CUDA graphs read the calibrated values; two views of kv_scales, which one copy_ sets.
        self.kv_scales = torch.ones(2, dtype=torch.float32)
        self.k_scale, self.v_scale = self.kv_scales.unbind()
        self.kv_amax = torch.zeros(2, dtype=torch.float32)      # of K and V, as measured by warm-up forwards

    def kv_store(self, v: torch.Tensor) -> "KVStore | None":
        """Where the rotary kernel may write this step's K and V itself (saving the store's launch): on CUDA, with
        a cache, for the backends whose store is our Triton kernel. None: `forward` stores them."""
        if not v.is_cuda or self.k_cache.numel() == 0 or self.backend is paged_attention_torch:
            return None
        return KVStore(v, self.k_cache, self.v_cache, get_context().slot_mapping, self.k_scale, self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = False) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]. `stored`: K and V are in the cache
        already (written through `kv_store`)."""
        ctx = get_context()
        if self.k_cache.numel() == 0:   # the warm-up that measures activation memory runs before the cache exists
            self.kv_amax = torch.maximum(self.kv_amax, torch.stack([k.abs().amax(), v.abs().amax()]).float())
            return paged_attention_torch.varlen_causal_attention(q, k, v, ctx.cu_seqlens_q, self.scale)
        scales = self.k_scale, self.v_scale
        if not stored:
            self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, *scales)
        if ctx.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, ctx, self.scale, *scales)
        return self.backend.decode(q, self.k_cache, self.v_cache, ctx, self.scale, *scales)


KV_SCALE_HEADROOM = 4.0


def set_kv_scales(layers: list[Attention]) -> None:
    """Per layer, scales mapping KV_SCALE_HEADROOM x the amax of K (of V) seen by the warm-up forward to 448, fp8's
    largest value; 1.0 (vLLM's default) where nothing was measured. Only fp8 caches read them.

    Why: e4m3 rounds its whole normal range with the same relative error (at most 2^-4), so a power-of-two headroom
    changes no rounding there; it only lets values ~28,000 / headroom x below the largest fall into subnormals,
    while a value past 448 * scale would saturate: activations may exceed the warm-up's amax 4x unclipped. Per
    tensor, not per head: one multiply per row in the kernels."""
    for layer in layers:
        layer.kv_scales.copy_(torch.where(layer.kv_amax > 0, layer.kv_amax * KV_SCALE_HEADROOM / FP8_MAX, 1.0))
