import threading
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Context:
    """Attention metadata for the current step: the arrays of its StepBatch on the device (slot_mapping -1: store
    nothing), set by the ModelRunner and read by every Attention layer. `backend` (an AttentionBackend) attends;
    its `prepare` may add what it derives once per step (cu_seqlens_k, decode_order)."""
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    has_cached_prefix: bool = False
    num_decode_seqs: int = 0    # a prefill's leading one-token sequences (the step's decodes), attended as a decode
    backend: object = None
    cu_seqlens_k: torch.Tensor | None = None
    decode_order: torch.Tensor | None = None


# One current step per thread: an engine steps in the thread that calls it, so engines in different threads (or a
# server's engine loop beside its handlers) never read each other's step.
_EMPTY = Context()
_current = threading.local()


def get_context() -> Context:
    return getattr(_current, "ctx", _EMPTY)


def set_context(ctx: Context) -> None:
    if ctx.backend is not None:
        ctx.backend.prepare(ctx)
    _current.ctx = ctx


def reset_context() -> None:
    set_context(Context())
