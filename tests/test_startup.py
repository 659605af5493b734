"""Start-up: Triton kernels compiled ahead in parallel (engine/compile_ahead.py) and the CUDA graph capture.

On the CPU: compile_ahead is a no-op there and with NANOVLLM_COMPILE_AHEAD=0, falls back (a warning, False) on any
failure, and skips launches only in the thread that discovers; a failed capture turns the garbage collector back on.
On a GPU: the same greedy tokens with and without it, and with an empty Triton cache nothing compiles on the main
thread (every kernel was compiled on the pool, though the discovery pass ran two decoder layers), tiny
and at real widths.
"""
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

from nanovllm.engine import compile_ahead as ca

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_noop_on_the_cpu_and_when_switched_off(monkeypatch):
    ran = []
    assert ca.compile_ahead(torch.device("cpu"), lambda: ran.append(1)) is False
    monkeypatch.setenv("NANOVLLM_COMPILE_AHEAD", "0")
    assert not ca.enabled(torch.device("cuda"))
    assert ca.compile_ahead(torch.device("cuda"), lambda: ran.append(1)) is False
    assert ran == []
    monkeypatch.delenv("NANOVLLM_COMPILE_AHEAD")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ca.enabled(torch.device("cuda:0"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ca.enabled(torch.device("cuda:0"))


def test_the_triton_install_hash_starts_on_a_thread(monkeypatch):
    """The function every kernel's cache key waits for is found in the installed Triton and filled by the thread."""
    pytest.importorskip("triton")
    from triton.runtime.cache import triton_key
    assert ca.hash_triton_install_in_background(torch.device("cpu")) is None
    monkeypatch.delenv("NANOVLLM_COMPILE_AHEAD", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_key.cache_clear()
    thread = ca.hash_triton_install_in_background(torch.device("cuda"))
    thread.join()
    assert triton_key.cache_info().currsize == 1


class FakeJIT:
    params = ()     # a kernel without parameters: its launches differ only in keyword arguments here

    def run(self, *args, grid, warmup, **kwargs):
        return warmup


def test_launches_are_skipped_only_in_the_discovering_thread_and_run_is_put_back():
    real = FakeJIT.run
    ca._install_skipping_run(FakeJIT)
    ca._install_skipping_run(FakeJIT)       # a second engine starting up at the same time
    try:
        kernel = FakeJIT()
        assert kernel.run(grid=(1,), warmup=False) is False
        ca._local.seen = set()
        other = []
        thread = threading.Thread(target=lambda: other.append(kernel.run(grid=(1,), warmup=False)))
        thread.start()
        thread.join()
        assert kernel.run(grid=(1,), warmup=False) is True and other == [False]
        # A launch that can only need the kernel just submitted does not reach Triton; other values do.
        assert kernel.run(grid=(2,), warmup=False) is None
        assert kernel.run(grid=(1,), warmup=False, BLOCK=64) is True
    finally:
        ca._local.seen = None
        ca._uninstall_skipping_run(FakeJIT)
        assert FakeJIT.run is not real      # the other engine still discovers
        ca._uninstall_skipping_run(FakeJIT)
    assert FakeJIT.run is real


class Param:
    def __init__(self, name, is_constexpr=False):
        self.name, self.is_constexpr = name, is_constexpr


def test_specialization_keeps_apart_what_triton_compiles_apart():
    class Kernel:
        params = [Param("x_ptr"), Param("n"), Param("BLOCK", is_constexpr=True)]
    key = lambda *args, **kwargs: ca._specialization(Kernel, args, kwargs)    # noqa: E731
    x = torch.zeros(64)
    assert key(x, 32, BLOCK=16) == key(torch.ones(64), 48, BLOCK=16)    # same dtype and alignment, both 16k
    assert key(x, 32, BLOCK=16) != key(x, 32, BLOCK=32)     # a constexpr's value
    assert key(x, 32, BLOCK=16) != key(x, 33, BLOCK=16)     # a multiple of 16 or not
    assert key(x, 2, BLOCK=16) != key(x, 1, BLOCK=16)       # 1
    assert key(x, 2, BLOCK=16) != key(x, 2**31 + 1, BLOCK=16)      # 64-bit
    assert key(x, 32, BLOCK=16) != key(x.half(), 32, BLOCK=16)      # dtype
    assert key(x, 32, BLOCK=16) != key(x[1:], 32, BLOCK=16)        # alignment
    assert key(x, 32, BLOCK=16, num_warps=4) != key(x, 32, BLOCK=16, num_warps=8)     # a launch option


@pytest.fixture
def pretend_cuda(monkeypatch):
    """compile_ahead's own CUDA calls made harmless, so that its Triton side runs on the CPU."""
    monkeypatch.setattr(ca, "enabled", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: "rng")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_a_failing_pass_falls_back_with_a_warning(pretend_cuda):
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "AsyncCompileMode"):
        pytest.skip("this Triton has no AsyncCompileMode")
    from triton.runtime.jit import JITFunction
    real_run, seen = JITFunction.run, []

    def discover():
        seen.append((JITFunction.run is not real_run, ca._local.seen is not None))
    assert ca.compile_ahead(torch.device("cuda"), discover) is True
    assert seen == [(True, True)]

    def fail():
        raise ValueError("no such kernel")
    with pytest.warns(UserWarning, match="compiling Triton kernels ahead failed.*no such kernel"):
        assert ca.compile_ahead(torch.device("cuda"), fail) is False
    assert JITFunction.run is real_run and getattr(ca._local, "seen", None) is None


@pytest.mark.parametrize("max_bs", [1, 7, 64, 100, 256, 512])
def test_graph_sizes_pad_little_and_stay_few(max_bs):
    """Every batch up to the largest graph runs in the smallest graph that fits it, padded by fewer rows than it has
    (below 16 rows), than half of them (from 16) and than 32 (from 96), and a 512-row engine captures no more than
    24 sizes: each costs start-up a discovery run and a capture."""
    from nanovllm.engine.cuda_graph import CUDAGraphs
    from nanovllm.engine.decode_inputs import DecodeInputs
    graphs = CUDAGraphs(None, DecodeInputs.empty(max_bs, 4, torch.device("cpu")), None, 8, torch.float32)
    sizes = graphs.batch_sizes
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_bs
    assert len(sizes) <= 24
    for batch in range(1, max_bs + 1):
        padded = graphs.padded_size(batch)
        assert padded == min(s for s in sizes if s >= batch)
        assert padded - batch < (batch if batch < 16 else batch / 2 if batch < 96 else 32)


def test_a_failed_capture_turns_the_garbage_collector_back_on(monkeypatch):
    from nanovllm.engine.cuda_graph import CUDAGraphs
    from nanovllm.engine.decode_inputs import DecodeInputs
    graphs = CUDAGraphs(torch.nn.Identity(), DecodeInputs.empty(4, 2, torch.device("cpu")), None, 8, torch.float32)

    def fail(self, bs):
        raise RuntimeError("capture broke")
    monkeypatch.setattr(CUDAGraphs, "_forward", fail)
    assert gc.isenabled()
    with pytest.raises(Exception):
        graphs.capture(warmed_up=True)
    assert gc.isenabled() and not graphs.graphs
    gc.disable()        # and one that was off stays off
    try:
        with pytest.raises(Exception):
            graphs.capture()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_discovery_pass_runs_the_first_two_layers_only_and_the_model_gets_all_back():
    from torch import nn

    from nanovllm.engine.model_runner import first_two_layers_only
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
    with first_two_layers_only(model):
        assert list(model.model.layers) == [layers[0], layers[1]]
    assert model.model.layers is layers
    with pytest.raises(RuntimeError), first_two_layers_only(model):
        raise RuntimeError("discovery failed")
    assert model.model.layers is layers and len(layers) == 4


@cuda
def test_the_same_greedy_tokens_with_and_without_compiling_ahead(qwen3_dir, monkeypatch):
    from nanovllm import LLM, SamplingParams
    batch = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {}
    for ahead in ("1", "0"):
        monkeypatch.setenv("NANOVLLM_COMPILE_AHEAD", ahead)
        llm = LLM(qwen3_dir, attention_backend="triton", kvcache_block_size=16, max_model_len=512,
                  num_kvcache_blocks=256, max_num_batched_tokens=1024, max_num_seqs=40)
        assert llm.executor.runner.graphs.graphs, "decode was not captured"
        outs[ahead] = [o["token_ids"] for o in llm.generate(batch, greedy, use_tqdm=False)]
        llm.exit()
        del llm
    assert outs["1"] == outs["0"]


COUNT_COMPILES = """
import sys, threading
import triton.compiler
real, where = triton.compiler.compile, []
def compile(*args, **kwargs):
    where.append(threading.current_thread() is threading.main_thread())
    return real(*args, **kwargs)
triton.compiler.compile = compile
from nanovllm import LLM
# A fixed cache size: the pytest process that starts this one may still hold GPU memory of its own engines.
llm = LLM(sys.argv[1], attention_backend="triton", kvcache_block_size=16, max_model_len=512,
          num_kvcache_blocks=256, max_num_batched_tokens=1024, max_num_seqs=40, load_format=sys.argv[2])
assert llm.executor.runner.graphs.graphs
print("compiles", len(where), "on the main thread", sum(where))
# Requests after start-up compile nothing: decodes, then prompts arriving while one and then several sequences
# decode, as graph rows and eagerly (400 tokens: more rows than the largest graph), the decodes as decode rows.
from nanovllm import SamplingParams
started, sp = len(where), SamplingParams(max_tokens=6, ignore_eos=True)
for arrivals in ([[5] * 20, [7] * 400], [[6] * 20] * 8 + [[8] * 30, [9] * 400]):
    llm.add_request(arrivals[0], sp)
    llm.step()
    for prompt in arrivals[1:]:
        llm.add_request(prompt, sp)
        llm.step()
    while not llm.is_finished():
        llm.step()
print("compiled after start-up", len(where) - started)
"""


def count_compiles(model: str, load_format: str, cache_dir, ahead: str) -> tuple[int, int]:
    """(kernels compiled, of them on the main thread) while `LLM(model)` starts in a fresh process with an empty
    Triton cache; and none compiled by the requests after it (asserted here)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache_dir), NANOVLLM_COMPILE_AHEAD=ahead, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-W", "error::UserWarning:nanovllm.engine.compile_ahead", "-c",
                             COUNT_COMPILES, model, load_format], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    assert words[-1] == "0", result.stdout[-2000:]
    return int(words[-10]), int(words[-5])


@cuda
@pytest.mark.parametrize("ahead", ["1", "0"])
def test_with_an_empty_triton_cache_every_kernel_compiles_on_the_pool(qwen3_dir, tmp_path, ahead):
    total, on_main = count_compiles(qwen3_dir, "auto", tmp_path, ahead)
    assert total > 10
    assert on_main == (0 if ahead == "1" else total)


@cuda
@pytest.mark.parametrize("name", ["qwen3-0.6b", "smollm2-135m"])
def test_at_real_shapes_the_discovery_pass_finds_every_kernel(name, tmp_path):
    """Triton specializes on widths (multiples of 16, the K tile), and the tiny test model's are not the real ones:
    at the shipped configs' shapes too, the two-layer discovery pass must find every kernel that any layer launches."""
    from nanovllm.configs import MODEL_CONFIGS
    total, on_main = count_compiles(MODEL_CONFIGS[name], "dummy", tmp_path, "1")
    assert total > 10 and on_main == 0
