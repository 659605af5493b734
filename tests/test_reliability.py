"""Faults mid-generation, repeated use and a soak: no hang, no leaked block, correct results after."""
import random

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import all_free, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture
def llm(qwen3_dir):
    return LLM(qwen3_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=12, max_model_len=128,
               max_num_batched_tokens=32)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("fail_at", [1, 3, 8])
def test_exception_mid_generate_aborts_and_engine_stays_usable(llm, monkeypatch, exc, fail_at):
    rng = random.Random(fail_at)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randrange(1, 50))] for _ in range(5)]
    real_run, calls = llm.executor.runner.run, [0]

    def flaky_run(batch):
        calls[0] += 1
        if calls[0] == fail_at:
            raise exc("injected")
        return real_run(batch)

    monkeypatch.setattr(llm.executor.runner, "run", flaky_run)
    with pytest.raises(exc, match="injected"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all_free(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(llm.config.model, prompt, GREEDY.max_tokens)
    assert all_free(llm)


def test_exception_from_the_tokenizer_during_output(llm, monkeypatch):
    def broken_decode(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "injected")
    monkeypatch.setattr(llm.tokenizer, "decode", broken_decode)
    with pytest.raises(UnicodeDecodeError):
        llm.generate(["hello"], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert all_free(llm)
    assert len(llm.generate(["hello"], GREEDY, use_tqdm=False)[0]["token_ids"]) == 10


def test_twenty_mixed_generates_leave_no_block_behind(llm):
    rng = random.Random(0)
    shared = [rng.randrange(3, 384) for _ in range(40)]
    for i in range(20):
        prompts = [shared[:rng.randrange(1, 41)] + [rng.randrange(3, 384) for _ in range(rng.randrange(0, 30))]
                   for _ in range(rng.randrange(1, 8))]
        params = [SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randrange(1, 40),
                                 ignore_eos=rng.random() < 0.5) for _ in prompts]
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, sp, out in zip(prompts, params, outs):
            assert 1 <= len(out["token_ids"]) <= min(sp.max_tokens, 128 - len(p))
            if sp.ignore_eos:
                assert len(out["token_ids"]) == min(sp.max_tokens, 128 - len(p))
        assert all_free(llm), f"blocks leaked after generate #{i}"


@pytest.mark.slow
def test_soak_2000_requests_under_a_small_cache(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=40, max_model_len=96,
              max_num_batched_tokens=128, max_num_seqs=32)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randrange(1, 60))] for _ in range(2000)]
    params = [SamplingParams(temperature=0.7, max_tokens=rng.randrange(1, 24), ignore_eos=True) for _ in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        assert len(out["token_ids"]) == min(sp.max_tokens, 96 - len(p))
    assert llm.scheduler.num_preemptions > 0
    assert all_free(llm)
