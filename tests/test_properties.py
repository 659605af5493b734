"""Property-based tests over random request streams: block accounting, progress and outputs.

The scheduler runs against a stand-in model whose next token is a hash of the whole sequence so far, so
the output of a request cannot depend on batching, chunking or preemption; then the real tiny model runs
a few streams and must match a run with an unbounded cache.
"""
import random
from collections import Counter, deque
from types import SimpleNamespace

import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm import LLM, SamplingParams
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence

VOCAB = 50


def fake_next_token(token_ids: list[int]) -> int:
    return xxhash.xxh32(repr(token_ids).encode()).intdigest() % VOCAB


@st.composite
def workloads(draw):
    block = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(4, 40))
    min_blocks = -(-max_model_len // block)
    prefixes = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=2 * block + 1),
                             min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, 12))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(st.integers(0, VOCAB - 1), max_size=12))
        if draw(st.booleans()):     # exact multiples of the block size are where caching bugs hide
            prompt = (prompt * block)[:max(block, len(prompt) // block * block)]
        prompt = prompt[:max_model_len]
        requests.append((draw(st.integers(0, 6)), prompt, draw(st.integers(1, 12))))
    return dict(block=block, max_model_len=max_model_len, stop_token=draw(st.sampled_from([None, 0])),
                num_blocks=draw(st.integers(min_blocks, min_blocks + 6)),
                max_num_batched_tokens=draw(st.integers(1, 48)), max_num_seqs=draw(st.integers(1, 6)),
                requests=requests)


def check_accounting(scheduler: Scheduler):
    bm = scheduler.block_manager
    live = [seq for seq in list(scheduler.running) + list(scheduler.waiting) if seq.block_table]
    refs = Counter(b for seq in live for b in seq.block_table)
    assert all(block.ref_count == refs[block.block_id] for block in bm.blocks)
    free = list(bm.free_block_ids)
    assert len(free) == len(set(free)), "a block is free twice"
    assert all(bm.blocks[b].ref_count == 0 for b in free)
    assert len(free) + sum(block.ref_count > 0 for block in bm.blocks) == len(bm.blocks), "a block is lost"


def run_stream(w: dict, num_blocks: int, overlap: bool = False) -> list[list[int]]:
    """Drive a scheduler through the request stream. The stand-in GPU samples at launch from every token it has
    sampled so far; with `overlap` the host books each step one step late, as the engine does."""
    config = SimpleNamespace(max_num_seqs=w["max_num_seqs"], max_num_batched_tokens=w["max_num_batched_tokens"],
                             kvcache_block_size=w["block"])
    scheduler = Scheduler(config, num_blocks, w["max_model_len"], eos_token_ids=())
    stop = [] if w["stop_token"] is None else [w["stop_token"]]
    pending = sorted(enumerate(w["requests"]), key=lambda r: r[1][0])
    seqs, step, on_gpu, unbooked = {}, 0, {}, deque()
    while pending or not scheduler.is_finished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens) = pending.pop(0)
            seqs[i] = Sequence(prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop))
            on_gpu[seqs[i].seq_id] = list(prompt)
            scheduler.add(seqs[i])
        step += 1
        if scheduler.is_finished():
            continue
        batch, is_prefill = scheduler.schedule()
        assert batch or unbooked, "nothing was scheduled while requests wait"
        assert len(batch) <= w["max_num_seqs"]
        # Prompts take what the decodes leave of the budget (decodes alone may pass it, as one token each)
        assert not is_prefill or sum(s.num_scheduled_tokens for s in batch) <= w["max_num_batched_tokens"]
        if batch:
            indices = scheduler.reserve_output_tokens(batch)
            tokens = []
            for seq, index in zip(batch, indices):
                sampled = on_gpu[seq.seq_id]
                assert index in (-1, len(sampled)), "a token is sampled twice or out of order"
                tokens.append(fake_next_token(sampled) if index >= 0 else -1)
                if index >= 0:
                    sampled.append(tokens[-1])
            unbooked.append((batch, indices, tokens))
        while len(unbooked) > (1 if overlap and batch else 0):
            scheduler.postprocess(*unbooked.popleft())
        check_accounting(scheduler)
        assert step < 10_000, "no progress"
    assert scheduler.block_manager.num_free_blocks == num_blocks
    return [seqs[i].completion_token_ids for i in range(len(w["requests"]))]


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_random_streams_keep_accounting_exact_and_finish(w):
    outputs = run_stream(w, w["num_blocks"])
    for (_, prompt, max_tokens), out in zip(w["requests"], outputs):
        length = min(max_tokens, max(1, w["max_model_len"] - len(prompt)))
        if w["stop_token"] in out:
            assert out.index(w["stop_token"]) == len(out) - 1 and len(out) <= length
        else:
            assert len(out) == length
    assert outputs == run_stream(w, num_blocks=10_000)      # an unbounded cache changes nothing
    # Booking one step late (a speculative step after a stop, preemption with a token in flight) changes nothing.
    assert outputs == run_stream(w, w["num_blocks"], overlap=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), num_blocks=st.integers(3, 8), chunk=st.sampled_from([5, 16, 64]),
       max_num_seqs=st.integers(1, 4))
def test_real_model_matches_an_unbounded_cache(qwen3_dir, seed, num_blocks, chunk, max_num_seqs):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 384) for _ in range(rng.choice([8, 16, 20]))]
    prompts = [prefix[:rng.randrange(1, len(prefix) + 1)] + [rng.randrange(3, 384) for _ in range(rng.randrange(0, 9))]
               for _ in range(rng.randrange(1, 6))]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 20), ignore_eos=True) for _ in prompts]
    small = LLM(qwen3_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=num_blocks, max_model_len=8 * num_blocks,
                max_num_batched_tokens=chunk, max_num_seqs=max_num_seqs)
    big = LLM(qwen3_dir, device="cpu", kvcache_block_size=8, max_model_len=8 * num_blocks, overlap_scheduling=False)
    prompts = [p[:8 * num_blocks] for p in prompts]
    got = [o["token_ids"] for o in small.generate(prompts, params, use_tqdm=False)]
    want = [o["token_ids"] for o in big.generate(prompts, params, use_tqdm=False)]
    assert got == want
    bm = small.scheduler.block_manager
    assert len(bm.free_block_ids) == len(bm.blocks)
