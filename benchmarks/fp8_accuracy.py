"""Accuracy of the fp8 KV cache: next-token logits with kv_cache_dtype="fp8" against the model-dtype cache.

    python benchmarks/fp8_accuracy.py            # GPU: dummy Qwen3-0.6B (bf16) and the tiny float32 test models,
                                                 # contexts 256..4096, 260 positions per model
    python benchmarks/fp8_accuracy.py --cpu      # CPU, small sizes: contexts 64..512 (the same 260 positions)

Teacher forcing: each sequence of random token ids is prefilled up to its last --decode-steps tokens, then decoded
one given token at a time, so both caches see the same tokens and every compared position (the prefill's last
one and each decode step) reads its whole context back from the KV cache. Per model it prints the relative error
||fp8 - ref|| / ||ref|| of each position's logits (mean and max over positions) and how often their argmax agrees.
For a float32 model a "bf16" row does the same for K/V rounded to bfloat16 (what a bf16 cache would do), a
yardstick of how sensitive that model is to K/V rounding at all. The model is driven directly (one Context per
step, as the runner builds it), so no scheduler is involved.
"""
import argparse
import contextlib
import gc
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovllm import LLM  # noqa: E402
from nanovllm.config import ModelConfig  # noqa: E402
from nanovllm.configs import QWEN3_0_6B  # noqa: E402
from nanovllm.layers.attention import Attention  # noqa: E402
from nanovllm.utils.context import reset_context, set_context  # noqa: E402
from nanovllm.utils.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402


