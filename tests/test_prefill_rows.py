"""A short prefill runs as a decode batch of one row a token (StepBatch.as_token_rows), so that on CUDA it replays a
decode graph instead of launching ~10 kernels a layer from the host. The rows must give the prefill's logits, with
or without cached keys before them, and the engine's outputs must not change."""
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine import model_runner
from nanovllm.engine.model_runner import EAGER
from nanovllm.engine.step_batch import StepBatch
from nanovllm.utils.context import reset_context
from tests.conftest import all_free, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def logits_both_ways(runner, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's next-token logits from the prefill path, and from its token rows' decode (last row of each)."""
    prefill = runner.prefill_logits(batch)
    input_ids, positions = runner.prepare_decode(batch.as_token_rows(), EAGER)
    try:
        rows = runner.run_model(input_ids, positions, EAGER)
    finally:
        reset_context()
    return prefill, rows[torch.as_tensor(batch.cu_seqlens_q[1:] - 1)]


def test_token_rows_give_the_prefills_logits(qwen3_dir):
    """Three prompts, the longest chunked, so that the second step's rows also attend to keys cached before it."""
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=64, max_model_len=128,
              max_num_batched_tokens=48)
    runner, scheduler = llm.executor.runner, llm.scheduler
    for n in (1, 13, 70):
        llm.add_request(ids(n, n), GREEDY)
    for step in range(2):
        seqs, is_prefill = scheduler.schedule()
        assert is_prefill
        batch = StepBatch.build(seqs, True, runner.block_size)
        rows = batch.as_token_rows()
        assert not rows.is_prefill and rows.num_seqs == len(batch.input_ids)
        assert (rows.context_lens == batch.positions + 1).all()
        assert len(rows.sampling.params) == len(rows.sampling.output_lens) == rows.num_seqs
        if step == 1:
            assert batch.positions[0] > 0       # the chunked prompt's rest, after its cached first chunk
        prefill, from_rows = logits_both_ways(runner, batch)
        torch.testing.assert_close(from_rows, prefill, rtol=1e-4, atol=1e-4)
        scheduler.postprocess(seqs, scheduler.reserve_output_tokens(seqs), [7] * len(seqs))


def test_a_mixed_step_takes_its_decodes_pending_ids_from_the_device(qwen3_dir):
    """A prompt arriving while another sequence decodes, under overlap scheduling: the step's decode row has its
    last token only on the device (sample_rows). Both the prefill path and the token rows (a decode graph's path)
    take it from there: their logits equal those of the same step built once that token is booked."""
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=64, max_model_len=128)
    runner, scheduler = llm.executor.runner, llm.scheduler
    llm.add_request(ids(1, 11), GREEDY)
    llm.step()      # launched; its token is not booked
    llm.add_request(ids(2, 6), GREEDY)
    seqs, is_prefill = scheduler.schedule()
    batch = StepBatch.build(seqs, True, runner.block_size, llm._unbooked[-1][0])
    assert is_prefill and len(seqs) == 2 and batch.input_ids[0] == 0 and batch.sample_rows.tolist() == [0] + [-1] * 6
    pending = logits_both_ways(runner, batch)
    llm._book_results(0)
    booked = StepBatch.build(seqs, True, runner.block_size)
    assert (booked.sample_rows < 0).all() and booked.input_ids[0] == seqs[0].last_token
    for got, expected in zip(pending, logits_both_ways(runner, booked)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_short_prefills_replay_a_decode_graph_and_keep_the_outputs(qwen3_dir, monkeypatch):
    """Prompts one at a time (1 to 100 tokens, then one that hits the prefix cache) replay the graph that fits their
    tokens, and give transformers' greedy tokens; past the largest graph, or past PREFILL_ROWS_MAX_KEYS, a prefill
    runs eagerly."""
    prompts = [ids(n, n) for n in (1, 2, 3, 17, 100)]
    prompts.append(prompts[-1][:64] + ids(7, 20))       # 64 cached tokens, then 20 rows
    llm = LLM(qwen3_dir, attention_backend="triton", kvcache_block_size=16, max_model_len=256,
              gpu_memory_utilization=0.3, max_num_batched_tokens=512, max_num_seqs=128)
    runner = llm.executor.runner
    plans, plan = [], runner.plan

    def recorded_plan(batch):
        plans.append((batch.is_prefill, plan(batch)))
        return plans[-1][1]

    monkeypatch.setattr(runner, "plan", recorded_plan)
    for prompt in prompts:
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens, device="cuda")
    assert out["num_cached_tokens"] == 64
    assert [p.graph_size for is_prefill, p in plans if is_prefill] == [1, 2, 4, 24, 128, 24]
    llm.generate([ids(8, 129)], GREEDY, use_tqdm=False)    # 129 rows: more than the largest graph's 128
    monkeypatch.setattr(model_runner, "PREFILL_ROWS_MAX_KEYS", 100)
    llm.generate([ids(9, 17)], GREEDY, use_tqdm=False)     # 17 rows attend to 153 keys in all
    assert [p for is_prefill, p in plans if is_prefill][-2:] == [EAGER, EAGER]
    together = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in together] == [hf_greedy(qwen3_dir, p, 12, device="cuda") for p in prompts]
    assert all_free(llm)
