"""Does warming L2 with a block's later weights, while attention's latency-bound kernels leave DRAM idle, speed up
the batch-1 GEMVs that follow? (a lab measurement, issue #24)

At batch 1 a decoder block's attention phases (q/k norm + rotary, decode split, merge: ~7 us) read almost nothing,
then the o, gate/up and down GEMVs stream 23 MB (Qwen3-0.6B) at well under DRAM's rate. `cp.async.bulk.prefetch.L2`
asks the memory system to bring bytes into L2 without holding registers or waiting, so a kernel of the attention
phase could start that stream early. The chain of prefetch_gemv.py (a block's four GEMVs as the model calls them,
three small dependent stand-in kernels after qkv for attention's phases, 28 layers of distinct weights, one CUDA
graph, PDL), microseconds a layer:
  base         gemv.py as shipped
  hot          every layer the same weights (31.5 MB, all in L2 after the first): the bound on what warming can buy
  warm-empty   a 132-program kernel after qkv that prefetches nothing: what one more kernel in the chain costs
  warm         that kernel prefetching the block's o, gate/up and down weights
  warm-fused   no extra kernel: the first stand-in runs on 132 programs and they prefetch (as a rotary kernel could)
  warm-next    warm-fused, and the next block's qkv weights too

    PYTHONPATH=. python benchmarks/lab/l2_warm.py [--model-config qwen3-0.6b] [--layers 28] [--chunk 4096]
"""
import argparse

import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from benchmarks.lab.gemv_chain_sweep import batch1_chain, stand_in_kernel
from nanovllm.kernels import gemv as g, pdl

WARM_PROGRAMS = 132


@triton.jit
def _prefetch_l2(base, nbytes, first_chunk, CHUNK: tl.constexpr, LANES: tl.constexpr):
    # chunks first_chunk + [0, LANES) of [base, base + nbytes), one bulk prefetch a lane; none past nbytes
    offsets = (first_chunk + tl.arange(0, LANES)).to(tl.int64) * CHUNK
    sizes = tl.minimum(nbytes - offsets, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + offsets, sizes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def warm_kernel(x_ptr, a0, n0, a1, n1, a2, n2, a3, n3, WORK: tl.constexpr, CHUNK: tl.constexpr,
                LANES: tl.constexpr, PDL: tl.constexpr):
    """Every program prefetches its share of up to four buffers (address, bytes), then waits; with WORK, program 0
    then does a stand-in's work."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    pdl.launch_dependents(PDL)
    for j in range(0, tl.cdiv(n0, CHUNK * LANES * programs)):
        _prefetch_l2(a0, n0, (j * programs + pid) * LANES, CHUNK, LANES)
    for j in range(0, tl.cdiv(n1, CHUNK * LANES * programs)):
        _prefetch_l2(a1, n1, (j * programs + pid) * LANES, CHUNK, LANES)
    for j in range(0, tl.cdiv(n2, CHUNK * LANES * programs)):
        _prefetch_l2(a2, n2, (j * programs + pid) * LANES, CHUNK, LANES)
    for j in range(0, tl.cdiv(n3, CHUNK * LANES * programs)):
        _prefetch_l2(a3, n3, (j * programs + pid) * LANES, CHUNK, LANES)
    pdl.wait_for_inputs(PDL)
    if WORK:
        if pid == 0:
            offs = tl.arange(0, 128)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--chunk", type=int, default=4096, help="bytes a bulk prefetch")
    args = p.parse_args()
    t = batch1_chain(args.model_config, args.layers)
    layers, nbytes, scratch, eps = t["layers"], t["nbytes"], t["scratch"], 1e-6
    hidden, residual, attn_out, o_out, gate_up = (t[n] for n in ("hidden", "residual", "attn_out", "o_out", "gate_up"))
    kw = {"PDL": True, "launch_pdl": True}

    def buffers(*tensors):
        pairs = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors] + [(0, 0)] * (4 - len(tensors))
        return [v for pair in pairs for v in pair]

    def block(i, variant):
        L = layers[0] if variant == "hot" else layers[i]
        g.norm_gemv(hidden, residual, L["n1"], eps, L["qkv"])
        if variant in ("warm", "warm-empty"):
            warm = buffers(L["o"], L["gu"], L["down"]) if variant == "warm" else buffers()
            warm_kernel[(WARM_PROGRAMS,)](scratch, *warm, WORK=False, CHUNK=args.chunk, LANES=128, num_warps=4, **kw)
        stand_ins = 3
        if variant in ("warm-fused", "warm-next"):
            nxt = [layers[(i + 1) % args.layers]["qkv"]] if variant == "warm-next" else []
            warm_kernel[(WARM_PROGRAMS,)](scratch, *buffers(L["o"], L["gu"], L["down"], *nxt), WORK=True,
                                          CHUNK=args.chunk, LANES=128, num_warps=4, **kw)
            stand_ins = 2
        for _ in range(stand_ins):
            stand_in_kernel[(1,)](scratch, **kw)
        g.gemv(attn_out, L["o"])
        g.norm_gemv(o_out, residual, L["n2"], eps, L["gu"])
        g.gemv(gate_up, L["down"], gated=True)

    print(f"{args.model_config}: {nbytes / 1e6:.1f} MB of weights a layer ({nbytes / 4.26e6:.2f} us at 4.26 TB/s), "
          f"{args.layers} layers, prefetch chunks of {args.chunk} bytes", flush=True)
    for variant in ("base", "hot", "warm-empty", "warm", "warm-fused", "warm-next", "base"):
        try:
            us = do_bench_cudagraph(lambda: [block(i, variant) for i in range(args.layers)], rep=100) * 1e3
            print(f"{variant:11s} {us / args.layers:6.2f} us a layer", flush=True)
        except Exception as e:      # one variant's failure must not hide the others
            print(f"{variant:11s} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
