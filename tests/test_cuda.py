"""CUDA-only checks of the whole engine (skipped without a GPU): exactness vs transformers, graphs vs eager."""
import gc
import importlib.util
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.configs import QWEN3_0_6B
from tests.conftest import hf_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["torch"] + [name for name, module in (("triton", "nanovllm.kernels.paged_attention_triton"),
                                                   ("flash_attn", "flash_attn"))
                        if importlib.util.find_spec(module) is not None]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(seed=0, lengths=(1, 15, 16, 17, 40, 100)):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lengths]


def block_size(backend):
    return 256 if backend == "flash_attn" else 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_transformers_on_cuda(qwen3_dir, backend):
    llm = LLM(qwen3_dir, attention_backend=backend, kvcache_block_size=block_size(backend), max_model_len=512,
              enforce_eager=backend == "torch", gpu_memory_utilization=0.3, max_num_batched_tokens=2048)
    batch = prompts()
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens, device="cuda")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_preemption_and_prefix_hits_on_cuda(qwen3_dir, backend):
    rng = random.Random(1)
    prefix = [rng.randrange(3, 384) for _ in range(40)]
    batch = [prefix + p for p in prompts(2, (3, 9, 30, 1, 22, 17))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    bs = block_size(backend)
    llm = LLM(qwen3_dir, attention_backend=backend, kvcache_block_size=bs, num_kvcache_blocks=10 if bs == 16 else 2,
              max_model_len=160, gpu_memory_utilization=0.3, max_num_batched_tokens=64)
    outs = llm.generate(batch, params, use_tqdm=False)
    again = llm.generate(batch, params, use_tqdm=False)
    if bs == 16:
        assert llm.scheduler.num_preemptions > 0
        assert all(o["num_cached_tokens"] >= 32 for o in again)
    for prompt, out, out2 in zip(batch, outs, again):
        expected = hf_greedy(qwen3_dir, prompt, params.max_tokens, device="cuda")
        assert out["token_ids"] == expected and out2["token_ids"] == expected
    bm = llm.scheduler.block_manager
    assert len(bm.free_block_ids) == len(bm.blocks)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_cuda_graphs_give_the_same_tokens_as_eager(qwen3_dir, backend):
    batch = prompts(3, tuple(range(1, 70, 3)))      # 23 sequences: a padded graph batch size
    outs = {}
    for eager in (True, False):
        llm = LLM(qwen3_dir, attention_backend=backend, kvcache_block_size=block_size(backend), max_model_len=512,
                  enforce_eager=eager, gpu_memory_utilization=0.3, max_num_batched_tokens=2048, max_num_seqs=64)
        outs[eager] = [o["token_ids"] for o in llm.generate(batch, GREEDY, use_tqdm=False)]
        del llm
    assert outs[True] == outs[False]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("overlap", [True, False])
def test_graphs_that_sample_hand_ids_across_every_path(qwen3_dir, overlap):
    """On one GPU a decode graph samples the temperature-only path itself and the next replay reads its ids from
    the graph's buffer; ids sampled elsewhere (a prefill, a batch where a row wants logprobs or min_tokens) are
    copied in. Prompts arrive in chunks while others decode and rows with extras come and go, so every hand-over
    happens: greedy tokens (and logprobs) must equal the eager engine's."""
    batch = prompts(5, (3, 50, 8, 90, 20, 33, 7, 61))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2 if i % 3 == 1 else None,
                             min_tokens=4 if i == 5 else 0)
              for i, n in enumerate((30, 9, 25, 14, 30, 6, 22, 17))]
    outs = {}
    for eager in (True, False):
        llm = LLM(qwen3_dir, attention_backend="triton", kvcache_block_size=16, max_model_len=256,
                  enforce_eager=eager, overlap_scheduling=overlap, gpu_memory_utilization=0.3,
                  max_num_batched_tokens=64, max_num_seqs=8)
        assert (llm.executor.runner.graphs is None) == eager
        outs[eager] = llm.generate(batch, params, use_tqdm=False)
        llm.exit()
        del llm     # its KV cache must be gone before the next engine sizes its own
    for graph, eager in zip(outs[False], outs[True], strict=True):
        assert graph["token_ids"] == eager["token_ids"]
        for lg, le in zip(graph.get("logprobs") or [], eager.get("logprobs") or [], strict=True):
            assert lg.keys() == le.keys() and all(abs(lg[t] - le[t]) < 1e-3 for t in lg)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_triton_and_torch_logits_close_on_dummy_qwen3_0_6b():
    """Real shapes in bfloat16: the Triton kernels' logits stay close to the PyTorch reference's."""
    from nanovllm.engine.model_runner import EAGER
    from nanovllm.engine.step_batch import StepBatch
    from nanovllm.utils.context import reset_context
    rng = random.Random(4)
    batch = [[rng.randrange(0, 10000) for _ in range(n)] for n in (5, 300, 700)]
    logits = {}
    for backend in ("torch", "triton"):
        llm = LLM(QWEN3_0_6B, load_format="dummy", attention_backend=backend, enforce_eager=True,
                  max_model_len=1024, gpu_memory_utilization=0.5, max_num_batched_tokens=2048)
        for prompt in batch:
            llm.add_request(prompt, GREEDY)
        seqs, is_prefill = llm.scheduler.schedule()
        runner = llm.executor.runner
        input_ids, positions = runner.prepare_prefill(StepBatch.build(seqs, True, runner.block_size))
        prefill_logits = runner.run_model(input_ids, positions, EAGER).float()
        reset_context()
        llm.scheduler.postprocess(seqs, llm.scheduler.reserve_output_tokens(seqs), [42] * len(seqs))      # the same next token for both backends
        seqs, _ = llm.scheduler.schedule()
        input_ids, positions = runner.prepare_decode(StepBatch.build(seqs, False, runner.block_size), EAGER)
        decode_logits = runner.run_model(input_ids, positions, EAGER).float()
        reset_context()
        logits[backend] = (prefill_logits, decode_logits)
        del llm, runner
        torch.cuda.empty_cache()
    for ref, out in zip(logits["torch"], logits["triton"]):
        rel = (out - ref).norm() / ref.norm()
        # bf16 through 28 layers of random weights: two summation orders differ by ~2e-2 (tp=2 vs tp=1: 2.3e-2;
        # this pair 2.09e-2 on the H100 once the small layers became Triton kernels). A wrong kernel is far off.
        assert rel < 3e-2, f"relative logits error {rel:.3e}"


