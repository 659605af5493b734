"""Correctness and speed of our Triton attention kernels at Qwen3-0.6B's shapes on one CUDA GPU.

    python benchmarks/attention_kernels.py       # checks, then timings at the default launch parameters

Shapes: 16 query heads, 8 KV heads, head_dim 128, bf16, 256-token pages, block tables 16 pages wide (the
ModelRunner's CUDA graphs are captured for max_model_len 4096). Every check prints PASS or FAIL; the script
exits 1 if any failed. Timings are triton.testing.do_bench medians (L2 flushed between runs).
Decode bandwidth counts the K and V bytes a sequence needs (context_len * kv_heads * head_dim * 2 bytes * 2);
prefill TFLOP/s counts causal work only (4 * head_dim * heads * attended keys, summed over query rows).
The decode rows print, for comparison, what a plain Triton split-KV paged decode kernel read on an H100 80GB at
the same shapes (a reference point, not a target for other GPUs). Batch-1 decode is timed as a step runs it: a
CUDA graph of 28 launches (one per layer), time per launch; NANOVLLM_PDL=0 times it without programmatic dependent
launch. benchmarks/decode_sweep.py times other decode launch parameters.
"""
import argparse
import sys

import torch
import triton
from triton.testing import do_bench

from nanovllm.kernels import paged_attention_torch as ref
from nanovllm.kernels import paged_attention_triton as tk

HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 16, 8, 128, 256, torch.bfloat16
TABLE_WIDTH = 4096 // BLOCK
SCALE = HEAD_DIM ** -0.5
TOL = dict(atol=1e-2, rtol=1e-2)
failures = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    if not ok:
        failures.append(name)


def paged_inputs(context_lens: list[int], new_tokens: list[int] | None = None, seed: int = 0):
    """Random K/V in shuffled pages for each sequence's context, plus queries (one per sequence, or new_tokens)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages = [triton.cdiv(n, BLOCK) for n in context_lens]
    num_blocks = sum(pages)
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    order = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    width = max(TABLE_WIDTH, max(pages))
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(pages):
        tables[i, :n] = order[start:start + n]
        start += n
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    rows = len(context_lens) if new_tokens is None else sum(new_tokens)
    q = torch.randn(rows, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return q, k_cache, v_cache, tables, lens


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> str:
    return f"max abs err {(actual.float() - expected.float()).abs().max().item():.2e}"


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(torch.isfinite(actual).all()) and torch.allclose(actual.float(), expected.float(), **TOL)


# ---- decode ---------------------------------------------------------------------------------------------------

def decode_case(batch: int, lo: int, hi: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    contexts = [hi] * batch if lo == hi else torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    return contexts, paged_inputs(contexts, seed=seed)


DECODE_CASES = {"decode B=8 ctx 4096": (8, 4096, 4096), "decode B=64 ctx 100..2048": (64, 100, 2048),
                "decode B=256 ctx 100..2048": (256, 100, 2048)}
H100_REFERENCE_TBS = {8: 1.9, 64: 2.6, 256: 2.8}    # a plain Triton split-KV paged decode kernel, H100 80GB


def kv_bytes(contexts: list[int]) -> int:
    return sum(contexts) * KV_HEADS * HEAD_DIM * DTYPE.itemsize * 2


def check_decode():
    # The reference materialises every table entry in float32 (~8 GB at B=64), so the checks stop at B=64.
    for batch, splits in ((64, None), (64, 1), (8, None), (8, 3)):
        contexts, (q, k_cache, v_cache, tables, lens) = decode_case(batch, 1, 4096, seed=batch)
        out = tk.paged_decode_attention(q, k_cache, v_cache, lens, tables, SCALE, num_splits=splits)
        expected = ref.paged_decode_attention(q, k_cache, v_cache, lens, tables, SCALE)
        report(f"decode vs torch reference, B={batch}, splits={splits or 'auto'}", close(out, expected),
               max_error(out, expected))


def check_decode_repeated():
    """Batch 1 and 4 at the heuristic's splits (32 and 17 on 132 SMs, most empty at batch 1), two queries in turn
    over one cache, 64 launches a CUDA graph replayed 8 times, so launches follow each other closely: every output
    must equal, bitwise, the first of its query (the merge order is fixed by split, whichever program merges). A
    merge that read a split's partial result before it was complete, or one left by the launch before, shows here."""
    for batch, lo, hi in ((1, 300, 300), (4, 100, 4096)):
        contexts, (q, k_cache, v_cache, tables, lens) = decode_case(batch, lo, hi, seed=batch)
        queries = (q, torch.randn_like(q))
        firsts = [tk.paged_decode_attention(x, k_cache, v_cache, lens, tables, SCALE) for x in queries]
        expected = [ref.paged_decode_attention(x, k_cache, v_cache, lens, tables, SCALE) for x in queries]
        outs = torch.empty(64, *q.shape, dtype=q.dtype, device="cuda")

        def launches():
            for i in range(len(outs)):
                tk.paged_decode_attention(queries[i % 2], k_cache, v_cache, lens, tables, SCALE, out=outs[i])
        launches()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launches()
        same = True
        for _ in range(8):
            outs.fill_(float("nan"))
            graph.replay()
            same &= all(torch.equal(outs[i], firsts[i % 2]) for i in range(len(outs)))
        report(f"decode B={batch}: 512 launches in graphs == the first, bitwise", same)
        report(f"decode B={batch} vs torch reference", close(firsts[0], expected[0]) and close(firsts[1], expected[1]),
               max_error(firsts[0], expected[0]))


