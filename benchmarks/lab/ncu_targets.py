"""Programs for Nsight Compute: `decode bf16|fp8 [batch]` runs the shipped paged decode 4 times on decode_sweep.py's
inputs; `gemv` runs Qwen3-0.6B's four batch-1 GEMVs (norm+qkv, o, norm+gate_up, gated down) 4 times each.

    PYTHONPATH=. ncu --clock-control none --set full --import-source yes -k regex:decode_split --launch-skip 2 \
        --launch-count 1 -o decode_fp8 python benchmarks/lab/ncu_targets.py decode fp8 256
    ncu -i decode_fp8.ncu-rep --page details; ncu -i decode_fp8.ncu-rep --page source --csv --print-source sass
"""
import sys
import torch
sys.path.insert(0, "benchmarks")
from decode_sweep import inputs, HEAD_DIM
from nanovllm.kernels import paged_attention_triton as tk, gemv as g

what = sys.argv[1]
if what == "decode":
    kv = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[sys.argv[2]]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    q, k, v, lens, tables, nbytes = inputs(batch, kv)
    scale = torch.ones(1, device="cuda")
    scales = dict(k_scale=scale, v_scale=scale) if kv == torch.float8_e4m3fn else {}
    for _ in range(4):
        tk.paged_decode_attention(q, k, v, lens, tables, HEAD_DIM ** -0.5, **scales)
    torch.cuda.synchronize()
    print("bytes", nbytes)
else:
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(1, 1024, device=dev, dtype=dt)
    ws = dict(qkv=torch.randn(4096, 1024, device=dev, dtype=dt), o=torch.randn(1024, 2048, device=dev, dtype=dt),
              gu=torch.randn(6144, 1024, device=dev, dtype=dt), down=torch.randn(1024, 3072, device=dev, dtype=dt))
    nw = torch.ones(1024, device=dev, dtype=dt)
    for _ in range(4):
        qkv, res = g.norm_gemv(x, None, nw, 1e-6, ws["qkv"])
        o = g.gemv(torch.randn(1, 2048, device=dev, dtype=dt), ws["o"])
        gu, res = g.norm_gemv(o, res, nw, 1e-6, ws["gu"])
        d = g.gemv(gu, ws["down"], gated=True)
    torch.cuda.synchronize()
