import torch
from torch import nn

from nanovllm.utils.compile import compile_on_cuda


@compile_on_cuda
def sample(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperatures.clamp_min(1e-5).unsqueeze(1), dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race), with no sort and no host sync.
    sampled = probs.div_(torch.empty_like(probs).exponential_(1).clamp_min_(1e-10)).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy, sampled)


class Sampler(nn.Module):
    """Picks one token per row: argmax where temperature is 0, else a draw from softmax(logits / temperature)."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        return sample(logits, temperatures)
