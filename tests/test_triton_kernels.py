"""Our Triton attention kernels against the PyTorch reference, on fresh random inputs with poisoned outputs.

Without CUDA the kernels run under Triton's CPU interpreter at small sizes (float32, block 16 or 128, head_dim
16/32); with CUDA the same tests run compiled on the GPU, and the `cuda` tests add Qwen3-0.6B's real shapes
(bf16, 16 query / 8 KV heads, head_dim 128, block 256) and a CUDA-graph capture of decode.

Cache slots that hold no token of any sequence are filled with NaN, and so are outputs before a kernel runs:
a kernel that reads past a context or leaves an output row unwritten shows up as NaN.

fp8 (float8_e4m3fn) caches run the same checks with k_scale != v_scale != 1, so a scale applied twice, not at
all or to the wrong tensor shows; the reference reads the same fp8 cache and multiplies by the scales.
"""
import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from unittest import mock

import pytest
import torch

from nanovllm.kernels import paged_attention_torch as ref
from nanovllm.kernels import paged_attention_triton as backend
from nanovllm.layers.attention_backends import BACKENDS, PagedKV
from nanovllm.utils.context import Context
from tests.triton_interpreter import CUDA, INTERPRETING, run_check

DEVICE = torch.device("cuda" if CUDA else "cpu")
ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# Triton converts to and from fp8 (e4m3) on compute capability 8.9+; the interpreter has no such limit.
fp8_capable = pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (8, 9),
                                 reason="Triton's fp8 needs compute capability 8.9 or newer")

# Without CUDA the kernel checks run in the TRITON_INTERPRET=1 worker (tests/triton_interpreter.py): module-level
# functions, which the worker finds by importing this module afresh (so the fp8 patch below applies there too).
FP8 = torch.float8_e4m3fn


def _round_fp8_as_gpus_do():
    """Triton's interpreter rounds float32 -> fp8 wrongly: ties away from zero, and a carry out of the mantissa
    is lost when the exponent is odd (31.5 -> 16, 1.97 -> 1.0; triton-lang/triton#8322, PR #11897). GPUs round
    to nearest even, as torch does, so the interpreter gets torch's rounding for that case: the fp8 checks then
    test our kernels, not the emulator. Other conversions are left alone. Values past +-448 still become NaN
    (torch would saturate them), so a kernel that forgets to clamp them keeps failing here."""
    import triton.language as tl
    from triton.runtime import interpreter
    emulated = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            x = torch.tensor(data)
            return torch.where(x.abs() > 448, float("nan"), x).to(FP8).view(torch.uint8).numpy()
        return emulated(data, input_dtype, output_dtype, rounding_mode)
    interpreter._convert_float = convert


if INTERPRETING:
    _round_fp8_as_gpus_do()


@contextlib.contextmanager
def isolated_modules(names):
    """Let the body import fresh copies of modules `names`; afterwards sys.modules and the parent packages'
    attributes are as they were, so the rest of the pytest process never sees those copies."""
    saved_modules = {name: sys.modules.pop(name, None) for name in names}
    saved_attrs = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            saved_attrs[name] = (sys.modules[parent], child, getattr(sys.modules[parent], child, None))
    try:
        yield
    finally:
        for name, module in saved_modules.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module
        for package, child, value in saved_attrs.values():
            if value is None:
                package.__dict__.pop(child, None)
            else:
                setattr(package, child, value)


# ---- inputs ---------------------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paged_cache(context_lens, block_size, kv_heads, head_dim, dtype=torch.float32, spare_blocks=3):
    """Caches holding random K/V for each sequence's first context_lens[i] tokens in shuffled blocks, NaN in every
    other slot; block tables padded with -1, one column wider than needed."""
    blocks = [cdiv(n, block_size) for n in context_lens]
    num_blocks = sum(blocks) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.full((len(context_lens), max(blocks, default=0) + 1), -1, dtype=torch.int32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    free = torch.randperm(num_blocks).tolist()
    for i, (n, nb) in enumerate(zip(context_lens, blocks)):
        ids, free = free[:nb], free[nb:]
        tables[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        used.view(-1)[torch.tensor([ids[p // block_size] * block_size + p % block_size for p in range(n)],
                                   dtype=torch.long)] = True
    unused = ~used.to(DEVICE)
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    return k_cache.to(dtype), v_cache.to(dtype), tables.to(DEVICE)


def kv_scales(kv_dtype):
    """(k_scale, v_scale) for a cache of kv_dtype: distinct float32 device tensors for fp8, None otherwise."""
    if kv_dtype != FP8:
        return None, None
    return torch.tensor(0.37, device=DEVICE), torch.tensor(1.9, device=DEVICE)


def clean(cache):
    """The reference decode multiplies masked slots by 0, so it must not see the NaN poison (fp8 has no
    nan_to_num)."""
    return torch.where(cache.isnan(), 0, cache)


def poisoned_like(x):
    return torch.full_like(x, float("nan"))


def assert_matches(actual, expected, atol=1e-4, rtol=1e-4):
    assert torch.isfinite(actual).all(), "a row was left unwritten or read poisoned memory"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---- store ----------------------------------------------------------------------------------------------------

def check_store_kvcache(kv_heads, layout, kv_dtype=torch.float32):
    """key/value as views of a packed qkv projection (as in the model) or head-major transposed views."""
    torch.manual_seed(0)
    heads, head_dim, block_size, num_blocks, tokens = 4, 16, 16, 4, 11
    if layout == "packed":
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE)
        _, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        key, value = key.view(tokens, kv_heads, head_dim), value.view(tokens, kv_heads, head_dim)
    else:
        key, value = torch.randn(2, kv_heads, tokens, head_dim, device=DEVICE).transpose(1, 2)
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[0, 4, 10]] = -1
    slots = slots.to(DEVICE)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), device=DEVICE).to(kv_dtype)
    v_cache = poisoned_like(k_cache)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    scales = kv_scales(kv_dtype)
    ref.store_kvcache(key, value, k_expected, v_expected, slots, *scales)
    backend.store_kvcache(key, value, k_cache, v_cache, slots, *scales)
    # fp8 compares as float32, which holds every fp8 value exactly.
    torch.testing.assert_close(k_cache.float(), k_expected.float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache.float(), v_expected.float(), rtol=0, atol=0, equal_nan=True)
    written = (~torch.isnan(k_cache)).all(-1).all(-1).sum()
    assert written == tokens - 3, f"{written} slots written, expected {tokens - 3}"


