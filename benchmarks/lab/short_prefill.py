"""A request's time to first token where the prefill is short: run as token rows in a decode CUDA graph
(model_runner.PREFILL_ROWS_MAX_KEYS set past any case, so the crossover shows) against eagerly (the constant set to
0), alternating in one process; "shipped" names the one the shipped constant picks.

    PYTHONPATH=. python benchmarks/lab/short_prefill.py [--model-config qwen3-0.6b] [--repeat 5]

A case is N requests of Q new tokens after C tokens already in the prefix cache (a prompt generated once before);
each is timed as `generate(max_tokens=1)`, the median of --repeat runs, ms.
"""
import argparse
import statistics
import time
from random import Random

import torch

from bench import MODEL_CONFIGS
from nanovllm import LLM, SamplingParams
from nanovllm.engine import model_runner

CASES = [(1, 16, 0), (1, 64, 0), (1, 128, 0), (1, 256, 0), (1, 512, 0), (1, 32, 1024), (1, 128, 1024),
         (1, 64, 2048), (8, 16, 0), (8, 64, 0), (8, 64, 512)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096)
    shipped = model_runner.PREFILL_ROWS_MAX_KEYS
    one = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1)
    rng = Random(0)
    print(f"{args.model_config}: time to first token, ms (median of {args.repeat}); rows: a decode graph, "
          f"eager: PREFILL_ROWS_MAX_KEYS = 0")
    for n, q, c in CASES:
        times = {"rows": [], "eager": []}
        for _ in range(args.repeat):
            for mode in times:
                prefixes = [[rng.randint(0, 10000) for _ in range(c)] for _ in range(n)]
                if c:
                    llm.generate(prefixes, one, use_tqdm=False)
                prompts = [prefix + [rng.randint(0, 10000) for _ in range(q)] for prefix in prefixes]
                model_runner.PREFILL_ROWS_MAX_KEYS = 2**62 if mode == "rows" else 0
                torch.cuda.synchronize()
                t = time.perf_counter()
                outs = llm.generate(prompts, one, use_tqdm=False)
                times[mode].append((time.perf_counter() - t) * 1e3)
                assert all(o["num_cached_tokens"] >= c // 256 * 256 for o in outs)
        keys = n * sum(range(c + 1, c + q + 1))
        print(f"  {n} x {q} new after {c} cached ({keys:,} keys): rows {statistics.median(times['rows']):.2f}, "
              f"eager {statistics.median(times['eager']):.2f}; shipped: {'rows' if keys <= shipped else 'eager'}")
    model_runner.PREFILL_ROWS_MAX_KEYS = shipped
    llm.exit()


if __name__ == "__main__":
    main()
