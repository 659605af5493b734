"""Issue #24: a batch-1 block's four GEMVs (norm+qkv, o, norm+residual+gate_up, gated down) x all layers as ONE
persistent Triton kernel, against the chain of separate PDL launches that gemv_chain_sweep.py times.

Each separate GEMV pays ~2.5 us of launch, ramp and tail. Here a grid of co-resident programs (a few per SM) walks
the phases and layers itself, and between dependent phases waits at a grid-wide barrier (a counter in global
memory). The weights depend on nothing, so a program requests the first weight tiles of its next phase BEFORE it
waits: memory streams while the grid synchronizes. The math and bf16 rounding are gemv.py's, so the last layer's
`down` and residual match the chain (up to fp32 summation order). Attention is left out: `o` is computed from a
fixed vector `a`, as in gemv_chain_sweep.py, but a barrier stands where attention would wait for qkv.

    PYTHONPATH=. timeout 300 python benchmarks/lab/persistent_chain.py [--model-config smollm2-135m] [--pps 1,2,4]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/lab/persistent_chain.py --cpu-check   # grid 1, tiny shapes
"""
import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl

MAX_SPIN = 1 << 20      # polls (each an L2 round trip, ~0.5 us) before a barrier gives up: ~0.5 s, never a hang


@triton.jit
def _w_tile(w_ptr, tile, N, K, BN: tl.constexpr, BK: tl.constexpr):
    # W[tile*BN : (tile+1)*BN, :K] with the whole row (K <= BK); a tile past N loads nothing (all lanes masked)
    cols = tile * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    return tl.load(w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :],
                   mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)


