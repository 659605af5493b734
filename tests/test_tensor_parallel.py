"""Tensor parallelism: tp=2 against tp=1 and transformers (gloo on CPU, NCCL on two GPUs), and process hygiene."""
import gc
import importlib.util
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import active_children

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.configs import QWEN3_0_6B
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_batch import StepBatch
from nanovllm.layers import embed_head
from tests.tiny_checkpoint import build_tiny_checkpoint
from tests.conftest import hf_greedy

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")      # no NVLink multicast on shared machines; workers inherit it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small blocks and a small cache, so prefix blocks are shared and decode runs out of blocks (preemption).
SMALL = dict(kvcache_block_size=16, num_kvcache_blocks=14, max_model_len=128, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
rng = random.Random(0)
PREFIX = [rng.randrange(3, 384) for _ in range(40)]
PROMPTS = [PREFIX + [rng.randrange(3, 384) for _ in range(n)] for n in (3, 9, 30)] + [[7] * 17, PREFIX + [5, 6]]
PROMPTS.insert(2, PROMPTS[0])   # the same prompt twice in one batch


def alive(pid: int) -> bool:
    """Whether a process is running (a zombie or a vanished pid counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_cleaned_up(pids: list[int], shm_name: str):
    assert not [pid for pid in pids if alive(pid)], "worker processes outlived the engine"
    assert not os.path.exists(f"/dev/shm/{shm_name}"), "the call buffer was not unlinked"


def prefill_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Next-token logits of `prompts`, computed by every rank through the engine's own blocks."""
    seqs = [Sequence(p) for p in prompts]
    block_manager = llm.scheduler.block_manager
    for seq in seqs:
        block_manager.allocate(seq, block_manager.can_allocate(seq))
        seq.num_scheduled_tokens = len(seq) - seq.num_computed_tokens
    try:
        batch = StepBatch.build(seqs, True, llm.config.kvcache_block_size)
        return llm.executor.call("prefill_logits", batch).float().cpu()
    finally:
        for seq in seqs:
            block_manager.deallocate(seq)


def generate_twice(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy ids of `prompts`, run twice: the second run is served partly from the prefix cache."""
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again]
    assert any(o["num_cached_tokens"] > 0 for o in again)
    assert llm.scheduler.num_preemptions > 0
    block_manager = llm.scheduler.block_manager
    assert len(block_manager.free_block_ids) == len(block_manager.blocks)
    return [o["token_ids"] for o in first]


# ---- CPU, gloo ----------------------------------------------------------------------------------------------

def test_a_step_batch_carries_only_this_steps_tokens():
    """What the workers receive: a prefill chunk's tokens, positions and slots; a decode step a few ints a row."""
    seq = Sequence(list(range(1000)))
    seq.block_table = list(range(63))
    seq.num_computed_tokens, seq.num_scheduled_tokens = 400, 100     # a prefill chunk
    batch = pickle.loads(pickle.dumps(StepBatch.build([seq], True, 16)))
    assert batch.input_ids.tolist() == list(range(400, 500)) and batch.positions.tolist() == list(range(400, 500))
    assert batch.slot_mapping.tolist() == list(range(400, 500)) and batch.context_lens.tolist() == [500]
    seq.append_token(7)
    seq.num_computed_tokens, seq.num_scheduled_tokens = 1000, 1     # a decode step
    data = pickle.dumps(StepBatch.build([seq], False, 16))
    batch = pickle.loads(data)
    assert (batch.input_ids.tolist(), batch.positions.tolist(), batch.context_lens.tolist()) == ([7], [1000], [1001])
    assert batch.slot_mapping.tolist() == [1000] and batch.sample_rows.tolist() == [-1]
    assert 1000 not in batch.input_ids and len(data) < 2000, "a decode step should not ship the token history"


def test_tp2_greedy_matches_tp1_and_transformers(model_dir):
    tp1 = LLM(model_dir, **SMALL)
    expected = generate_twice(tp1, PROMPTS)
    logits1 = prefill_logits(tp1, PROMPTS[:4])
    tp2 = LLM(model_dir, tensor_parallel_size=2, **SMALL)
    try:
        assert generate_twice(tp2, PROMPTS) == expected
        # float32 rounding only: the all-reduce and torch's fused CPU attention sum in another order per head split
        torch.testing.assert_close(prefill_logits(tp2, PROMPTS[:4]), logits1, rtol=1e-4, atol=1e-4)
    finally:
        tp2.exit()
    for prompt, ids in zip(PROMPTS, expected):
        assert ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens)


def test_tp2_pads_a_vocabulary_it_cannot_split(tmp_path):
    """413 ids over 2 ranks: 207 rows each, rank 1's last row padding. Its logit must never be sampled or
    reported, so logprobs over the whole vocabulary (a 414th column would be among them) match tp=1's."""
    model_dir = build_tiny_checkpoint(str(tmp_path), arch="qwen3", seed=2, vocab_size=413)
    prompts = PROMPTS[:2] + [[412, 411, 300, 207, 206, 0, 405] * 3]     # ids at both ends of both ranks' rows
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=413)
    tp1 = LLM(model_dir, **SMALL)
    expected = [o["token_ids"] for o in tp1.generate(prompts, GREEDY, use_tqdm=False)]
    logits1 = prefill_logits(tp1, prompts)
    expected_sampled = tp1.generate(prompts[:2], sampled, use_tqdm=False)
    tp2 = LLM(model_dir, tensor_parallel_size=2, **SMALL)
    try:
        assert [o["token_ids"] for o in tp2.generate(prompts, GREEDY, use_tqdm=False)] == expected
        logits2 = prefill_logits(tp2, prompts)
        outs = tp2.generate(prompts[:2], sampled, use_tqdm=False)
    finally:
        tp2.exit()
    assert logits2.shape == logits1.shape == (3, 413)
    torch.testing.assert_close(logits2, logits1, rtol=1e-5, atol=1e-5)
    for out, want in zip(outs, expected_sampled):
        assert out["token_ids"] == want["token_ids"] and max(out["token_ids"]) < 413
        for got, ref in zip(out["logprobs"], want["logprobs"]):
            assert sorted(got) == sorted(ref) == list(range(413))
            torch.testing.assert_close(torch.tensor([got[i] for i in range(413)]),
                                       torch.tensor([ref[i] for i in range(413)]), rtol=1e-4, atol=1e-4)
    for prompt, ids in zip(prompts, expected):
        assert ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens)


