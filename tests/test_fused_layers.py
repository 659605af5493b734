"""The Triton kernels of the model's small layers (nanovllm/kernels/fused_layers.py) against the torch code in
nanovllm/layers/ that they replace on CUDA, on fresh random inputs. Every tensor the launchers allocate is filled
with NaN first, so an output element a kernel leaves unwritten shows up as NaN.

Without CUDA the kernels run under Triton's CPU interpreter at small sizes (tests/triton_interpreter.py). Its
float32 -> bf16 conversion truncates where a GPU rounds to nearest, so bf16 is checked loosely there; on a GPU
it is checked tightly (the kernels round where the torch code does, so almost every element is bit-equal), and
the `cuda` tests add Qwen3-0.6B's real sizes, CUDA-graph replay and one compilation per kernel for all batch sizes.
"""
import contextlib
import importlib.util
import inspect
import os
import re

import pytest
import torch

from nanovllm.kernels import fused_layers
from nanovllm.layers.activation import SiluAndMul, silu_and_mul
from nanovllm.layers.attention import Attention
from nanovllm.layers.layernorm import RMSNorm, rms_norm
from nanovllm.layers.rotary_embedding import RotaryEmbedding, apply_rotary
from tests.triton_interpreter import CUDA, INTERPRETING, run_check

DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-6
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# Qwen3-0.6B: hidden 1024, intermediate 3072, 16 query / 8 KV heads of 128, rope theta 1e6.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, MAX_POSITION, THETA = 1024, 3072, 16, 8, 128, 40960, 1e6


