"""A batch-1 GEMV that streams its weights into shared memory before its PDL wait (a prototype, issue #24).

gemv.py's kernel holds the weights it prefetches in registers (a 4-column program uses 72 of them a thread for 16
of weights), so only a few of a wide GEMV's programs fit an SM at once: the critical path (critical_path.py) shows
the gate/up GEMV adding 6.9 us for its 12.6 MB, most of it loaded after its wait. Here a program copies its
BLOCK_N x K weights into shared memory with cp.async (Gluon, Triton's explicit-layout dialect: plain Triton only
stages a dot's operands), waits, then reads x and its weights back, one thread the elements it copied itself (no
barrier). With few registers a program, all of a GEMV's programs can be resident while the kernels before it run,
and with programmatic dependent launch the next GEMVs launch as soon as the previous ones' programs have all started.

    PYTHONPATH=. python benchmarks/lab/prefetch_gemv.py [--model-config qwen3-0.6b] [--layers 28]

(Shapes whose K is a multiple of 256: Qwen3-0.6B, Llama-3.2-1B; not SmolLM2-135M's 576.) Compiled for sm_90 with
Triton 3.6, the device's: 38-50 registers a thread at 4-8 rows a program, the copies before the wait.

Prints, for the four linear layers of a block chained over the layers in one CUDA graph (plain GEMVs: no norm or
gate in either kernel), microseconds a layer for gemv.py's kernel and for this one at several BLOCK_N, each checked
against torch first; then the same with three small dependent kernels between qkv and o standing in for attention.
"""
import argparse
import json

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from nanovllm.kernels import gemv as g, pdl

# Triton 3.6 names it async_copy_global_to_shared; 3.9 async_load.
_copy_to_shared = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _pdl(asm: gl.constexpr, PDL: gl.constexpr):
    if PDL:
        gl.inline_asm_elementwise(asm + " // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def prefetch_gemv_kernel(x_ptr, w_ptr, out_ptr, K: gl.constexpr, K_PAD: gl.constexpr, BLOCK_N: gl.constexpr,
                         WARPS: gl.constexpr, PDL: gl.constexpr):
    """Program n: out[0, n * BLOCK_N:(n + 1) * BLOCK_N] = x[0] @ W[those rows].T (N a multiple of BLOCK_N, K of
    256, BLOCK_N of WARPS); float32 sums. A warp owns BLOCK_N / WARPS rows, a thread 8 consecutive elements of a
    256-wide chunk: 16-byte copies, conflict-free shared reads, and the row sums need no barrier."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])
    shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    CHUNK: gl.constexpr = 256
    pid = gl.program_id(0)
    rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    ks = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, K_PAD], shared)     # a power of two: Gluon's rule
    _pdl("griddepcontrol.launch_dependents;", PDL)
    for c in gl.static_range(K // CHUNK):
        _copy_to_shared(w_smem.slice(c * CHUNK, CHUNK, dim=1),
                        w_ptr + rows[:, None].to(gl.int64) * K + c * CHUNK + ks[None, :])
    async_copy.commit_group()
    _pdl("griddepcontrol.wait;", PDL)
    acc = gl.zeros([BLOCK_N, CHUNK], gl.float32, layout=layout)
    async_copy.wait_group(0)        # this thread's own copies: it reads back only what it copied
    for c in gl.static_range(K // CHUNK):
        x = gl.load(x_ptr + c * CHUNK + ks).to(gl.float32)
        w = w_smem.slice(c * CHUNK, CHUNK, dim=1).load(layout).to(gl.float32)
        acc += w * x[None, :]
    gl.store(out_ptr + rows, gl.sum(acc, axis=1).to(gl.bfloat16))


def prefetch_gemv(x, w, out, block_n, pdl, warps=4):
    n, k = w.shape
    prefetch_gemv_kernel[(n // block_n,)](x, w, out, K=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=block_n,
                                          WARPS=warps, PDL=pdl, num_warps=warps,
                                          **({"launch_pdl": True} if pdl else {}))


def shipped_gemv(x, w, out, pdl):
    n, k = w.shape
    g.gemv_kernel[(triton.cdiv(n, g.GEMV_BLOCK_N),)](
        x, w, out, 1, n, k, x.stride(0), w.stride(0), out.stride(0), M_PAD=1, BLOCK_N=g.GEMV_BLOCK_N,
        BLOCK_K=min(g.GEMV_MAX_BLOCK_K, triton.next_power_of_2(k)), PDL=pdl, num_warps=g.GEMV_WARPS, num_stages=1,
        **({"launch_pdl": True} if pdl else {}))


@triton.jit
def _stand_in_kernel(x_ptr, PDL: tl.constexpr):
    # attention's three small dependent kernels at batch 1: read a few values, write them back
    pdl.launch_dependents(PDL)
    pdl.wait_for_inputs(PDL)
    offs = tl.arange(0, 128)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args()
    from triton.testing import do_bench_cudagraph
    cfg = json.load(open(f"nanovllm/configs/{args.model_config}/config.json"))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    qkv_n, attn = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd, cfg["num_attention_heads"] * hd
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    shapes = dict(qkv=(qkv_n, h), o=(h, attn), gu=(2 * inter, h), down=(h, inter))
    layers = [{name: torch.randn(*s, device=dev, dtype=dt) * 0.02 for name, s in shapes.items()}
              for _ in range(args.layers)]
    nbytes = sum(w.numel() * 2 for w in layers[0].values())
    x_in = {"qkv": torch.randn(1, h, device=dev, dtype=dt), "o": torch.randn(1, attn, device=dev, dtype=dt),
            "gu": torch.randn(1, h, device=dev, dtype=dt), "down": torch.randn(1, inter, device=dev, dtype=dt)}
    outs = {name: torch.empty(1, s[0], device=dev, dtype=dt) for name, s in shapes.items()}
    scratch = torch.zeros(128, device=dev, dtype=torch.float32)

    def check(name, fn):
        w, x = layers[0][name], x_in[name]
        out = torch.full((1, w.shape[0]), float("nan"), device=dev, dtype=dt)
        fn(x, w, out)
        ref = (x.float() @ w.float().T)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, (name, err)

    def chain(gemv, gap, pdl):
        for L in layers:
            gemv(x_in["qkv"], L["qkv"], outs["qkv"])
            for _ in range(3 if gap else 0):
                _stand_in_kernel[(1,)](scratch, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
            gemv(x_in["o"], L["o"], outs["o"])
            gemv(x_in["gu"], L["gu"], outs["gu"])
            gemv(x_in["down"], L["down"], outs["down"])

    print(f"{args.model_config}: {nbytes / 1e6:.1f} MB of weights a layer ({nbytes / 4.26e6:.2f} us at 4.26 TB/s)")
    variants = {"gemv.py": lambda x, w, o: shipped_gemv(x, w, o, True)}
    for bn in (4, 8, 16):
        for warps in (4,) if bn == 4 else (2, 4):
            variants[f"prefetch n{bn} w{warps}"] = (lambda bn, warps: lambda x, w, o: prefetch_gemv(x, w, o, bn, True,
                                                                                                    warps))(bn, warps)
    for label, gemv in variants.items():
        try:
            for name in shapes:
                check(name, gemv)
            row = [do_bench_cudagraph(lambda: chain(gemv, gap, True), rep=50) * 1e3 / args.layers
                   for gap in (False, True)]
            print(f"{label:22s} chain {row[0]:6.2f} us a layer, with 3 stand-in kernels {row[1]:6.2f}", flush=True)
        except Exception as e:      # a prototype: one variant's failure must not hide the others
            print(f"{label:22s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