def test_no_gpu_memory_growth_over_repeated_generates(qwen3_dir):
    """After start-up everything is preallocated: repeated mixed generates must not grow allocated memory."""
    backend = BACKENDS[-1]
    llm = LLM(qwen3_dir, attention_backend=backend, kvcache_block_size=block_size(backend), max_model_len=512,
              gpu_memory_utilization=0.3, max_num_batched_tokens=2048)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    rng = random.Random(5)
    for _ in range(10):
        batch = prompts(rng.randrange(1000), tuple(rng.randrange(1, 200) for _ in range(rng.randrange(1, 20))))
        params = [SamplingParams(temperature=rng.choice([0, 0.7]), max_tokens=rng.randrange(1, 40),
                                 top_p=rng.choice([1.0, 0.9]), logprobs=rng.choice([None, 2])) for _ in batch]
        llm.generate(batch, params, use_tqdm=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - start < 8 * 2**20


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_several_cuda_graph_engines_in_one_process(qwen3_dir, qwen2_dir, backend):
    """Engines with CUDA graphs built one after another in one process, with other models and graph ladders in
    between, all match transformers. With torch.compile'd layers an H100 run saw a later engine compile RMSNorm
    for a new shape inside graph capture, which failed it and every engine after it."""
    batch = prompts(6, (1, 12, 40))
    for path, max_num_seqs in ((qwen3_dir, 8), (qwen2_dir, 24), (qwen3_dir, 40), (qwen3_dir, 3)):
        llm = LLM(path, attention_backend=backend, kvcache_block_size=block_size(backend), max_model_len=256,
                  gpu_memory_utilization=0.3, max_num_batched_tokens=1024, max_num_seqs=max_num_seqs)
        outs = llm.generate(batch, GREEDY, use_tqdm=False)
        llm.exit()
        del llm             # the next engine sizes its KV cache from the memory left free
        gc.collect()
        torch.cuda.empty_cache()
        for prompt, out in zip(batch, outs):
            assert out["token_ids"] == hf_greedy(path, prompt, GREEDY.max_tokens, device="cuda")
