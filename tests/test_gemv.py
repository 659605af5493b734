"""The Triton GEMV (nanovllm/kernels/gemv.py) against F.linear, and the rule that sends a layer to it.

Without CUDA the kernel runs under Triton's CPU interpreter (tests/triton_interpreter.py) and is compiled for an
H100; with CUDA at Qwen3-0.6B's row-parallel shapes, eagerly and inside a CUDA graph.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels import gemv
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.layers.linear import QKVParallelLinear, RowParallelLinear, norm_and_linear
from tests.test_fused_layers import _PTXAS, compile_for_h100, nan_allocations
from tests.triton_interpreter import CUDA, INTERPRETING, run_check

DEVICE = torch.device("cuda" if CUDA else "cpu")


def check_gemv(m, n, k, dtype, gated=False):
    """gated: x is [gate | up] and the reference multiplies silu_and_mul(x), computed by torch in x's dtype."""
    torch.manual_seed(m * n + k)
    x = torch.randn(m, 2 * k if gated else k, device=DEVICE).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    with nan_allocations() as made:
        out = gemv.gemv(x, weight, gated)
    assert len(made) == 1 and out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all(), "an output element was left unwritten (NaN)"
    expected = F.linear((silu_and_mul(x) if gated else x).float(), weight.float())
    # float32 sums in another order; bf16 rounds the float32 result once (cuBLAS does the same)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(out.float(), expected, **tol)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_matches_linear(m, dtype, gated):
    run_check(check_gemv, m, 6, 2 * gemv.GEMV_MAX_BLOCK_K, dtype, gated)     # two K slices


@pytest.mark.parametrize("n,k", [(7, 576), (5, 1536)])     # off the tiles (SmolLM2's K), N odd
def test_gemv_masks_columns_and_k_off_the_tiles(n, k):
    run_check(check_gemv, 1, n, k, torch.float32)
    run_check(check_gemv, 2, n, k, torch.float32, True)


def check_norm_gemv(n, k, dtype, with_residual):
    """One row: RMSNorm(x + residual) then x @ W.T in one kernel, against the torch RMSNorm and F.linear; the new
    residual (x + residual, rounded once) exactly as torch adds it."""
    torch.manual_seed(n + k + with_residual)
    x, residual = (torch.randn(1, k, device=DEVICE) * 3).to(dtype), (torch.randn(1, k, device=DEVICE) * 3).to(dtype)
    norm_weight = (torch.randn(k, device=DEVICE) * 0.5 + 1).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    with nan_allocations():
        out, new_residual = gemv.norm_gemv(x, residual if with_residual else None, norm_weight, 1e-6, weight)
    assert torch.isfinite(out).all(), "an output element was left unwritten (NaN)"
    if with_residual:
        normed, expected_residual = rms_norm(x, norm_weight, 1e-6, residual)
        if CUDA or dtype == torch.float32:
            assert torch.equal(new_residual, expected_residual)
        else:   # the interpreter truncates float32 -> bf16 where a GPU rounds (tests/test_fused_layers.py)
            torch.testing.assert_close(new_residual.float(), expected_residual.float(), atol=5e-2, rtol=4e-2)
    else:
        normed = rms_norm(x, norm_weight, 1e-6)
        assert new_residual is x
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(out.float(), F.linear(normed.float(), weight.float()), **tol)