@torch.inference_mode()
def teacher_forced_logits(llm: LLM, sequences: list[list[int]], decode_steps: int) -> torch.Tensor:
    """Logits [positions, vocab] (float32, on the CPU) after the prefill of each sequence's first
    len - decode_steps tokens, then after each of its remaining tokens fed one decode step at a time; sequence by
    sequence at each step. Each sequence gets contiguous blocks of the engine's cache."""
    runner, device = llm.executor.runner, llm.executor.runner.device
    block_size = runner.block_size
    tables, first_block = [], 0
    for seq in sequences:
        num_blocks = -(-len(seq) // block_size)
        tables.append(list(range(first_block, first_block + num_blocks)))
        first_block += num_blocks
    if first_block > llm.executor.runner.num_kvcache_blocks:
        raise ValueError(f"the sequences need {first_block} KV blocks, the engine has {llm.executor.runner.num_kvcache_blocks}")
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)

    def slots(seq_index, positions):
        table = torch.tensor(tables[seq_index], device=device)
        return table[positions // block_size] * block_size + positions % block_size

    def step(ids, positions, **context):
        set_context(block_tables=block_tables, **context)
        try:
            return runner.model.compute_logits(runner.model(ids, positions)).float().cpu()
        finally:
            reset_context()

    prompt_lens = [len(seq) - decode_steps for seq in sequences]
    positions = [torch.arange(n, device=device) for n in prompt_lens]
    cu = torch.tensor([0] + prompt_lens, device=device).cumsum(0).to(torch.int32)
    out = [step(torch.tensor([t for seq, n in zip(sequences, prompt_lens) for t in seq[:n]], device=device),
                torch.cat(positions), is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=max(prompt_lens),
                max_seqlen_k=max(prompt_lens), slot_mapping=torch.cat([slots(i, p) for i, p in enumerate(positions)]),
                context_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device))]
    for k in range(decode_steps):
        pos = torch.tensor([n + k for n in prompt_lens], device=device)
        out.append(step(torch.tensor([seq[n + k] for seq, n in zip(sequences, prompt_lens)], device=device), pos,
                        slot_mapping=torch.cat([slots(i, pos[i:i + 1]) for i in range(len(sequences))]),
                        context_lens=(pos + 1).to(torch.int32)))
    return torch.cat(out)


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-position relative error of the logits (mean, max) and the fraction of positions whose argmax agrees."""
    rel = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    return dict(positions=len(rel), rel_mean=rel.mean().item(), rel_max=rel.max().item(), top1=top1.item())


@contextlib.contextmanager
def kv_rounded_to_bf16():
    """Every Attention layer rounds K and V to bfloat16 before using them: a float32 model with a bf16 cache.
    (The store is then left to Attention.forward, not fused into the rotary kernel, which would store them unrounded.)"""
    forward, kv_store = Attention.forward, Attention.kv_store
    Attention.forward = lambda self, q, k, v, stored=False: forward(self, q, k.bfloat16().to(k.dtype),
                                                                    v.bfloat16().to(v.dtype), stored)
    Attention.kv_store = lambda self, v: None
    try:
        yield
    finally:
        Attention.forward, Attention.kv_store = forward, kv_store


def random_sequences(contexts: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in contexts]


def measure(model: str, contexts: list[int], decode_steps: int, seed: int = 0, yardstick: bool = True,
            **engine_args) -> dict[str, dict]:
    """{"fp8": compare() of the fp8 cache against the model-dtype cache on the same tokens and engine settings},
    plus "bf16" (kv_rounded_to_bf16) for a float32 model when yardstick is set. Contexts are capped at the model's
    max_position_embeddings (2048 for the tiny test models)."""
    hf = ModelConfig.from_model_dir(model)
    contexts = [min(n, hf.max_position_embeddings) for n in contexts]
    runs = {"auto": ("auto", contextlib.nullcontext), "fp8": ("fp8", contextlib.nullcontext)}
    if yardstick and hf.dtype == torch.float32:
        runs["bf16"] = ("auto", kv_rounded_to_bf16)
    logits = {}
    for name, (kv_cache_dtype, rounding) in runs.items():
        llm = LLM(model, kv_cache_dtype=kv_cache_dtype, enforce_eager=True, max_model_len=max(contexts),
                  max_num_batched_tokens=max(16384, sum(contexts)), **engine_args)
        with rounding():
            logits[name] = teacher_forced_logits(llm, random_sequences(contexts, hf.vocab_size, seed), decode_steps)
        llm.exit()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {name: compare(logits[name], logits["auto"]) for name in runs if name != "auto"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU at small sizes")
    p.add_argument("--contexts", type=int, nargs="+", help="sequence lengths (default 256 1024 2048 4096; "
                   "with --cpu 64 128 256 512)")
    p.add_argument("--decode-steps", type=int, default=64, help="decode positions per sequence")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "tiny-qwen3", "tiny-qwen2"])
    args = p.parse_args()
    contexts = args.contexts or ([64, 128, 256, 512] if args.cpu else [256, 1024, 2048, 4096])
    engine_args = dict(device="cpu" if args.cpu else "auto", attention_backend=args.attention_backend)
    if not args.cpu:
        engine_args["gpu_memory_utilization"] = 0.5
    print(f"contexts {contexts}, {args.decode_steps} decode steps each, backend {args.attention_backend}, "
          f"device {'cpu' if args.cpu else 'auto'}")
    print(f"{'model':<12} {'dtype':<9} {'KV':<5} {'positions':>9} {'rel err mean':>12} {'rel err max':>11} "
          f"{'top-1 agree':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"qwen3-0.6b": (QWEN3_0_6B, "bfloat16", dict(load_format="dummy")),
                 "tiny-qwen3": (build_tiny_checkpoint(os.path.join(tmp, "q3"), "qwen3", seed=0), "float32", {}),
                 "tiny-qwen2": (build_tiny_checkpoint(os.path.join(tmp, "q2"), "qwen2", seed=1), "float32", {})}
        for name in args.models:
            path, dtype, extra = paths[name]
            for kv, r in measure(path, contexts, args.decode_steps, **engine_args, **extra).items():
                print(f"{name:<12} {dtype:<9} {kv:<5} {r['positions']:>9} {r['rel_mean']:>12.2e} "
                      f"{r['rel_max']:>11.2e} {r['top1']:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
