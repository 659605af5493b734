import math

import torch
from torch import nn


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor,
                 sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The CPU path and the CUDA kernel's reference: rotation in float32, the result in q's and k's dtype.
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """The rotation frequencies under a checkpoint's RoPE scaling. "linear" slows every frequency by `factor`.
    "llama3" (Llama 3.1/3.2) leaves the fast ones (wavelength below original_max_position_embeddings /
    high_freq_factor) alone, slows those of wavelength above original / low_freq_factor by `factor`, and blends the
    two in between, linearly in original / wavelength."""
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    original, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                 "high_freq_factor"))
    ratio = original * inv_freq / (2 * math.pi)        # original context / wavelength
    blend = ((ratio - low) / (high - low)).clamp(0, 1)     # 0: slow by factor, 1: keep
    return inv_freq / factor * (1 - blend) + inv_freq * blend


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form, as Qwen and Llama use) from a precomputed float32 cos/sin table.
    On CUDA the Attention layer applies the tables in its fused q/k kernel; this forward is the torch path."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), scaled_inv_freq(inv_freq, scaling))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [tokens, heads, head_dim]; positions: [tokens]."""
        return apply_rotary(positions, q, k, self.cos, self.sin)