@contextlib.contextmanager
def nan_allocations():
    """Make torch.empty/empty_like return NaN-filled floating tensors; yields the list of those made."""
    made, empty, empty_like = [], torch.empty, torch.empty_like

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            if tensor.is_floating_point():
                made.append(tensor.fill_(float("nan")))
            return tensor
        return allocate_nan

    torch.empty, torch.empty_like = poisoned(empty), poisoned(empty_like)
    try:
        yield made
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def assert_matches(actual, expected, exact=False):
    """float32: equal up to summation order and rsqrt/exp precision. bf16 on a GPU: nearly every element equal
    (not rounding where torch rounds makes ~25% differ by an ulp); in the interpreter: close."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "an output element was left unwritten (NaN)"
    if exact and (CUDA or actual.dtype == torch.float32):
        assert torch.equal(actual, expected)
    elif actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    elif CUDA:
        torch.testing.assert_close(actual, expected, atol=2e-2, rtol=1.6e-2)
        mismatched = (actual != expected).float().mean().item()
        assert mismatched < 0.01, f"{mismatched:.1%} of bf16 elements differ from the torch path"
    else:
        torch.testing.assert_close(actual.float(), expected.float(), atol=5e-2, rtol=4e-2)


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype)


# ---- checks (module-level: the interpreter worker finds them by name) ------------------------------------------

def check_rms_norm(rows, n, dtype, with_residual):
    torch.manual_seed(rows * n)
    x, residual = randn(rows, n, dtype=dtype, scale=3), randn(rows, n, dtype=dtype, scale=3)
    weight = randn(n, dtype=dtype, scale=0.5, shift=1)
    residual = residual if with_residual else None
    with nan_allocations() as made:
        result = fused_layers.rms_norm(x, weight, EPS, residual)
    assert len(made) == (2 if with_residual else 1)
    expected = rms_norm(x, weight, EPS, residual)
    if with_residual:
        assert_matches(result[0], expected[0])
        assert_matches(result[1], expected[1], exact=True)     # the residual stream: one rounded add, as torch's
    else:
        assert_matches(result, expected)


def check_silu_and_mul(rows, d, dtype):
    torch.manual_seed(rows + d)
    x = randn(rows, 2 * d, dtype=dtype, scale=3)
    with nan_allocations() as made:
        out = fused_layers.silu_and_mul(x)
    assert len(made) == 1
    assert_matches(out, silu_and_mul(x))


def check_qk_norm_rotary(tokens, heads, kv_heads, head_dim, dtype, with_norm, max_position=64):
    """q and k are views of a packed qkv projection (token stride > heads * head_dim), as in the model."""
    torch.manual_seed(tokens + heads + head_dim)
    rotary = RotaryEmbedding(head_dim, max_position, 10000.0).to(DEVICE)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, max_position, (tokens,), device=DEVICE)
    positions[:2] = torch.tensor([max_position - 1, 0])[:tokens]   # both ends of the cos/sin tables
    norm = dict(q_weight=randn(head_dim, dtype=dtype, scale=0.5, shift=1),
                k_weight=randn(head_dim, dtype=dtype, scale=0.5, shift=1), eps=EPS) if with_norm else {}
    with nan_allocations() as made:
        q_out, k_out = fused_layers.qk_norm_rotary(positions, q, k, rotary.cos, rotary.sin, **norm)
    assert len(made) == 2
    if with_norm:
        q, k = rms_norm(q, norm["q_weight"], EPS), rms_norm(k, norm["k_weight"], EPS)
    q_expected, k_expected = apply_rotary(positions, q, k, rotary.cos, rotary.sin)
    assert_matches(q_out, q_expected)
    assert_matches(k_out, k_expected)


def check_qk_norm_rotary_store(tokens, dtype, kv_dtype):
    """With `store` the kernel also writes the rotated k and v to the paged cache: what the attention backend's
    own store (the Triton kernel, itself checked against torch in test_triton_kernels) writes from the returned k,
    to the same slots; a slot of -1 writes nothing and other slots keep what they held."""
    from nanovllm.kernels import paged_attention_triton
    from nanovllm.layers.attention_backends import PagedKV
    torch.manual_seed(tokens)
    heads, kv_heads, head_dim, blocks, block_size = 4, 2, 32, 3, 16
    rotary = RotaryEmbedding(head_dim, 64, 10000.0).to(DEVICE)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                 kv_heads * head_dim], dim=-1))
    positions = torch.randint(0, 64, (tokens,), device=DEVICE)
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens]
    slots[0] = -1       # a padding row
    scales = torch.tensor([0.02, 0.03], device=DEVICE)      # fp8: K / 0.02, V / 0.03
    norm = dict(q_weight=randn(head_dim, dtype=dtype, shift=1), k_weight=randn(head_dim, dtype=dtype, shift=1),
                eps=EPS)
    caches = [torch.full((blocks, block_size, kv_heads, head_dim), 7.0, device=DEVICE).to(kv_dtype)
              for _ in range(4)]
    q_out, k_out = fused_layers.qk_norm_rotary(positions, q, k, rotary.cos, rotary.sin, **norm,
                                               store=(v, PagedKV(*caches[:2], *scales), slots))
    q_plain, k_plain = fused_layers.qk_norm_rotary(positions, q, k, rotary.cos, rotary.sin, **norm)
    assert torch.equal(q_out, q_plain) and torch.equal(k_out, k_plain)
    paged_attention_triton.store_kvcache(k_out, v, *caches[2:], slots, *scales)
    for fused, separate in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(fused.view(torch.uint8), separate.view(torch.uint8))
    untouched = torch.ones(blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[1:]] = False
    assert (caches[0].view(-1, kv_heads, head_dim)[untouched].float() == 7.0).all()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_qk_norm_rotary_stores_k_and_v(kv_dtype):
    run_check(check_qk_norm_rotary_store, 9, torch.float32 if kv_dtype == torch.float32 else torch.bfloat16, kv_dtype)


# ---- small sizes: the interpreter without a GPU, compiled on one -----------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows,n", [(7, 64), (5, 96), (1, 40)])
def test_rms_norm(rows, n, dtype, with_residual):
    run_check(check_rms_norm, rows, n, dtype, with_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(3, 1500), (1, 24)])    # 1500: two column blocks, the second partial
def test_silu_and_mul(rows, d, dtype):
    run_check(check_silu_and_mul, rows, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3", "qwen2"])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(7, 4, 2, 32), (3, 3, 1, 16)])
def test_qk_norm_rotary(tokens, heads, kv_heads, head_dim, dtype, with_norm):
    run_check(check_qk_norm_rotary, tokens, heads, kv_heads, head_dim, dtype, with_norm)


@pytest.mark.skipif(INTERPRETING, reason="the layers would launch interpreted kernels on CUDA tensors")
def test_layers_send_cuda_tensors_to_the_kernels_and_cpu_tensors_to_torch(monkeypatch):
    calls = []

    def counted(name, launch):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return launch(*args, **kwargs)
        return wrapper

    for name in ("rms_norm", "silu_and_mul", "qk_norm_rotary"):
        monkeypatch.setattr(fused_layers, name, counted(name, getattr(fused_layers, name)))
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        calls.clear()
        torch.manual_seed(0)
        norm, rotary = RMSNorm(48).to(device), RotaryEmbedding(16, 32, 1e4).to(device)
        attention = Attention(3, 1, 16, rotary, qk_norm_eps=1e-6).to(device)
        head_norm = attention.q_norm
        x, residual, q, k = (torch.randn(5, 48, device=device), torch.randn(5, 48, device=device),
                             torch.randn(5, 3, 16, device=device), torch.randn(5, 1, 16, device=device))
        positions = torch.arange(5, device=device)
        torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, norm.eps))
        torch.testing.assert_close(norm(x, residual), rms_norm(x, norm.weight, norm.eps, residual))
        torch.testing.assert_close(SiluAndMul()(x), silu_and_mul(x))
        torch.testing.assert_close(attention._norm_and_rotate(positions, q, k, None),
                                   apply_rotary(positions, rms_norm(q, head_norm.weight, head_norm.eps),
                                                rms_norm(k, head_norm.weight, head_norm.eps), rotary.cos, rotary.sin))
        torch.testing.assert_close(rotary(positions, q, k), apply_rotary(positions, q, k, rotary.cos, rotary.sin))
        expected = ["rms_norm", "rms_norm", "silu_and_mul", "qk_norm_rotary"]
        assert calls == (expected if device == "cuda" else [])


# ---- without a GPU: compile for an H100 ------------------------------------------------------------------------

_PTXAS = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends", "nvidia", "bin", "ptxas")


def compile_for_h100(kernel, signature, constexprs):
    """PTX of `kernel` for sm_90 with 4 warps, specialised as a real launch is: pointers 16-byte aligned, integers
    (strides) divisible by 16; `signature` gives the non-constexpr arguments' Triton types, constexprs not given
    take their defaults."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    constexprs = {p.name: p.default for p in kernel.params
                  if p.is_constexpr and p.default is not inspect.Parameter.empty} | constexprs
    full = {name: "constexpr" if name in constexprs else signature[name] for name in names}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items() if kind != "fp32"}
    source = ASTSource(kernel, full, {(names.index(name),): value for name, value in constexprs.items()}, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]


