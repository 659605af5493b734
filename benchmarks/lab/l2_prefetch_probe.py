"""Whether streaming a block's later weights into L2 while batch-1 attention runs shortens the GEMV chain: the four
GEMVs of a decoder block as the model runs them (norm+qkv, o, norm+gate_up, gated down; x 28 layers with distinct
weights, one CUDA graph, PDL), with a spin kernel standing in for attention between qkv and o (it reads no memory,
as batch-1 attention at a short context nearly does). Microseconds per layer:

    distinct / hot      distinct weights per layer (today), or one layer's weights in every layer (all in L2: a bound)
    gap N               a spin of N cycles after the qkv GEMV (the gap alone is printed too)
    prefetch o,gu,down  the qkv GEMV then streams o, gate_up and down into L2 (kernels/gemv.py PREFETCH)

    PYTHONPATH=. python benchmarks/lab/l2_prefetch_probe.py [--model-config qwen3-0.6b] [--gaps 0 8000 16000]
"""
import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from nanovllm.kernels import gemv as g


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--gaps", type=int, nargs="+", default=[0, 8000, 16000])
    args = p.parse_args()
    cfg = json.load(open(f"nanovllm/configs/{args.model_config}/config.json"))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    qkv_n, attn = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd, cfg["num_attention_heads"] * hd
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)

    def layer():
        return dict(qkv=torch.randn(qkv_n, h, device=dev, dtype=dt) * 0.02,
                    o=torch.randn(h, attn, device=dev, dtype=dt) * 0.02,
                    gu=torch.randn(2 * inter, h, device=dev, dtype=dt) * 0.02,
                    down=torch.randn(h, inter, device=dev, dtype=dt) * 0.02,
                    n1=torch.ones(h, device=dev, dtype=dt), n2=torch.ones(h, device=dev, dtype=dt))
    distinct = [layer() for _ in range(args.layers)]
    hot = [distinct[0]] * args.layers
    nbytes = sum(t.nbytes for t in distinct[0].values())
    hidden, residual = torch.randn(1, h, device=dev, dtype=dt), torch.randn(1, h, device=dev, dtype=dt)
    a = torch.randn(1, attn, device=dev, dtype=dt)

    def chain(layers, gap, prefetch):
        x, res = hidden, residual
        for i, L in enumerate(layers):
            ahead = {"none": (), "o,gu,down": (L["o"], L["gu"], L["down"]),
                     "gu,down,next qkv": (L["gu"], L["down"], layers[(i + 1) % len(layers)]["qkv"])}[prefetch]
            g.norm_gemv(x, res, L["n1"], 1e-6, L["qkv"], prefetch=ahead)
            if gap:
                torch.cuda._sleep(gap)
            o = g.gemv(a, L["o"])
            gu, res = g.norm_gemv(o, res, L["n2"], 1e-6, L["gu"])
            x = g.gemv(gu, L["down"], gated=True)

    def us(fn):
        return do_bench_cudagraph(fn, rep=50) * 1e3 / args.layers

    print(f"{args.model_config}: {nbytes / 1e6:.1f} MB of weights a layer", flush=True)
    for gap in args.gaps:
        gap_alone = us(lambda: [torch.cuda._sleep(gap) for _ in range(args.layers)]) if gap else 0.0
        row = {name: us(lambda: chain(layers, gap, pf)) for name, layers, pf in (
            ("distinct", distinct, "none"), ("hot", hot, "none"), ("prefetch o,gu,down", distinct, "o,gu,down"),
            ("prefetch gu,down,next qkv", distinct, "gu,down,next qkv"))}
        print(f"gap {gap} cycles ({gap_alone:.2f} us alone): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
              + " us/layer", flush=True)


if __name__ == "__main__":
    main()
