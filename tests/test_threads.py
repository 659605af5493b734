"""Several callers at once (a server's handlers beside its engine loop, a user's thread pool): two engines in two
threads, and two threads on one engine, give exactly their single-thread outputs, run after run."""
import random
from concurrent.futures import ThreadPoolExecutor

from nanovllm import LLM, SamplingParams
from tests.conftest import all_free

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
RUNS = 100


def token_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def prompt_sets(seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(3, 384) for _ in range(rng.randrange(1, 40))] for _ in range(3)] for _ in range(2)]


def test_two_engines_in_two_threads(qwen3_dir, qwen2_dir):
    engines = [LLM(path, device="cpu", kvcache_block_size=16) for path in (qwen3_dir, qwen2_dir)]
    prompts = prompt_sets(0)
    expected = [token_ids(llm, p) for llm, p in zip(engines, prompts)]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(RUNS):
            assert list(pool.map(token_ids, engines, prompts)) == expected
    assert all(all_free(llm) for llm in engines)


def test_two_threads_on_one_engine(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16)
    prompts = prompt_sets(1)
    expected = [token_ids(llm, p) for p in prompts]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(RUNS):
            assert list(pool.map(token_ids, [llm, llm], prompts)) == expected
    assert all_free(llm)


def test_a_stream_and_a_generate_in_two_threads(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16)
    prompts = prompt_sets(2)
    expected = [token_ids(llm, p) for p in prompts]

    def streamed(p):
        ids = [[] for _ in p]
        for piece in llm.stream(p, GREEDY):
            ids[piece.index] += piece.new_token_ids
        return ids
    with ThreadPoolExecutor(2) as pool:
        for _ in range(20):
            stream, generate = pool.submit(streamed, prompts[0]), pool.submit(token_ids, llm, prompts[1])
            assert [stream.result(), generate.result()] == expected
    assert all_free(llm)
