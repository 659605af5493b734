"""The sampling controls OpenAI clients send (issue 22): n, presence/frequency/repetition penalties, seeds with
them, and temperatures too small to divide by, each with vLLM's semantics.

How each is checked against vLLM / transformers, never against the feature itself:
- penalties: a loop-per-row torch reference written from vLLM's apply_penalties (repetition over prompt and
  completion: divide positive logits, multiply the others; then OpenAI's frequency * count and presence over the
  completion), and transformers' RepetitionPenaltyLogitsProcessor for repetition_penalty; end to end, greedy
  completions and their logprobs against transformers' model stepped by hand with that reference;
- n: vLLM's parallel sampling makes sample i of a request the same request with seed + i (its ParentRequest), so a
  seeded n-sample request must equal n single requests with those seeds; the samples share the prompt's full
  blocks, so only the first computes them;
- temperatures below vLLM's epsilon (1e-5) are greedy: the same tokens as temperature 0, finite logprobs.
"""
import math
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.layers.sampler import Sampler, apply_penalties, prepare_sampling, token_counts
from tests.conftest import all_free, hf_model

BLOCK = 16
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])


# ---- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("n", 0, "[1, 16384]"), ("n", 2.0, "[1, 16384]"), ("n", True, "[1, 16384]"), ("n", 16385, "[1, 16384]"),
    ("presence_penalty", 2.5, "[-2, 2]"), ("presence_penalty", math.nan, "[-2, 2]"),
    ("frequency_penalty", -2.1, "[-2, 2]"), ("frequency_penalty", "1", "[-2, 2]"),
    ("repetition_penalty", 0, "> 0"), ("repetition_penalty", -1.0, "> 0"), ("repetition_penalty", math.inf, "> 0"),
    ("repetition_penalty", None, "> 0"),
])
def test_new_fields_name_themselves_and_their_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field) and allowed in str(info.value)


def test_greedy_takes_one_sample_and_tiny_temperatures_are_greedy():
    # vLLM: "n must be 1 when using greedy sampling"; a temperature below 1e-5 is greedy.
    for temperature in (0, 1e-40, 9e-6):
        with pytest.raises(ValueError, match="^n must be .* 1 when greedy"):
            SamplingParams(n=2, temperature=temperature)
        assert SamplingParams(temperature=temperature, top_k=5, min_p=0.5).temperature == 0
    assert SamplingParams(n=2, temperature=1e-5).n == 2
    assert not SamplingParams(temperature=1e-40, top_k=5, min_p=0.5, seed=3).needs_sampler_extras


def test_penalties_take_the_full_sampler_even_when_greedy():
    """A CUDA graph samples the temperature-only path itself; a penalty must send the step to the full sampler."""
    for penalty in ({"presence_penalty": 0.5}, {"frequency_penalty": -1}, {"repetition_penalty": 1.1}):
        for temperature in (0, 1.0):
            assert SamplingParams(temperature=temperature, **penalty).needs_sampler_extras
    runner = object.__new__(ModelRunner)    # plan() reads only the graphs and the batch
    runner.graphs = SimpleNamespace(can_run=lambda n: True, padded_size=lambda n: n, sampled=torch.zeros(4))
    batch = lambda *params: SimpleNamespace(is_prefill=False, num_seqs=len(params), input_ids=[0] * len(params),
                                            sampling=SimpleNamespace(params=list(params)))
    assert runner.plan(batch(SamplingParams(), SamplingParams(temperature=0))).graph_samples
    assert not runner.plan(batch(SamplingParams(), SamplingParams(temperature=0, repetition_penalty=1.2))).graph_samples


# ---- penalties on logits, against references -----------------------------------------------------------

def reference_penalties(logits, prompts, completions, presence, frequency, repetition):
    """vLLM's apply_penalties, one row and one token at a time."""
    out = logits.clone()
    for r in range(len(out)):
        for t in set(prompts[r]) | set(completions[r]):
            x = out[r, t]
            out[r, t] = x / repetition[r] if x > 0 else x * repetition[r]
        for t, count in Counter(completions[r]).items():
            out[r, t] -= frequency[r] * count + presence[r]
    return out


