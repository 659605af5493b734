"""Scheduler state machine without a model: fake token ids stand in for the runner."""
from types import SimpleNamespace

import pytest

from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BLOCK = 4
EOS = 0


def make_scheduler(num_blocks=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64):
    config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             kvcache_block_size=BLOCK)
    return Scheduler(config, num_blocks, max_model_len, (EOS,))


def step(scheduler, token=7):
    seqs, is_prefill = scheduler.schedule()
    finished = scheduler.postprocess(seqs, scheduler.reserve_output_tokens(seqs), [token] * len(seqs))
    return seqs, is_prefill, finished


def test_lifecycle_waiting_running_finished():
    s = make_scheduler()
    seq = Sequence([1, 2, 3, 4, 5], SamplingParams(max_tokens=3))
    s.add(seq)
    assert seq.status == SequenceStatus.WAITING
    seqs, is_prefill, _ = step(s)
    assert is_prefill and seqs == [seq] and seq.status == SequenceStatus.RUNNING
    assert seq.num_completion_tokens == 1 and seq.num_computed_tokens == 5
    _, is_prefill, _ = step(s)
    assert not is_prefill
    _, _, finished = step(s)
    assert finished == [seq] and seq.status == SequenceStatus.FINISHED
    assert seq.completion_token_ids == [7, 7, 7] and s.is_finished()
    assert s.block_manager.num_free_blocks == 16


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos_stops_unless_ignored(ignore_eos):
    s = make_scheduler()
    seq = Sequence([1, 2], SamplingParams(max_tokens=5, ignore_eos=ignore_eos))
    s.add(seq)
    step(s, token=EOS)
    assert seq.is_finished != ignore_eos
    while not s.is_finished():
        step(s, token=EOS)
    assert seq.num_completion_tokens == (5 if ignore_eos else 1)


def test_stops_at_max_model_len():
    s = make_scheduler(max_model_len=10)
    seq = Sequence(list(range(1, 8)), SamplingParams(max_tokens=100))
    s.add(seq)
    while not s.is_finished():
        step(s)
    assert len(seq) == 10


def test_preempts_most_recently_started_first():
    s = make_scheduler(num_blocks=6, max_num_batched_tokens=4)
    seqs = [Sequence([1, 2, 3, 4], SamplingParams(max_tokens=20)) for _ in range(3)]
    for seq in seqs:
        s.add(seq)
    while any(q.status != SequenceStatus.RUNNING for q in seqs):    # admitted in chunks beside the decodes
        step(s)
    # Each holds 2 blocks (4 prompt tokens + 1 new needs the second at decode); 6 blocks, all used.
    assert s.num_preemptions == 0
    while s.num_preemptions == 0:
        step(s)
    assert seqs[2].status == SequenceStatus.WAITING and s.waiting[0] is seqs[2]
    assert not seqs[2].block_table and seqs[2].num_computed_tokens == 0
    assert all(q.status == SequenceStatus.RUNNING for q in seqs[:2])


def test_chunked_prefill_respects_the_token_budget():
    s = make_scheduler(max_num_batched_tokens=5)
    long_seq = Sequence(list(range(1, 13)), SamplingParams(max_tokens=2))
    short = Sequence([1, 2], SamplingParams(max_tokens=2))
    s.add(long_seq)
    s.add(short)
    chunks = []
    while long_seq.num_completion_tokens == 0:
        seqs, is_prefill, _ = step(s)
        assert is_prefill and sum(q.num_scheduled_tokens for q in seqs) <= 5
        chunks.append(long_seq.num_scheduled_tokens)
        assert long_seq.status == (SequenceStatus.RUNNING if long_seq.num_completion_tokens else SequenceStatus.WAITING)
    assert chunks == [5, 5, 2] and long_seq.num_computed_tokens == 12
    assert short.status == SequenceStatus.RUNNING       # admitted in the last chunk's step with the 3 left


def test_max_num_seqs_bounds_every_batch():
    s = make_scheduler(max_num_seqs=2, num_blocks=64)
    for _ in range(5):
        s.add(Sequence([1, 2, 3], SamplingParams(max_tokens=4)))
    while not s.is_finished():
        seqs, _, _ = step(s)
        assert 1 <= len(seqs) <= 2 and len(s.running) <= 2


def test_abort_frees_blocks_wherever_the_request_is():
    s = make_scheduler(max_num_batched_tokens=3)
    running, partial, waiting = (Sequence(list(range(1, n)), SamplingParams(max_tokens=9)) for n in (3, 9, 5))
    for seq in (running, partial, waiting):
        s.add(seq)
    step(s)     # running: prefilled; partial: a 1-token chunk, holding its blocks
    assert running.status == SequenceStatus.RUNNING and partial.block_table
    for seq in (running, partial, waiting):
        s.finish(seq, "abort")
    assert s.is_finished() and s.block_manager.num_free_blocks == 16


def test_prompts_sharing_a_prefix_in_one_step_compute_it_once():
    s = make_scheduler(num_blocks=32)
    prefix = list(range(1, 31))                     # 7 full blocks and 2 tokens
    seqs = [Sequence(prefix + [40 + i] * (i + 1), SamplingParams(max_tokens=2)) for i in range(4)]
    for seq in seqs:
        s.add(seq)
    scheduled, is_prefill = s.schedule()
    assert is_prefill and scheduled == seqs
    assert [q.num_cached_tokens for q in seqs] == [0, 28, 28, 28]
    assert [q.num_scheduled_tokens for q in seqs] == [31, 4, 5, 6]
    assert all(q.block_table[:7] == seqs[0].block_table[:7] for q in seqs)
    assert [s.block_manager.blocks[b].ref_count for b in seqs[0].block_table] == [4] * 7 + [1]
    s.postprocess(scheduled, s.reserve_output_tokens(scheduled), [7] * 4)
    while not s.is_finished():
        step(s)
    assert s.block_manager.num_free_blocks == 32


