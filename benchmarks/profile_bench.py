"""Where bench.py's time goes: per-step timing over the whole workload, a phase breakdown of single decode
steps, and the GPU kernels of a few decode steps at full batch.

    python benchmarks/profile_bench.py [--attention-backend triton] [--enforce-eager]
"""
import argparse
import time
from collections import defaultdict
from random import randint, seed

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.configs import QWEN3_0_6B


def bench_workload():
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024)) for _ in range(256)]
    return prompts, params


from nanovllm.layers.sampler import prepare_sampling  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def step_phases(llm, label):
    """One step split into its phases, with a sync after each (so phases do not overlap)."""
    s, runner = llm.scheduler, llm.executor.runner
    (seqs, is_prefill), t_sched = timed(s.schedule)
    prepare = runner.prepare_prefill if is_prefill else runner.prepare_decode
    def prepare_sample():
        return prepare_sampling([seq.sampling_params for seq in seqs], [len(seq) - seq.num_prompt_tokens for seq in seqs],
                                runner.eos_token_ids, runner.config.hf_config.vocab_size, runner.device)
    (inputs, _), t_prep = timed(lambda: (prepare(seqs), prepare_sample()))
    temperatures, extras = prepare_sample()
    logits, t_fwd = timed(lambda: runner.run_model(*inputs, is_prefill))
    (tokens, _), t_sample = timed(lambda: runner.sampler(logits, temperatures, extras))
    token_ids, t_tolist = timed(tokens.tolist)
    from nanovllm.utils.context import reset_context
    reset_context()
    _, t_post = timed(lambda: s.postprocess(seqs, s.launched(seqs), token_ids, None))
    total = t_sched + t_prep + t_fwd + t_sample + t_tolist + t_post
    print(f"{label}: {'prefill' if is_prefill else 'decode'} batch {len(seqs)}  total {total * 1e3:.2f} ms = schedule {t_sched * 1e3:.2f} + prepare "
          f"{t_prep * 1e3:.2f} + forward(graph+lm_head) {t_fwd * 1e3:.2f} + sample {t_sample * 1e3:.2f} + "
          f"tolist {t_tolist * 1e3:.2f} + postprocess {t_post * 1e3:.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--only-prefill", action="store_true")
    args = p.parse_args()
    llm = LLM(QWEN3_0_6B, load_format="dummy", attention_backend=args.attention_backend,
              enforce_eager=args.enforce_eager, max_model_len=4096)
    prompts, params = bench_workload()
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    if args.only_prefill:
        return profile_prefill(llm)

    # 1. the whole workload, step by step
    for prompt, sp in zip(prompts, params):
        llm.add_request(prompt, sp)
    stats = defaultdict(lambda: [0, 0.0, 0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    while not llm.is_finished():
        t = time.perf_counter()
        _, num_tokens = llm.step()
        dt = time.perf_counter() - t
        key = "prefill" if num_tokens > 0 else f"decode b{min(256, 1 << (max(1, -num_tokens) - 1).bit_length())}"
        stats[key][0] += 1
        stats[key][1] += dt
        stats[key][2] += abs(num_tokens)
    wall = time.perf_counter() - start
    print(f"workload: {wall:.2f}s wall")
    for key in sorted(stats, key=lambda k: (k != "prefill", int(k[8:]) if k != "prefill" else 0)):
        n, t, tokens = stats[key]
        print(f"  {key:12s} steps {n:5d}  time {t:6.2f}s ({100 * t / wall:4.1f}%)  {t / n * 1e3:7.2f} ms/step  "
              f"{tokens / t:9.0f} tok/s")

    profile_prefill(llm)
    profile_decode(llm, prompts, params)


def profile_prefill(llm):
    # 2. fresh (uncached) prefill steps, phase by phase, then one under the profiler
    seed(1)
    for _ in range(128):
        llm.add_request([randint(0, 10000) for _ in range(randint(100, 1024))],
                        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2))
    for _ in range(3):
        step_phases(llm, "prefill")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    while not llm.is_finished():
        llm.step()


def profile_decode(llm, prompts, params):
    # 3. single decode steps, phase by phase, at batch 256 and batch 1
    for batch, label in ((256, "full batch"), (1, "batch 1")):
        for prompt, sp in zip(prompts[:batch], params[:batch]):
            llm.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=40))
        while llm.scheduler.waiting:
            llm.step()
        for _ in range(3):
            llm.step()
        for _ in range(2):
            step_phases(llm, label)
        while not llm.is_finished():
            llm.step()

    # 4. the GPU kernels of 5 decode steps at full batch
    for prompt in prompts:
        llm.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=30))
    while llm.scheduler.waiting:
        llm.step()
    llm.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            llm.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    while not llm.is_finished():
        llm.step()


if __name__ == "__main__":
    main()