def fake_seq(prompt, completion):
    return SimpleNamespace(token_ids=prompt + completion, num_prompt_tokens=len(prompt))


def random_history(rng, vocab, rows):
    """Prompts and completions with repeats, some tokens in both, and an empty completion (a first token)."""
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] for _ in range(rows)]
    completions = [[rng.randrange(vocab // 2) for _ in range(rng.randrange(0 if r == 0 else 1, 40))]
                   for r in range(rows)]
    return prompts, completions


PENALTIES = [(0.0, 0.0, 1.0), (0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.8), (-1.5, 2.0, 0.6), (2.0, -2.0, 1.3),
             (0.3, 0.4, 1.1)]


def last_inputs(prompts, completions):
    """Each row's last input id, as the runner passes them: its last generated token, else its prompt's last."""
    return torch.tensor([(c or p)[-1] for p, c in zip(prompts, completions)])


@pytest.mark.parametrize("booked_last", [False, True])
def test_penalties_equal_the_reference(booked_last):
    """Counts scattered on the device from the host's tokens, each row's last generated token from the device
    (`last_tokens`: with overlap scheduling the host may not have booked it yet); a row that has generated nothing
    (a prompt's) counts no completion token, whatever its last input id."""
    rng = random.Random(0)
    vocab, rows = 50, len(PENALTIES)
    prompts, completions = random_history(rng, vocab, rows)
    completions[0] = []
    logits = torch.randn(rows, vocab) * 3
    presence, frequency, repetition = zip(*PENALTIES)
    expected = reference_penalties(logits, prompts, completions, presence, frequency, repetition)
    booked = completions if booked_last else [c[:-1] for c in completions]
    counts = token_counts([(fake_seq(p, b), len(c), True) for p, b, c in zip(prompts, booked, completions)],
                          vocab, torch.device("cpu"), last_inputs(prompts, completions))
    got = apply_penalties(logits, torch.arange(rows), torch.tensor(PENALTIES), counts)
    torch.testing.assert_close(got, expected)
    assert counts[0].sum(-1).tolist() == [len(c) for c in completions]


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    rng = random.Random(1)
    vocab, rows = 64, 5
    prompts, completions = random_history(rng, vocab, rows)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    # transformers sees each row's prompt and completion as input_ids (padded with a token already in the row).
    input_ids = torch.tensor([p + c + [p[0]] * (width - len(p) - len(c)) for p, c in zip(prompts, completions)])
    scores = torch.randn(rows, vocab) * 3
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone())
    counts = token_counts([(fake_seq(p, c), len(c), True) for p, c in zip(prompts, completions)], vocab,
                          torch.device("cpu"), last_inputs(prompts, completions))
    got = apply_penalties(scores, torch.arange(rows), torch.tensor([[0.0, 0.0, penalty]] * rows), counts)
    torch.testing.assert_close(got, expected)


def test_sampler_applies_penalties_to_its_rows_only():
    """Through prepare_sampling and the Sampler, as the runner calls them: penalized rows (greedy and sampled) next
    to plain ones; greedy rows take the argmax of the penalized logits, logprobs are of what was sampled from."""
    rng = random.Random(2)
    vocab = 40
    params = [SamplingParams(temperature=0, repetition_penalty=1.7, presence_penalty=1.0),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, frequency_penalty=2.0, logprobs=3),
              SamplingParams(temperature=0, frequency_penalty=-2.0, presence_penalty=-2.0)]
    prompts, completions = random_history(rng, vocab, len(params))
    seqs = [fake_seq(p, c) for p, c in zip(prompts, completions)]
    logits = torch.randn(len(params), vocab) * 2
    original = logits.clone()
    temperatures, extras = prepare_sampling(params, [len(c) for c in completions], frozenset(), vocab,
                                            torch.device("cpu"), seqs, last_inputs(prompts, completions))
    tokens, (sampled_lp, top_lp, top_ids) = Sampler()(logits, temperatures, extras)
    assert torch.equal(logits, original)        # the caller's logits are left as they were
    penalized = reference_penalties(logits, prompts, completions, *zip(*[
        (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) for p in params]))
    assert tokens[[0, 1, 3]].tolist() == [penalized[0].argmax().item(), logits[1].argmax().item(),
                                          penalized[3].argmax().item()]
    expected_lp = (penalized / torch.tensor([1, 1, 0.7, 1]).unsqueeze(1)).log_softmax(-1)
    torch.testing.assert_close(top_lp, expected_lp.topk(3, dim=-1).values)
    torch.testing.assert_close(sampled_lp, expected_lp.gather(1, tokens.unsqueeze(1)).squeeze(1))


