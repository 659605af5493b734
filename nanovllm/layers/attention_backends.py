"""Attention backends: how the Attention layers store K/V into the paged cache and attend over it. Each backend is
a class behind the contract of `AttentionBackend`, listed in `BACKENDS`; adding one (FlashInfer, say) is a class
here. Cache layout (every backend): k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]; the token at
position p of a sequence lives in block block_table[p // block_size], row p % block_size."""
import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from nanovllm.kernels import paged_attention_torch as reference
from nanovllm.utils.context import Context


@dataclass(slots=True)
class PagedKV:
    """One layer's share of the paged cache, with the scales an fp8 cache is read with (see set_kv_scales)."""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor


class AttentionBackend:
    """The contract. `check` runs before the engine builds anything and raises a ValueError saying what cannot run
    and what to pass instead. The runner calls `prepare` once per step (inside the capture for a CUDA graph), before
    any layer; the layers then call `store_kvcache` (unless the rotary kernel stored K/V itself: `fuses_kv_store`),
    then `prefill` (new tokens over their cached prefix and themselves) or `decode` (one query a row over its
    context_lens[i] cached tokens; rows may share a sequence and read the keys this step stored: a prefill run as
    token rows), which return [tokens, heads, head_dim]. The base class runs `kernels`, paged_attention_torch."""
    name: ClassVar[str]
    needs_cuda: ClassVar[bool] = True
    supports_fp8: ClassVar[bool] = False        # can read and write a float8_e4m3fn cache
    supports_cuda_graphs: ClassVar[bool] = True     # decode never syncs with the host, so it can be captured
    fuses_kv_store: ClassVar[bool] = False      # its store is our Triton kernel, which the rotary kernel runs inline
    kernels = reference

    @classmethod
    def check(cls, device: str, block_size: int, fp8: bool) -> None:
        if cls.needs_cuda and device != "cuda":
            raise ValueError(f"attention_backend={cls.name!r} needs a CUDA GPU; on {device} use 'torch' or 'auto'")
        if fp8 and not cls.supports_fp8:
            raise ValueError(f"kv_cache_dtype='fp8' does not run on the {cls.name} backend; "
                             f"use attention_backend='triton'")

    def prepare(self, ctx: Context) -> None:
        """Derive, once per step, what every layer would otherwise derive again (written into `ctx`)."""

    def store_kvcache(self, k: torch.Tensor, v: torch.Tensor, kv: PagedKV, slot_mapping: torch.Tensor) -> None:
        self.kernels.store_kvcache(k, v, kv.k_cache, kv.v_cache, slot_mapping, kv.k_scale, kv.v_scale)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKV, ctx: Context,
                scale: float) -> torch.Tensor:
        # The step's leading one-token sequences (decodes beside prompts) go through decode, which reads a KV head
        # once for its whole group of query heads, where prefill reads it once a query head.
        out, d = torch.empty_like(q), ctx.num_decode_seqs
        if d:
            self.kernels.paged_decode_attention(q[:d], kv.k_cache, kv.v_cache, ctx.context_lens[:d],
                                                ctx.block_tables[:d], scale, out=out[:d], k_scale=kv.k_scale,
                                                v_scale=kv.v_scale)
        if d < len(ctx.context_lens):
            self.kernels.paged_prefill_attention(q, kv.k_cache, kv.v_cache, ctx.cu_seqlens_q[d:], ctx.context_lens[d:],
                                                 ctx.block_tables[d:], scale, ctx.max_seqlen_q or None, out=out,
                                                 k_scale=kv.k_scale, v_scale=kv.v_scale)
        return out

    def decode(self, q: torch.Tensor, kv: PagedKV, ctx: Context, scale: float) -> torch.Tensor:
        return self.kernels.paged_decode_attention(q, kv.k_cache, kv.v_cache, ctx.context_lens, ctx.block_tables,
                                                   scale, k_scale=kv.k_scale, v_scale=kv.v_scale,
                                                   seq_order=ctx.decode_order)


class TorchBackend(AttentionBackend):
    """Plain PyTorch (kernels/paged_attention_torch.py) on any device; its store syncs with the host: no CUDA graph."""
    name, needs_cuda, supports_fp8, supports_cuda_graphs = "torch", False, True, False