def h100_launches():
    """The kernels as the layers launch them for Qwen3-0.6B in bf16."""
    bf16 = lambda *names: dict.fromkeys(names, "*bf16")     # noqa: E731
    rms = bf16("x_ptr", "weight_ptr", "out_ptr", "residual_ptr", "residual_out_ptr")
    rotary = dict(bf16("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "q_weight_ptr", "k_weight_ptr", "v_ptr"),
                  positions_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", eps="fp32", slot_mapping_ptr="*i64",
                  k_scale_ptr="*fp32", v_scale_ptr="*fp32", **bf16("k_cache_ptr", "v_cache_ptr"),
                  **dict.fromkeys(["q_stride_t", "q_stride_h", "k_stride_t", "k_stride_h", "v_stride_t",
                                   "v_stride_h"], "i32"))
    rotary_sizes = dict(HEADS=HEADS, KV_HEADS=KV_HEADS, HEADS_PAD=HEADS, KV_HEADS_PAD=KV_HEADS, HALF=HEAD_DIM // 2,
                        NORM=True)
    return {
        "rms_norm": (fused_layers.rms_norm_kernel, dict(rms, eps="fp32"), dict(N=HIDDEN, BLOCK=HIDDEN,
                                                                              ADD_RESIDUAL=True)),
        "silu_and_mul": (fused_layers.silu_and_mul_kernel, bf16("x_ptr", "out_ptr"),
                         dict(D=INTERMEDIATE, BLOCK=fused_layers.SILU_BLOCK)),
        "qk_norm_rotary": (fused_layers.qk_norm_rotary_kernel, rotary,
                           dict(rotary_sizes, STORE_KV=False, KV_FP8=False)),
        # ... also writing K and V to a bf16 cache (the decode and prefill steps' launch)
        "qk_norm_rotary_store": (fused_layers.qk_norm_rotary_kernel, rotary,
                                 dict(rotary_sizes, STORE_KV=True, KV_FP8=False)),
    }


@pytest.mark.skipif(CUDA, reason="with CUDA the other tests compile and run these kernels for real")
@pytest.mark.skipif(INTERPRETING, reason="this process runs Triton's interpreter, which cannot compile")
@pytest.mark.skipif(not os.path.exists(_PTXAS), reason="this Triton install has no ptxas")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("kernel", ["rms_norm", "silu_and_mul", "qk_norm_rotary", "qk_norm_rotary_store"])
def test_kernels_compile_for_h100_with_16_byte_loads(kernel):
    """Catches what the interpreter cannot (lowering errors), and scalar loads: these kernels only move bytes,
    so they need 16-byte vector loads and stores to approach the memory bandwidth. Compiled with programmatic
    dependent launch, as launched on Hopper (kernels/pdl.py): a kernel may start while the one before it still
    writes its inputs, so it must wait (griddepcontrol.wait) before its first global store and before reading what
    a kernel of the forward writes: the rotary kernel reads its step inputs and tables before (pdl.py's contract)."""
    launched, signature, constexprs = h100_launches()[kernel]
    ptx = compile_for_h100(launched, signature, dict(constexprs, PDL=True))
    body = ptx.split(".entry", 1)[1]
    first_access = re.search(r"st\.global" if kernel.startswith("qk_norm_rotary") else r"(ld|st)\.global", body).start()
    assert body.index("griddepcontrol.launch_dependents") < body.index("griddepcontrol.wait") < first_access
    loads, stores = set(re.findall(r"ld\.global(?:\.\w+)*", ptx)), set(re.findall(r"st\.global(?:\.\w+)*", ptx))
    assert "ld.global.v4.b32" in loads and "st.global.v4.b32" in stores, (loads, stores)
    assert not any(op.endswith(".b16") for op in loads | stores), (loads, stores)
    assert "ld.local" not in ptx and "st.local" not in ptx, "registers spilled"


# ---- real sizes on the GPU -------------------------------------------------------------------------------------

REAL_TOKENS = [1, 7, 64, 257, 16384]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", REAL_TOKENS)
def test_real_sizes(tokens, dtype):
    check_rms_norm(tokens, HIDDEN, dtype, with_residual=False)
    check_rms_norm(tokens, HIDDEN, dtype, with_residual=True)
    check_silu_and_mul(tokens, INTERMEDIATE, dtype)
    for with_norm in (True, False):
        check_qk_norm_rotary(tokens, HEADS, KV_HEADS, HEAD_DIM, dtype, with_norm, max_position=MAX_POSITION)


def qwen3_layers(dtype):
    """(RMSNorm, SiluAndMul, Attention with q/k RMSNorm, Attention without) at Qwen3-0.6B's sizes, random weights;
    the attention layers' fused q/k norm + rotary is what runs of them (no cache)."""
    torch.manual_seed(0)
    rotary = RotaryEmbedding(HEAD_DIM, MAX_POSITION, THETA).to(DEVICE)      # float32 tables, as in the model
    norm = RMSNorm(HIDDEN).to(DEVICE, dtype)
    normed, plain = (Attention(HEADS, KV_HEADS, HEAD_DIM, rotary, eps).to(DEVICE) for eps in (1e-6, None))
    with torch.no_grad():
        for weight in (norm.weight, normed.q_norm.weight, normed.k_norm.weight):
            weight.normal_(1, 0.5)
    normed.q_norm.to(dtype), normed.k_norm.to(dtype)
    return norm, SiluAndMul(), normed, plain


def run_layers(layers, x, residual, gate_up, q, k, positions):
    norm, act, normed, plain = layers
    return (norm(x), *norm(x, residual), act(gate_up), *normed._norm_and_rotate(positions, q, k, None),
            *plain._norm_and_rotate(positions, q, k, None))


def layer_inputs(tokens, dtype):
    qkv = randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    return (randn(tokens, HIDDEN, dtype=dtype), randn(tokens, HIDDEN, dtype=dtype),
            randn(tokens, 2 * INTERMEDIATE, dtype=dtype), q.view(tokens, HEADS, HEAD_DIM),
            k.view(tokens, KV_HEADS, HEAD_DIM), torch.randint(0, MAX_POSITION, (tokens,), device=DEVICE))


@pytest.mark.cuda
@cuda_only
def test_one_compilation_per_kernel_for_every_batch_size():
    """The ModelRunner warms up and captures CUDA graphs for batch sizes 1, 2, 4, 8, 16, 32, ...: a kernel that
    compiled anew for some of them would compile inside graph capture, or stall the first big prefill."""
    def compiled_variants():
        kernels = (fused_layers.rms_norm_kernel, fused_layers.silu_and_mul_kernel, fused_layers.qk_norm_rotary_kernel)
        return [sum(len(cache[0]) for cache in kernel.device_caches.values()) for kernel in kernels]

    layers = qwen3_layers(torch.bfloat16)
    run_layers(layers, *layer_inputs(3, torch.bfloat16))
    before = compiled_variants()
    for tokens in (1, 2, 4, 16, 17, 32, 48, 256, 512, 16384):
        run_layers(layers, *layer_inputs(tokens, torch.bfloat16))
    torch.cuda.synchronize()
    assert compiled_variants() == before


@pytest.mark.cuda
@cuda_only
def test_cuda_graph_replay_equals_eager():
    """All the layers captured once at a decode batch of 8, replayed on new inputs: bit-equal to eager launches."""
    layers = qwen3_layers(torch.bfloat16)
    static = layer_inputs(8, torch.bfloat16)
    run_layers(layers, *static)             # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run_layers(layers, *static)
    for trial in range(2):
        for buffer, fresh in zip(static, layer_inputs(8, torch.bfloat16)):
            buffer.copy_(fresh)
        graph.replay()
        for out, expected in zip(outs, run_layers(layers, *static)):
            assert torch.equal(out, expected)