def test_vanishing_temperature_through_the_engine_is_greedy(llm):
    prompt = prompt_of(BLOCK + 4, 12)
    tiny = SamplingParams(temperature=1e-40, top_k=5, min_p=0.1, top_p=0.5, logprobs=3, max_tokens=12, ignore_eos=True)
    zero = SamplingParams(temperature=0, logprobs=3, max_tokens=12, ignore_eos=True)
    got, want = llm.generate([prompt, prompt], [tiny, zero], use_tqdm=False)
    assert got["token_ids"] == want["token_ids"] and got["logprobs"] == want["logprobs"]
    assert len(set(got["token_ids"])) > 3 and all(math.isfinite(lp) for d in got["logprobs"] for lp in d.values())


# ---- end to end: the engine against transformers stepped by hand ---------------------------------------

_HF_RUNS = {}


def hf_penalized_greedy(path, prompt, max_tokens, presence, frequency, repetition):
    """transformers' model, greedy, with transformers' repetition processor and the reference presence/frequency
    penalties applied at each step (vLLM's order); returns the tokens and each step's penalized log-softmax."""
    key = (path, tuple(prompt), max_tokens, presence, frequency, repetition)
    if key not in _HF_RUNS:
        _HF_RUNS[key] = _hf_penalized_greedy(path, prompt, max_tokens, presence, frequency, repetition)
    return _HF_RUNS[key]


def _hf_penalized_greedy(path, prompt, max_tokens, presence, frequency, repetition):
    model = hf_model(path)
    ids, past, out, logprobs = torch.tensor([prompt]), None, [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            result = model(ids, past_key_values=past, use_cache=True)
            past, logits = result.past_key_values, result.logits[:, -1].float()
            logits = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([prompt + out]), logits)[0]
            for t, count in Counter(out).items():
                logits[t] -= frequency * count + presence
            out.append(logits.argmax().item())
            logprobs.append(logits.log_softmax(-1))
            ids = torch.tensor([[out[-1]]])
    return out, logprobs


@pytest.fixture(scope="module", params=["cpu", CUDA])
def engines(request, qwen3_dir):
    """Small engines on one checkpoint: with overlap scheduling (the last token is still on the device when the
    next step's penalties need it) and without; chunked prefill at 64 tokens."""
    small = dict(device=request.param, kvcache_block_size=BLOCK, num_kvcache_blocks=200, max_model_len=256,
                 max_num_seqs=16, max_num_batched_tokens=64)
    llms = {overlap: LLM(qwen3_dir, overlap_scheduling=overlap, **small) for overlap in (True, False)}
    yield llms
    for llm in llms.values():
        llm.exit()


@pytest.fixture(scope="module")
def llm(engines):
    return engines[True]


@pytest.fixture(autouse=True)
def blocks_free_after(request):
    yield
    if "engines" in request.fixturenames:
        for llm in request.getfixturevalue("engines").values():
            assert all_free(llm), "a block or a sequence is still held"


