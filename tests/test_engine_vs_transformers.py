"""Greedy token ids from the engine must equal transformers' on the same tiny float32 checkpoint."""
import random

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import all_free, hf_greedy

BLOCK = 16
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_llm(path, **kwargs):
    kwargs.setdefault("kvcache_block_size", BLOCK)
    return LLM(path, device="cpu", **kwargs)


def random_prompt(rng, n, vocab=384):
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [random_prompt(rng, n) for n in (1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7)]


def test_prompt_lengths_around_block_boundaries(model_dir, prompts):
    llm = make_llm(model_dir)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(model_dir, prompt, GREEDY.max_tokens)
    assert all_free(llm)


def test_output_varies_token_to_token(qwen3_dir, prompts):
    """The fixture's weights make greedy output change; a model repeating one token would prove nothing."""
    out = hf_greedy(qwen3_dir, prompts[-1], 12)
    assert len(set(out)) >= 6
    assert hf_greedy(qwen3_dir, prompts[-2], 12) != out


def test_shared_prefix_and_fully_cached_rerun(model_dir):
    rng = random.Random(1)
    prefix = random_prompt(rng, 3 * BLOCK)
    batch = [prefix + random_prompt(rng, n) for n in (1, 5, BLOCK + 3)]
    llm = make_llm(model_dir)
    first = llm.generate(batch, GREEDY, use_tqdm=False)
    second = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, a, b in zip(batch, first, second):
        expected = hf_greedy(model_dir, prompt, GREEDY.max_tokens)
        assert a["token_ids"] == expected and b["token_ids"] == expected
        assert b["num_cached_tokens"] >= 3 * BLOCK      # the rerun hits the cache
    assert all_free(llm)


def test_fully_cached_prompt_of_exact_block_multiple_still_computes_a_token(qwen3_dir):
    """nano-vllm crashed here: every block of the prompt is cached, yet its last token's logits are needed."""
    prompt = random_prompt(random.Random(2), 2 * BLOCK)
    llm = make_llm(qwen3_dir)
    expected = hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == expected
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again["token_ids"] == expected
    assert again["num_cached_tokens"] == BLOCK      # one block is recomputed so the last token has logits
    assert all_free(llm)


def test_preemption_under_small_cache(model_dir):
    rng = random.Random(3)
    batch = [random_prompt(rng, rng.randrange(5, 40)) for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = make_llm(model_dir, num_kvcache_blocks=8, max_model_len=128)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for prompt, out in zip(batch, outs):
        assert out["token_ids"] == hf_greedy(model_dir, prompt, params.max_tokens)
    assert all_free(llm)


def test_preempted_sequence_revives_its_cached_prefix(qwen3_dir):
    """nano-vllm broke when a preempted sequence came back to find its own prefix cached."""
    rng = random.Random(4)
    batch = [random_prompt(rng, 2 * BLOCK + 3) for _ in range(3)]
    # 3 blocks each fill 9 of 10; at 48 tokens all three need a 4th block, so the newest is preempted. The
    # other two finish soon after, and the newest comes back to find its first two blocks still cached.
    max_tokens = [16, 16, 40]
    llm = make_llm(qwen3_dir, num_kvcache_blocks=10, max_model_len=128)
    for prompt, m in zip(batch, max_tokens):
        llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    seqs = list(llm.scheduler.waiting)
    # num_cached_tokens cannot tell (it counts the first allocation's hits only): watch the block manager instead.
    bm, revived_hits = llm.scheduler.block_manager, []
    real_allocate = bm.allocate

    def allocate(seq, hits):
        if seq.num_completion_tokens > 0:   # back from preemption
            revived_hits.append(len(hits))
        real_allocate(seq, hits)
    bm.allocate = allocate
    while not llm.is_finished():
        llm.step()
    assert any(n > 0 for n in revived_hits)
    for prompt, m, seq in zip(batch, max_tokens, seqs):
        assert seq.completion_token_ids == hf_greedy(qwen3_dir, prompt, m)
    assert all_free(llm)


def test_first_decode_token_of_a_new_block(qwen3_dir):
    """The token after a full block needs a fresh block; with 2 blocks in all, the last free one must be used."""
    prompt = random_prompt(random.Random(5), BLOCK)
    params = SamplingParams(temperature=0, max_tokens=BLOCK, ignore_eos=True)
    llm = make_llm(qwen3_dir, num_kvcache_blocks=2, max_model_len=2 * BLOCK)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, params.max_tokens)
    assert all_free(llm)


def test_chunked_prefill(model_dir):
    rng = random.Random(6)
    batch = [random_prompt(rng, n) for n in (3, 29, 50)]
    llm = make_llm(model_dir, max_num_batched_tokens=7)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out["token_ids"] == hf_greedy(model_dir, prompt, GREEDY.max_tokens)
    assert all_free(llm)


def test_per_request_params_and_output_order(qwen3_dir):
    rng = random.Random(7)
    batch = [random_prompt(rng, n) for n in (20, 3, 11, 35)]
    max_tokens = [9, 2, 14, 5]      # finish out of input order
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    llm = make_llm(qwen3_dir, max_num_seqs=2)
    outs = llm.generate(batch, params, use_tqdm=False)
    for prompt, m, out in zip(batch, max_tokens, outs):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, m)
    assert all_free(llm)


def test_text_prompts_and_decoded_text(qwen3_dir):
    llm = make_llm(qwen3_dir)
    out = llm.generate(["Hello, world!"], GREEDY, use_tqdm=False)[0]
    ids = llm.tokenizer.encode("Hello, world!")
    assert out["token_ids"] == hf_greedy(qwen3_dir, ids, GREEDY.max_tokens)
    assert out["text"] == llm.tokenizer.decode(out["token_ids"])


def test_sampling_with_temperature_stays_in_vocab_and_length(qwen3_dir):
    llm = make_llm(qwen3_dir)
    outs = llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o["token_ids"]) == 20 and all(0 <= t < 384 for t in o["token_ids"]) for o in outs)
    assert len({tuple(o["token_ids"]) for o in outs}) > 1     # four samples are not all the same
    assert all_free(llm)


def test_garbage_in_unused_cache_slots_does_not_leak_into_attention(qwen3_dir):
    """The cache is allocated uninitialised: slots past a context may hold NaN, and must not matter."""
    prompt = random_prompt(random.Random(8), 20)
    llm = make_llm(qwen3_dir)
    llm.executor.runner.kv_cache.fill_(float("nan"))
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


def test_kernel_warmup_leaves_the_engine_exact(qwen3_dir):
    """The start-up warm-up (run on CUDA) writes into the empty cache; it must leave no trace in results."""
    prompt = random_prompt(random.Random(9), 40)
    llm = make_llm(qwen3_dir)
    llm.executor.runner.warmup_kernels()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(qwen3_dir, prompt, 12)
    assert all_free(llm)
