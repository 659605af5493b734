import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:     # the CPU path and the CUDA kernel's reference
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """SwiGLU's gate: silu(x[..., :d]) * x[..., d:] for the packed gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:   # imported here: Triton is installed only on Linux, and only CUDA needs it
            from nanovllm.kernels import fused_layers
            return fused_layers.silu_and_mul(x)
        return silu_and_mul(x)
