"""The Triton kernels of the model's small layers (nanovllm/kernels/fused_layers.py) against the torch.compile'd
torch code they replaced, at Qwen3-0.6B's sizes in bf16, on one CUDA GPU.

    python benchmarks/layer_kernels.py              # checks, compile costs, timings at 1, 64, 256 and 16384 tokens
    python benchmarks/layer_kernels.py --warm-caches   # reuse the Triton/Inductor disk caches (a second start-up)

Shapes: hidden 1024, 16 query / 8 KV heads of 128, intermediate 3072, rope theta 1e6. The compiled side is
what the layers did before (nanovllm/utils/compile.py, since removed): torch.compile(fn, dynamic=True), one compiled function
for every RMSNorm (hidden rows and q/k heads alike), one for silu-and-mul, one for the rotary embedding; its q/k
step is three calls (q norm, k norm, rotary) where the kernel is one.

1. Checks: each kernel against the eager torch code (PASS/FAIL; bf16, so small differences are expected).
2. First-call cost of each op at each size in turn, with empty disk caches unless --warm-caches: Triton
   compiles once per op; torch.compile compiles, then recompiles when a size changes its guards.
3. Timings with CUDA events after warm-up, L2 not flushed (decode sizes stay in L2, as in the model; a 16384-token
   call moves 67-300 MB, more than the 50 MB L2). "graph": N calls captured in one CUDA graph and replayed, the
   GPU time per call as decode sees it. "eager": N launches back to back, so host launch cost counts when it
   exceeds the GPU time. GB/s: bytes read + written per call / graph time.

Predictions, written before any run (H100, ~3.0 TB/s device copy):
- 16384 tokens (bandwidth-bound): rms_norm 67 MB in ~27 us, add+rms_norm 134 MB ~54 us, silu_and_mul 302 MB
  ~115 us (2.5-2.7 TB/s), qk_norm_rotary 210 MB ~90 us (~2.3 TB/s: one program per token, 8-byte accesses for k).
  torch.compile: about the same for the first three (Inductor emits the same one-pass kernels); its q/k step
  moves the q/k bytes three times in three kernels: ~3x slower (~250-350 us; docs/BENCHMARKS.md measured 6.8 ms
  of compiled rotary in a 28-layer 16384-token prefill step, ~240 us a layer).
- 1, 64, 256 tokens (latency-bound, < 1.5 MB a call): ~2-3 us per kernel in a graph for both; the q/k step
  ~2.5 us for the kernel against ~7-9 us for three compiled kernels. Eager launches: Triton ~4-8 us of host
  time per call, torch.compile ~15-30 us (guards and the Inductor wrapper), so Triton ~3x faster there.
- Per decoder layer at batch 1 in a graph (the four ops): ~10 us Triton against ~16-20 us compiled, so ~0.2 ms
  less per 28-layer decode step (of 1.98 ms measured at batch 1). Not the 2x batch 1 needs: the other launches
  per layer (KV store, split-KV decode and merge, four matmuls) stay.
"""
import argparse
import os
import sys
import tempfile
import time

if "--warm-caches" not in sys.argv:     # before torch/triton read them: a fresh machine's start-up
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")

import torch                                                        # noqa: E402
import triton                                                       # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovllm.kernels import fused_layers                           # noqa: E402
from nanovllm.layers.activation import silu_and_mul                 # noqa: E402
from nanovllm.layers.layernorm import rms_norm                      # noqa: E402
from nanovllm.layers.rotary_embedding import RotaryEmbedding, apply_rotary     # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, MAX_POSITION, THETA = 1024, 3072, 16, 8, 128, 40960, 1e6
DTYPE, EPS, LAYERS = torch.bfloat16, 1e-6, 28
TOKENS = [1, 64, 256, 16384]
PREDICTED_US = {    # graph time per call: (Triton, torch.compile), from the docstring
    "rms_norm": {16384: (27, 30)}, "add_rms_norm": {16384: (54, 60)}, "silu_and_mul": {16384: (115, 125)},
    "qk_norm_rotary": {16384: (90, 300)},
}
PREDICTED_SMALL_US = {"qk_norm_rotary": (2.5, 8)}      # 1..256 tokens; the others ~2.5 us on both sides
failures = []

compiled_rms_norm = torch.compile(rms_norm, dynamic=True)
compiled_silu_and_mul = torch.compile(silu_and_mul, dynamic=True)
compiled_apply_rotary = torch.compile(apply_rotary, dynamic=True)


def make_inputs(tokens: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale + shift).to(DTYPE)

    qkv = randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    rotary = RotaryEmbedding(HEAD_DIM, MAX_POSITION, THETA).cuda()
    return dict(x=randn(tokens, HIDDEN), residual=randn(tokens, HIDDEN), weight=randn(HIDDEN, scale=0.1, shift=1),
                gate_up=randn(tokens, 2 * INTERMEDIATE), q=q.view(tokens, HEADS, HEAD_DIM),
                k=k.view(tokens, KV_HEADS, HEAD_DIM), q_weight=randn(HEAD_DIM, scale=0.1, shift=1),
                k_weight=randn(HEAD_DIM, scale=0.1, shift=1), cos=rotary.cos, sin=rotary.sin,
                positions=torch.randint(0, MAX_POSITION, (tokens,), device="cuda", generator=gen))


