"""Overlap scheduling: step N+1 is launched before step N's tokens are booked. Everything a user sees must be what
the synchronous loop gives: tokens, text, stop reasons, logprobs, seeded draws, and the blocks freed at the end."""
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import SampledTokens
from tests.conftest import all_free

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def engine(qwen3_dir, device: str, overlap: bool, **kwargs) -> LLM:
    options = dict(kvcache_block_size=8, num_kvcache_blocks=16, max_model_len=96, max_num_batched_tokens=40,
                   max_num_seqs=4)
    if device == "cuda":    # the same 128 cache slots in pages the Triton kernels can tile
        options.update(attention_backend="triton", enforce_eager=False, kvcache_block_size=16, num_kvcache_blocks=8)
    return LLM(qwen3_dir, device=device, overlap_scheduling=overlap, **{**options, **kwargs})


def same_outputs(got: list[dict], want: list[dict]) -> bool:
    """Equal but for timestamps, and logprobs up to float rounding (a speculative step changes the batch shape)."""
    for g, w in zip(got, want, strict=True):
        if {k: v for k, v in g.items() if k not in ("metrics", "logprobs")} != \
                {k: v for k, v in w.items() if k not in ("metrics", "logprobs")}:
            return False
        for lg, lw in zip(g.get("logprobs", []), w.get("logprobs", []), strict=True):
            if lg.keys() != lw.keys() or any(abs(lg[t] - lw[t]) > 1e-4 for t in lg):
                return False
    return True


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_on_and_off_give_identical_outputs(qwen3_dir, device):
    """A mix that ends requests every way (stop token, stop string, length, max_model_len) in a cache small enough
    to chunk prompts and preempt, so speculative steps and in-flight preemptions happen."""
    sync = engine(qwen3_dir, device, overlap=False)
    prompts = [ids(i, n) for i, n in enumerate((5, 30, 17, 60, 9, 44, 23, 70))]
    plain = sync.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    stop_token = plain[1]["token_ids"][6]       # ends request 1 (at least) mid-way
    stop_text = plain[3]["text"][len(plain[3]["text"]) // 2:][:2]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0.8, seed=7, max_tokens=15, logprobs=3),
              SamplingParams(temperature=0, max_tokens=20, stop=[stop_text]),
              SamplingParams(temperature=0, max_tokens=3, min_tokens=2),
              SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),    # runs into max_model_len
              SamplingParams(temperature=1.0, seed=3, top_k=5, top_p=0.9, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=1)]
    preempted = sync.scheduler.num_preemptions
    want = sync.generate(prompts, params, use_tqdm=False)
    assert want[1]["finish_reason"] == "stop" and len(want[1]["token_ids"]) < 20
    assert want[3]["finish_reason"] == "stop" and want[5]["finish_reason"] == "length"
    assert sync.scheduler.num_preemptions > preempted, "the workload should preempt"
    overlap = engine(qwen3_dir, device, overlap=True)
    assert same_outputs(overlap.generate(prompts, params, use_tqdm=False), want)
    assert overlap.scheduler.num_preemptions > 0 and all_free(overlap)
    # Streamed under overlap, the pieces add up to the same text and tokens.
    pieces = {i: ("", []) for i in range(len(prompts))}
    for out in overlap.stream(prompts, params):
        text, tokens = pieces[out.index]
        pieces[out.index] = (text + out.new_text, tokens + out.new_token_ids)
    assert [pieces[i] for i in range(len(prompts))] == [(o["text"], o["token_ids"]) for o in want]
    assert all_free(overlap)
    for llm in (sync, overlap):
        llm.exit()


def test_a_step_launches_before_the_previous_one_is_booked(qwen3_dir, monkeypatch):
    events = []
    real_result = SampledTokens.result
    llm = engine(qwen3_dir, "cpu", overlap=True)
    runner = llm.executor.runner
    real_run = runner.run
    monkeypatch.setattr(runner, "run", lambda batch: (events.append("launch"), real_run(batch))[1])
    monkeypatch.setattr(SampledTokens, "result", lambda self: (events.append("book"), real_result(self))[1])
    llm.generate([ids(1, 10)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    # prefill, then decodes 1-3; each is booked after the next launch, the last when nothing is left to launch.
    assert events == ["launch", "launch", "book", "launch", "book", "launch", "book", "book"]
    events.clear()
    sync = engine(qwen3_dir, "cpu", overlap=False)
    real_run = sync.executor.runner.run
    monkeypatch.setattr(sync.executor.runner, "run",
                        lambda batch: (events.append("launch"), real_run(batch))[1])
    sync.generate([ids(1, 10)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert events == ["launch", "book"] * 4


def test_an_interrupted_wait_loses_no_step(qwen3_dir, monkeypatch):
    """Ctrl-C while the host waits for a step: that call's requests are aborted, the step stays queued and is
    booked first by the next call, and a stream left open across it gets every token."""
    llm = engine(qwen3_dir, "cpu", overlap=True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o["token_ids"] for o in engine(qwen3_dir, "cpu", overlap=False).generate(
        [ids(2, 12), ids(3, 20)], greedy, use_tqdm=False)]
    stream = llm.stream([ids(2, 12)], greedy)
    first = next(stream)        # the stream's prefill and first decode were launched, the prefill booked
    real_result = SampledTokens.result

    def interrupt(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(SampledTokens, "result", interrupt)
    with pytest.raises(KeyboardInterrupt):      # launches the new prompt's prefill, then waits for the decode
        llm.generate([ids(9, 15)], greedy, use_tqdm=False)
    monkeypatch.setattr(SampledTokens, "result", real_result)
    # The stream's next step needs the decode's token, which only the interrupted wait would have booked.
    tokens = first.new_token_ids + [t for out in stream for t in out.new_token_ids]
    assert tokens == want[0]
    assert [o["token_ids"] for o in llm.generate([ids(3, 20)], greedy, use_tqdm=False)] == want[1:]
    assert all_free(llm)