@triton.jit
def _vec(ptr, n, BK: tl.constexpr):
    # a vector another program wrote during this launch: .cg reads L2, never a stale L1 line
    ks = tl.arange(0, BK)
    return tl.load(ptr + ks, mask=ks < n, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _norm(x_ptr, r_ptr, nw_ptr, r_out_ptr, H, eps, pid, BK: tl.constexpr):
    # RMSNorm(x + r) * nw rounded as gemv.py (NORM, ADD_RESIDUAL) rounds it; each program computes it itself
    # (x is one row of H), program 0 stores x + r as the new residual
    dt = r_out_ptr.dtype.element_ty
    ks = tl.arange(0, BK)
    x = (_vec(x_ptr, H, BK) + _vec(r_ptr, H, BK)).to(dt).to(tl.float32)
    if pid == 0:
        tl.store(r_out_ptr + ks, x.to(dt), mask=ks < H)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    nw = tl.load(nw_ptr + ks, mask=ks < H, other=0.0).to(tl.float32)
    return ((x * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)


@triton.jit
def _gemv(x, w0, w1, w_ptr, out_ptr, N, K, pid, nprog, BN: tl.constexpr, BK: tl.constexpr):
    # out[tiles pid, pid + nprog, ...] = x @ W[tile].T; w0, w1: the first two tiles, requested by the caller (between
    # arriving at the barrier and waiting); each step requests the tile two ahead, so two tiles stream while one is summed
    for t in range(pid, tl.cdiv(N, BN), nprog):
        w2 = _w_tile(w_ptr, t + 2 * nprog, N, K, BN, BK)
        acc = tl.sum(x[None, :] * w0.to(tl.float32), axis=1)
        cols = t * BN + tl.arange(0, BN)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)
        w0 = w1
        w1 = w2


@triton.jit
def _arrive(ctr_ptr):
    # this program's stores of the phase are done: bar.sync orders all its threads' stores before thread 0's
    # release add (cumulative at gpu scope). Its result is unused, so it is a fire-and-forget `red`, with no
    # block-wide broadcast of a returned value: the caller requests its next weight tiles right after it (not
    # before: the release's fence would wait for those loads too), then waits
    tl.debug_barrier()
    tl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(ctr_ptr, err_ptr, target, ok, MAX_SPIN: tl.constexpr, POLL_LD: tl.constexpr):
    # the counter only grows (the host zeroes it per launch): phase p is complete at (p + 1) * nprog. Poll with
    # acquire adds (POLL_LD=False) or with volatile loads (no read-modify-write traffic on the counter) then one
    # acquire add, enough since all arrivals are RMWs of one release sequence. A program that timed out once (`ok` 0)
    # stops waiting, so a grid that is not co-resident sets the error flag instead of hanging the GPU.
    seen = 0
    spins = 0
    while (seen < target) & (spins < MAX_SPIN * ok):
        if POLL_LD:
            seen = tl.load(ctr_ptr, volatile=True)
        else:
            seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if POLL_LD:     # unconditional: a scalar atomic is a block-wide step (thread 0 + shared-memory broadcast)
        seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    if seen < target:
        tl.store(err_ptr, 1)
        ok = 0
    return ok


@triton.jit
def persistent_chain_kernel(hidden_ptr, resid_ptr, a_ptr, wqkv_ptr, wo_ptr, wgu_ptr, wdown_ptr, n1_ptr, n2_ptr,
                            qkv_ptr, o_ptr, gu_ptr, down_ptr, res1_ptr, res2_ptr, ctr_ptr, err_ptr,
                            L, H, QKV, ATTN, INTER, eps, BK_H: tl.constexpr, BK_A: tl.constexpr, BK_I: tl.constexpr,
                            BN_H: tl.constexpr, BN_A: tl.constexpr, BN_I: tl.constexpr, MAX_SPIN: tl.constexpr,
                            POLL_LD: tl.constexpr):
    """Weights are stacked [L, N, K]. Layer l: res1 = x + r, qkv = norm(res1) @ Wqkv.T | o = a @ Wo.T |
    res2 = o + res1, gu = norm(res2) @ Wgu.T | down = (silu(gate) * up) @ Wdown.T; x, r = down, res2 for l + 1
    (layer 0 reads hidden, resid). Four barriers a layer; at each, once this program has arrived and before
    it waits, it requests the next phase's first two weight tiles."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ok = 1
    q0 = _w_tile(wqkv_ptr, pid, QKV, H, BN_H, BK_H)
    q1 = _w_tile(wqkv_ptr, pid + nprog, QKV, H, BN_H, BK_H)
    for layer in range(L):
        lw = tl.cast(layer, tl.int64)    # weight offsets past 2**31 elements in larger models
        wq, wo = wqkv_ptr + lw * QKV * H, wo_ptr + lw * H * ATTN
        wg, wd = wgu_ptr + lw * 2 * INTER * H, wdown_ptr + lw * H * INTER
        x_src, r_src = down_ptr, res2_ptr
        if layer == 0:
            x_src, r_src = hidden_ptr, resid_ptr
        x = _norm(x_src, r_src, n1_ptr + lw * H, res1_ptr, H, eps, pid, BK_H)
        _gemv(x, q0, q1, wq, qkv_ptr, QKV, H, pid, nprog, BN_H, BK_H)
        _arrive(ctr_ptr)     # where attention would wait for qkv
        w0 = _w_tile(wo, pid, H, ATTN, BN_A, BK_A)
        w1 = _w_tile(wo, pid + nprog, H, ATTN, BN_A, BK_A)
        ok = _wait(ctr_ptr, err_ptr, (4 * layer + 1) * nprog, ok, MAX_SPIN, POLL_LD)
        _gemv(_vec(a_ptr, ATTN, BK_A), w0, w1, wo, o_ptr, H, ATTN, pid, nprog, BN_A, BK_A)
        _arrive(ctr_ptr)
        g0 = _w_tile(wg, pid, 2 * INTER, H, BN_H, BK_H)
        g1 = _w_tile(wg, pid + nprog, 2 * INTER, H, BN_H, BK_H)
        ok = _wait(ctr_ptr, err_ptr, (4 * layer + 2) * nprog, ok, MAX_SPIN, POLL_LD)
        x = _norm(o_ptr, res1_ptr, n2_ptr + lw * H, res2_ptr, H, eps, pid, BK_H)
        _gemv(x, g0, g1, wg, gu_ptr, 2 * INTER, H, pid, nprog, BN_H, BK_H)
        _arrive(ctr_ptr)
        d0 = _w_tile(wd, pid, H, INTER, BN_I, BK_I)
        d1 = _w_tile(wd, pid + nprog, H, INTER, BN_I, BK_I)
        ok = _wait(ctr_ptr, err_ptr, (4 * layer + 3) * nprog, ok, MAX_SPIN, POLL_LD)
        gate = _vec(gu_ptr, INTER, BK_I)        # silu(gate) * up, rounded as gemv.py (GATED) rounds it
        up = _vec(gu_ptr + INTER, INTER, BK_I)
        act = ((gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32) * up).to(tl.bfloat16).to(tl.float32)
        _gemv(act, d0, d1, wd, down_ptr, H, INTER, pid, nprog, BN_I, BK_I)
        _arrive(ctr_ptr)
        q_n = tl.where(layer + 1 < L, QKV, 0)   # the next layer's qkv tiles (none after the last)
        q0 = _w_tile(wq + QKV * H, pid, q_n, H, BN_H, BK_H)
        q1 = _w_tile(wq + QKV * H, pid + nprog, q_n, H, BN_H, BK_H)
        ok = _wait(ctr_ptr, err_ptr, (4 * layer + 4) * nprog, ok, MAX_SPIN, POLL_LD)


def dims(cfg):
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    return h, (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd, cfg["num_attention_heads"] * hd, inter


def setup(h, qkv_n, attn, inter, layers, dev, w_scale=0.02):
    dt, g = torch.bfloat16, torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, scale=w_scale: (torch.randn(*s, device=dev, generator=g) * scale).to(dt)
    w = dict(qkv=r(layers, qkv_n, h), o=r(layers, h, attn), gu=r(layers, 2 * inter, h), down=r(layers, h, inter),
             n1=1 + r(layers, h, scale=0.1), n2=1 + r(layers, h, scale=0.1))
    io = dict(hidden=r(1, h, scale=1), resid=r(1, h, scale=1), a=r(1, attn, scale=1))
    return w, io


def run_chain(w, io, pdl, bufs, cfg=dict(bn=4, bk=4096, warps=4)):
    """The separate-kernel chain (gemv.py's defaults), each layer fed by the last: returns (down, residual)."""
    from benchmarks.lab.gemv_chain_sweep import launch
    x, r = io["hidden"], io["resid"]
    qkv, o, gu, down, res1, res2 = bufs
    for l in range(w["qkv"].size(0)):
        launch(x, w["qkv"][l], qkv, r, w["n1"][l], res1, norm=True, pdl=pdl, **cfg)
        launch(io["a"], w["o"][l], o, pdl=pdl, **cfg)
        launch(o, w["gu"][l], gu, res1, w["n2"][l], res2, norm=True, pdl=pdl, **cfg)
        launch(gu, w["down"][l], down, gated=True, pdl=pdl, **cfg)
        x, r = down, res2
    return down, res2


def run_persistent(w, io, bufs, ctr, err, grid, tile, warps, poll_ld, max_spin=MAX_SPIN, coop=False):
    L, qkv_n, h = w["qkv"].shape
    attn, inter = w["o"].size(2), w["down"].size(2)
    bk = [triton.next_power_of_2(k) for k in (h, attn, inter)]
    bn = [max(1, tile // k) for k in bk]       # the same bytes a tile in every phase
    ctr.zero_()     # captured in the graph with the kernel: each launch counts its barriers from 0
    return persistent_chain_kernel[(grid,)](
        io["hidden"], io["resid"], io["a"], w["qkv"], w["o"], w["gu"], w["down"], w["n1"], w["n2"], *bufs, ctr, err,
        L, h, qkv_n, attn, inter, 1e-6, *bk, *bn, MAX_SPIN=max_spin, POLL_LD=poll_ld, num_warps=warps,
        num_stages=1, **({"launch_cooperative_grid": True} if coop else {}))


def reference(w, io, rtz=False):
    """torch, float32 sums, gemv.py's roundings (rtz: to bf16 toward zero, as Triton's interpreter rounds)."""
    f = lambda t: t.float()
    bf = ((lambda t: (t.contiguous().view(torch.int32) & -65536).view(torch.float32)) if rtz
          else (lambda t: t.to(torch.bfloat16).float()))
    def norm(x, nw):
        return bf(bf(x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)) * f(nw))
    x, r, a, inter = f(io["hidden"]), f(io["resid"]), f(io["a"]), w["down"].size(2)
    for l in range(w["qkv"].size(0)):
        r = bf(x + r)
        norm(r, w["n1"][l]) @ f(w["qkv"][l]).T      # qkv: unused, as attention is left out
        o = bf(a @ f(w["o"][l]).T)
        r = bf(o + r)
        gu = bf(norm(r, w["n2"][l]) @ f(w["gu"][l]).T)
        g, u = gu[:, :inter], gu[:, inter:]
        x = bf(bf(bf(g / (1 + torch.exp(-g))) * u) @ f(w["down"][l]).T)
    return x, r


def buffers(h, qkv_n, attn, inter, dev):
    return [torch.zeros(1, n, device=dev, dtype=torch.bfloat16) for n in (qkv_n, h, 2 * inter, h, h, h)]


def diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def cpu_check():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    h, qkv_n, attn, inter, L = 48, 80, 40, 72, 3       # not powers of two: the masks matter
    w, io = setup(h, qkv_n, attn, inter, L, "cpu", w_scale=0.15)     # O(1) outputs at these small K
    ctr, err = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    bufs = buffers(h, qkv_n, attn, inter, "cpu")
    ref_d, ref_r = reference(w, io, rtz=True)
    ch_d, ch_r = (t.clone() for t in run_chain(w, io, False, buffers(h, qkv_n, attn, inter, "cpu")))
    for tile, poll_ld in ((64, False), (128, True), (256, False)):     # 1..4 columns a tile: several tiles each
        run_persistent(w, io, bufs, ctr, err, 1, tile, 4, poll_ld)
        d, r = bufs[3], bufs[5]
        print(f"grid 1 tile {tile}: down vs torch {diff(d, ref_d):.2e}, vs chain {diff(d, ch_d):.2e}; residual vs "
              f"torch {diff(r, ref_r):.2e}, vs chain {diff(r, ch_r):.2e}; counter {ctr.item()} (expect {4 * L}), "
              f"error flag {err.item()}")
    print(f"chain vs torch: down {diff(ch_d, ref_d):.2e} residual {diff(ch_r, ref_r):.2e} (|down| max "
          f"{ref_d.abs().max().item():.2f})")
    # grid 2 cannot sync under the interpreter (programs run one by one): the barrier must time out and flag it
    run_persistent(w, io, bufs, ctr, err, 2, 64, 4, True, max_spin=8)
    print(f"grid 2 (cannot meet under the interpreter): error flag {err.item()} (expect 1), returned")


def occupancy(kernel, warps, dev):
    """Programs of `kernel` an SM holds at once (registers, shared memory, threads)."""
    p = torch.cuda.get_device_properties(dev)
    regs = getattr(p, "regs_per_multiprocessor", 65536)
    smem = getattr(p, "shared_memory_per_multiprocessor", 233472)
    threads = getattr(p, "max_threads_per_multi_processor", 2048)
    per_warp = -(-kernel.n_regs * 32 // 256) * 256
    return min(32, threads // (32 * warps), regs // (per_warp * warps), smem // (kernel.metadata.shared + 1024))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--pps", default="1,2,4", help="programs per SM")
    ap.add_argument("--tile", default="2048,4096,8192", help="weight elements a tile (x2 bytes), every phase")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--poll", default="atomic,ld")
    ap.add_argument("--coop", action="store_true", help="cooperative launch (the driver refuses a grid too large)")
    ap.add_argument("--cpu-check", action="store_true")
    args = ap.parse_args()
    if args.cpu_check:
        return cpu_check()
    from triton.testing import do_bench_cudagraph
    dev = torch.device("cuda")
    h, qkv_n, attn, inter = dims(json.load(open(f"nanovllm/configs/{args.model_config}/config.json")))
    w, io = setup(h, qkv_n, attn, inter, args.layers, dev)
    nbytes = sum(t[0].numel() * 2 for t in w.values())
    chain_bufs, bufs = buffers(h, qkv_n, attn, inter, dev), buffers(h, qkv_n, attn, inter, dev)
    ch_d, ch_r = (t.clone() for t in run_chain(w, io, True, chain_bufs))
    ref_d, ref_r = reference(w, io)
    rate = lambda t: f"{t:.2f} us/layer {nbytes / t / 1e6:.2f} TB/s"
    t = do_bench_cudagraph(lambda: run_chain(w, io, True, chain_bufs), rep=30) * 1e3 / args.layers
    print(f"{args.model_config}: {nbytes / 1e6:.1f} MB a layer, {args.layers} layers; chain of PDL GEMVs {rate(t)}; "
          f"vs torch: down {diff(ch_d, ref_d):.1e} residual {diff(ch_r, ref_r):.1e}", flush=True)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    ctr, err = torch.zeros(1, device=dev, dtype=torch.int32), torch.zeros(1, device=dev, dtype=torch.int32)
    for pps, tile, warps, poll in itertools.product(*(s.split(",") for s in (args.pps, args.tile, args.warps,
                                                                                args.poll))):
        pps, tile, warps, poll_ld = int(pps), int(tile), int(warps), poll == "ld"
        name = f"pps {pps} tile {tile * 2 // 1024}KB warps {warps} poll {poll}"
        k = run_persistent(w, io, bufs, ctr, err, 1, tile, warps, poll_ld)    # grid 1: compiles, always meets
        torch.cuda.synchronize()
        fits = occupancy(k, warps, dev)
        if fits < pps:
            print(f"{name}: skipped, an SM holds {fits} ({k.n_regs} regs, {k.metadata.shared} B shared)", flush=True)
            continue
        err.zero_()
        run = lambda: run_persistent(w, io, bufs, ctr, err, pps * sms, tile, warps, poll_ld, coop=args.coop)
        run()
        torch.cuda.synchronize()
        if err.item():     # a barrier gave up: the grid was not co-resident; timing it would take minutes
            print(f"{name}: FAIL, a barrier timed out (programs not co-resident?)", flush=True)
            continue
        dd, dr = diff(bufs[3], ch_d), diff(bufs[5], ch_r)
        ok = dd <= 0.02 * ch_d.abs().max().item() and dr <= 0.02 * ch_r.abs().max().item()
        t = do_bench_cudagraph(run, rep=30) * 1e3 / args.layers
        print(f"{name}: {rate(t)}; vs chain: down {dd:.1e} residual {dr:.1e} {'PASS' if ok else 'FAIL'}; "
              f"{k.n_regs} regs{f', {k.n_spills} spills' if k.n_spills else ''}"
              f"{'; a barrier timed out while timing' if err.item() else ''}", flush=True)


if __name__ == "__main__":
    main()
