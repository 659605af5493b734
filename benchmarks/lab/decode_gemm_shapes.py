"""The decode step's four linear layers (and the LM head) of a model at the CUDA graphs' batch sizes: cuBLAS as torch
calls it, against cuBLASLt (torch.backends.cuda.preferred_blas_library), each timed alone in a CUDA graph, with the
floor from its bytes (weights + activations at the copy rate) and its FLOPs (at the bf16 matmul rate).

    PYTHONPATH=. python benchmarks/lab/decode_gemm_shapes.py [--model-config qwen3-0.6b] [--rows 32 64 128 256]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

COPY_RATE, MATMUL_RATE = 4.26e12, 774e12       # the H200's measured device copy (bytes/s) and bf16 matmul (FLOP/s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--libraries", nargs="+", default=["cublas", "cublaslt"])
    args = p.parse_args()
    cfg = json.load(open(f"nanovllm/configs/{args.model_config}/config.json"))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    shapes = {"qkv": ((cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd, h),
              "o": (h, cfg["num_attention_heads"] * hd), "gate_up": (2 * inter, h), "down": (h, inter),
              "lm_head": (cfg["vocab_size"], h)}
    weights = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, kk) in shapes.items()}
    shipped = torch.backends.cuda.preferred_blas_library()
    print(f"{'layer':8} {'rows':>5} {'floor us':>9} " + " ".join(f"{lib + ' us':>12}" for lib in args.libraries))
    totals = {lib: {} for lib in args.libraries}
    for rows in args.rows:
        for name, w in weights.items():
            n, k = w.shape
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            floor = max((n * k + rows * (n + k)) * 2 / COPY_RATE, 2 * rows * n * k / MATMUL_RATE) * 1e6
            times = []
            for lib in args.libraries:
                torch.backends.cuda.preferred_blas_library(lib)
                out = F.linear(x, w)
                us = do_bench_cudagraph(lambda: F.linear(x, w), rep=30) * 1e3
                times.append(us)
                if name != "lm_head":
                    totals[lib][rows] = totals[lib].get(rows, 0.0) + us
                torch.backends.cuda.preferred_blas_library(shipped)
            print(f"{name:8} {rows:5d} {floor:9.2f} " + " ".join(f"{t:12.2f}" for t in times), flush=True)
    for lib, by_rows in totals.items():
        print(lib, "four layers of a block, us:", {r: round(t, 2) for r, t in by_rows.items()})


if __name__ == "__main__":
    main()
