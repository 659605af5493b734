"""Lower bound on the run time of bench.py's workload for a model on a GPU, and the fraction of it a run reached.

Every decode step must read the weights once and the whole KV cache of every running
sequence; prefill must do ~2*params FLOPs per prompt token. Time can't go below
bytes/bandwidth + flops/peak. Defaults are an H200 measured on this project's GPU machine
(a 2 GiB device-to-device copy: 4.26 TB/s counting bytes read + written; an 8192^3 bf16
matmul: 774 TFLOP/s). `--gpu h100` takes the H100 figures measured earlier (3.0 TB/s, 790).

    PYTHONPATH=. python benchmarks/roofline.py                   # bf16 KV cache, Qwen3-0.6B (the shipped config)
    PYTHONPATH=. python benchmarks/roofline.py --kv-bytes 1      # fp8 KV cache
    PYTHONPATH=. python benchmarks/roofline.py --batch1          # one sequence: the weights read once per token
    PYTHONPATH=. python benchmarks/roofline.py --measured 6.6    # bench.py's "Time:", as a fraction of the floor

Run from the repository root: the workload is bench.py's own (`from bench import make_workload`).
"""
import argparse
import json
import os

from bench import make_workload
from nanovllm.configs import QWEN3_0_6B

GPUS = {"h200": (4.26e12, 7.74e14), "h100": (3.0e12, 7.9e14)}


def params_of(c: dict) -> int:
    """Parameters a decode step reads: layers, final norm, the embedding as LM head (twice if untied)."""
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or h // heads
    per_layer = h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * c["intermediate_size"] + 2 * h
    embed = c["vocab_size"] * h
    return c["num_hidden_layers"] * per_layer + h + embed * (1 if c.get("tie_word_embeddings") else 2)


def workload(num_seqs: int) -> tuple[list[int], list[int]]:
    """bench.py's prompt and output lengths."""
    prompts, params = make_workload(num_seqs)
    return [len(p) for p in prompts], [sp.max_tokens for sp in params]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(QWEN3_0_6B, "config.json"),
                    help="a model's config.json (default: the shipped Qwen3-0.6B one, bench.py --dummy's)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    ap.add_argument("--bandwidth", type=float, help="bytes/s the GPU really moves (overrides --gpu)")
    ap.add_argument("--flops", type=float, help="bf16 matmul FLOP/s really reached (overrides --gpu)")
    ap.add_argument("--measured", type=float, help="bench.py's measured time in seconds (with --batch1: its "
                    "tok/s), to print the fraction of the limit")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--kv-bytes", type=float, default=2, help="bytes per KV element (1 for an fp8 cache)")
    ap.add_argument("--weight-bytes", type=float, default=2, help="bytes per weight (2 for bf16)")
    ap.add_argument("--batch1", action="store_true", help="print the batch-1 decode limit instead")
    a = ap.parse_args()
    bw, flops = GPUS[a.gpu]
    bw, flops = a.bandwidth or bw, a.flops or flops
    with open(os.path.expanduser(a.config)) as f:
        c = json.load(f)
    c = c.get("text_config", c)
    params = params_of(c)
    if a.batch1:
        t = params * a.weight_bytes / bw
        print(f"{params / 1e6:.0f}M parameters: a decode step reads {params * a.weight_bytes / 1e9:.2f} GB of "
              f"weights -> at least {t * 1e3:.3f} ms a token, at most {1 / t:,.0f} tok/s for one sequence")
        if a.measured:
            print(f"measured {a.measured:,.0f} tok/s = {a.measured * t:.0%} of that limit")
        return
    ins, outs = workload(a.num_seqs)
    kv_heads = c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_per_token = 2 * c["num_hidden_layers"] * kv_heads * head_dim * a.kv_bytes
    # decode step s of a sequence with prompt length p attends over p + s cached tokens
    kv_bytes = sum(sum(p + s for s in range(o)) for p, o in zip(ins, outs)) * kv_per_token
    weight_bytes = max(outs) * params * a.weight_bytes
    prefill_flops = 2 * params * sum(ins)
    floor = (kv_bytes + weight_bytes) / bw + prefill_flops / flops
    total_out = sum(outs)
    print(f"{params / 1e6:.0f}M parameters; output tokens {total_out}, prompt tokens {sum(ins)}; "
          f"{bw / 1e12:.2f} TB/s, {flops / 1e12:.0f} TFLOP/s")
    print(f"decode reads: KV {kv_bytes / 1e12:.2f} TB + weights {weight_bytes / 1e12:.2f} TB; "
          f"prefill {prefill_flops / 1e12:.0f} TFLOP")
    print(f"floor {floor:.2f} s -> at most {total_out / floor:,.0f} tok/s")
    if a.measured:
        print(f"measured {a.measured:.2f} s = {total_out / a.measured:,.0f} tok/s = "
              f"{floor / a.measured:.0%} of the floor")


if __name__ == "__main__":
    main()