@pytest.mark.parametrize("kv_heads,layout", [(2, "packed"), (3, "packed"), (2, "head-major")])
@pytest.mark.parametrize("kv_dtype", [torch.float32, pytest.param(FP8, marks=fp8_capable)])
def test_store_kvcache_writes_strided_rows_and_skips_padding(kv_heads, layout, kv_dtype):
    run_check(check_store_kvcache, kv_heads, layout, kv_dtype)


def check_store_fp8_quantization(num_tokens, impl):
    """Every stored value is within half an fp8 step of K / k_scale (round to nearest) and reads back as K to
    that accuracy; values past +-448 * scale saturate at +-448 instead of turning into NaN (e4m3fn has no inf)."""
    torch.manual_seed(0)
    kv_heads, head_dim = 2, 16
    key, value = torch.randn(2, num_tokens, kv_heads, head_dim, device=DEVICE) * 30
    key[0, 0, :4] = torch.tensor([1e4, -1e4, float("inf"), 448 * 0.37 * 1.001])   # all past the range
    value[1, 1, :2] = torch.tensor([-1e6, 1e6])
    k_cache = torch.full((cdiv(num_tokens, 16), 16, kv_heads, head_dim), float("nan"), device=DEVICE).to(FP8)
    v_cache = poisoned_like(k_cache)
    scales = kv_scales(FP8)
    store = backend.store_kvcache if impl == "triton" else ref.store_kvcache
    store(key, value, k_cache, v_cache, torch.arange(num_tokens, device=DEVICE), *scales)
    for x, cache, scale, num_outliers in ((key, k_cache, scales[0], 4), (value, v_cache, scales[1], 2)):
        stored = cache.view(-1, kv_heads, head_dim)[:num_tokens]
        assert not stored.isnan().any(), "an out-of-range value became NaN instead of saturating"
        scaled = x / scale
        out_of_range = scaled.abs() > 448
        assert out_of_range.sum() == num_outliers
        assert torch.equal(stored.float()[out_of_range], 448 * scaled[out_of_range].sign())
        # Round to nearest: half a step is 2^-4 of the value in the normal range, 2^-10 among subnormals.
        bound = (2 ** -4 * scaled.abs() + 2 ** -10)[~out_of_range]
        assert ((stored.float() - scaled)[~out_of_range].abs() <= bound).all()
        assert ((ref.dequantize(stored, scale) - x)[~out_of_range].abs() <= bound * scale * 1.0001).all()


@fp8_capable
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_store_kvcache_quantizes_fp8_with_saturation(impl):
    run_check(check_store_fp8_quantization, 40, impl)


# ---- prefill --------------------------------------------------------------------------------------------------

# (cached prefix, new tokens) per sequence: one-token prompts, lengths on and off page and tile boundaries,
# prefixes that end mid-page, a single new token after a long prefix.
PREFILL_BATCH = [(0, 1), (0, 16), (0, 37), (16, 5), (29, 19), (48, 1), (3, 70), (128, 64), (0, 129)]


def run_prefill(seqs, heads, kv_heads, head_dim, block_size, dtype=torch.float32, scale=0.3, kv_dtype=None):
    """Prefill a batch of (cached, new) sequences over a cache of kv_dtype (default: dtype); returns (output,
    reference)."""
    torch.manual_seed(0)
    context_lens = [cached + new for cached, new in seqs]
    kv_dtype = kv_dtype or dtype
    k_cache, v_cache, tables = paged_cache(context_lens, block_size, kv_heads, head_dim, kv_dtype)
    k_scale, v_scale = kv_scales(kv_dtype)
    cu_seqlens = torch.tensor([0] + [new for _, new in seqs], device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu_seqlens[-1]), heads, head_dim, device=DEVICE).to(dtype)
    out = poisoned_like(q)
    result = backend.paged_prefill_attention(q, k_cache, v_cache, cu_seqlens, lens, tables, scale,
                                             max_seqlen_q=max(new for _, new in seqs), out=out,
                                             k_scale=k_scale, v_scale=v_scale)
    assert result is out
    expected = ref.paged_prefill_attention(q.float(), k_cache, v_cache, cu_seqlens, lens, tables, scale,
                                           k_scale=k_scale, v_scale=v_scale)
    return out, expected


def check_prefill(heads, kv_heads, head_dim, block_size, kv_dtype=None):
    assert_matches(*run_prefill(PREFILL_BATCH, heads, kv_heads, head_dim, block_size, kv_dtype=kv_dtype))


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 32, 16), (2, 2, 16, 16), (4, 1, 16, 128)])
def test_prefill_matches_reference(heads, kv_heads, head_dim, block_size):
    run_check(check_prefill, heads, kv_heads, head_dim, block_size)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_cacheless_warmup_attention_is_causal_softmax_attention(heads, kv_heads):
    """The warm-up's attention (no cache; the fp8 scales are measured through it) against softmax(q k^T) v written
    out in float64, per sequence, each query head reading its group's K/V head."""
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    lens = [1, 7, 33]
    q, k, v = (torch.randn(sum(lens), n, 16, generator=gen) for n in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 1, 8, 41], dtype=torch.int32)
    out = ref.varlen_causal_attention(q, k, v, cu, 0.3)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        group = heads // kv_heads
        qs, ks, vs = q[start:end].double(), k[start:end].double(), v[start:end].double()
        ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * 0.3
        n = end - start
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
        torch.testing.assert_close(out[start:end].double(), expected, atol=1e-5, rtol=1e-5)


