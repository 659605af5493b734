"""bench.py's schedule without a model: the Scheduler alone over bench.py's 256 requests, a stand-in token for every
sample, overlap scheduling's one step in flight. Prints the decode steps and, for each prefill step, its tokens
and how many of them are decodes riding along; `--tree DIR` imports the scheduler of another tree (say .old/).

    PYTHONPATH=. python benchmarks/lab/schedule_sim.py [--tree .old] [--max-num-batched-tokens 16384]
"""
import argparse
import sys
from collections import deque
from types import SimpleNamespace


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tree", default=".")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--num-blocks", type=int, default=4000, help="256-token KV blocks (an H200 holds ~4,000)")
    args = p.parse_args()
    sys.path.insert(0, args.tree)
    from bench import make_workload
    from nanovllm.engine.scheduler import Scheduler
    from nanovllm.engine.sequence import Sequence
    config = SimpleNamespace(max_num_seqs=512, max_num_batched_tokens=args.max_num_batched_tokens,
                             kvcache_block_size=256)
    scheduler = Scheduler(config, args.num_blocks, 4096, ())
    for prompt, params in zip(*make_workload(256)):
        scheduler.add(Sequence(prompt, params))
    in_flight, decode_steps, prefill_steps = deque(), 0, []
    while not scheduler.is_finished():
        seqs, is_prefill = scheduler.schedule()
        if is_prefill:
            decodes = sum(s.num_computed_tokens >= s.num_prompt_tokens for s in seqs)
            prefill_steps.append((sum(s.num_scheduled_tokens for s in seqs), decodes))
        decode_steps += bool(seqs) and not is_prefill
        if seqs:
            in_flight.append((seqs, scheduler.reserve_output_tokens(seqs), [7] * len(seqs)))
        while len(in_flight) > (1 if seqs else 0):
            scheduler.postprocess(*in_flight.popleft())
    print(f"{args.tree}: {decode_steps} decode steps; prefill steps (tokens, of them decodes): {prefill_steps}; "
          f"preemptions {scheduler.num_preemptions}")


if __name__ == "__main__":
    main()
