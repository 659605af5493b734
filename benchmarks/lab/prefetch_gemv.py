"""A batch-1 GEMV that streams its weights into shared memory before its PDL wait (a prototype, issue #24).

gemv.py's kernel holds the weights it prefetches in registers (a 4-column program uses 72 of them a thread for 16
of weights), so only a few of a wide GEMV's programs fit an SM at once: the critical path (critical_path.py) shows
the gate/up GEMV adding 6.9 us for its 12.6 MB, most of it loaded after its wait. Here a program copies its
BLOCK_N x K weights into shared memory with cp.async (Gluon, Triton's explicit-layout dialect: plain Triton only
stages a dot's operands), waits, then reads x and its weights back, one thread the elements it copied itself (no
barrier). With few registers a program, all of a GEMV's programs can be resident while the kernels before it run,
and with programmatic dependent launch the next GEMVs launch as soon as the previous ones' programs have all started.

    PYTHONPATH=. python benchmarks/lab/prefetch_gemv.py [--model-config qwen3-0.6b] [--layers 28]
    PYTHONPATH=. python benchmarks/lab/prefetch_gemv.py --e2e "n8 w4"     # and --e2e gemv.py: the engine end to end

K is masked to 256-element chunks (shared memory is allocated to the next power of two), N to the rows a program
takes. Compiled for sm_90 with Triton 3.6 (the device's) and 3.9 on the CPU machine: the copies come before the
wait in both; 48-78 registers a thread at 8 rows in 3.6.

The chain: a block's four linear layers as the model calls them at batch 1 (norm + residual + qkv, o, norm +
residual + gate/up, gated down), 28 layers of distinct weights in one CUDA graph, gemv.py's kernel against this one
(routed through gemv.py's entry points, outputs checked against gemv.py's first), microseconds a layer; then with
three small dependent kernels after qkv standing in for attention's phases. --e2e: the engine itself.
"""
import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from benchmarks.lab.gemv_chain_sweep import batch1_chain, stand_in_kernel
from nanovllm.kernels import gemv as g

