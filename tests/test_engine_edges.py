"""Edges where state once travelled through back doors: two engines in one process, streams held open or
interleaved, the cached count after preemption, and (on CUDA) warm-up and graph capture for any model."""
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import all_free, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def test_engines_with_different_block_sizes_share_a_process(qwen3_dir):
    """Each engine keeps its own block size: prefix hits and outputs stay right whatever was created after it."""
    def make(bs):
        return LLM(qwen3_dir, device="cpu", kvcache_block_size=bs, num_kvcache_blocks=1024 // bs, max_model_len=128)

    def check(llm, bs, seed):
        for shared in (ids(seed, 8), ids(seed + 1, 40)):     # a prefix shorter than a block, and one over several
            prompts = [shared + ids(seed + 2, 30), shared + ids(seed + 3, 25)]
            first = llm.generate([prompts[0]], GREEDY, use_tqdm=False)[0]
            second = llm.generate([prompts[1]], GREEDY, use_tqdm=False)[0]
            assert [first["token_ids"], second["token_ids"]] == [hf_greedy(qwen3_dir, p, 12) for p in prompts]
            assert second["num_cached_tokens"] == len(shared) // bs * bs     # the full blocks of the shared prefix
        assert all_free(llm)

    a, b = make(16), make(32)
    check(a, 16, seed=0)
    c = make(4)
    for llm, bs in ((a, 16), (b, 32), (c, 4)):
        check(llm, bs, seed=10)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128,
               max_num_batched_tokens=64)


def collect(pieces, outs: dict):
    for out in pieces:
        text, tokens, done = outs.setdefault(out.index, ["", [], False])
        assert not done, "output after the final one"
        outs[out.index] = [text + out.new_text, tokens + out.new_token_ids, out.finished]


