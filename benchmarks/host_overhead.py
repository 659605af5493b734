"""Host-side cost of one decode step's scheduling and bookkeeping, without a model (runs on any machine).

    python benchmarks/host_overhead.py [batch]

256 sequences with bench.py-like prompts are admitted, then `steps` decode steps are scheduled and booked
with a fake token, timing Scheduler.schedule and Scheduler.postprocess separately.
"""
import sys
import time
from random import randint, seed
from types import SimpleNamespace

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def main(batch: int = 256, steps: int = 300):
    config = SimpleNamespace(max_num_seqs=512, max_num_batched_tokens=16384, kvcache_block_size=256)
    scheduler = Scheduler(config, num_kvcache_blocks=4000, max_model_len=4096, eos_token_ids=(0,))
    seed(0)
    for _ in range(batch):
        scheduler.add(Sequence([randint(1, 9999) for _ in range(randint(100, 1024))],
                               SamplingParams(temperature=0.6, max_tokens=3000, ignore_eos=True)))
    while scheduler.waiting:
        seqs, _ = scheduler.schedule()
        scheduler.postprocess(seqs, scheduler.launched(seqs), [5] * len(seqs))
    t_schedule = t_postprocess = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        seqs, _ = scheduler.schedule()
        t1 = time.perf_counter()
        scheduler.postprocess(seqs, scheduler.launched(seqs), [5] * len(seqs))
        t_schedule += t1 - t0
        t_postprocess += time.perf_counter() - t1
    print(f"batch {len(seqs)}: schedule {t_schedule / steps * 1e3:.3f} ms, "
          f"postprocess {t_postprocess / steps * 1e3:.3f} ms per decode step")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