@cuda_only
def test_cacheless_warmup_attention_builds_no_score_matrix():
    """At Qwen3-0.6B's heads, one 4,096-token sequence: the [heads, L, L] scores alone would be 512 MB in bf16.
    The warm-up sizes the KV cache after its peak memory, so a score matrix here would shrink the cache."""
    q = torch.randn(4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 4096], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ref.varlen_causal_attention(q, k, v, cu, 0.088)
    torch.cuda.synchronize()
    # (K and V repeated to 16 heads, the output and any contiguous copies: tens of MB)
    assert torch.cuda.max_memory_allocated() - before < 256 * 2**20


@fp8_capable
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 32, 16), (4, 1, 16, 128)])
def test_prefill_fp8_cache_matches_reference(heads, kv_heads, head_dim, block_size):
    run_check(check_prefill, heads, kv_heads, head_dim, block_size, FP8)


def check_chunked_prefill(kv_dtype=torch.float32):
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size, prompt_len = 4, 2, 16, 16, 70
    k_cache, v_cache, tables = paged_cache([prompt_len], block_size, kv_heads, head_dim, kv_dtype)
    k_scale, v_scale = kv_scales(kv_dtype)
    table = tables[0, :cdiv(prompt_len, block_size)]
    positions = torch.arange(prompt_len, device=DEVICE)
    slots = table.long()[positions // block_size] * block_size + positions % block_size
    q = torch.randn(prompt_len, heads, head_dim, device=DEVICE)
    k, v = torch.randn(2, prompt_len, kv_heads, head_dim, device=DEVICE)
    outs, done = [], 0
    for chunk in (20, 33, 1, 16):
        end = done + chunk
        backend.store_kvcache(k[done:end], v[done:end], k_cache, v_cache, slots[done:end], k_scale, v_scale)
        cu = torch.tensor([0, chunk], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([end], dtype=torch.int32, device=DEVICE)
        outs.append(backend.paged_prefill_attention(q[done:end], k_cache, v_cache, cu, lens, tables, 0.25,
                                                    out=poisoned_like(q[done:end]), k_scale=k_scale, v_scale=v_scale))
        done = end
    if kv_dtype == FP8:     # what the cache can hold: K and V rounded to fp8 steps of their scales
        k = ref.dequantize(ref.quantize_fp8(k, k_scale), k_scale)
        v = ref.dequantize(ref.quantize_fp8(v, v_scale), v_scale)
    expected = ref._attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 0.25)     # causal, one shot
    assert_matches(torch.cat(outs), expected.transpose(0, 1))


@pytest.mark.parametrize("kv_dtype", [torch.float32, pytest.param(FP8, marks=fp8_capable)])
def test_chunked_prefill_equals_one_shot(kv_dtype):
    """A prompt prefilled chunk by chunk through the cache (store, then attend) equals attending to it at once."""
    run_check(check_chunked_prefill, kv_dtype)


# ---- decode ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def decode_launch_changed(kv_dtype, changes):
    """Launch the decode kernel over a kv_dtype cache with these DecodeLaunch fields changed (None: as is)."""
    saved = dict(backend.DECODE_LAUNCH)
    if changes:
        backend.DECODE_LAUNCH[kv_dtype.itemsize] = backend.DECODE_LAUNCH[kv_dtype.itemsize]._replace(**changes)
    try:
        yield
    finally:
        backend.DECODE_LAUNCH.update(saved)


_real_empty = torch.empty


def nan_filled_empty(*args, **kwargs):
    """torch.empty whose float tensors hold NaN: a kernel that reads what no kernel wrote (the partial result of a
    split that skipped its work) shows in its output."""
    tensor = _real_empty(*args, **kwargs)
    return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor


def run_decode(context_lens, heads, kv_heads, head_dim, block_size, num_splits, dtype=torch.float32, scale=0.3,
               kv_dtype=None, launch=None, seq_order=None):
    """Decode with stale garbage in block-table entries past each context (as CUDA-graph replay leaves them) and
    an out-of-range table for the context_len 0 rows, over a cache of kv_dtype (default: dtype); returns (output,
    reference, rows with a context). launch: DecodeLaunch fields to change (decode_launch_changed); seq_order: the
    order the rows' programs start in (a list; "longest": decode_order's)."""
    torch.manual_seed(0)
    kv_dtype = kv_dtype or dtype
    k_cache, v_cache, tables = paged_cache(context_lens, block_size, kv_heads, head_dim, kv_dtype)
    k_scale, v_scale = kv_scales(kv_dtype)
    stale = tables.clone()
    stale[stale < 0] = torch.randint(0, k_cache.shape[0], (int((stale < 0).sum()),), dtype=torch.int32,
                                     device=DEVICE)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    stale[lens == 0] = 10**6            # would fault (GPU) or raise (interpreter) if a padded row were read
    q = torch.randn(len(context_lens), heads, head_dim, device=DEVICE).to(dtype)
    if seq_order == "longest":
        seq_order = torch.argsort(lens, descending=True)
    elif seq_order is not None:
        seq_order = torch.tensor(seq_order, device=DEVICE)
    with decode_launch_changed(kv_dtype, launch), mock.patch.object(torch, "empty", nan_filled_empty):
        out = backend.paged_decode_attention(q, k_cache, v_cache, lens, stale, scale, out=poisoned_like(q),
                                             num_splits=num_splits, k_scale=k_scale, v_scale=v_scale,
                                             seq_order=seq_order)
    if (launch or {}).get("query_fp8"):
        q = ref.round_query_fp8(q)
    expected = ref.paged_decode_attention(q.float(), clean(k_cache), clean(v_cache), lens, tables, scale,
                                          k_scale=k_scale, v_scale=v_scale)
    return out, expected, lens > 0


def check_decode(context_lens, heads, kv_heads, head_dim, block_size, num_splits, kv_dtype=None, launch=None,
                 seq_order=None):
    out, expected, real = run_decode(context_lens, heads, kv_heads, head_dim, block_size, num_splits,
                                     kv_dtype=kv_dtype, launch=launch, seq_order=seq_order)
    assert_matches(out[real], expected[real])
    assert torch.isfinite(out[~real]).all(), "padded rows should come out as zeros"


# Contexts at and around tile (16) and page boundaries, one token, and graph padding (context_len 0).
DECODE_CONTEXTS_16 = [1, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 0]
# Block 128 holds two 64-token tiles per page, the layout real sizes use (64-token tiles in 256-token pages).
DECODE_CONTEXTS_128 = [1, 63, 64, 65, 127, 128, 129, 200, 0, 300]


@pytest.mark.parametrize("num_splits", [None, 1, 2, 3, 8])
def test_decode_matches_reference_at_split_boundaries(num_splits):
    run_check(check_decode, DECODE_CONTEXTS_16, 4, 2, 32, 16, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_two_tiles_per_page(num_splits):
    run_check(check_decode, DECODE_CONTEXTS_128, 4, 1, 16, 128, num_splits)


# Few (sequence, KV head) pairs take smaller tiles (DECODE_FEW_PROGRAMS): 32 tokens of this 128-dim float32 head.
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_with_few_programs_small_tiles(num_splits):
    run_check(check_decode, [1, 31, 32, 33, 200, 0], 2, 1, 128, 128, num_splits)


def test_decode_tiles_shrink_only_where_few_programs_wait_on_them(monkeypatch):
    """The split kernel's KV tile: at most DECODE_FEW_PROGRAMS_TILE_BYTES of K for few (sequence, KV head) pairs,
    the launch's for more, and for heads whose launch tile is that small already (SmolLM2-135M's 64 dims)."""
    tiles = []

    class Recorder:     # stands in for the split kernel: records each launch's tile
        def __getitem__(self, grid):
            return lambda *args, **kwargs: tiles.append(kwargs["BLOCK_N"])
    monkeypatch.setattr(backend.kernels, "decode_split_kernel", Recorder())
    launch = backend.decode_launch(torch.bfloat16)

    def tile(batch, kv_heads, head_dim):
        k_cache = torch.zeros(4, 256, kv_heads, head_dim, dtype=torch.bfloat16)
        backend.paged_decode_attention(torch.zeros(batch, kv_heads, head_dim, dtype=torch.bfloat16), k_cache,
                                       k_cache, torch.ones(batch, dtype=torch.int32),
                                       torch.zeros(batch, 4, dtype=torch.int32), 1.0, num_splits=1)
        return tiles[-1]
    few = tile(1, 8, 128)       # Qwen3-0.6B at batch 1
    assert few < launch.block_n and few * 128 * 2 <= backend.DECODE_FEW_PROGRAMS_TILE_BYTES
    assert tile(backend.DECODE_FEW_PROGRAMS // 8, 8, 128) == few
    assert tile(backend.DECODE_FEW_PROGRAMS // 8 + 1, 8, 128) == launch.block_n
    assert tile(1, 3, 64) == launch.block_n


# The rows' programs started in another order: each row must still read its own context and write its own output.
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("seq_order", ["longest", [12, 0, 7, 3, 11, 1, 9, 5, 2, 10, 4, 8, 6]])
def test_decode_rows_in_any_start_order(num_splits, seq_order):
    run_check(check_decode, DECODE_CONTEXTS_16, 4, 2, 32, 16, num_splits, None, None, seq_order)


def test_decode_order_is_longest_first_from_its_threshold():
    small = torch.tensor([5, 9, 1])
    assert backend.decode_order(small) is None      # too few rows for the order to matter
    lens = torch.randint(0, 3000, (backend.DECODE_ORDER_MIN_BATCH,))
    order = backend.decode_order(lens)
    assert sorted(order.tolist()) == list(range(len(lens)))
    assert (lens[order][:-1] >= lens[order][1:]).all()
    for is_prefill, ordered in ((False, True), (True, False)):  # the backend orders decode steps only
        ctx = Context(is_prefill=is_prefill, context_lens=lens)
        BACKENDS["triton"]().prepare(ctx)
        assert (ctx.decode_order is not None) == ordered


# fp8 tiles widened by Triton or in registers (inline PTX; the interpreter runs the plain conversion).
LAUNCH_VARIANTS = [None, dict(widen="kv"), dict(widen="v")]


@fp8_capable
@pytest.mark.parametrize("launch", LAUNCH_VARIANTS)
@pytest.mark.parametrize("contexts,heads,kv_heads,head_dim,block_size,num_splits", [
    (DECODE_CONTEXTS_16, 4, 2, 32, 16, 1), (DECODE_CONTEXTS_16, 4, 2, 32, 16, 3),
    (DECODE_CONTEXTS_128, 4, 1, 16, 128, 2)])
def test_decode_fp8_cache_matches_reference(contexts, heads, kv_heads, head_dim, block_size, num_splits, launch):
    run_check(check_decode, contexts, heads, kv_heads, head_dim, block_size, num_splits, FP8, launch)


def check_decode_query_fp8(contexts, heads, kv_heads, head_dim, block_size, num_splits, launch):
    """The query rounded to e4m3 (DecodeLaunch.query_fp8) against the reference with the same rounding. The output
    is bfloat16 and V meets the softmax weights in a float16 dot, so single elements differ by bfloat16 steps; on
    average the kernel must sit much closer to the rounded query's reference than to the unrounded one's (a query
    used unrounded, or a row's scale lost, fails that). With the weights in e4m3 too (weights_fp8) each weight is off
    by up to half an e4m3 step (1/16), which the reference does not model: within a few percent on average."""
    out, expected, real = run_decode(contexts, heads, kv_heads, head_dim, block_size, num_splits, torch.bfloat16,
                                     kv_dtype=FP8, launch=launch)
    unrounded = run_decode(contexts, heads, kv_heads, head_dim, block_size, num_splits, torch.bfloat16,
                           kv_dtype=FP8)[1]
    err, err_unrounded = ((out[real].float() - x[real].bfloat16().float()).abs() for x in (expected, unrounded))
    if launch.get("weights_fp8"):
        assert err.max() < 0.1 and err.mean() < 0.03 * expected[real].abs().mean(), (err.max(), err.mean())
    else:
        assert err.max() < 0.05 and err.mean() < 0.6 * err_unrounded.mean(), (err.max(), err.mean(),
                                                                               err_unrounded.mean())
    assert torch.isfinite(out[~real].float()).all(), "padded rows should come out as zeros"


@fp8_capable
@pytest.mark.parametrize("launch", [dict(widen=""), dict(widen="v"), dict(widen="v", keys_major=True),
                                    dict(keys_major=True, weights_fp8=True)])
@pytest.mark.parametrize("contexts,heads,kv_heads,head_dim,block_size,num_splits", [
    (DECODE_CONTEXTS_16, 4, 2, 32, 16, 3), (DECODE_CONTEXTS_128, 4, 1, 16, 128, 2)])
def test_decode_with_the_query_in_fp8_matches_the_reference(contexts, heads, kv_heads, head_dim, block_size,
                                                            num_splits, launch):
    run_check(check_decode_query_fp8, contexts, heads, kv_heads, head_dim, block_size, num_splits,
              dict(query_fp8=True, **launch))


# The dots with the keys as their rows (DecodeLaunch.keys_major), over a float32 cache and an fp8 one.
@pytest.mark.parametrize("kv_dtype", [None, pytest.param(FP8, marks=fp8_capable)])
@pytest.mark.parametrize("contexts,heads,kv_heads,head_dim,block_size,num_splits", [
    (DECODE_CONTEXTS_16, 4, 2, 32, 16, 3), (DECODE_CONTEXTS_128, 4, 1, 16, 128, 1)])
def test_decode_keys_major_matches_reference(contexts, heads, kv_heads, head_dim, block_size, num_splits, kv_dtype):
    run_check(check_decode, contexts, heads, kv_heads, head_dim, block_size, num_splits, kv_dtype,
              dict(keys_major=True))


def test_decode_split_heuristic_depends_on_shapes_only():
    splits = backend.decode_num_splits
    cpu = torch.device("cpu")
    assert splits(1, 1, 16, 16, cpu) == 1                            # never more splits than tiles
    assert splits(256, 8, 4096, 64, cpu) == 1
    assert 1 <= splits(1, 1, 100_000, 64, cpu) <= backend.DECODE_MAX_SPLITS


# ---- backend interface ----------------------------------------------------------------------------------------

def test_block_size_rule():
    for ok in (16, 32, 64, 256, 1024):
        backend.check_block_size(ok)
        BACKENDS["triton"].check("cuda", ok, fp8=False)
    for bad in (0, 1, 8, 48, 100, 257):
        with pytest.raises(ValueError, match="power of two"):
            BACKENDS["triton"].check("cuda", bad, fp8=False)


def check_entry_points():
    """The triton backend's prefill and decode read the step's Context as the torch backend does."""
    torch.manual_seed(0)
    context_lens = [5, 23]
    k_cache, v_cache, tables = paged_cache(context_lens, 16, 2, 16)
    kv, clean_kv = (PagedKV(k, v, None, None) for k, v in ((k_cache, v_cache), (clean(k_cache), clean(v_cache))))
    triton_backend, torch_backend = BACKENDS["triton"](), BACKENDS["torch"]()
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE)
    q = torch.randn(8, 4, 16, device=DEVICE)
    ctx = Context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=5, context_lens=lens, block_tables=tables)
    expected = torch_backend.prefill(q, None, None, kv, ctx, 0.5)
    assert_matches(triton_backend.prefill(q, None, None, kv, ctx, 0.5), expected)
    ctx = Context(context_lens=lens, block_tables=tables)
    expected = torch_backend.decode(q[:2], clean_kv, ctx, 0.5)
    assert_matches(triton_backend.decode(q[:2], kv, ctx, 0.5), expected)
    with pytest.raises(ValueError, match="head_dim"):
        triton_backend.decode(q[:2, :, :12], PagedKV(k_cache[..., :12], v_cache[..., :12], None, None), ctx, 0.5)


def check_mixed_step():
    """A prefill step whose leading sequences are one-token rows (the step's decodes, attended by the decode
    kernel) and whose others are prompts (the prefill kernel, over the rest of cu_seqlens_q) equals the torch
    reference attending to every sequence as a prefill; rows are written once, none left out."""
    torch.manual_seed(1)
    context_lens = [40, 1, 17, 9, 30]       # two decodes (40 and 1 keys), then prompts of 17, 4 and 6 new tokens
    query_lens = [1, 1, 17, 4, 6]
    k_cache, v_cache, tables = paged_cache(context_lens, 16, 2, 16)
    kv, clean_kv = (PagedKV(k, v, None, None) for k, v in ((k_cache, v_cache), (clean(k_cache), clean(v_cache))))
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(query_lens), 4, 16, device=DEVICE)
    ctx = Context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=17, context_lens=lens, block_tables=tables)
    expected = BACKENDS["torch"]().prefill(q, None, None, clean_kv, ctx, 0.5)
    ctx.num_decode_seqs = 2
    with mock.patch.object(torch, "empty_like", lambda x, **kw: torch.full_like(x, float("nan"), **kw)):
        for name in ("triton", "torch"):
            assert_matches(BACKENDS[name]().prefill(q, None, None, kv if name == "triton" else clean_kv, ctx, 0.5),
                           expected)