def test_interleaved_streams_and_generate_lose_nothing(llm):
    prompts_a, prompts_b, prompt_c = ["Hello, world!", "语言模型"], ["😀🚀 emoji"], "Les modèles"
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = llm.generate(prompts_a + prompts_b + [prompt_c], sp, use_tqdm=False)
    a, b = llm.stream(prompts_a, sp), llm.stream(prompts_b, sp)
    outs_a, outs_b = {}, {}
    collect([next(a)], outs_a)
    collect([next(b), next(b)], outs_b)
    short = llm.generate([prompt_c], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert short["token_ids"] == reference[3]["token_ids"][:4]
    collect(a, outs_a)      # a resumes after b and generate stepped its requests: what they got is yielded
    collect(b, outs_b)
    for outs, refs in ((outs_a, reference[:2]), (outs_b, reference[2:3])):
        for i, ref in enumerate(refs):
            assert outs[i] == [ref["text"], ref["token_ids"], True]
    assert all_free(llm)


@pytest.mark.parametrize("how", ["break", "exception"])
def test_an_open_stream_does_not_hold_up_other_calls_and_close_frees_it(llm, how):
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    it = llm.stream(["Hello, world!", "语言模型"], sp)
    try:
        for _ in it:
            if how == "exception":
                raise ValueError("the caller's own error")
            break
    except ValueError:
        pass
    out = llm.generate([ids(3, 5)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out["token_ids"]) == 4
    held = list(llm.scheduler.running) + list(llm.scheduler.waiting)
    assert len(held) == 2 and all(seq.num_completion_tokens < 20 for seq in held)     # not run to the end first
    it.close()      # as when the stream is dropped: its requests are aborted
    assert all_free(llm)


def test_dropping_a_stream_aborts_its_requests(llm):
    it = llm.stream(["Hello, world!"], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    next(it)
    del it
    assert all_free(llm)


def test_cached_tokens_after_preemption_count_only_the_prompt(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=128)
    prompts = [ids(10 + i, 3) for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert [o["num_cached_tokens"] for o in outs] == [0] * len(prompts)     # distinct 3-token prompts: no hit
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, sp.max_tokens)
    assert all_free(llm)


@cuda
def test_warmup_is_valid_for_a_vocabulary_smaller_than_its_prompt(qwen3_dir):
    """The tiny model's 384 tokens are fewer than a warm-up over two 256-token blocks would index."""
    llm = LLM(qwen3_dir, attention_backend="triton", kvcache_block_size=256, max_model_len=512,
              gpu_memory_utilization=0.3, max_num_batched_tokens=1024)
    prompt = ids(4, 30)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(qwen3_dir, prompt, 12, "cuda")
    llm.exit()


@cuda
def test_engines_with_cuda_graphs_one_after_another(qwen3_dir):
    batch = [ids(5, 9), ids(6, 33), ids(7, 70)]
    expected = [hf_greedy(qwen3_dir, p, GREEDY.max_tokens, "cuda") for p in batch]
    for i, tokens in enumerate((64, 128, 256, 512, 1024, 2048, 96, 4096)):
        llm = LLM(qwen3_dir, attention_backend="triton", kvcache_block_size=16, max_model_len=256,
                  max_num_batched_tokens=tokens, max_num_seqs=4 + 8 * i, num_kvcache_blocks=40 + 8 * i,
                  enforce_eager=False)
        assert llm.executor.runner.graphs.graphs, "decode was not captured"
        assert [o["token_ids"] for o in llm.generate(batch, GREEDY, use_tqdm=False)] == expected
        llm.exit()


@cuda
def test_an_engine_after_a_dropped_one_gets_the_memory_back(tmp_path):
    """Seen on the H200 (2026-12-03, tests/test_models.py): after an engine sized by gpu_memory_utilization=0.3
    ran beside transformers on the GPU and was dropped, every later engine in the process found that memory still
    taken ("no GPU memory is left for the KV cache")."""
    from tests.tiny_checkpoint import build_tiny_checkpoint
    kwargs = dict(attention_backend="triton", kvcache_block_size=16, max_model_len=256, max_num_batched_tokens=256,
                  gpu_memory_utilization=0.3, enforce_eager=True)
    blocks = []
    for i in range(3):
        path = build_tiny_checkpoint(str(tmp_path / str(i)), arch="llama", seed=20 + i)   # transformers loads it
        llm = LLM(path, **kwargs)
        blocks.append(llm.executor.runner.num_kvcache_blocks)
        prompt = ids(i, 20)
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out["token_ids"] == hf_greedy(path, prompt, GREEDY.max_tokens, "cuda")
        llm.exit()
        del llm
    assert min(blocks) >= 0.95 * max(blocks), blocks


@cuda
def test_a_failed_capture_leaves_the_process_usable(qwen3_dir, monkeypatch):
    from nanovllm.engine.cuda_graph import CUDAGraphs
    real_forward = CUDAGraphs._forward

    def forward_that_syncs(self, bs):   # a host sync is illegal inside a capture and invalidates it
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        real_forward(self, bs)

    kwargs = dict(attention_backend="triton", kvcache_block_size=16, max_model_len=256, max_num_seqs=8,
                  num_kvcache_blocks=40, max_num_batched_tokens=256)
    monkeypatch.setattr(CUDAGraphs, "_forward", forward_that_syncs)
    with pytest.raises(RuntimeError, match="(?s)CUDA graph capture failed.*enforce_eager=True"):
        LLM(qwen3_dir, **kwargs)
    monkeypatch.setattr(CUDAGraphs, "_forward", real_forward)
    llm = LLM(qwen3_dir, **kwargs)
    batch = [ids(8, 12), ids(9, 40)]
    sampled = SamplingParams(temperature=1.0, max_tokens=4)      # the CUDA RNG works again
    assert all(len(o["token_ids"]) == 4 for o in llm.generate(batch, sampled, use_tqdm=False))
    for prompt, out in zip(batch, llm.generate(batch, GREEDY, use_tqdm=False)):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens, "cuda")
    llm.exit()