def test_vocab_shards_are_padded_with_zeros_and_a_wrong_table_is_refused(monkeypatch):
    """Each rank's loader, without processes: rank 1 of 2 gets the last 206 rows and a zero row."""
    table = torch.randn(413, 8)
    monkeypatch.setattr(embed_head, "tp_size", lambda: 2)
    for rank, rows in ((0, table[:207]), (1, torch.cat([table[207:], torch.zeros(1, 8)]))):
        monkeypatch.setattr(embed_head, "tp_rank", lambda r=rank: r)
        shard = embed_head.VocabParallelEmbedding(413, 8)
        shard.weight.data.fill_(float("nan"))     # whatever the allocator left there
        shard.weight.weight_loader(shard.weight, table)
        assert torch.equal(shard.weight.data, rows)
        for wrong in (table[:412], torch.randn(414, 8), table[:, :7]):   # rank 0 once took a longer table's head
            with pytest.raises(ValueError, match=r"expected a tensor of shape \(413, 8\), got"):
                shard.weight.weight_loader(shard.weight, wrong)


def test_kernel_warmup_runs_on_every_rank(qwen3_dir):
    """On CUDA each rank runs the start-up kernel warm-up; a worker once counted blocks with the wrong size."""
    llm = LLM(qwen3_dir, tensor_parallel_size=2, **SMALL)
    try:
        llm.executor.call("warmup_kernels")
        prompt = list(range(5, 45))
        assert llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    finally:
        llm.exit()


