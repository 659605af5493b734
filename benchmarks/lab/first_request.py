"""The first requests after start-up: which Triton kernel variants they still have to compile (or load from the disk
cache), and what that adds to their time. Start-up compiles what its warm-up and graph capture launch
(engine/compile_ahead.py); a request whose shapes put an integer argument in another of Triton's specialization
classes (1, a multiple of 16, anything else), or tensors of another dtype or alignment, launches a variant nothing
has compiled yet. A slow first request that compiles nothing points elsewhere (files read cold, cuBLAS's first
heuristics).

    PYTHONPATH=. python benchmarks/lab/first_request.py [--model-config qwen3-0.6b] [--cold]

--cold: an empty Triton cache (a temporary TRITON_CACHE_DIR), as on a fresh machine. Each request is timed, then run
again: the second run has nothing left to compile, so the difference is what the first run's new variants cost.
"""
import argparse
import os
import tempfile
import time

from bench import MODEL_CONFIGS

# (prompt tokens, output tokens, requests): bench.py's batch-1 case first, then other lengths and batches
REQUESTS = [(16, 64, 1), (17, 64, 1), (1, 16, 1), (100, 64, 1), (300, 32, 4), (1000, 32, 8), (4000, 8, 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--cold", action="store_true", help="start with an empty Triton cache")
    args = p.parse_args()
    if args.cold:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    from triton import knobs

    from nanovllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=8192)
    print(f"LLM(): {time.perf_counter() - t:.2f} s ({'empty' if args.cold else 'existing'} Triton cache)")

    new_variants = []

    def record(*, fn, repr, **kwargs):      # Triton calls it before compiling a variant not in its memory cache
        new_variants.append(repr)
        return False        # compile it as usual
    knobs.runtime.jit_cache_hook = record

    for prompt_len, tokens, batch in REQUESTS:
        prompts = [[(7 * i + j) % 10000 for j in range(prompt_len)] for i in range(batch)]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=tokens)
        times = []
        for _ in range(2):
            del new_variants[:]
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t)
            if len(times) == 1:
                first_variants = list(new_variants)
        print(f"{batch} x {prompt_len} tokens -> {tokens}: first {times[0] * 1e3:.0f} ms, "
              f"again {times[1] * 1e3:.0f} ms; {len(first_variants)} new kernel variants")
        for variant in first_variants:
            print(f"    {variant[:400]}")
    llm.exit()


if __name__ == "__main__":
    main()
