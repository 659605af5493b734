"""Linear layers split over tensor-parallel ranks as Megatron does: column-parallel layers split the output
features (no communication), row-parallel layers split the input features and all-reduce the partial sums.
Each parameter carries a `weight_loader` that copies this rank's shard out of the full checkpoint tensor."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.activation import SiluAndMul
from nanovllm.utils.loader import copy_shard
from nanovllm.utils.parallel import tp_rank, tp_size


SWIGLU = SiluAndMul()     # stateless: the Triton kernel on CUDA, the torch code elsewhere


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
    """F.linear of x (gated: of silu(gate) * up, x holding [gate | up]), or on CUDA the Triton GEMV where it beats
    cuBLAS (a batch-1 or -2 decode step's row-parallel layers, see kernels/gemv.py), the gate fused into it."""
    if x.is_cuda and bias is None:  # imported here: Triton is installed only on Linux, and only CUDA needs it
        from nanovllm.kernels import gemv
        if gemv.gemv_is_faster(x, weight, gated):
            return gemv.gemv(x, weight, gated)
    return F.linear(SWIGLU(x) if gated else x, weight, bias)


def norm_and_linear(norm: nn.Module, layer: "LinearBase", x: torch.Tensor, residual: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(norm(x + residual)), x + residual): a block's pre-norm and first projection (residual None: x alone).
    In a batch-1 step on CUDA one GEMV kernel does both (kernels/gemv.py): one launch a block less."""
    if x.is_cuda and layer.bias is None and (residual is None or residual.is_contiguous()):
        from nanovllm.kernels import gemv   # imported here: Triton is installed only on Linux
        if gemv.gemv_fuses_norm(x, layer.weight):
            return gemv.norm_gemv(x, residual, norm.weight, norm.eps, layer.weight)
    normed, residual = (norm(x), x) if residual is None else norm(x, residual)
    return layer(normed), residual


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.register_parameter("bias", nn.Parameter(torch.empty(output_size)) if bias else None)
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        if self.tp_size > 1:
            size = param.size(self.tp_dim)
            loaded = loaded.narrow(self.tp_dim, self.tp_rank * size, size)
        copy_shard(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# Config refuses a tensor_parallel_size that does not divide the heads and the intermediate size, before any layer
# is built: the sizes split below are multiples of those.
class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size // tp_size(), bias, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up; q, k and v)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int):
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        copy_shard(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections (shards 0, 1 and 2) in one matmul; each rank holds its own query and KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        self.num_heads, self.num_kv_heads = num_heads // tp_size(), num_kv_heads // tp_size()
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias)


class RowParallelLinear(LinearBase):
    """`gated_input`: the input is [gate | up], taken as silu(gate) * up (SwiGLU, in the MLP's down projection)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gated_input: bool = False):
        super().__init__(input_size // tp_size(), output_size, bias, 1)
        self.gated_input = gated_input

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        if param.dim() == 1:        # the bias is added once, on rank 0, after the all-reduce would double it
            copy_shard(param, loaded if self.tp_rank == 0 else torch.zeros_like(loaded))
        else:
            super().weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.gated_input)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