def test_engines_one_after_another_clean_up_after_themselves(qwen3_dir):
    outputs, names = [], []
    for _ in range(2):
        llm = LLM(qwen3_dir, tensor_parallel_size=2, **SMALL)
        pids, names = [p.pid for p in llm.executor.pool.processes], names + [llm.executor.pool.shm.name]
        with pytest.raises(RuntimeError, match="exit"):    # one tensor-parallel engine per process at a time
            LLM(qwen3_dir, tensor_parallel_size=2, **SMALL)
        outputs.append([o["token_ids"] for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)])
        llm.exit()
        llm.exit()  # idempotent
        assert_cleaned_up(pids, names[-1])
        with pytest.raises(RuntimeError, match="exit"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert outputs[0] == outputs[1]
    assert names[0] != names[1]
    assert not active_children()


@pytest.mark.parametrize("when", ["between calls", "mid-call"])
def test_killed_worker_makes_the_caller_raise_within_seconds(qwen3_dir, when):
    llm = LLM(qwen3_dir, tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=512, max_model_len=1024)
    victim, shm_name = llm.executor.pool.processes[0].pid, llm.executor.pool.shm.name
    try:
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        if when == "between calls":
            os.kill(victim, signal.SIGKILL)
        else:
            threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        long = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)     # seconds: the kill lands mid-call
        with pytest.raises(RuntimeError, match=r"rank 1 died with exit code -9 \(SIGKILL\)"):
            llm.generate([[3 + i] * 5 for i in range(8)], long, use_tqdm=False)
        assert time.monotonic() - start < 5
        with pytest.raises(RuntimeError, match="has stopped.*SIGKILL"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    finally:
        llm.exit()
    assert_cleaned_up([victim], shm_name)
    assert not active_children()


class ExplodesInWorker:
    """An argument that cannot be rebuilt in a worker: the worker raises while rank 0 waits in a collective."""

    def __reduce__(self):
        return int, ("planted failure",)


def test_worker_exception_surfaces_in_the_caller(qwen3_dir):
    llm = LLM(qwen3_dir, tensor_parallel_size=2, **SMALL)
    try:
        seq = Sequence([5, 6, 7])
        llm.scheduler.block_manager.allocate(seq, [])
        seq.num_scheduled_tokens = 3
        batch = StepBatch.build([seq], True, llm.config.kvcache_block_size)
        with pytest.raises(RuntimeError, match=r"(?s)rank 1 raised:.*ValueError.*planted failure"):
            llm.executor.call("run", batch, worker_args=(ExplodesInWorker(),))
        assert not llm.executor.pool.processes[0].is_alive()
    finally:
        llm.exit()
    assert not active_children()


@pytest.mark.parametrize("size, match", [(0, "between 1 and 8"), (9, "between 1 and 8"), (2.0, "integer"),
                                         (3, "attention heads"), (4, "KV heads")])
def test_invalid_sizes_raise_before_spawning(qwen3_dir, size, match):
    with pytest.raises(ValueError, match=match):
        LLM(qwen3_dir, tensor_parallel_size=size)
    assert not active_children()


def test_gpu_count_is_checked(qwen3_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        LLM(qwen3_dir, tensor_parallel_size=2, device="cuda")
    assert not active_children()


def test_start_up_failure_on_every_rank_raises_rank_0s_error_and_stops_the_workers(qwen3_dir):
    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(qwen3_dir, tensor_parallel_size=2, cpu_kvcache_space_gib=1e-9)
    assert not active_children()


def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(qwen3_dir, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(f"from nanovllm import LLM\nLLM({qwen3_dir!r}, tensor_parallel_size=2)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"PYTHONPATH": ROOT})
    assert result.returncode != 0
    assert 'needs an `if __name__ == "__main__":` guard' in result.stderr


# Run as a script by the tests below: a tensor-parallel engine in a process of its own, to interrupt or kill.
CHILD = """
import faulthandler, json, os, signal, sys, threading, time
from nanovllm import LLM, SamplingParams

if __name__ == "__main__":
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the tests run in a background job (which
    # starts every process with SIGINT ignored, and then Python keeps it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("DUMP_STACKS_AFTER_S"):   # into stderr, for a test that sees this child hang
        faulthandler.dump_traceback_later(float(os.environ["DUMP_STACKS_AFTER_S"]))
    model, device, mode = sys.argv[1:4]
    long = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    batch = [[i + 3] * 8 for i in range(8)]
    llm = LLM(model, tensor_parallel_size=2, device=device, kvcache_block_size=16, max_model_len=2048,
              num_kvcache_blocks=1024, attention_backend=os.environ.get("BACKEND", "auto"))
    pids = [p.pid for p in llm.executor.pool.processes]
    print(json.dumps({"pids": pids, "shm": llm.executor.pool.shm.name}), flush=True)
    if mode == "generate":      # for the test to interrupt (one batch can take under a second on a GPU)
        deadline = time.monotonic() + 120   # a child left by a killed pytest (its own session) stops by itself
        while time.monotonic() < deadline:
            llm.generate(batch, long, use_tqdm=False)
    elif mode == "idle":        # for the test to kill: the workers sit waiting for a call, not in a collective
        time.sleep(60)
    elif mode == "finish":      # and leave without llm.exit(): atexit must stop the workers
        llm.generate(batch, SamplingParams(max_tokens=8), use_tqdm=False)
    else:
        llm.generate(batch[:1], SamplingParams(max_tokens=4), use_tqdm=False)
        if mode == "kill-between":
            os.kill(pids[0], signal.SIGKILL)
        elif mode == "kill-mid-call":
            threading.Timer(1.0, os.kill, (pids[0], signal.SIGKILL)).start()
        else:   # "worker-raises": the worker cannot unpickle the next call; rank 0 runs it and waits in a collective
            from nanovllm.engine.step_batch import StepBatch
            StepBatch.__reduce__ = lambda self: (int, ("planted failure",))
        start = time.monotonic()
        try:
            llm.generate(batch, long, use_tqdm=False)
            error = None
        except RuntimeError as e:
            error = str(e)
        print(json.dumps({"error": error, "seconds": time.monotonic() - start}), flush=True)
        llm.exit()
        print(json.dumps({"exited": True}), flush=True)
"""


def start_child(tmp_path, model: str, device: str, mode: str, **env) -> tuple[subprocess.Popen, dict]:
    """Run CHILD; returns the process and its first report. Its stderr goes to tmp_path / "stderr"."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with open(tmp_path / "stderr", "w") as stderr:
        child = subprocess.Popen([sys.executable, str(script), model, device, mode], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": ROOT} | env,
                                 start_new_session=True)
    line = child.stdout.readline()
    while line and not line.startswith("{"):    # a library may print too (NCCL_DEBUG=WARN prints its version)
        line = child.stdout.readline()
    return child, json.loads(line)


def test_interpreter_exit_ctrl_c_and_a_killed_parent_leave_no_orphans(qwen3_dir, tmp_path_factory):
    """Three engines at once on one machine (no port or name collides): one script ends without llm.exit(),
    one gets Ctrl-C while it generates, one is killed while idle."""
    dirs = [tmp_path_factory.mktemp(name) for name in ("finished", "interrupted", "killed")]
    finished, info_f = start_child(dirs[0], qwen3_dir, "cpu", "finish")
    interrupted, info_i = start_child(dirs[1], qwen3_dir, "cpu", "generate")
    killed, info_k = start_child(dirs[2], qwen3_dir, "cpu", "idle")
    assert len({info_f["shm"], info_i["shm"], info_k["shm"]}) == 3
    time.sleep(1)
    os.killpg(interrupted.pid, signal.SIGINT)    # what a terminal sends its foreground group on Ctrl-C
    os.kill(killed.pid, signal.SIGKILL)          # no cleanup runs in the parent: the workers must notice alone
    assert interrupted.wait(timeout=20) != 0
    assert killed.wait(timeout=5) == -signal.SIGKILL
    assert finished.wait(timeout=20) == 0
    assert_cleaned_up(info_f["pids"], info_f["shm"])
    for path in dirs[:2]:   # we freed everything ourselves: multiprocessing's resource tracker found no leak
        assert "leaked" not in (path / "stderr").read_text(), (path / "stderr").read_text()
    assert_cleaned_up(info_i["pids"], info_i["shm"])
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in info_k["pids"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in info_k["pids"]), "workers outlived their killed parent"


# ---- two GPUs, NCCL -----------------------------------------------------------------------------------------

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
CUDA_BACKENDS = ["torch", "triton"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])


@needs_two_gpus
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_tp2_greedy_matches_tp1_and_transformers(model_dir, backend):
    """float32 on two GPUs; with a kernel backend the decode steps run as CUDA graphs with NCCL inside."""
    kwargs = SMALL | dict(device="cuda", attention_backend=backend, max_num_batched_tokens=64)
    if backend == "flash_attn":
        kwargs |= dict(kvcache_block_size=256, num_kvcache_blocks=3, max_model_len=128)
    tp1 = LLM(model_dir, **kwargs)
    expected = [o["token_ids"] for o in tp1.generate(PROMPTS, GREEDY, use_tqdm=False)]
    tp2 = LLM(model_dir, tensor_parallel_size=2, **kwargs)
    try:
        outs = tp2.generate(PROMPTS, GREEDY, use_tqdm=False)
        again = tp2.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == expected == [o["token_ids"] for o in again]
        assert any(o["num_cached_tokens"] > 0 for o in again)
    finally:
        start = time.monotonic()
        tp2.exit()      # NCCL waits forever if a CUDA graph that captured its collectives outlives the group
    assert time.monotonic() - start < 8, "exit() waited for the workers instead of stopping them in step"
    for prompt, ids in zip(PROMPTS, expected):
        assert ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens, device="cuda")


@needs_two_gpus
def test_cuda_tp2_logits_close_to_tp1_on_dummy_qwen3_0_6b_bf16():
    """Real shapes in bfloat16: splitting the matmuls and summing partial results over NCCL changes rounding
    only, so tp=2's logits stay close to one GPU's. The cache is sized from memory (the minimum over ranks)."""
    rng = random.Random(4)
    batch = [[rng.randrange(0, 10000) for _ in range(n)] for n in (5, 300, 700)]
    logits = {}
    for tp in (1, 2):
        llm = LLM(QWEN3_0_6B, load_format="dummy", tensor_parallel_size=tp, max_model_len=1024,
                  gpu_memory_utilization=0.5, max_num_batched_tokens=2048)
        logits[tp] = prefill_logits(llm, batch)
        llm.exit()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    rel = ((logits[2] - logits[1]).norm(dim=-1) / logits[1].norm(dim=-1)).max().item()
    print(f"tp=2 vs tp=1 bf16 logits: max relative error {rel:.2e}, "
          f"top-1 agreement {(logits[2].argmax(-1) == logits[1].argmax(-1)).tolist()}")
    # Measured on CPU (gloo, same shapes and weights): 2.2e-2, where bf16 itself is 0.5 away from float32.
    assert rel < 0.1, f"relative logits error {rel:.3e}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_two_gpus)])
@pytest.mark.parametrize("mode, story", [("kill-between", "rank 1 died"), ("kill-mid-call", "rank 1 died"),
                                         ("worker-raises", "(?s)rank 1 raised:.*planted failure")],
                         ids=["kill-between", "kill-mid-call", "worker-raises"])
def test_dead_worker_makes_the_caller_raise_and_exit(qwen3_dir, tmp_path, device, mode, story):
    """A worker dies while the engine generates. NCCL does not notice a dead peer: the watchdog must abort the
    group (and rank 0 drop its CUDA graphs, or the abort never returns). In a child process, so that a hang
    fails this test (timeout) instead of hanging the suite; on CUDA, decode runs as CUDA graphs (triton)."""
    backend = "triton" if device == "cuda" else "auto"
    child, info = start_child(tmp_path, qwen3_dir, device, mode, BACKEND=backend, DUMP_STACKS_AFTER_S="45")
    try:
        out, _ = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        pytest.fail(f"{mode}: the caller hung after its worker died; its stdout:\n{child.communicate()[0]}\n"
                    f"its stderr:\n" + (tmp_path / "stderr").read_text()[-6000:])
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]   # after start_child's
    assert len(reports) == 2, (f"{mode}: the child exited ({child.returncode}) before reporting; its stderr:\n"
                               + (tmp_path / "stderr").read_text()[-4000:])
    result, exited = reports
    print(mode, result)
    # A killed worker's exit status may not be known yet: the driver can take a while to tear its context down.
    assert result["error"] is not None and re.search(story, result["error"]), result["error"]
    assert result["seconds"] < 10
    assert exited == {"exited": True} and child.returncode == 0
    assert_cleaned_up(info["pids"], info["shm"])


@needs_two_gpus
def test_cuda_ctrl_c_while_generating_stops_the_workers(qwen3_dir, tmp_path):
    """Ctrl-C on rank 0 in the middle of CUDA-graph decode: rank 0 aborts the group (its graphs dropped), so the
    script ends and leaves no worker behind."""
    child, info = start_child(tmp_path, qwen3_dir, "cuda", "generate", BACKEND="triton", DUMP_STACKS_AFTER_S="45")
    time.sleep(2)       # it generates from its first report on, until interrupted
    os.killpg(child.pid, signal.SIGINT)     # what a terminal sends its foreground group on Ctrl-C
    try:
        code = child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        pytest.fail("the script hung after Ctrl-C; its stderr:\n" + (tmp_path / "stderr").read_text()[-6000:])
    assert code != 0 and "KeyboardInterrupt" in (tmp_path / "stderr").read_text()
    assert_cleaned_up(info["pids"], info["shm"])
