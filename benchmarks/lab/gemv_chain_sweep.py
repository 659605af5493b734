"""Batch-1 decoder blocks' four GEMVs in a chain, as the model runs them (norm+qkv, o, norm+residual+gate_up,
gated down, x 28 layers with distinct weights, in one CUDA graph), over the GEMV's launch parameters, with and
without programmatic dependent launch: microseconds per layer and the weights' bandwidth. Attention is left out.

    PYTHONPATH=. python benchmarks/lab/gemv_chain_sweep.py [--model-config qwen3-0.6b]
"""
import argparse
import itertools
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from nanovllm.kernels import gemv as g, pdl


def launch(x, w, out, residual=None, norm_weight=None, residual_out=None, *, gated=False, norm=False, bn, bk, warps,
           pdl):
    n, k = w.shape
    g.gemv_kernel[(triton.cdiv(n, bn),)](
        x, w, out, 1, n, k, x.stride(0), w.stride(0), out.stride(0), residual, norm_weight, residual_out, 1e-6,
        M_PAD=1, BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(k)), GATED=gated, NORM=norm,
        ADD_RESIDUAL=residual is not None, PDL=pdl, num_warps=warps, num_stages=1, **({"launch_pdl": True} if pdl else {}))


def block_widths(model_config: str) -> tuple[int, int, int, int]:
    """A shipped config's hidden size, intermediate size, qkv width and attention output width."""
    cfg = json.load(open(f"nanovllm/configs/{model_config}/config.json"))
    h = cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return h, cfg["intermediate_size"], (heads + 2 * kv_heads) * hd, heads * hd


@triton.jit
def stand_in_kernel(x_ptr, PDL: tl.constexpr):
    """One of attention's small dependent kernels at batch 1, in a chain: read a few values, write them back."""
    pdl.launch_dependents(PDL)
    pdl.wait_for_inputs(PDL)
    offs = tl.arange(0, 128)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


def batch1_chain(model_config: str, num_layers: int) -> dict:
    """A batch-1 chain's tensors on the GPU: `layers` (num_layers dicts of a block's qkv, o, gate/up and down weights,
    random, and its two norms' weights n1, n2), `nbytes` (a layer's weights), and the activations the four GEMVs read
    (hidden, residual, attn_out, o_out, gate_up) and a float32 scratch row for stand-in kernels."""
    h, inter, qkv_n, attn = block_widths(model_config)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    shapes = dict(qkv=(qkv_n, h), o=(h, attn), gu=(2 * inter, h), down=(h, inter))
    layers = [{name: torch.randn(*s, device=dev, dtype=dt) * 0.02 for name, s in shapes.items()}
              | {"n1": torch.rand(h, device=dev, dtype=dt) + 0.5, "n2": torch.rand(h, device=dev, dtype=dt) + 0.5}
              for _ in range(num_layers)]
    return dict(layers=layers, nbytes=sum(layers[0][name].numel() * 2 for name in shapes),
                hidden=torch.randn(1, h, device=dev, dtype=dt), residual=torch.randn(1, h, device=dev, dtype=dt),
                attn_out=torch.randn(1, attn, device=dev, dtype=dt), o_out=torch.randn(1, h, device=dev, dtype=dt),
                gate_up=torch.randn(1, 2 * inter, device=dev, dtype=dt),
                scratch=torch.zeros(128, device=dev, dtype=torch.float32))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args()
    h, inter, qkv_n, attn = block_widths(args.model_config)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    layers = [dict(qkv=torch.randn(qkv_n, h, device=dev, dtype=dt) * 0.02, o=torch.randn(h, attn, device=dev, dtype=dt) * 0.02,
                   gu=torch.randn(2 * inter, h, device=dev, dtype=dt) * 0.02, down=torch.randn(h, inter, device=dev, dtype=dt) * 0.02,
                   n1=torch.ones(h, device=dev, dtype=dt), n2=torch.ones(h, device=dev, dtype=dt)) for _ in range(args.layers)]
    nbytes = sum(t.numel() * 2 for t in layers[0].values())
    hidden, residual = torch.randn(1, h, device=dev, dtype=dt), torch.randn(1, h, device=dev, dtype=dt)
    qkv, a, o, gu, down = (torch.empty(1, n, device=dev, dtype=dt) for n in (qkv_n, attn, h, 2 * inter, h))
    res1, res2 = torch.empty_like(residual), torch.empty_like(residual)

    def chain(cfgs, pdl):
        c_qkv, c_o, c_gu, c_down = cfgs
        for L in layers:
            launch(hidden, L["qkv"], qkv, residual, L["n1"], res1, norm=True, pdl=pdl, **c_qkv)
            launch(a, L["o"], o, pdl=pdl, **c_o)
            launch(o, L["gu"], gu, res1, L["n2"], res2, norm=True, pdl=pdl, **c_gu)
            launch(gu, L["down"], down, gated=True, pdl=pdl, **c_down)

    def us_per_layer(cfgs, pdl):
        return do_bench_cudagraph(lambda: chain(cfgs, pdl), rep=30) * 1e3 / args.layers

    def cublas():
        import torch.nn.functional as F
        for L in layers:
            F.linear(hidden, L["qkv"], out=qkv); F.linear(a, L["o"], out=o)
            F.linear(o, L["gu"], out=gu); F.linear(gu[:, :inter], L["down"], out=down)
    t = do_bench_cudagraph(cublas, rep=30) * 1e3 / args.layers
    print(f"{args.model_config}: {nbytes / 1e6:.1f} MB a layer; cuBLAS (no norm/gate fusion) {t:.2f} us/layer "
          f"{nbytes / t / 1e6:.2f} TB/s", flush=True)
    grid = [dict(bn=bn, bk=bk, warps=w) for bn, bk, w in itertools.product((1, 2, 4, 8, 16), (1024, 4096), (2, 4, 8))
            if bn * min(bk, 4096) <= 16384]     # a weight tile of at most 32 KB (registers)
    current = dict(bn=2, bk=1024, warps=4)
    results = []
    for with_pdl in (False, True):
        t = us_per_layer([current] * 4, with_pdl)
        print(f"current n2 k1024 w4, PDL {with_pdl}: {t:.2f} us/layer {nbytes / t / 1e6:.2f} TB/s", flush=True)
    for c in grid:      # the same parameters for all four
        t = us_per_layer([c] * 4, True)
        results.append((t, c))
    results.sort(key=lambda r: r[0])
    for t, c in results[:8]:
        print(f"all four {c}: {t:.2f} us/layer {nbytes / t / 1e6:.2f} TB/s", flush=True)
    # then per kernel: vary one position at a time from the best uniform choice
    best = [results[0][1]] * 4
    for pos, name in enumerate(("qkv", "o", "gate_up", "down")):
        trials = []
        for c in grid:
            cfgs = list(best); cfgs[pos] = c
            trials.append((us_per_layer(cfgs, True), c))
        trials.sort(key=lambda r: r[0])
        best[pos] = trials[0][1]
        print(f"{name}: best {trials[0][1]} -> {trials[0][0]:.2f} us/layer; next {[(round(tt, 2), cc) for tt, cc in trials[1:4]]}", flush=True)
    t = us_per_layer(best, True)
    t0 = us_per_layer(best, False)
    print(f"best per kernel {best}: PDL {t:.2f} us/layer ({nbytes / t / 1e6:.2f} TB/s), without PDL {t0:.2f}")


if __name__ == "__main__":
    main()