def test_a_mixed_step_attends_its_decodes_as_decodes():
    run_check(check_mixed_step)


def test_backend_entry_points_use_the_context():
    run_check(check_entry_points)


def kernel_kind():
    return type(backend.kernels.prefill_kernel).__name__


def test_kernels_are_interpreted_only_in_the_worker():
    """On CPU the checks ran interpreted in the worker; this process's environment and kernels are untouched."""
    assert run_check(kernel_kind) == ("JITFunction" if CUDA else "InterpretedFunction")
    assert os.environ.get("TRITON_INTERPRET") == ENV_BEFORE
    if not INTERPRETING:
        assert kernel_kind() == "JITFunction"


def test_flash_backend_wiring():
    """flash-attn is not installed here: a stand-in implementing its documented semantics with the reference checks
    that the flash backend passes the right tensors (packed K/V or paged cache, int32 cu_seqlens_k, block tables)."""
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               block_table=None):
        assert causal and cu_seqlens_k.dtype == torch.int32
        assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        assert max_seqlen_k == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        if block_table is None:
            assert torch.equal(cu_seqlens_k, cu_seqlens_q)
            return ref.varlen_causal_attention(q, k, v, cu_seqlens_q, softmax_scale)
        lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        return ref.paged_prefill_attention(q, k, v, cu_seqlens_q, lens, block_table, softmax_scale)

    def with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal):
        assert q.dim() == 4 and q.shape[1] == 1 and cache_seqlens.dtype == torch.int32
        return ref.paged_decode_attention(q[:, 0], k_cache, v_cache, cache_seqlens, block_table,
                                          softmax_scale).unsqueeze(1)

    stub = types.ModuleType("flash_attn")
    stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)     # find_spec sees it installed
    stub.flash_attn_varlen_func, stub.flash_attn_with_kvcache = varlen, with_kvcache
    flash_backend, torch_backend = BACKENDS["flash_attn"], BACKENDS["torch"]()
    with isolated_modules(("flash_attn",)):
        sys.modules["flash_attn"] = stub
        for bad in (16, 128, 300):
            with pytest.raises(ValueError, match="multiple of 256"):
                flash_backend.check("cuda", bad, fp8=False)
        flash_backend.check("cuda", 512, fp8=False)
        flash = flash_backend()

        seqs = [(0, 4), (9, 3), (0, 1)]
        context_lens = [cached + new for cached, new in seqs]
        k_cache, v_cache, tables = paged_cache(context_lens, 16, 2, 16, spare_blocks=0)
        kv = PagedKV(clean(k_cache), clean(v_cache), None, None)
        lens = torch.tensor(context_lens, dtype=torch.int64, device=DEVICE)     # the runner's decode inputs are int64
        cu = torch.tensor([0, 4, 7, 8], dtype=torch.int32, device=DEVICE)
        q = torch.randn(8, 4, 16, device=DEVICE)

        def prepared(**fields):
            ctx = Context(**fields)
            flash.prepare(ctx)
            return ctx
        ctx = prepared(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=4, max_seqlen_k=12, context_lens=lens,
                       block_tables=tables, has_cached_prefix=True)
        expected = torch_backend.prefill(q, None, None, kv, ctx, 0.5)
        torch.testing.assert_close(flash.prefill(q, None, None, kv, ctx, 0.5), expected)

        new_k, new_v = torch.randn(2, 8, 2, 16, device=DEVICE)
        ctx = prepared(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=4, context_lens=cu[1:] - cu[:-1],
                       block_tables=tables)
        expected = ref.varlen_causal_attention(q, new_k, new_v, cu, 0.5)
        torch.testing.assert_close(flash.prefill(q, new_k, new_v, None, ctx, 0.5), expected)

        ctx = prepared(context_lens=lens, block_tables=tables.long())
        torch.testing.assert_close(flash.decode(q[:3], kv, ctx, 0.5), torch_backend.decode(q[:3], kv, ctx, 0.5))