# Triton 3.6 names it async_copy_global_to_shared; 3.9 async_load.
_copy_to_shared = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _pdl(asm: gl.constexpr, PDL: gl.constexpr):
    if PDL:
        gl.inline_asm_elementwise(asm + " // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def prefetch_gemv_kernel(x_ptr, w_ptr, out_ptr, N, residual_ptr, norm_weight_ptr, residual_out_ptr, eps,
                         K: gl.constexpr, K_PAD: gl.constexpr, BLOCK_N: gl.constexpr, WARPS: gl.constexpr,
                         GATED: gl.constexpr, NORM: gl.constexpr, ADD_RESIDUAL: gl.constexpr, PDL: gl.constexpr):
    """Program n: out[0, n * BLOCK_N:(n + 1) * BLOCK_N] = x[0] @ W[those rows].T, float32 sums, with gemv.py's
    GATED / NORM / ADD_RESIDUAL input (rounded as it rounds); BLOCK_N a multiple of WARPS. A warp owns
    BLOCK_N / WARPS rows, a thread 8 consecutive elements of a 256-wide chunk: 16-byte copies, conflict-free shared
    reads, and the row sums need no barrier."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])
    shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    CHUNK: gl.constexpr = 256
    CHUNKS: gl.constexpr = (K + CHUNK - 1) // CHUNK
    dtype: gl.constexpr = out_ptr.dtype.element_ty
    pid = gl.program_id(0)
    rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    ks = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, K_PAD], shared)     # a power of two: Gluon's rule
    _pdl("griddepcontrol.launch_dependents;", PDL)
    for c in gl.static_range(CHUNKS):
        _copy_to_shared(w_smem.slice(c * CHUNK, CHUNK, dim=1),
                        w_ptr + rows[:, None].to(gl.int64) * K + c * CHUNK + ks[None, :],
                        mask=(c * CHUNK + ks[None, :] < K) & (rows[:, None] < N))
    async_copy.commit_group()
    _pdl("griddepcontrol.wait;", PDL)
    if NORM:
        sum_sq = gl.zeros([CHUNK], gl.float32, layout=gl.SliceLayout(0, layout))
        for c in gl.static_range(CHUNKS):
            x = _input_chunk(x_ptr, residual_ptr, c * CHUNK + ks, K, dtype, ADD_RESIDUAL)
            sum_sq += x * x
            if ADD_RESIDUAL:
                if pid == 0:
                    gl.store(residual_out_ptr + c * CHUNK + ks, x.to(dtype), mask=c * CHUNK + ks < K)
        rstd = gl.rsqrt(gl.sum(sum_sq, axis=0) / K + eps)
    acc = gl.zeros([BLOCK_N, CHUNK], gl.float32, layout=layout)
    async_copy.wait_group(0)        # this thread's own copies: it reads back only what it copied
    for c in gl.static_range(CHUNKS):
        kk = c * CHUNK + ks
        x = _input_chunk(x_ptr, residual_ptr, kk, K, dtype, ADD_RESIDUAL)
        if NORM:
            norm_weight = gl.load(norm_weight_ptr + kk, mask=kk < K, other=0.0).to(gl.float32)
            x = ((x * rstd).to(dtype).to(gl.float32) * norm_weight).to(dtype).to(gl.float32)
        if GATED:
            up = gl.load(x_ptr + K + kk, mask=kk < K, other=0.0).to(gl.float32)
            silu = (x / (1.0 + gl.exp(-x))).to(dtype).to(gl.float32)
            x = (silu * up).to(dtype).to(gl.float32)
        w = w_smem.slice(c * CHUNK, CHUNK, dim=1).load(layout).to(gl.float32)
        acc += gl.where(kk[None, :] < K, w, 0.0) * x[None, :]      # past K the shared memory was never written
    gl.store(out_ptr + rows, gl.sum(acc, axis=1).to(dtype), mask=rows < N)


@gluon.jit
def _input_chunk(x_ptr, residual_ptr, kk, K: gl.constexpr, dtype: gl.constexpr, ADD_RESIDUAL: gl.constexpr):
    x = gl.load(x_ptr + kk, mask=kk < K, other=0.0).to(gl.float32)
    if ADD_RESIDUAL:
        x = (x + gl.load(residual_ptr + kk, mask=kk < K, other=0.0).to(gl.float32)).to(dtype).to(gl.float32)
    return x


MAX_SHARED_PER_PROGRAM = 32 * 1024     # fewer rows a program for long rows (down's 3,072), so several fit an SM


def prefetch_gemv(x, w, out, block_n, pdl, warps=4, gated=False, residual=None, norm_weight=None,
                  residual_out=None, eps=0.0):
    n, k = w.shape
    k_pad = triton.next_power_of_2(max(k, 256))
    block_n = max(warps, min(block_n, MAX_SHARED_PER_PROGRAM // (2 * k_pad)))
    prefetch_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, n, residual, norm_weight, residual_out, eps, K=k, K_PAD=k_pad,
        BLOCK_N=block_n, WARPS=warps, GATED=gated, NORM=norm_weight is not None, ADD_RESIDUAL=residual is not None,
        PDL=pdl, num_warps=warps, **({"launch_pdl": True} if pdl else {}))


def install(block_n: int = 8, warps: int = 4):
    """Route gemv.py's batch-1 entry points (one row; the layers call them through the module) to this kernel."""
    original_gemv = g.gemv

    def gemv(x, weight, gated=False):
        if x.size(0) != 1:
            return original_gemv(x, weight, gated)
        out = torch.empty(1, weight.size(0), dtype=x.dtype, device=x.device)
        prefetch_gemv(x, weight, out, block_n, True, warps, gated=gated)
        return out

    def norm_gemv(x, residual, norm_weight, eps, weight):
        out = torch.empty(1, weight.size(0), dtype=x.dtype, device=x.device)
        residual_out = x if residual is None else torch.empty_like(x)
        prefetch_gemv(x, weight, out, block_n, True, warps, residual=residual, norm_weight=norm_weight,
                      residual_out=residual_out, eps=eps)
        return out, residual_out
    g.gemv, g.norm_gemv = gemv, norm_gemv