class TritonBackend(AttentionBackend):
    """Our Triton kernels (kernels/paged_attention_triton.py): the default on CUDA."""
    name, supports_fp8, fuses_kv_store = "triton", True, True

    @classmethod
    def check(cls, device: str, block_size: int, fp8: bool) -> None:
        super().check(device, block_size, fp8)
        from nanovllm.kernels import paged_attention_triton    # imported here: Triton is installed only on Linux
        paged_attention_triton.check_block_size(block_size)
        if fp8 and (capability := torch.cuda.get_device_capability()) < (8, 9):
            raise ValueError(f"kv_cache_dtype='fp8' on the Triton backend needs a GPU of compute capability 8.9 or "
                             f"newer (Ada, Hopper), this one is {capability}; use kv_cache_dtype='auto'")

    def __init__(self):
        from nanovllm.kernels import paged_attention_triton
        self.kernels = paged_attention_triton

    def prepare(self, ctx):
        if not ctx.is_prefill:
            ctx.decode_order = self.kernels.decode_order(ctx.context_lens)


class FlashAttnBackend(AttentionBackend):
    """flash-attn's kernels (our Triton store). An explicit choice only: it has no wheel on the package registry and
    has never run in this project's GPU tests, so "auto" never picks it. Its paged cache has our layout with int32
    metadata; with causal=True and more keys than queries it aligns the mask bottom-right, as our kernels do."""
    name, fuses_kv_store = "flash_attn", True

    @classmethod
    def check(cls, device: str, block_size: int, fp8: bool) -> None:
        super().check(device, block_size, fp8)
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attention_backend='flash_attn' needs the flash-attn package, which is not installed; "
                             "use 'triton' or 'auto'")
        if block_size % 256:
            raise ValueError(f"the flash_attn backend needs kvcache_block_size to be a multiple of 256 "
                             f"(flash-attn's paged-KV requirement), got {block_size}; use attention_backend='triton'")

    def __init__(self):
        import flash_attn
        from nanovllm.kernels import paged_attention_triton    # its store
        self.flash, self.kernels = flash_attn, paged_attention_triton

    def prepare(self, ctx):
        """flash-attn takes int32 lengths and tables (the decode inputs are int64) and the keys' offsets."""
        ctx.context_lens, ctx.block_tables = ctx.context_lens.int(), ctx.block_tables.int()
        ctx.cu_seqlens_k = F.pad(torch.cumsum(ctx.context_lens, 0, dtype=torch.int32), (1, 0))

    def prefill(self, q, k, v, kv, ctx, scale):
        # Without a cached prefix the new K/V are all the keys: attend to them directly, no cache reads.
        paged = ctx.has_cached_prefix
        return self.flash.flash_attn_varlen_func(
            q, *((kv.k_cache, kv.v_cache) if paged else (k, v)), cu_seqlens_q=ctx.cu_seqlens_q,
            cu_seqlens_k=ctx.cu_seqlens_k if paged else ctx.cu_seqlens_q, max_seqlen_q=ctx.max_seqlen_q,
            max_seqlen_k=ctx.max_seqlen_k if paged else ctx.max_seqlen_q, softmax_scale=scale, causal=True,
            block_table=ctx.block_tables if paged else None)

    def decode(self, q, kv, ctx, scale):
        return self.flash.flash_attn_with_kvcache(q.unsqueeze(1), kv.k_cache, kv.v_cache,
                                                  cache_seqlens=ctx.context_lens, block_table=ctx.block_tables,
                                                  softmax_scale=scale, causal=True).squeeze(1)


BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (TorchBackend, TritonBackend, FlashAttnBackend)}
BACKEND_CHOICES = ("auto", *BACKENDS)


def select_attention_backend(name: str, device: str, block_size: int, kv_cache_dtype: str) -> AttentionBackend:
    """The backend `name` picks ("auto": Triton on CUDA, torch elsewhere); a ValueError where it cannot run."""
    if not isinstance(name, str) or name not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {BACKEND_CHOICES}, got {name!r}")
    cls = BACKENDS[("triton" if device == "cuda" else "torch") if name == "auto" else name]
    cls.check(device, block_size, kv_cache_dtype == "fp8")
    return cls()
