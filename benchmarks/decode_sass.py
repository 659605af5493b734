"""The decode kernel's instruction mix on an H100 (sm_90), from the compiler alone: no GPU needed.

    python benchmarks/decode_sass.py [--configs 128,4,2 64,4,1,r]   (decode_sweep.py's tile,warps,stages[,widen])

Compiles decode_split_kernel as the Triton backend launches it for Qwen3-0.6B over a bf16 and an fp8 cache
(tests/test_triton_kernels.py, qwen3_kernel_configs), disassembles the cubin with the nvdisasm that ships with
Triton, and counts the instructions that tell how K/V reach the tensor cores: global loads (LDG, LDGSTS =
cp.async), shared-memory loads (LDS scalar/vector, LDSM = ldmatrix), conversions (F2FP) and MMAs (HMMA).
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.decode_sweep import describe, parse_config  # noqa: E402
from nanovllm.kernels import paged_attention_triton as tk  # noqa: E402
from tests.test_triton_kernels import compile_for_h100, qwen3_kernel_configs  # noqa: E402

COUNTED = ("LDG", "LDGSTS", "LDS", "LDSM", "STS", "F2FP", "HMMA", "HGMMA")


def instruction_mix(cubin: bytes) -> collections.Counter:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    return collections.Counter(m.group(1).split(".")[0] for m in
                               re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", help="launches to compile (default: the backend's)")
    args = p.parse_args()
    for fp8 in (False, True):
        fn, constexprs, pointer_dtypes, warps, stages, _ = qwen3_kernel_configs(fp8)["decode"]
        default = tk.decode_launch(torch.float8_e4m3fn if fp8 else torch.bfloat16)
        for launch in [parse_config(c) for c in args.configs] if args.configs else [default]:
            constexprs = dict(constexprs, BLOCK_N=launch.block_n, WIDEN_K="k" in launch.widen,
                              WIDEN_V="v" in launch.widen)
            compiled = compile_for_h100(fn, constexprs, pointer_dtypes, launch.warps, launch.stages,
                                        launch.max_registers)
            mix = instruction_mix(compiled.asm["cubin"])
            name = "fp8" if fp8 else torch.bfloat16
            print(f"{str(name):15} {describe(launch)}: {sum(mix.values())} instructions, shared "
                  f"{compiled.metadata.shared} B; " + ", ".join(f"{op} {mix[op]}" for op in COUNTED))


if __name__ == "__main__":
    main()
