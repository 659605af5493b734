"""Data parallelism on Ray (nanovllm/ray_replicas.py), on a local two-node cluster with one logical GPU per node: the
replicas' greedy outputs equal one in-process LLM's, in order, through the helper, a pool and Ray Data; a replica
killed mid-run loses and duplicates nothing; the engine's errors come through as themselves."""
import os
import time

import pytest

# Keep Ray on the loopback address: by default it connects to the machine's outward address even on one machine.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from ray.cluster_utils import Cluster  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.ray_replicas import LLMPredictor, ReplicaPool, generate  # noqa: E402

# Replicas run on the CPU; the logical GPUs only place them (one per node).
ENGINE = dict(device="cpu", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128)
TEXT = ["Hello, world!", "The quick brown fox", "Paged attention keeps", "语言模型预测下一个词。"]
PROMPTS = TEXT + [[5, 6, 7, 8, 9], list(range(40, 80)), [3] * 17, [100, 200, 300]]
PARAMS = [SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def cluster():
    node = dict(num_cpus=2, num_gpus=1, object_store_memory=100 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def oracle(qwen3_dir):
    """One in-process LLM's outputs for PROMPTS."""
    llm = LLM(qwen3_dir, **ENGINE)
    return llm.generate(PROMPTS, PARAMS, use_tqdm=False)


def same(outputs: list[dict], expected: list[dict]):
    keys = ("text", "token_ids", "prompt_token_ids", "finish_reason")
    assert [{k: o[k] for k in keys} for o in outputs] == [{k: o[k] for k in keys} for o in expected]


def test_two_replicas_equal_one_llm(cluster, oracle, qwen3_dir):
    same(generate(PROMPTS, PARAMS, qwen3_dir, num_replicas=2, **ENGINE), oracle)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # Ray Data's own, about its own settings
def test_map_batches_equals_one_llm(cluster, oracle, qwen3_dir):
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    rows = [{"prompt": p, "max_tokens": sp.max_tokens} for p, sp in zip(TEXT, PARAMS)]
    ds = ray.data.from_items(rows).map_batches(
        LLMPredictor, fn_constructor_kwargs=dict(model=qwen3_dir, sampling_params=SamplingParams(temperature=0,
                                                 ignore_eos=True), **ENGINE),
        compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1, batch_size=2)
    out = ds.take_all()
    assert [r["prompt"] for r in out] == TEXT
    assert [r["text"] for r in out] == [o["text"] for o in oracle[:len(TEXT)]]
    assert [list(r["token_ids"]) for r in out] == [o["token_ids"] for o in oracle[:len(TEXT)]]


def test_killed_replica_is_restarted_and_its_batches_retried(cluster, oracle, qwen3_dir):
    with ReplicaPool(qwen3_dir, num_replicas=2, **ENGINE) as pool:
        refs = pool.submit(PROMPTS, PARAMS, batch_size=1)    # replica 0 runs batches 0, 2, 4, 6 in turn
        ray.wait(refs[:1])
        unfinished = ray.wait(refs[2::2], num_returns=3, timeout=0)[1]
        ray.kill(pool.replicas[0], no_restart=False)
        assert len(unfinished) >= 2, "the replica had finished its batches before it was killed"
        same(pool.gather(refs), oracle)
        same(pool.generate(PROMPTS, PARAMS), oracle)    # and the restarted replica serves the next call


def test_engine_errors_come_through_as_themselves(cluster, qwen3_dir):
    with pytest.raises(ValueError, match=r"^prompt has 200 tokens, more than max_model_len=128$"):
        generate([[5] * 10, [5] * 200], SamplingParams(max_tokens=4), qwen3_dir, num_replicas=2, **ENGINE)
    with pytest.raises(TypeError, match="max_num_seq"):
        ReplicaPool(qwen3_dir, num_replicas=1, max_num_seq=4, **ENGINE)


def test_tensor_parallel_replica_gets_its_gpus_on_one_node(cluster, oracle, qwen3_dir):
    """A replica with tensor_parallel_size=2 needs two GPUs of one node: only this third node has them."""
    cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=100 * 2**20)
    with ReplicaPool(qwen3_dir, num_replicas=1, tensor_parallel_size=2, **ENGINE) as pool:
        same(pool.generate(PROMPTS, PARAMS), oracle)