def prompt_of(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


@pytest.mark.parametrize("overlap", [True, False])
def test_penalized_greedy_equals_transformers(engines, qwen3_dir, overlap):
    llm = engines[overlap]
    prompts = [prompt_of(n, seed=n) for n in (5, BLOCK + 3, 3 * BLOCK + 1)]
    cases = [(1.5, 0.0, 1.0), (0.0, 1.2, 1.0), (0.0, 0.0, 1.9), (-2.0, -1.0, 1.0), (0.5, 0.5, 0.7), (0.0, 0.0, 1.0)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2, presence_penalty=p,
                             frequency_penalty=f, repetition_penalty=r) for p, f, r in cases]
    # Every case on every prompt, in one batch: penalized rows next to others, so rows must not mix.
    batch = [(prompt, sp, case) for prompt in prompts for sp, case in zip(params, cases)]
    outs = llm.generate([b[0] for b in batch], [b[1] for b in batch], use_tqdm=False)
    changed = 0
    for (prompt, _, case), out in zip(batch, outs):
        expected, expected_lp = hf_penalized_greedy(qwen3_dir, prompt, 20, *case)
        assert out["token_ids"] == expected, case
        for token, entry, row in zip(out["token_ids"], out["logprobs"], expected_lp):
            assert entry[token] == pytest.approx(row[token].item(), abs=2e-4)
        changed += expected != hf_penalized_greedy(qwen3_dir, prompt, 20, 0.0, 0.0, 1.0)[0]
    assert changed >= 10        # the penalties do change these completions: the comparison is not vacuous


@pytest.mark.parametrize("overlap", [True, False])
def test_requests_arriving_mid_decode_ride_along_and_equal_transformers(engines, qwen3_dir, overlap):
    """Requests added while others decode join the running ones' steps (a prefill batch whose decodes are one-token
    rows, their last token still on the device under overlap scheduling); penalized greedy tokens and their
    log-probabilities stay transformers'. A decode row's uncounted last token would move the log-probabilities."""
    llm = engines[overlap]
    case = (0.4, 0.6, 1.3)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, presence_penalty=case[0],
                        frequency_penalty=case[1], repetition_penalty=case[2])
    prompts = [prompt_of(n, seed=40 + n) for n in (6, 2 * BLOCK + 3, 9, 70)]
    arrivals = {0: 0, 2: 1, 4: 2, 5: 3}        # step -> prompt; the last one is chunked beside the decodes
    added, mixed, run, add = [], 0, llm.executor.run, llm.scheduler.add

    def recording_run(batch):
        nonlocal mixed
        query_lens = np.diff(batch.cu_seqlens_q)
        mixed += batch.is_prefill and query_lens[0] == 1 and query_lens.max() > 1
        return run(batch)

    llm.executor.run, llm.scheduler.add = recording_run, lambda seq: (added.append(seq), add(seq))
    try:
        step = 0
        while arrivals or not llm.is_finished():
            if step in arrivals:
                llm.add_request(prompts[arrivals.pop(step)], sp)
            llm.step()
            step += 1
    finally:
        del llm.executor.run, llm.scheduler.add
    assert mixed >= 3 and len(added) == len(prompts)
    for prompt, seq in zip(prompts, added):
        expected, expected_lp = hf_penalized_greedy(qwen3_dir, prompt, 12, *case)
        assert seq.completion_token_ids == expected
        for token, entry, row in zip(expected, seq.logprobs, expected_lp):
            assert entry[token] == pytest.approx(row[token].item(), abs=2e-4)


def test_seeded_penalized_request_is_the_same_alone_and_batched(llm):
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True, frequency_penalty=1.0,
                        repetition_penalty=1.2)
    prompt = prompt_of(20)
    alone = llm.generate([prompt], sp, use_tqdm=False)[0]["token_ids"]
    others = [SamplingParams(temperature=0.9, max_tokens=30, presence_penalty=1.0), SamplingParams(temperature=0)]
    batch = llm.generate([prompt_of(7, 1), prompt, prompt_of(40, 2)], [others[0], sp, others[1]], use_tqdm=False)
    assert batch[1]["token_ids"] == alone


# ---- n -------------------------------------------------------------------------------------------------

def test_n_samples_are_the_request_with_seed_plus_i(llm):
    prompt = prompt_of(2 * BLOCK + 5)
    sp = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True, logprobs=1,
                        presence_penalty=0.5)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    singles = llm.generate([prompt] * 4, [SamplingParams(temperature=1.0, seed=11 + i, max_tokens=16, ignore_eos=True,
                                                         logprobs=1, presence_penalty=0.5) for i in range(4)],
                           use_tqdm=False)
    assert [o["token_ids"] for o in out["outputs"]] == [s["token_ids"] for s in singles]
    assert len({tuple(o["token_ids"]) for o in out["outputs"]}) == 4       # seeded samples still differ
    assert {k: v for k, v in out.items() if k != "outputs"} == out["outputs"][0]
    for o in out["outputs"]:
        assert set(o) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "num_cached_tokens", "metrics",
                          "logprobs"}
        assert o["prompt_token_ids"] == prompt and len(o["logprobs"]) == 16
        assert o["text"] == llm.tokenizer.decode(o["token_ids"])