# ---- ahead-of-time compilation for an H100 -------------------------------------------------------------------

H100_SHARED_MEMORY = 227 * 1024
_PTXAS = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends", "nvidia", "bin", "ptxas")


def compile_for_h100(fn, constexprs, pointer_dtypes, num_warps, num_stages, maxnreg=None):
    """Compile a kernel for sm_90 without a GPU, specialised as a real launch would be: pointers and strides
    divisible by 16, other ints i32, pointers bf16 unless pointer_dtypes says otherwise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, "bf16")
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
        if name.endswith("_ptr") or "stride" in name:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))


def qwen3_kernel_configs(fp8: bool):
    """(kernel, constexprs, pointer dtypes, warps, stages, streams K/V) as the backend launches them for Qwen3-0.6B,
    over a bf16 or an fp8 cache."""
    k = backend.kernels
    tables = dict(context_lens_ptr="i32", block_tables_ptr="i32")
    decode = backend.decode_launch(torch.float8_e4m3fn if fp8 else torch.bfloat16)
    cache = dict(k_cache_ptr="fp8e4nv", v_cache_ptr="fp8e4nv", k_scale_ptr="fp32", v_scale_ptr="fp32") if fp8 else {}
    return {
        "store": (k.store_kvcache_kernel, dict(NUM_KV_HEADS=8, HEADS_PAD=8, HEAD_DIM=128, KV_FP8=fp8),
                  dict(slot_mapping_ptr="i64", **cache), 4, 3, True),
        "prefill": (k.prefill_kernel, dict(GROUP=2, BLOCK_SIZE=256, HEAD_DIM=128, BLOCK_M=backend.PREFILL_BLOCK_M,
                                           BLOCK_N=backend.PREFILL_BLOCK_N, DOT_PRECISION="tf32", KV_FP8=fp8),
                    dict(cu_seqlens_q_ptr="i32", **tables, **cache), backend.PREFILL_WARPS, backend.PREFILL_STAGES,
                    True),
        "decode": (k.decode_split_kernel, dict(GROUP=2, GROUP_PAD=16, BLOCK_SIZE=256, HEAD_DIM=128,
                                               BLOCK_N=decode.block_n, DOT_PRECISION="tf32", KV_FP8=fp8,
                                               WIDEN_K="k" in decode.widen, WIDEN_V="v" in decode.widen,
                                               QUERY_FP8=decode.query_fp8, KEYS_MAJOR=decode.keys_major,
                                               WEIGHTS_FP8=decode.weights_fp8,
                                               ORDERED=True,    # as large batches launch it (decode_order)
                                               PDL=True),       # as launched on Hopper (kernels/pdl.py)
                   # the runner's decode inputs are one int64 buffer (engine/decode_inputs.py)
                   dict(part_out_ptr="fp32", part_lse_ptr="fp32", context_lens_ptr="i64", block_tables_ptr="i64",
                        seq_order_ptr="i64", **cache), decode.warps, decode.stages, True),
        "merge": (k.decode_merge_kernel, dict(SPLITS_PAD=16, HEAD_DIM=128, BLOCK_N=decode.block_n, PDL=True),
                  dict(part_out_ptr="fp32", part_lse_ptr="fp32", context_lens_ptr="i64"), 4, 1, False),
    }


@pytest.mark.skipif(CUDA, reason="with CUDA the other tests compile and run these kernels for real")
@pytest.mark.skipif(INTERPRETING, reason="this process runs Triton's interpreter, which cannot compile")
@pytest.mark.skipif(not os.path.exists(_PTXAS), reason="this Triton install has no ptxas")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("kernel,fp8", [("store", False), ("prefill", False), ("decode", False), ("merge", False),
                                        ("store", True), ("prefill", True), ("decode", True)])
def test_kernels_compile_for_h100_with_16_byte_loads(kernel, fp8):
    """Catches what the interpreter cannot: lowering errors, shared memory over an H100's, and scalar K/V loads
    (the cache must be streamed with 16-byte vector loads to approach full bandwidth). An fp8 store must round
    with the hardware's nearest-even, saturating conversion (the interpreter's rounding is patched, see above)."""
    fn, constexprs, pointer_dtypes, warps, stages, streams_kv = qwen3_kernel_configs(fp8)[kernel]
    launch = backend.decode_launch(FP8 if fp8 else torch.bfloat16)
    registers = launch.max_registers if kernel == "decode" else None
    compiled = compile_for_h100(fn, constexprs, pointer_dtypes, warps, stages, registers)
    assert compiled.metadata.shared <= H100_SHARED_MEMORY
    if registers:   # the cap is there so that more programs fit an SM: their shared memory must fit too
        programs = 64 * 1024 // (registers * 32 * warps)
        assert programs * compiled.metadata.shared <= H100_SHARED_MEMORY, (programs, compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    if streams_kv:
        scalar_load = "ld.global.b8" if fp8 and kernel != "store" else "ld.global.b16"
        assert scalar_load not in ptx and ("cp.async.cg.shared.global" in ptx or "ld.global.v4" in ptx)
    if kernel in ("decode", "merge"):   # launched with PDL: q, the cache and the partials only after the wait
        body = ptx.split(".entry", 1)[1]
        wait = body.index("griddepcontrol.wait")
        assert body.index("griddepcontrol.launch_dependents") < wait
        assert all(wait < m.start() for m in re.finditer(r"st\.global|cp\.async|ld\.global\.v4", body))
    if fp8 and kernel == "store":
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    if fp8 and kernel in ("prefill", "decode"):    # widened straight to float16, not on through float32 to bf16
        assert "cvt.rn.f16x2.e4m3x2" in ptx and "cvt.bf16.f16" not in ptx


# ---- real sizes on the GPU ------------------------------------------------------------------------------------

QWEN3_0_6B = dict(heads=16, kv_heads=8, head_dim=128, block_size=256)
BF16_TOL = dict(atol=1e-2, rtol=1e-2)


KV_DTYPES = [torch.bfloat16, pytest.param(FP8, marks=fp8_capable)]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_real_size_prefill(kv_dtype):
    seqs = [(0, 1), (0, 300), (512, 200), (1000, 1), (0, 1024), (2560, 512), (255, 257)]
    out, expected = run_prefill(seqs, **QWEN3_0_6B, dtype=torch.bfloat16, scale=128 ** -0.5, kv_dtype=kv_dtype)
    assert_matches(out, expected, **BF16_TOL)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("launch", LAUNCH_VARIANTS)
def test_real_size_decode(num_splits, kv_dtype, launch):
    torch.manual_seed(1)
    contexts = [1, 63, 64, 65, 255, 256, 257, 511, 512, 513, 4096, 0, 0]
    contexts += torch.randint(1, 3000, (40,)).tolist()
    out, expected, real = run_decode(contexts, **QWEN3_0_6B, num_splits=num_splits, dtype=torch.bfloat16,
                                     scale=128 ** -0.5, kv_dtype=kv_dtype, launch=launch)
    assert_matches(out[real], expected[real], **BF16_TOL)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_real_size_decode_few_programs(num_splits, kv_dtype):
    """Four sequences of Qwen3-0.6B's eight KV heads, few enough for DECODE_FEW_PROGRAMS: a bf16 cache's smaller
    tiles, and an fp8 cache's (16 KB already at the launch's 128 tokens) under the same split counts."""
    out, expected, real = run_decode([1, 65, 513, 3000], **QWEN3_0_6B, num_splits=num_splits, dtype=torch.bfloat16,
                                     scale=128 ** -0.5, kv_dtype=kv_dtype)
    assert_matches(out[real], expected[real], **BF16_TOL)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_real_size_decode_longest_first(kv_dtype):
    torch.manual_seed(2)
    contexts = torch.randint(1, 3000, (300,)).tolist() + [0] * 20      # programs in several waves
    out, expected, real = run_decode(contexts, **QWEN3_0_6B, num_splits=None, dtype=torch.bfloat16,
                                     scale=128 ** -0.5, kv_dtype=kv_dtype, seq_order="longest")
    assert_matches(out[real], expected[real], **BF16_TOL)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_decode_cuda_graph_replay(kv_dtype):
    """Store + decode captured once at a padded batch (slot -1, context_len 0 rows), replayed on new inputs; an fp8
    cache's scales change between replays, which the graph must read from their tensors, not from the capture."""
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 256
    real_contexts, graph_batch, width = [2, 300, 256, 700, 2000], 8, 16
    k_cache, v_cache, tables = paged_cache(real_contexts, block_size, kv_heads, head_dim, kv_dtype)
    k_cache, v_cache = clean(k_cache), clean(v_cache)
    k_scale, v_scale = kv_scales(kv_dtype)
    static = dict(q=torch.zeros(graph_batch, heads, head_dim, dtype=torch.bfloat16, device=DEVICE),
                  k=torch.zeros(graph_batch, kv_heads, head_dim, dtype=torch.bfloat16, device=DEVICE),
                  slots=torch.full((graph_batch,), -1, dtype=torch.int64, device=DEVICE),
                  lens=torch.zeros(graph_batch, dtype=torch.int32, device=DEVICE),
                  tables=torch.zeros(graph_batch, width, dtype=torch.int32, device=DEVICE))
    static["v"] = torch.zeros_like(static["k"])

    def step():
        backend.store_kvcache(static["k"], static["v"], k_cache, v_cache, static["slots"], k_scale, v_scale)
        return backend.paged_decode_attention(static["q"], k_cache, v_cache, static["lens"], static["tables"],
                                              128 ** -0.5, k_scale=k_scale, v_scale=v_scale)

    step()                      # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(2):
        n = len(real_contexts) - trial          # fewer, shorter rows on the second replay: the rest is padding
        lens = torch.tensor(real_contexts[:n], device=DEVICE) - trial
        positions = (lens - 1).long()
        table = tables[:n].clamp_min(0).long()
        slots = table.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
        static["q"].normal_()
        static["k"].normal_()
        static["v"].normal_()
        static["slots"].fill_(-1)
        static["slots"][:n] = slots
        static["lens"].zero_()
        static["lens"][:n] = lens.to(torch.int32)
        static["tables"][:n, :tables.shape[1]] = tables[:n]
        if kv_dtype == FP8:
            k_scale.fill_(0.05 * (trial + 1))
            v_scale.fill_(2.0 / (trial + 1))
        graph.replay()
        expected = ref.paged_decode_attention(static["q"][:n].float(), k_cache, v_cache, static["lens"][:n],
                                              tables[:n], 128 ** -0.5, k_scale=k_scale, v_scale=v_scale)
        assert_matches(out[:n], expected, **BF16_TOL)
        assert torch.isfinite(out[n:]).all()
        stored = k_cache.view(-1, kv_heads, head_dim)[slots]
        new_k = static["k"][:n] if kv_dtype != FP8 else ref.quantize_fp8(static["k"][:n], k_scale)
        assert torch.equal(stored.view(torch.uint8), new_k.view(torch.uint8))


