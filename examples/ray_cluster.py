"""Batch generation on a Ray cluster: one LLM replica per `--tensor-parallel-size` GPUs, prompts from a file (one a
line), completions to a JSON-lines file in the prompts' order.

    ray start --head --port=6379                  # on the head node
    ray start --address=HEAD_IP:6379              # on every other node
    python examples/ray_cluster.py --model ~/huggingface/Qwen3-0.6B --num-replicas 4 --prompts prompts.txt

Every node needs `pip install "nano-vllm[ray]"` and the model at the same path. `--ray-data` runs the prompts
through Ray Data's map_batches instead of the plain helper. `--address local --device cpu` runs it all on this
machine, on the CPU (the replicas on logical GPUs).
"""
import argparse
import json

import ray
import ray.data

from nanovllm import SamplingParams
from nanovllm.ray_replicas import LLMPredictor, ReplicaPool

DEFAULT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers."]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint directory or .gguf file, at this path on every node")
    p.add_argument("--address", default="auto", help="the cluster's HEAD_IP:6379; 'auto' finds the one `ray start` "
                                                     "made here; 'local' starts one in this process")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica, all on one node")
    p.add_argument("--prompts", help="a text file, one prompt a line (default: three examples)")
    p.add_argument("--output", default="completions.jsonl")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--ray-data", action="store_true", help="use ray.data's map_batches")
    return p.parse_args()


def main():
    args = parse_args()
    local_cpu = args.address == "local" and args.device == "cpu"
    ray.init(address=args.address, num_gpus=args.num_replicas * args.tensor_parallel_size if local_cpu else None)
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = DEFAULT_PROMPTS
    sampling_params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    engine = dict(tensor_parallel_size=args.tensor_parallel_size, device=args.device)

    if args.ray_data:
        # Rows keep their order with preserve_order; without it they come back in whatever order batches finish.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ray.data.from_items([{"prompt": p} for p in prompts]).map_batches(
            LLMPredictor, fn_constructor_kwargs=dict(model=args.model, sampling_params=sampling_params, **engine),
            compute=ray.data.ActorPoolStrategy(size=args.num_replicas), num_gpus=args.tensor_parallel_size,
            batch_size=64)
        texts = [row["text"] for row in ds.iter_rows()]
    else:
        with ReplicaPool(args.model, args.num_replicas, **engine) as pool:
            texts = [o["text"] for o in pool.generate(prompts, sampling_params)]

    with open(args.output, "w") as f:
        for prompt, text in zip(prompts, texts):
            f.write(json.dumps({"prompt": prompt, "text": text}, ensure_ascii=False) + "\n")
    print(f"{len(texts)} completions written to {args.output}")


if __name__ == "__main__":
    main()