def test_n_samples_share_the_prompts_full_blocks(llm):
    """Only the first sample computes the prompt's full blocks; the others find them in the prefix cache and
    compute the last partial block (vLLM's children share them the same way)."""
    prompt = prompt_of(3 * BLOCK + 5, seed=3)
    prefill_tokens = []
    run = llm.executor.run

    def counting_run(batch):
        if batch.is_prefill:    # the prompt's tokens (a step's decodes ride along, past the prompt)
            prefill_tokens.append(int((batch.positions < len(prompt)).sum()))
        return run(batch)

    llm.executor.run = counting_run
    try:
        out = llm.generate([prompt], SamplingParams(n=5, temperature=1.0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)[0]
    finally:
        del llm.executor.run
    assert [o["num_cached_tokens"] for o in out["outputs"]] == [0] + [3 * BLOCK] * 4
    assert sum(prefill_tokens) == len(prompt) + 4 * 5
    assert len({tuple(o["token_ids"]) for o in out["outputs"]}) > 1        # unseeded samples differ too


def test_n_with_other_requests_and_one_output_unchanged(llm):
    prompts = [prompt_of(10, 4), prompt_of(BLOCK * 2, 5), prompt_of(3, 6)]
    params = [SamplingParams(n=3, max_tokens=5), SamplingParams(temperature=0, max_tokens=6),
              SamplingParams(n=2, max_tokens=7, ignore_eos=True)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o["outputs"]) for o in (outs[0], outs[2])] == [3, 2] and "outputs" not in outs[1]
    assert set(outs[1]) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "num_cached_tokens", "metrics"}
    assert all(len(o["token_ids"]) == 7 for o in outs[2]["outputs"])
    greedy = llm.generate([prompts[1]], params[1], use_tqdm=False)[0]
    assert greedy["token_ids"] == outs[1]["token_ids"]


def test_n_streams_each_sample_on_its_own(llm):
    prompts = [prompt_of(BLOCK + 2, 7), prompt_of(5, 8)]
    sp = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    final = llm.generate(prompts, sp, use_tqdm=False)
    got = {}
    for piece in llm.stream(prompts, sp):
        entry = got.setdefault((piece.index, piece.sample_index), {"ids": [], "text": "", "finished": False})
        assert not entry["finished"]
        entry["ids"] += piece.new_token_ids
        entry["text"] += piece.new_text
        entry["finished"] = piece.finished
    assert sorted(got) == [(i, j) for i in range(2) for j in range(3)]
    for (i, j), entry in got.items():
        assert entry["finished"] and entry["ids"] == final[i]["outputs"][j]["token_ids"]
        assert entry["text"] == final[i]["outputs"][j]["text"]


@pytest.mark.parametrize("after", [0, 1, 12])
def test_leaving_an_n_stream_frees_every_sample(llm, after):
    stream = llm.stream([prompt_of(2 * BLOCK + 1, 9)], SamplingParams(n=4, max_tokens=20, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i >= after:
            break
    stream.close()
    assert all_free(llm)
    assert len(llm.generate([prompt_of(4)], SamplingParams(n=2, max_tokens=3), use_tqdm=False)[0]["outputs"]) == 2


def test_a_failed_first_step_aborts_the_held_samples_too(llm):
    """Before the first sample's first token the others are held back, in no queue: they must end all the same."""
    def failing(batch):
        raise RuntimeError("the device went away")

    llm.executor.run = failing
    try:
        with pytest.raises(RuntimeError, match="went away"):
            llm.generate([prompt_of(2 * BLOCK + 1, 10)], SamplingParams(n=3, max_tokens=5), use_tqdm=False)
    finally:
        del llm.executor.run
    assert all_free(llm)
    assert len(llm.generate([prompt_of(4)], SamplingParams(n=2, max_tokens=3), use_tqdm=False)[0]["outputs"]) == 2
