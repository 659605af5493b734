import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.context import get_context
from nanovllm.utils.parallel import tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over ranks: each rank looks up its own ids, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        if num_embeddings % self.tp_size:
            raise ValueError(f"vocab size {num_embeddings} is not divisible by tensor_parallel_size {self.tp_size}")
        self.num_embeddings = num_embeddings
        self.rows_per_rank = num_embeddings // self.tp_size
        self.vocab_start = self.rows_per_rank * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        shard = loaded.narrow(0, self.vocab_start, self.rows_per_rank)
        if shard.shape != param.shape:
            raise ValueError(f"expected a tensor of shape {tuple(param.shape)}, got {tuple(shard.shape)}")
        param.data.copy_(shard)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        ctx = get_context()
        if ctx.is_prefill:      # only each sequence's last token is sampled
            x = x[ctx.cu_seqlens_q[1:] - 1].contiguous()
        logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, parts, 0)
        return torch.cat(parts, -1) if self.tp_rank == 0 else None
