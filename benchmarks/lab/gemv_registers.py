"""Are the batch-1 GEMVs slow because too few of their programs fit an SM at once? (a lab measurement, issue #24)

Compiled by the device's Triton 3.6 for sm_90a, gemv.py's kernel at 4 columns and 4 warps takes 128 registers a
thread for the norm + qkv and norm + gate/up projections (Qwen3-0.6B: K = 1,024), 168 for o, 255 and spills for the
gated down projection (ptxas -v): four programs an SM for the wide projections, so gate/up's 1,536 programs run in
three waves, each paying a program's whole dependent chain (wait, x, the norm's reduction, the dot, the store).
Here the chain of gemv_chain_sweep.py (the four GEMVs of a block as the model calls them, 28 layers of distinct
weights, one CUDA graph, PDL) under register caps (Triton's maxnreg: more programs an SM, some values spilled) and
other widths, microseconds a layer.

    PYTHONPATH=. python benchmarks/lab/gemv_registers.py [--model-config qwen3-0.6b] [--layers 28] [--caps 96 64]
    PYTHONPATH=. python benchmarks/lab/gemv_registers.py --e2e 64    # bench.py's batch-1 workload, norm_gemv capped
"""
import argparse

import torch
import triton
from triton.testing import do_bench_cudagraph

from benchmarks.lab.gemv_chain_sweep import block_widths
from nanovllm.kernels import gemv as g


def launch(x, w, out, residual=None, norm_weight=None, residual_out=None, *, gated=False, norm=False, bn=4, warps=4,
           maxnreg=None):
    n, k = w.shape
    g.gemv_kernel[(triton.cdiv(n, bn),)](
        x, w, out, 1, n, k, x.stride(0), w.stride(0), out.stride(0), residual, norm_weight, residual_out, 1e-6,
        M_PAD=1, BLOCK_N=bn, BLOCK_K=triton.next_power_of_2(k), GATED=gated, NORM=norm,
        ADD_RESIDUAL=residual is not None, PDL=True, num_warps=warps, num_stages=1, launch_pdl=True,
        **({"maxnreg": maxnreg} if maxnreg else {}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--caps", type=int, nargs="*", default=[96, 64, 48])
    p.add_argument("--e2e", type=int, help="a fresh engine, norm_gemv's registers capped at this (0: no cap)")
    args = p.parse_args()
    if args.e2e is not None:
        return e2e(args.model_config, args.e2e)
    h, inter, qkv_n, attn = block_widths(args.model_config)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    layers = [dict(qkv=torch.randn(qkv_n, h, device=dev, dtype=dt) * 0.02,
                   o=torch.randn(h, attn, device=dev, dtype=dt) * 0.02,
                   gu=torch.randn(2 * inter, h, device=dev, dtype=dt) * 0.02,
                   down=torch.randn(h, inter, device=dev, dtype=dt) * 0.02,
                   n1=torch.ones(h, device=dev, dtype=dt), n2=torch.ones(h, device=dev, dtype=dt))
              for _ in range(args.layers)]
    hidden, residual = torch.randn(1, h, device=dev, dtype=dt), torch.randn(1, h, device=dev, dtype=dt)
    qkv, a, o, gu, down = (torch.randn(1, n, device=dev, dtype=dt) for n in (qkv_n, attn, h, 2 * inter, h))
    res1, res2 = torch.empty_like(residual), torch.empty_like(residual)

    def chain(c_qkv, c_o, c_gu, c_down):
        for L in layers:
            launch(hidden, L["qkv"], qkv, residual, L["n1"], res1, norm=True, **c_qkv)
            launch(a, L["o"], o, **c_o)
            launch(o, L["gu"], gu, res1, L["n2"], res2, norm=True, **c_gu)
            launch(gu, L["down"], down, gated=True, **c_down)

    shipped = dict(bn=4, warps=4)
    trials = {"shipped (4 columns, 4 warps)": [shipped] * 4}
    for cap in args.caps:
        trials[f"wide two capped at {cap}"] = [dict(shipped, maxnreg=cap), shipped, dict(shipped, maxnreg=cap), shipped]
        trials[f"all four capped at {cap}"] = [dict(shipped, maxnreg=cap)] * 4
    if args.caps == [96, 64, 48]:
        for bn, warps in ((2, 2), (2, 4), (1, 1), (1, 2), (8, 8)):
            trials[f"{bn} columns, {warps} warps"] = [dict(bn=bn, warps=warps)] * 4
    trials["shipped again"] = [shipped] * 4
    for name, cfgs in trials.items():
        try:
            us = do_bench_cudagraph(lambda: chain(*cfgs), rep=50) * 1e3 / args.layers
            print(f"{args.model_config} {name:30s} {us:6.2f} us a layer", flush=True)
        except Exception as e:      # one trial's failure must not hide the others
            print(f"{args.model_config} {name:30s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)


def e2e(model_config: str, cap: int):
    """bench.py's batch-1 workload (1,024 tokens after a 16-token prompt, seed 1) three times in a fresh engine."""
    from bench import MODEL_CONFIGS
    from benchmarks.lab.small_batch_decode import CASES, throughput
    from nanovllm import LLM
    g.NORM_GEMV_MAX_REGISTERS = cap or None
    llm = LLM(MODEL_CONFIGS[model_config], load_format="dummy", max_model_len=4096)
    print(f"e2e {model_config} norm_gemv cap {cap or 'none'}: batch-1 {throughput(llm, *CASES['b1'])} tok/s",
          flush=True)
    llm.exit()


if __name__ == "__main__":
    main()
