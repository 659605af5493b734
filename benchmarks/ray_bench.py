"""The cost of running the engine under Ray: bench.py's workload through one LLM in this process, then through
replicas on a local Ray cluster (nanovllm/ray_replicas.py), in one run; prints both throughputs and their ratio.

    PYTHONPATH=. python benchmarks/ray_bench.py --dummy                      # one replica against one LLM
    PYTHONPATH=. python benchmarks/ray_bench.py --dummy --num-replicas 2     # two GPUs: scaling
    PYTHONPATH=. python benchmarks/ray_bench.py --model DIR --num-seqs 8 --device cpu   # a smoke run on CPU

With N replicas the Ray side gets N times the requests (bench.py's workload drawn for num_seqs * N), so that each
replica has as much work as the single LLM; the ratio printed is then per replica (1.0 is perfect scaling).
"""
import argparse
import gc
import os
import time

import torch

from bench import make_workload, prompts_for_run
from nanovllm import LLM, SamplingParams
from nanovllm.configs import MODEL_CONFIGS
from nanovllm.ray_replicas import ReplicaPool


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="~/huggingface/Qwen3-0.6B")
    p.add_argument("--dummy", action="store_true", help="random weights in a shipped config's shapes, no download")
    p.add_argument("--model-config", default="qwen3-0.6b", choices=list(MODEL_CONFIGS))
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="time each side this many times; the best run counts")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--enforce-eager", action="store_true")
    return p.parse_args()


def best_throughput(name: str, generate, prompts: list, params: list, repeat: int, vocab_size: int) -> float:
    generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8))     # warm-up, as bench.py's
    best = 0.0
    for i in range(repeat):
        run_prompts = prompts_for_run(prompts, i, vocab_size)     # no run reads the one before from the prefix cache
        t = time.perf_counter()
        outputs = generate(run_prompts, params)
        t = time.perf_counter() - t     # outputs are back on the host: the GPU is done
        tokens = sum(len(o["token_ids"]) for o in outputs)
        print(f"{name} run {i + 1}: {tokens}tok, {t:.2f}s, {tokens / t:.2f}tok/s")
        best = max(best, tokens / t)
    return best


def main():
    args = parse_args()
    path = MODEL_CONFIGS[args.model_config] if args.dummy else os.path.expanduser(args.model)
    # bench.py's engine options.
    engine = dict(max_model_len=4096, load_format="dummy" if args.dummy else "auto", device=args.device,
                  enforce_eager=args.enforce_eager)

    prompts, params = make_workload(args.num_seqs)
    llm = LLM(path, **engine)
    vocab_size = llm.config.model_config.vocab_size
    plain = best_throughput("LLM", lambda p, sp: llm.generate(p, sp, use_tqdm=False), prompts, params, args.repeat,
                            vocab_size)
    llm.exit()
    del llm     # give its GPU memory back before a replica sizes its KV cache on the same GPU
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    import ray
    # A fresh local instance, whatever `ray start` left on this machine. On CPU, logical GPUs (a replica asks for
    # tensor_parallel_size of them). The prompts and outputs are a few MB: 1 GiB of object store, not 30% of memory.
    ray.init(address="local", include_dashboard=False, object_store_memory=2**30,
             num_gpus=args.num_replicas if args.device == "cpu" else None)
    prompts, params = make_workload(args.num_seqs * args.num_replicas)
    # As many intra-op threads as this process had, the machine allowing: Ray gives an actor one unless it asks.
    num_cpus = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // args.num_replicas))
    with ReplicaPool(path, args.num_replicas, ray_remote_args={"num_cpus": num_cpus}, **engine) as pool:
        replicas = best_throughput(f"Ray x{args.num_replicas}", pool.generate, prompts, params, args.repeat,
                                   vocab_size)
    ray.shutdown()
    print(f"LLM {plain:.2f}tok/s; Ray, {args.num_replicas} replica(s): {replicas:.2f}tok/s; "
          f"per replica / LLM = {replicas / args.num_replicas / plain:.3f}")


if __name__ == "__main__":
    main()