@pytest.mark.cuda
@cuda_only
def test_step_shapes_select_no_new_kernel_variant():
    """The block table's width and the decode split count change from step to step. Triton compiles a kernel again
    for an integer argument that turns 1 or a multiple of 16, so unless the kernels opt out, a request meets
    variants start-up never launched and waits seconds for their compile (benchmarks/lab/first_request.py)."""
    from triton import knobs
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 256
    k_cache, v_cache, tables = paged_cache([1024], block_size, kv_heads, head_dim, torch.bfloat16)

    def table(width):       # the sequence's pages, then -1 up to `width` columns
        padded = torch.full((1, width), -1, dtype=torch.int32, device=DEVICE)
        padded[0, :min(width, 4)] = tables[0, :min(width, 4)]
        return padded

    def prefill(width, dtype=torch.bfloat16):     # the sequence's first page
        q = torch.randn(256, heads, head_dim, device=DEVICE, dtype=dtype)
        cu_seqlens, lens = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in ([0, 256], [256]))
        backend.paged_prefill_attention(q, k_cache.to(dtype), v_cache.to(dtype), cu_seqlens, lens, table(width),
                                        0.1, max_seqlen_q=256)

    def decode(width, num_splits):      # over the pages the table holds
        q = torch.randn(1, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
        lens = torch.tensor([min(4, width) * block_size], dtype=torch.int32, device=DEVICE)
        backend.paged_decode_attention(q, k_cache, v_cache, lens, table(width), 0.1, num_splits=num_splits)

    # One launch of each kind, as start-up's warm-up makes (a split count's power of two above it is a constexpr of
    # the merge: 9 and 16 share one; graph sizes keep their split counts)
    prefill(5), decode(5, 9), decode(5, 1)
    compiled = []

    def record(*, fn, **kwargs):
        compiled.append(fn.name)
        return False
    knobs.runtime.jit_cache_hook = record
    try:
        prefill(1), prefill(16), decode(16, 16), decode(32, 16), decode(1, 1), decode(16, 1)
        torch.cuda.synchronize()
        assert compiled == []
        prefill(5, torch.float16)       # a new dtype: a new variant, which the hook must see
        assert compiled == ["prefill_kernel"]
    finally:
        knobs.runtime.jit_cache_hook = None
