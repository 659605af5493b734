"""Prompts that share a prefix and arrive together: the first computes the prefix, the others of the same prefill
step read it from the cache (its blocks are published when that step is scheduled), and every output stays the
transformers greedy one."""
import random

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import all_free, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def prefill_counter(llm) -> list[int]:
    """Patches the executor to record the prompt tokens of every prefill step it launches (not the one-token rows
    of the sequences decoding beside them)."""
    counts, run = [], llm.executor.run

    def counting_run(batch):
        if batch.is_prefill:
            query_lens = np.diff(batch.cu_seqlens_q)
            counts.append(int(sum(q for q, n in zip(query_lens, batch.sampling.output_lens) if n == 0)))
        return run(batch)

    llm.executor.run = counting_run
    return counts


@pytest.mark.parametrize("block_size, max_num_batched_tokens, overlap",
                         [(256, 4096, True), (16, 4096, True), (16, 4096, False), (16, 100, True), (16, 100, False),
                          (256, 128, True)])
def test_a_shared_prefix_in_one_batch_is_computed_once(qwen3_dir, block_size, max_num_batched_tokens, overlap):
    """Four prompts with one 300-token system prompt, submitted together. A budget of 100 or 128 tokens chunks the
    first prompt's prefix over several steps (the others are admitted with its last chunk, or after)."""
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=block_size, num_kvcache_blocks=8192 // block_size,
              max_model_len=1024, max_num_batched_tokens=max_num_batched_tokens, overlap_scheduling=overlap)
    shared = ids(0, 300)
    prompts = [shared + ids(1 + i, 20 + 7 * i) for i in range(4)]
    counts = prefill_counter(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    cached = 300 // block_size * block_size         # the full blocks of the shared prefix
    assert [o["num_cached_tokens"] for o in outs] == [0, cached, cached, cached]
    assert sum(counts) == sum(map(len, prompts)) - 3 * cached
    if max_num_batched_tokens > 1000:
        assert len(counts) == 1         # one prefill step for all four
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    assert all_free(llm)


def test_prompts_equal_to_the_prefix_still_compute_their_last_block(qwen3_dir):
    """The same 48-token prompt four times (3 full blocks of 16): the others hit 2 blocks, as after a step."""
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256)
    prompt = ids(5, 48)
    outs = llm.generate([prompt] * 4, GREEDY, use_tqdm=False)
    assert [o["num_cached_tokens"] for o in outs] == [0, 32, 32, 32]
    expected = hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    assert all(o["token_ids"] == expected for o in outs)
    assert all_free(llm)


def test_a_failed_step_leaves_no_uncomputed_block_shared(qwen3_dir):
    """A prefill step whose launch raises published its blocks when it was scheduled: aborting its requests must
    withdraw them, or the retry would read KV that was never written."""
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256)
    shared = ids(6, 40)
    prompts = [shared + ids(7, 5), shared + ids(8, 9)]

    def failing(batch):
        raise RuntimeError("the device went away")

    llm.executor.run = failing
    try:
        with pytest.raises(RuntimeError, match="went away"):
            llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        del llm.executor.run
    assert all_free(llm) and not llm.scheduler.block_manager.hash_to_block_id
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["num_cached_tokens"] for o in outs] == [0, 32]
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


@cuda
@pytest.mark.parametrize("block_size", [16, 256])
def test_a_shared_prefix_in_one_batch_on_the_gpu(qwen3_dir, block_size):
    """The Triton path: the rotary kernel stores the step's K/V, then the prefill kernel reads the prefix that
    another sequence of the same step wrote, through the block table."""
    llm = LLM(qwen3_dir, attention_backend="triton", kvcache_block_size=block_size, max_model_len=1024,
              num_kvcache_blocks=8192 // block_size, max_num_batched_tokens=4096, max_num_seqs=8)
    shared = ids(20, 300)
    prompts = [shared + ids(21 + i, 20 + 7 * i) for i in range(4)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    cached = 300 // block_size * block_size
    assert [o["num_cached_tokens"] for o in outs] == [0, cached, cached, cached]
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens, "cuda")
    assert all_free(llm)
    llm.exit()
