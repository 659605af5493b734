import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.context import get_context
from nanovllm.utils.parallel import tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over ranks: each rank looks up its own ids, then all-reduce.
    Any vocabulary splits: the last rank's rows past it are zero, never looked up, and cut from the logits."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        # ceil(vocab / tp), not rounded up to a multiple of 64 as in vLLM: no kernel here needs the alignment,
        # and real vocabularies (Qwen's 151936) are multiples of 128 already, so only odd toy sizes get padding.
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.rows_per_rank * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        expected = (self.num_embeddings, param.size(1))     # the whole table, so every rank sees a wrong one
        if loaded.shape != expected:
            raise ValueError(f"expected a tensor of shape {expected}, got {tuple(loaded.shape)}")
        shard = loaded[self.vocab_start:self.vocab_start + self.rows_per_rank]   # short on the last rank
        param.data[:len(shard)].copy_(shard)
        param.data[len(shard):].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        local = x - self.vocab_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        y = F.embedding(local * mine, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, split like the embedding; rank 0 gathers the full logits."""

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The logits of the rows to sample (rank 0; None on the others), written into `out` if given (one GPU)."""
        ctx = get_context()
        if ctx.is_prefill:      # only each sequence's last token is sampled
            x = x[ctx.cu_seqlens_q[1:] - 1].contiguous()
        if self.tp_size == 1:
            return torch.matmul(x, self.weight.t(), out=out)
        logits = F.linear(x, self.weight)
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, parts, 0)
        return torch.cat(parts, -1)[:, :self.num_embeddings] if self.tp_rank == 0 else None   # drop the padding
