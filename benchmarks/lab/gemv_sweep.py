"""Small-batch linear layers on the GPU: cuBLAS (F.linear) against the Triton GEMV (nanovllm/kernels/gemv.py) over
launch parameters, for Qwen3-0.6B's decode shapes at 1, 2 and 4 rows.

    python benchmarks/lab/gemv_sweep.py

Each measurement runs the layer over 28 distinct weights in a row, as the model's 28 layers do, inside a CUDA
graph (do_bench_cudagraph: GPU time without Python launch costs), so the weights come from HBM rather than L2.
Reported: microseconds per layer and the weight bandwidth; each Triton result is checked against F.linear.
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from nanovllm.kernels.gemv import gemv

SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024),
          "down_proj": (1024, 3072)}
LAYERS = 28
# (block_n, block_k, warps, stages)
CONFIGS = [(4, 512, 4, 4), (4, 512, 4, 2), (8, 512, 4, 3), (8, 256, 4, 4), (2, 1024, 4, 3), (4, 1024, 4, 2),
           (8, 1024, 8, 2), (16, 256, 4, 3), (16, 512, 8, 2), (2, 512, 2, 4)]


def main():
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(LAYERS)]
        nbytes = n * k * 2
        for m in (1, 2, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            results = []

            def bench(fn):
                ms = do_bench_cudagraph(lambda: [fn(x, w) for w in weights], rep=50)
                return ms * 1e3 / LAYERS
            us = bench(F.linear)
            results.append((us, "F.linear (cuBLAS)", 0.0))
            if m == 1:
                results.append((bench(lambda x, w: torch.mv(w, x[0])), "torch.mv", 0.0))
            for bn, bk, warps, stages in CONFIGS:
                if n % bn or k % bk:
                    continue
                fn = lambda x, w, c=(bn, bk, warps, stages): gemv(x, w, False, *c)  # noqa: E731
                err = ((fn(x, weights[0]).float() - F.linear(x, weights[0]).float()).abs().max()
                       / F.linear(x, weights[0]).float().abs().max()).item()
                results.append((bench(fn), f"gemv n{bn} k{bk} w{warps} s{stages}", err))
            for us, label, err in sorted(results)[:6]:
                print(f"{name:13} M={m} {label:26} {us:6.2f} us/layer {nbytes / us / 1e6:5.2f} TB/s  rel err {err:.1e}")
            print(f"{name:13} M={m} {'F.linear (cuBLAS)':26} "
                  f"{results[0][0]:6.2f} us/layer {nbytes / results[0][0] / 1e6:5.2f} TB/s")


if __name__ == "__main__":
    main()
