"""Decode throughput at small batches and several context lengths, for comparing two trees in one call (run it once
per tree, each with its own PYTHONPATH). Case b1 is bench.py's `Batch-1 decode:` workload (1,024 tokens after a
16-token prompt, seed 1, temperature 0.6) in a fresh engine; bN-L is N requests after L-token prompts.

    PYTHONPATH=<tree> python benchmarks/lab/small_batch_decode.py [--model-config qwen3-0.6b] [--label main]
        [--decode-launch TILE,WARPS,STAGES]    (the bf16 cache's decode launch at every batch, for a launch sweep)
        [--max-splits N]                       (DECODE_MAX_SPLITS: how many programs may share one sequence's KV)
"""
import argparse
import time

from bench import MODEL_CONFIGS, small_batch_workload
from nanovllm import LLM
from nanovllm.kernels import paged_attention_triton

CASES = {"b1": (1, 16, 1024, 3), "b1-3000": (1, 3000, 512, 2), "b4-1500": (4, 1500, 256, 2),
         "b8-1500": (8, 1500, 256, 2), "b16-1000": (16, 1000, 256, 2), "b16": (16, 16, 512, 2)}


def throughput(llm: LLM, batch: int, prompt_len: int, tokens: int, repeat: int) -> str:
    prompts, params = small_batch_workload(batch, prompt_len, tokens)
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o["token_ids"]) for o in outputs) / (time.perf_counter() - t))
    return " / ".join(f"{r:,.0f}" for r in rates)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--label", default="", help="printed first, to tell the trees apart")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--decode-launch", help="TILE,WARPS,STAGES: replaces DECODE_LAUNCH for a 16-bit cache, and the "
                   "smaller tiles for few programs are off (DECODE_FEW_PROGRAMS = 0)")
    p.add_argument("--max-splits", type=int, help="replaces DECODE_MAX_SPLITS")
    args = p.parse_args()
    if args.max_splits:
        paged_attention_triton.DECODE_MAX_SPLITS = args.max_splits
    if args.decode_launch:
        paged_attention_triton.DECODE_LAUNCH[2] = paged_attention_triton.DecodeLaunch(
            *map(int, args.decode_launch.split(",")))
        paged_attention_triton.DECODE_FEW_PROGRAMS = 0
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096)
    results = [f"{name} {throughput(llm, *CASES[name])}" for name in args.cases]
    print(f"{args.label} {args.model_config} tok/s: " + "; ".join(results), flush=True)
    llm.exit()


if __name__ == "__main__":
    main()