def time_decode_batch_1(rows: list):
    """A decode step's attention at batch 1: 28 launches (Qwen3-0.6B's layers) in one CUDA graph, time per launch."""
    for context in (300, 3000):
        contexts, (q, k_cache, v_cache, tables, lens) = decode_case(1, context, context)
        out = torch.empty_like(q)

        def launches():
            for _ in range(28):
                tk.paged_decode_attention(q, k_cache, v_cache, lens, tables, SCALE, out=out)
        launches()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launches()
        ms = do_bench(graph.replay, return_mode="median") / 28
        rows.append((f"decode B=1 ctx {context}, per launch in a graph of 28", ms,
                     f"{kv_bytes(contexts) / ms / 1e9:.2f} TB/s KV read", ""))


def time_decode(rows: list):
    for name, (batch, lo, hi) in DECODE_CASES.items():
        contexts, (q, k_cache, v_cache, tables, lens) = decode_case(batch, lo, hi)
        ms = do_bench(lambda: tk.paged_decode_attention(q, k_cache, v_cache, lens, tables, SCALE),
                      return_mode="median")
        rows.append((f"{name} (triton)", ms, f"{kv_bytes(contexts) / ms / 1e9:.2f} TB/s KV read",
                     f"~{H100_REFERENCE_TBS[batch]} TB/s"))
        if batch == 64:
            ms = do_bench(lambda: ref.paged_decode_attention(q, k_cache, v_cache, lens, tables, SCALE),
                          return_mode="median")
            rows.append((f"{name} (torch reference)", ms, f"{kv_bytes(contexts) / ms / 1e9:.2f} TB/s KV read", ""))


def check_decode_cuda_graph():
    """Capture store + decode at a padded batch (5 padded rows: slot -1, context_len 0, stale tables), replay
    on new inputs, compare with the same calls run eagerly and with the reference."""
    graph_batch, real = 16, 11
    contexts, (q, k_cache, v_cache, tables, lens) = decode_case(graph_batch, 100, 3000, seed=7)
    static_q = torch.zeros_like(q)
    static_kv = torch.zeros(2, graph_batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    static_slots = torch.full((graph_batch,), -1, dtype=torch.int64, device="cuda")
    static_lens = torch.zeros(graph_batch, dtype=torch.int32, device="cuda")
    static_tables = torch.zeros_like(tables)

    def step():
        tk.store_kvcache(static_kv[0], static_kv[1], k_cache, v_cache, static_slots)
        return tk.paged_decode_attention(static_q, k_cache, v_cache, static_lens, static_tables, SCALE)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    static_q.copy_(q)
    static_kv.normal_()
    positions = lens[:real].long() - 1
    slots = tables[:real].long().gather(1, (positions // BLOCK)[:, None])[:, 0] * BLOCK + positions % BLOCK
    static_slots[:real] = slots
    static_lens[:real] = lens[:real]
    static_tables.copy_(tables)
    static_tables[real:] = 12345      # stale entries on padded rows must never be read
    graph.replay()
    torch.cuda.synchronize()
    replayed = graph_out[:real].clone()
    eager = step()[:real]
    expected = ref.paged_decode_attention(q[:real], k_cache, v_cache, lens[:real], tables[:real], SCALE)
    stored = torch.equal(k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], static_kv[0, :real])
    report("decode CUDA graph replay == eager (padded batch 16, 11 real rows)",
           torch.equal(replayed, eager) and stored, "bitwise" if torch.equal(replayed, eager) else "differs")
    report("decode CUDA graph replay vs torch reference", close(replayed, expected), max_error(replayed, expected))


# ---- prefill --------------------------------------------------------------------------------------------------

PREFILL_CASES = {"prefill 16 x 1024 new tokens": [(0, 1024)] * 16,
                 "prefill chunk 512 after 3072 cached": [(3072, 512)]}


def prefill_inputs(seqs: list[tuple[int, int]]):
    contexts = [cached + new for cached, new in seqs]
    q, k_cache, v_cache, tables, lens = paged_inputs(contexts, [new for _, new in seqs])
    cu = torch.tensor([0] + [new for _, new in seqs], device="cuda").cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, cu, lens, tables, max(new for _, new in seqs)


def causal_flops(seqs: list[tuple[int, int]]) -> int:
    keys = sum(new * cached + new * (new + 1) // 2 for cached, new in seqs)
    return 4 * HEAD_DIM * HEADS * keys


def check_prefill():
    for name, seqs in {**PREFILL_CASES, "prefill mixed (1-token, prefix mid-page)":
                       [(0, 1), (300, 1), (255, 257), (0, 700), (1000, 24)]}.items():
        q, k_cache, v_cache, cu, lens, tables, max_q = prefill_inputs(seqs)
        out = tk.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, SCALE, max_seqlen_q=max_q)
        expected = ref.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, SCALE)
        report(f"{name} vs torch reference", close(out, expected), max_error(out, expected))


def time_prefill(rows: list):
    for name, seqs in PREFILL_CASES.items():
        q, k_cache, v_cache, cu, lens, tables, max_q = prefill_inputs(seqs)
        ms = do_bench(lambda: tk.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, SCALE,
                                                         max_seqlen_q=max_q), return_mode="median")
        rows.append((name, ms, f"{causal_flops(seqs) / ms / 1e9:.0f} TFLOP/s", ""))


def print_table(title: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"{'case':<58} {'time':>10}  {'rate':<40} H100 reference")
    for name, ms, rate, reference in rows:
        print(f"{name:<58} {ms * 1e3:>8.1f}us  {rate:<40} {reference}")


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    check_decode()
    check_decode_repeated()
    check_decode_cuda_graph()
    check_prefill()
    rows = []
    time_decode_batch_1(rows)
    time_decode(rows)
    time_prefill(rows)
    print_table("timings (default launch parameters)", rows)
    print(f"\n{'ALL CHECKS PASSED' if not failures else 'FAILED: ' + ', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