@pytest.mark.parametrize("with_residual", [False, True], ids=["first layer", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_gemv_matches_rms_norm_then_linear(dtype, with_residual):
    run_check(check_norm_gemv, 6, 2 * gemv.GEMV_MAX_BLOCK_K, dtype, with_residual)
    run_check(check_norm_gemv, 7, 576, dtype, with_residual)     # K off the tile: the RMS must ignore the padding


@pytest.mark.skipif(INTERPRETING, reason="the layer would launch an interpreted kernel on CUDA tensors")
def test_norm_and_linear_fuses_on_cuda_for_one_row_only(monkeypatch):
    calls = []
    real = gemv.norm_gemv
    monkeypatch.setattr(gemv, "norm_gemv", lambda *args: calls.append(args[0].shape) or real(*args))
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        calls.clear()
        norm, layer = RMSNorm(1024).to(device), QKVParallelLinear(1024, 64, 4, 2).to(device)
        torch.nn.init.normal_(layer.weight, std=1024 ** -0.5)
        torch.nn.init.normal_(norm.weight, 1, 0.5)
        for rows in (1, 3):
            x, residual = torch.randn(rows, 1024, device=device), torch.randn(rows, 1024, device=device)
            for res in (None, residual):
                y, new_residual = norm_and_linear(norm, layer, x, res)
                normed, expected_residual = (rms_norm(x, norm.weight, norm.eps), x) if res is None else \
                    rms_norm(x, norm.weight, norm.eps, res)
                torch.testing.assert_close(y, F.linear(normed, layer.weight), atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(new_residual, expected_residual)
        assert calls == ([torch.Size([1, 1024])] * 2 if device == "cuda" else [])


def test_only_small_row_parallel_shapes_go_to_the_gemv():
    w = torch.empty(1024, 3072)
    assert gemv.gemv_is_faster(torch.empty(1, 3072), w) and gemv.gemv_is_faster(torch.empty(2, 3072), w)
    assert not gemv.gemv_is_faster(torch.empty(3, 3072), w)                       # a GEMM: cuBLAS
    assert not gemv.gemv_is_faster(torch.empty(1, 1024), torch.empty(4096, 1024))  # many columns: cuBLAS
    assert gemv.gemv_is_faster(torch.empty(1, 576), torch.empty(960, 576))        # any K (masked)
    assert not gemv.gemv_is_faster(torch.empty(1, 6144)[:, ::2], w)                # strided rows
    assert gemv.gemv_is_faster(torch.empty(1, 6144), w, gated=True)                # [gate | up] of 3072 each
    assert not gemv.gemv_is_faster(torch.empty(1, 3072), w, gated=True)


@pytest.mark.skipif(INTERPRETING, reason="the layer would launch an interpreted kernel on CUDA tensors")
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_row_parallel_layer_uses_the_gemv_on_cuda_only(monkeypatch, gated):
    """Both paths compute the same function: the layer (gated: of silu(gate) * up) through the GEMV at 1-2 rows
    on CUDA, through the activation and F.linear otherwise."""
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *args: calls.append(args[0].shape) or real(*args))
    width = 4096 if gated else 2048
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        calls.clear()
        layer = RowParallelLinear(2048, 1024, gated_input=gated).to(device)
        torch.nn.init.normal_(layer.weight, std=2048 ** -0.5)
        for rows in (1, 2, 5):
            x = torch.randn(rows, width, device=device)
            expected = F.linear(silu_and_mul(x) if gated else x, layer.weight)
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
        assert calls == ([torch.Size([1, width]), torch.Size([2, width])] if device == "cuda" else [])


GEMV_SIGNATURE = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", M="i32", N="i32", K="i32", stride_xm="i32",
                      stride_wn="i32", stride_om="i32", residual_ptr="*bf16", norm_weight_ptr="*bf16",
                      residual_out_ptr="*bf16", eps="fp32")


def test_norm_gemv_caps_registers_only_where_k_fits_the_cap(monkeypatch):
    """A longer K spills far more under the same cap (ptxas -v), so only K up to NORM_GEMV_CAPPED_MAX_K is capped."""
    launches = []

    class Recorder:     # stands in for the kernel: records each launch's keyword arguments
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)
    monkeypatch.setattr(gemv, "gemv_kernel", Recorder())
    for k in (576, gemv.NORM_GEMV_CAPPED_MAX_K, 2 * gemv.NORM_GEMV_CAPPED_MAX_K):
        gemv.norm_gemv(torch.randn(1, k), None, torch.ones(k), 1e-6, torch.randn(8, k))
    cap = gemv.NORM_GEMV_MAX_REGISTERS
    assert cap and [launch.get("maxnreg") for launch in launches] == [cap, cap, None]


@pytest.mark.skipif(CUDA, reason="with CUDA the other tests compile and run the kernel for real")
@pytest.mark.skipif(INTERPRETING, reason="this process runs Triton's interpreter, which cannot compile")
@pytest.mark.skipif(not os.path.exists(_PTXAS), reason="this Triton install has no ptxas")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("block_k", [1024, gemv.GEMV_MAX_BLOCK_K])
@pytest.mark.parametrize("variant", ["plain", "gated", "norm"])
@pytest.mark.parametrize("m_pad", [1, 2])
def test_gemv_compiles_for_h100_with_16_byte_weight_loads(m_pad, variant, block_k):
    """The kernel only streams the weight: it must load it 16 bytes at a time, and not spill. With programmatic
    dependent launch (as launched on Hopper) the first weight slice is loaded before griddepcontrol.wait, x only
    after it."""
    ptx = compile_for_h100(gemv.gemv_kernel, GEMV_SIGNATURE, dict(
        M_PAD=m_pad, BLOCK_N=gemv.GEMV_BLOCK_N, BLOCK_K=block_k, GATED=variant == "gated",
        NORM=variant == "norm", ADD_RESIDUAL=variant == "norm", PDL=True))
    assert "ld.global.v4.b32" in set(re.findall(r"ld\.global(?:\.\w+)*", ptx))
    assert "ld.local" not in ptx and "st.local" not in ptx, "registers spilled"
    body = ptx[ptx.index(".entry"):]
    wait, loads = body.index("griddepcontrol.wait"), [m.start() for m in re.finditer(r"ld\.global", body)]
    assert body.index("griddepcontrol.launch_dependents") < wait
    assert loads[0] < wait < loads[-1]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(1024, 2048), (1024, 3072)])     # Qwen3-0.6B's o_proj and down_proj
def test_real_sizes_eager_and_in_a_cuda_graph(n, k):
    for m in (1, 2):
        check_gemv(m, n, k, torch.bfloat16)
        check_gemv(m, n, k, torch.bfloat16, gated=True)
    for n_wide in (4096, 6144):     # qkv_proj and gate_up_proj behind their RMSNorms
        check_norm_gemv(n_wide, 1024, torch.bfloat16, with_residual=True)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    eager = gemv.gemv(x, weight)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.gemv(x, weight)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, gemv.gemv(x, weight)) and not torch.equal(out, eager)