def ops(a: dict) -> dict:
    """name -> (Triton call, compiled call, eager torch call, bytes read + written per call)."""
    t, item = a["x"].shape[0], DTYPE.itemsize
    qk_bytes = 2 * t * (HEADS + KV_HEADS) * HEAD_DIM * item + t * HEAD_DIM * 4     # q, k in and out; cos/sin rows

    def qk(norm, rotary):
        return lambda: rotary(a["positions"], norm(a["q"], a["q_weight"], EPS), norm(a["k"], a["k_weight"], EPS),
                              a["cos"], a["sin"])

    return {
        "rms_norm": (lambda: fused_layers.rms_norm(a["x"], a["weight"], EPS),
                     lambda: compiled_rms_norm(a["x"], a["weight"], EPS),
                     lambda: rms_norm(a["x"], a["weight"], EPS), 2 * t * HIDDEN * item),
        "add_rms_norm": (lambda: fused_layers.rms_norm(a["x"], a["weight"], EPS, a["residual"]),
                         lambda: compiled_rms_norm(a["x"], a["weight"], EPS, a["residual"]),
                         lambda: rms_norm(a["x"], a["weight"], EPS, a["residual"]), 4 * t * HIDDEN * item),
        "silu_and_mul": (lambda: fused_layers.silu_and_mul(a["gate_up"]),
                         lambda: compiled_silu_and_mul(a["gate_up"]),
                         lambda: silu_and_mul(a["gate_up"]), 3 * t * INTERMEDIATE * item),
        "qk_norm_rotary": (lambda: fused_layers.qk_norm_rotary(a["positions"], a["q"], a["k"], a["cos"], a["sin"],
                                                               a["q_weight"], a["k_weight"], EPS),
                           qk(compiled_rms_norm, compiled_apply_rotary), qk(rms_norm, apply_rotary), qk_bytes),
    }


def flat(result) -> list:
    return list(result) if isinstance(result, tuple) else [result]


def check(tokens: int) -> None:
    for name, (kernel, compiled, eager, _) in ops(make_inputs(tokens, seed=1)).items():
        ok, worst = True, 0.0
        for actual, expected in zip(flat(kernel()), flat(eager())):
            worst = max(worst, (actual.float() - expected.float()).abs().max().item())
            ok &= bool(torch.isfinite(actual).all()) and torch.allclose(actual.float(), expected.float(),
                                                                         atol=2e-2, rtol=1.6e-2)
            ok &= (actual != expected).float().mean().item() < 0.01    # the kernels round where torch does
        print(f"{'PASS' if ok else 'FAIL'}  {name} at {tokens} tokens  max abs err {worst:.2e}")
        if not ok:
            failures.append(f"{name}@{tokens}")


def first_calls() -> None:
    """Wall time of each op's first call at each size in turn: compilation (and recompilation) cost."""
    caches = "warm disk caches" if "--warm-caches" in sys.argv else "empty disk caches"
    print(f"\nfirst call at each size, in order (ms, compilation included; {caches})")
    print(f"{'op':<16} " + " ".join(f"{f'{t} tok triton':>16} {f'{t} tok compile':>16}" for t in TOKENS))
    timed = {}
    for tokens in TOKENS:
        for name, (kernel, compiled, _, _) in ops(make_inputs(tokens)).items():
            for side, fn in (("triton", kernel), ("compile", compiled)):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                timed[name, tokens, side] = (time.perf_counter() - start) * 1e3
    for name in ops(make_inputs(1)):
        print(f"{name:<16} " + " ".join(f"{timed[name, t, 'triton']:>16.1f} {timed[name, t, 'compile']:>16.1f}"
                                        for t in TOKENS))
    for side in ("triton", "compile"):
        total = sum(v for (_, _, s), v in timed.items() if s == side)
        print(f"  {side}: {total / 1e3:.2f} s in all")


def time_eager_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def time_graph_us(fn, calls: int, replays: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    torch.cuda.empty_cache()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def timings() -> None:
    print("\ntimings per call (us); GB/s from the graph time; predicted: graph us, Triton / compile")
    print(f"{'op':<16} {'tokens':>6} {'triton graph':>13} {'compile graph':>14} {'speed-up':>9} {'triton GB/s':>12} "
          f"{'compile GB/s':>13} {'triton eager':>13} {'compile eager':>14}  predicted")
    per_layer = {}
    for tokens in TOKENS:
        calls = 10 if tokens >= 4096 else 100
        for name, (kernel, compiled, _, nbytes) in ops(make_inputs(tokens)).items():
            tg, cg = time_graph_us(kernel, calls), time_graph_us(compiled, calls)
            te, ce = time_eager_us(kernel, calls), time_eager_us(compiled, calls)
            per_layer[tokens] = [a + b for a, b in zip(per_layer.get(tokens, (0, 0)), (tg, cg))]
            guess = PREDICTED_US.get(name, {}).get(tokens) or PREDICTED_SMALL_US.get(name, (2.5, 2.5))
            print(f"{name:<16} {tokens:>6} {tg:>13.1f} {cg:>14.1f} {cg / tg:>8.2f}x {nbytes / tg / 1e3:>12.0f} "
                  f"{nbytes / cg / 1e3:>13.0f} {te:>13.1f} {ce:>14.1f}  {guess[0]} / {guess[1]}")
    print("\nthe four ops of one decoder layer (graph time, us), and x28 layers:")
    for tokens, (tg, cg) in per_layer.items():
        print(f"  {tokens:>6} tokens: Triton {tg:7.1f}  compiled {cg:7.1f}   x{LAYERS}: {tg * LAYERS / 1e3:.2f} ms vs "
              f"{cg * LAYERS / 1e3:.2f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-caches", action="store_true", help="keep the Triton and Inductor disk caches")
    parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    first_calls()
    print()
    for tokens in (1, 7, 256, 16384):
        check(tokens)
    timings()
    print(f"\n{'ALL CHECKS PASSED' if not failures else 'FAILED: ' + ', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
