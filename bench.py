"""nano-vllm's throughput benchmark: 256 requests, prompt and output lengths uniform in 100..1024, seed 0.

    python bench.py --dummy            # the shipped Qwen3-0.6B config with random weights, no download
    python bench.py --model ~/huggingface/Qwen3-0.6B
    python bench.py --dummy --kv-cache-dtype fp8   # K/V stored in 8 bits: half the bytes decode reads
    python bench.py --dummy --model-config llama-3.2-1b    # another shipped config: smollm2-135m, llama-3.2-1b
    python bench.py --dummy --shared-prefix 512    # one 512-token system prompt before every prompt

Other scripts that need this workload import it (`from bench import make_workload, prompts_for_run`, run from the
repository root with PYTHONPATH=.), so it is written once. Repeated runs in one engine (`--repeat`) each get their own
token ids (`prompts_for_run`): the same work, never read from the prefix cache the runs before them filled.
"""
import argparse
import os
import statistics
import time
from random import Random

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.layers.attention_backends import BACKEND_CHOICES as ATTENTION_BACKENDS
from nanovllm.configs import MODEL_CONFIGS

MAX_INPUT_LEN = MAX_OUTPUT_LEN = 1024


def make_workload(num_seqs: int = 256, seed: int = 0,
                  shared_prefix: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's bench workload: random token ids, prompt and output lengths uniform in 100..1024.

    The draws, and their order (all prompts, then all output lengths), are upstream bench.py's under
    random.seed(seed), so both benchmarks run the same requests. `shared_prefix`: that many random tokens (drawn
    after those) before every prompt, as one system prompt for a whole offline batch."""
    rng = Random(seed)
    prompt_token_ids = [[rng.randint(0, 10000) for _ in range(rng.randint(100, MAX_INPUT_LEN))]
                        for _ in range(num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, MAX_OUTPUT_LEN))
                       for _ in range(num_seqs)]
    if shared_prefix:
        prefix = [rng.randint(0, 10000) for _ in range(shared_prefix)]
        prompt_token_ids = [prefix + prompt for prompt in prompt_token_ids]
    return prompt_token_ids, sampling_params


def small_batch_workload(batch: int = 1, prompt_len: int = 16, max_tokens: int = 1024
                         ) -> tuple[list[list[int]], SamplingParams]:
    """The `Batch-1 decode:` line's workload (and the lab's small batches): `batch` random prompts of `prompt_len`
    tokens (seed 1), each decoding max_tokens."""
    rng = Random(1)
    prompts = [[rng.randint(0, 10000) for _ in range(prompt_len)] for _ in range(batch)]
    return prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)


def prompts_for_run(prompt_token_ids: list[list[int]], run: int, vocab_size: int) -> list[list[int]]:
    """The workload's prompts for its `run`-th repetition in one engine: the same lengths with other token ids, so the
    same work, none of it in the prefix cache from the runs before (a shared prefix stays shared within the run)."""
    return [[(t + 10_001 * run) % vocab_size for t in prompt] for prompt in prompt_token_ids]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint (default ~/huggingface/Qwen3-0.6B; with --dummy, a config's directory)")
    p.add_argument("--dummy", action="store_true",
                   help="random weights in --model's shapes, or else a shipped config's; no download")
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS),
                   help="the shipped config --dummy uses (default qwen3-0.6b)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--no-overlap", action="store_true", help="book each step before launching the next")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="put the same N random tokens before every prompt (one system prompt for the batch)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="run the workload this many times in one process")
    p.add_argument("--skip-batch1", action="store_true", help="skip the single-request decode measurement")
    return p.parse_args()


def latency_summary(outputs: list[dict]) -> str:
    """Time to first token (from the request's arrival: all arrive at once here, so it includes queueing) and time
    per output token after the first, median and p99 over the requests, as vLLM's benchmarks report them."""
    def median_p99(values):     # in ms
        p99 = statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]
        return statistics.median(values) * 1e3, p99 * 1e3
    metrics = [(o["metrics"], len(o["token_ids"])) for o in outputs]
    ttft = median_p99([m["first_token_time"] - m["arrival_time"] for m, _ in metrics])
    tpot = median_p99([(m["finished_time"] - m["first_token_time"]) / (n - 1) for m, n in metrics if n > 1])
    return (f"TTFT median {ttft[0]:.1f} ms, p99 {ttft[1]:.1f} ms; "
            f"TPOT median {tpot[0]:.2f} ms, p99 {tpot[1]:.2f} ms")


def main():
    args = parse_args()
    path = os.path.expanduser(args.model or (MODEL_CONFIGS[args.model_config] if args.dummy
                                             else "~/huggingface/Qwen3-0.6B"))
    start = time.perf_counter()
    llm = LLM(path, enforce_eager=args.enforce_eager, max_model_len=4096, attention_backend=args.attention_backend,
              tensor_parallel_size=args.tensor_parallel_size, load_format="dummy" if args.dummy else "auto",
              kv_cache_dtype=args.kv_cache_dtype, overlap_scheduling=not args.no_overlap)
    print(f"Startup: {time.perf_counter() - start:.2f}s "
          f"(backend {llm.executor.runner.attention_backend.name}, {llm.executor.runner.num_kvcache_blocks} KV blocks, "
          f"kv_cache_dtype {args.kv_cache_dtype}, overlap {'off' if args.no_overlap else 'on'})")

    prompt_token_ids, sampling_params = make_workload(args.num_seqs, shared_prefix=args.shared_prefix)

    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8), use_tqdm=False)     # warm-up
    cuda = torch.cuda.is_available()
    for i in range(args.repeat):
        prompts = prompts_for_run(prompt_token_ids, i, llm.config.model_config.vocab_size)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        outputs = llm.generate(prompts, sampling_params, use_tqdm=False)
        t = time.perf_counter() - t     # generate() has read every sampled token back, so the GPU is done
        total_tokens = sum(len(o["token_ids"]) for o in outputs)
        print(f"Total: {total_tokens}tok, Time: {t:.2f}s, Throughput: {total_tokens / t:.2f}tok/s")
        print(f"  run {i + 1}: {latency_summary(outputs)}")
        prompt_tokens, cached = sum(map(len, prompt_token_ids)), sum(o["num_cached_tokens"] for o in outputs)
        print(f"  run {i + 1}: prefill computed {prompt_tokens - cached} of {prompt_tokens} prompt tokens "
              f"({cached} from the prefix cache)")
        if cuda:
            print(f"  run {i + 1}: torch.cuda.memory_allocated = {torch.cuda.memory_allocated() / 2**20:.1f} MiB, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")

    if not args.skip_batch1:
        t = time.perf_counter()
        out = llm.generate(*small_batch_workload(), use_tqdm=False)
        t = time.perf_counter() - t
        ttft = out[0]["metrics"]["first_token_time"] - out[0]["metrics"]["arrival_time"]
        print(f"Batch-1 decode: {len(out[0]['token_ids']) / t:.2f}tok/s (1024 tokens after a 16-token prompt; "
              f"time to first token {ttft * 1e3:.1f} ms)")
    if hasattr(llm, "exit"):
        llm.exit()


if __name__ == "__main__":
    main()