def chain_main(args):
    from triton.testing import do_bench_cudagraph
    t = batch1_chain(args.model_config, args.layers)
    layers, nbytes, scratch, eps = t["layers"], t["nbytes"], t["scratch"], 1e-6
    hidden, residual, attn_out, o_out, gate_up = (t[n] for n in ("hidden", "residual", "attn_out", "o_out", "gate_up"))

    def block(L, gap, pdl):     # one decoder block's four linear layers, as the model calls them at batch 1
        g.norm_gemv(hidden, residual, L["n1"], eps, L["qkv"])
        for _ in range(3 if gap else 0):
            stand_in_kernel[(1,)](scratch, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
        g.gemv(attn_out, L["o"])
        g.norm_gemv(o_out, residual, L["n2"], eps, L["gu"])
        g.gemv(gate_up, L["down"], gated=True)

    def outputs(L):     # every tensor the block's four calls return, norm_gemv's new residual included
        return [*g.norm_gemv(hidden, residual, L["n1"], eps, L["qkv"]), g.gemv(attn_out, L["o"]),
                *g.norm_gemv(o_out, residual, L["n2"], eps, L["gu"]), g.gemv(gate_up, L["down"], gated=True)]

    print(f"{args.model_config}: {nbytes / 1e6:.1f} MB of weights a layer ({nbytes / 4.26e6:.2f} us at 4.26 TB/s)")
    shipped = outputs(layers[0])
    original = g.gemv, g.norm_gemv
    for variant in ["gemv.py"] + [f"n{bn} w{w}" for bn in (4, 8, 16) for w in (4,) if bn >= w] + ["n16 w8"]:
        g.gemv, g.norm_gemv = original
        try:
            if variant != "gemv.py":
                bn, w = (int(part[1:]) for part in variant.split())
                install(bn, w)
                worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                            for a, b in zip(outputs(layers[0]), shipped))
                assert worst < 2e-2, f"differs from gemv.py by {worst:.3g} of the largest output"
            row = [do_bench_cudagraph(lambda: [block(L, gap, True) for L in layers], rep=50) * 1e3 / args.layers
                   for gap in (False, True)]
            print(f"{variant:10s} {row[0]:6.2f} us a layer ({nbytes / row[0] / 1e6:.2f} TB/s); with 3 stand-in "
                  f"kernels after qkv {row[1]:6.2f}", flush=True)
        except Exception as e:      # a prototype: one variant's failure must not hide the others
            print(f"{variant:10s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
    g.gemv, g.norm_gemv = original


def e2e_main(args, variant):
    """bench.py's batch-1 workload and 64 greedy tokens, in a fresh engine, gemv.py's kernel or this one."""
    from bench import MODEL_CONFIGS
    from benchmarks.lab.small_batch_decode import CASES, throughput
    from nanovllm import LLM, SamplingParams
    if variant != "gemv.py":
        install(*(int(part[1:]) for part in variant.split()))
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096)
    rates = throughput(llm, *CASES["b1"])
    greedy = llm.generate([[11, 22, 33, 44, 55, 66, 77, 88]], SamplingParams(temperature=0.0, ignore_eos=True,
                                                                           max_tokens=64), use_tqdm=False)
    print(f"e2e {args.model_config} {variant}: batch-1 {rates} tok/s; greedy "
          + " ".join(map(str, greedy[0]["token_ids"])), flush=True)
    llm.exit()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--e2e", help='a fresh engine with "gemv.py" or "nB wW" (rows and warps a program)')
    args = p.parse_args()
    if args.e2e:
        e2e_main(args, args.e2e)
    else:
        chain_main(args)


if __name__ == "__main__":
    main()
