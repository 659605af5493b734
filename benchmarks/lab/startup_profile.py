"""What LLM() start-up spends its time on: the import, then cProfile of the constructor, by cumulative time.

    PYTHONPATH=. python benchmarks/lab/startup_profile.py [--model-config qwen3-0.6b]    # TRITON_CACHE_DIR to pick cold/warm
"""
import argparse
import cProfile
import pstats
import time

t0 = time.perf_counter()
import torch  # noqa: E402
t1 = time.perf_counter()
from nanovllm import LLM  # noqa: E402
t2 = time.perf_counter()
from bench import MODEL_CONFIGS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--rows", type=int, default=35)
    args = p.parse_args()
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096)
    profiler.disable()
    print(f"import torch {t1 - t0:.2f}s, import nanovllm {t2 - t1:.2f}s, LLM() {time.perf_counter() - t:.2f}s")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.rows)
    llm.exit()


if __name__ == "__main__":
    main()
