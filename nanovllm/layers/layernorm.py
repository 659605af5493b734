import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm's CPU path, and the reference of the CUDA kernel (kernels/fused_layers.py)."""
    if residual is not None:
        x = residual = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, residual)


class RMSNorm(nn.Module):
    """weight * RMSNorm(x) over the last dimension in float32; with `residual`, (that of x + residual, x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:   # imported here: Triton is installed only on Linux, and only CUDA needs it
            from nanovllm.kernels import fused_layers
            return fused_layers.rms_norm(x, self.weight, self.eps, residual)
        return rms_norm(x, self.weight, self.eps, residual)