def test_a_chunk_publishes_only_the_blocks_it_fills():
    s = make_scheduler(num_blocks=32, max_num_batched_tokens=10)
    prefix = list(range(1, 31))
    first, second = Sequence(prefix + [40], SamplingParams(max_tokens=2)), Sequence(prefix + [41, 42])
    s.add(first)
    s.add(second)
    bm = s.block_manager
    while first.num_completion_tokens == 0:
        scheduled, _ = s.schedule()
        end = first.num_computed_tokens + first.num_scheduled_tokens     # 10, 20, 30, 31
        assert [bm.blocks[b].hash != -1 for b in first.block_table] == [i < end // BLOCK for i in range(8)]
        s.postprocess(scheduled, s.reserve_output_tokens(scheduled), [7] * len(scheduled))
    assert second.num_cached_tokens == 28        # admitted beside the 1-token last chunk: 7 blocks hit
    assert second.block_table[:7] == first.block_table[:7]


def test_n_samples_are_admitted_with_their_first():
    s = make_scheduler(num_blocks=32)
    first = Sequence(list(range(1, 11)), SamplingParams(n=3, max_tokens=2))
    samples = first.fork()
    s.add(first)
    assert list(s.waiting) == samples and not first.held_samples
    scheduled, _ = s.schedule()
    assert scheduled == samples and [q.num_cached_tokens for q in samples] == [0, 8, 8]
    s.postprocess(scheduled, s.reserve_output_tokens(scheduled), [7] * 3)
    assert all(q.num_completion_tokens == 1 for q in samples)
    for q in samples:
        s.finish(q, "abort")
    assert s.is_finished() and s.block_manager.num_free_blocks == 32


def test_a_step_decodes_every_running_sequence_then_admits_with_the_budget_left():
    """Mixed steps (vLLM's order): a new prompt rides along with the running decodes instead of stalling them."""
    s = make_scheduler(max_num_batched_tokens=8)
    first, second = Sequence([1, 2, 3, 4, 5], SamplingParams(max_tokens=9)), Sequence([1, 2, 3], SamplingParams())
    s.add(first)
    s.add(second)
    step(s)
    late = Sequence(list(range(20, 30)), SamplingParams(max_tokens=2))
    s.add(late)
    scheduled, is_prefill = s.schedule()
    assert is_prefill and scheduled == [first, second, late]
    assert [q.num_scheduled_tokens for q in scheduled] == [1, 1, 6]     # 8 tokens: two decodes, a 6-token chunk
    assert late.status == SequenceStatus.WAITING and list(s.running) == [first, second]
    s.postprocess(scheduled, s.reserve_output_tokens(scheduled), [7] * 3)
    assert [q.num_completion_tokens for q in scheduled] == [2, 2, 0]
    scheduled, is_prefill = s.schedule()
    assert is_prefill and [q.num_scheduled_tokens for q in scheduled] == [1, 1, 4]
    s.postprocess(scheduled, s.reserve_output_tokens(scheduled), [7] * 3)
    assert late.num_completion_tokens == 1 and s.schedule() == ([first, second, late], False)


def test_a_step_that_preempts_for_its_decodes_admits_nobody():
    s = make_scheduler(num_blocks=4, max_num_batched_tokens=16)
    a, b = (Sequence([1, 2, 3, 4], SamplingParams(max_tokens=20)) for _ in range(2))
    s.add(a)
    s.add(b)
    step(s)                     # a and b hold 1 block each, and each needs a second at its first decode
    step(s)                     # now 4 of 4 blocks are held
    waiting = Sequence([1], SamplingParams(max_tokens=2))
    s.add(waiting)
    for _ in range(3):
        step(s)                 # a and b fill their second blocks
    scheduled, is_prefill = s.schedule()
    assert s.num_preemptions == 1 and b.status == SequenceStatus.WAITING
    assert scheduled == [a] and not is_prefill and list(s.waiting) == [b, waiting]


def test_a_sequence_preempted_beside_a_chunked_prompt_queues_behind_it():
    """Ahead of the prompt, which holds its blocks while its chunks run, the preempted sequence would wait for
    blocks that only the prompt's progress can free, while the prompt waited behind it: nothing would run."""
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=4)
    running = Sequence([1, 2, 3, 4], SamplingParams(max_tokens=20))
    s.add(running)
    step(s)
    prompt = Sequence(list(range(20, 39)), SamplingParams(max_tokens=2))
    s.add(prompt)
    while not s.num_preemptions:    # the prompt takes the 5 blocks left; running's third block is not there
        step(s)
    assert prompt.block_table and running.status == SequenceStatus.WAITING
    assert list(s.waiting) == [prompt, running]
    for _ in range(100):
        if s.is_finished():
            break
        step(s)
    assert s.is_finished() and running.num_completion_tokens == 20 and s.block_manager.num_free_blocks == 7


def test_a_preempted_sequence_waits_for_its_last_token_on_the_gpu():
    """With overlap scheduling a preempted sequence's last token may not be booked: its recompute needs it."""
    s = make_scheduler()
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=5))
    s.add(seq)
    scheduled, _ = s.schedule()
    in_flight = (scheduled, s.reserve_output_tokens(scheduled), [7])    # launched, not booked
    s.running.remove(seq)       # as a decode that found no block does
    s.preempt(seq)
    assert s.schedule() == ([], False)
    s.postprocess(*in_flight)
    scheduled, is_prefill = s.schedule()
    assert is_prefill and scheduled == [seq] and seq.num_scheduled_tokens == 4 and seq.token_ids[-1] == 7
