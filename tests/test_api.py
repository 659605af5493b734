"""generate / stream / chat on the tiny checkpoints: finish reasons, stop conditions, logprobs, seeds, text.

Expected values come from transformers, the tokenizer, or a run of the engine without the feature under
test (a greedy run without a stop condition tells where that condition must cut), never from the feature.
"""
import time
from contextlib import nullcontext

import pytest
import torch

from nanovllm import LLM, SamplingParams, StreamOutput
from conftest import hf_greedy, hf_model

MAX_MODEL_LEN = 160
PROMPTS = ["Hello, world!", "语言模型预测下一个词。", "😀🚀 emoji", "Les modèles 语言 😀 mixed"]

_ENGINES = {}
SMALL = dict(kvcache_block_size=16, num_kvcache_blocks=160, max_model_len=MAX_MODEL_LEN, max_num_seqs=32,
             max_num_batched_tokens=64)


def engine(path: str) -> LLM:
    """One small CPU engine per checkpoint for the whole module (blocks of 16 tokens, chunked prefill at 64)."""
    if path not in _ENGINES:
        _ENGINES[path] = LLM(path, device="cpu", **SMALL)
    return _ENGINES[path]


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return engine(qwen3_dir)


@pytest.fixture(autouse=True)
def all_blocks_free_after(request):
    yield
    for llm in _ENGINES.values():
        manager = llm.scheduler.block_manager
        assert llm.scheduler.is_finished()
        assert len(manager.free_block_ids) == len(manager.blocks), "a block is still held"


def greedy(llm, prompt, max_tokens=32, **kwargs) -> dict:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)
    return llm.generate([prompt], sp, use_tqdm=False)[0]


def decode(llm, token_ids, skip_special_tokens=True) -> str:
    return llm.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


# ---- outputs and finish reasons ----------------------------------------------------------------------

def test_output_fields_and_length_finish(llm):
    out = greedy(llm, PROMPTS[0], max_tokens=7)
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "num_cached_tokens", "metrics"}
    m = out["metrics"]
    assert m["arrival_time"] <= m["first_token_time"] <= m["finished_time"] <= time.perf_counter()
    assert out["prompt_token_ids"] == llm.tokenizer.encode(PROMPTS[0])
    assert len(out["token_ids"]) == 7 and out["finish_reason"] == "length"
    assert out["text"] == decode(llm, out["token_ids"])


def test_max_model_len_finishes_with_length(llm):
    prompt = list(range(3, 3 + MAX_MODEL_LEN - 5))
    out = greedy(llm, prompt, max_tokens=50)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"


def seeded_samples(llm, n=32, **kwargs) -> list[dict]:
    """n sampled completions of one prompt at a high temperature, where the tiny model often draws eos."""
    params = [SamplingParams(temperature=1.5, max_tokens=40, seed=i, **kwargs) for i in range(n)]
    return llm.generate([[5, 6, 7, 8]] * n, params, use_tqdm=False)


def test_eos_finishes_with_stop_and_ignore_eos_goes_on(llm):
    eos = llm.tokenizer.eos_token_id
    outs = seeded_samples(llm, skip_special_tokens=False)
    stopped = [o for o in outs if o["finish_reason"] == "stop"]
    assert stopped and len(stopped) < len(outs)
    for out in outs:
        ids = out["token_ids"]
        if out["finish_reason"] == "stop":
            assert ids[-1] == eos and eos not in ids[:-1]
            assert out["text"] == decode(llm, ids[:-1], skip_special_tokens=False)    # eos's text left out
        else:
            assert len(ids) == 40 and eos not in ids
    # The same seeds with ignore_eos draw the same tokens, then go on past eos.
    for out, longer in zip(outs, seeded_samples(llm, ignore_eos=True)):
        assert longer["finish_reason"] == "length" and longer["token_ids"][:len(out["token_ids"])] == out["token_ids"]
    # include_stop_str_in_output keeps the stop token's text.
    kept = seeded_samples(llm, skip_special_tokens=False, include_stop_str_in_output=True)
    assert all(o["text"].endswith("<|im_end|>") == (o["finish_reason"] == "stop") for o in kept)


def test_min_tokens_masks_eos(llm):
    eos = llm.tokenizer.eos_token_id
    free = seeded_samples(llm)
    assert any(o["finish_reason"] == "stop" and len(o["token_ids"]) <= 20 for o in free)   # eos would come early
    for out in seeded_samples(llm, min_tokens=20):
        assert eos not in out["token_ids"][:20] and len(out["token_ids"]) > 20


def test_stop_token_ids(llm):
    full = greedy(llm, PROMPTS[0])["token_ids"]
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    out = greedy(llm, PROMPTS[0], stop_token_ids=[full[k]])
    assert out["token_ids"] == full[:k + 1] and out["finish_reason"] == "stop"
    assert out["text"] == decode(llm, full[:k])
    kept = greedy(llm, PROMPTS[0], stop_token_ids=[full[k]], include_stop_str_in_output=True)
    assert kept["text"] == decode(llm, full[:k + 1])


def test_min_tokens_masks_stop_token_ids(llm):
    prompt = llm.tokenizer.encode(PROMPTS[0])
    first = greedy(llm, prompt)["token_ids"][0]
    out = greedy(llm, prompt, stop_token_ids=[first], min_tokens=3)
    assert first not in out["token_ids"][:3]
    # With `first` masked, greedy takes transformers' best other token (eos is ignored here).
    with torch.no_grad():
        logits = hf_model(llm.config.model)(torch.tensor([prompt])).logits[0, -1]
    logits[first] = float("-inf")
    assert out["token_ids"][0] == logits.argmax().item()


# ---- stop strings --------------------------------------------------------------------------------------

def spanning_stop(llm, token_ids) -> str:
    """A 2-character string of the decoded completion that no single token's text contains."""
    text = decode(llm, token_ids)
    for i in range(1, len(token_ids)):
        head, tail = decode(llm, token_ids[:i]), decode(llm, token_ids[i:i + 1])
        if head and tail and "\ufffd" not in head[-1] + tail[0] and text.startswith(head):
            stop = head[-1] + tail[0]
            if all(stop not in decode(llm, [t]) for t in token_ids):
                return stop
    pytest.fail("no printable token boundary in the greedy completion")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_is_cut_exactly(llm, include):
    full = greedy(llm, PROMPTS[0], max_tokens=48)
    stop = spanning_stop(llm, full["token_ids"])
    at = full["text"].find(stop)
    sp = dict(stop=["never-in-this-text", stop], include_stop_str_in_output=include)
    out = greedy(llm, PROMPTS[0], max_tokens=48, **sp)
    assert out["finish_reason"] == "stop"
    assert out["text"] == full["text"][:at + len(stop) if include else at]
    ids = out["token_ids"]
    assert ids == full["token_ids"][:len(ids)] and stop in decode(llm, ids)
    assert stop not in decode(llm, ids[:-1])        # it stopped on the token that completed the stop string
    streamed = list(llm.stream([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, **sp)))
    assert "".join(s.new_text for s in streamed) == out["text"]
    assert [t for s in streamed for t in s.new_token_ids] == ids
    assert streamed[-1].finished and streamed[-1].finish_reason == "stop"


def test_stop_string_found_on_the_last_token_overrides_length(llm):
    full = greedy(llm, PROMPTS[0], max_tokens=48)
    stop = spanning_stop(llm, full["token_ids"])
    n = len(greedy(llm, PROMPTS[0], max_tokens=48, stop=stop)["token_ids"])
    out = greedy(llm, PROMPTS[0], max_tokens=n, stop=stop)
    assert out["finish_reason"] == "stop" and stop not in out["text"]


# ---- logprobs ------------------------------------------------------------------------------------------

def assert_greedy_logprobs_match_transformers(llm, path, tolerance):
    prompt = llm.tokenizer.encode(PROMPTS[3])
    out = greedy(llm, prompt, max_tokens=8, logprobs=3)
    assert out["token_ids"] == hf_greedy(path, prompt, 8)
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt + out["token_ids"]])).logits[0]
    expected = logits[len(prompt) - 1:-1].log_softmax(-1)
    assert len(out["logprobs"]) == 8
    for token_id, entry, row in zip(out["token_ids"], out["logprobs"], expected):
        assert set(entry) == {token_id, *row.topk(3).indices.tolist()}
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t].item(), abs=tolerance)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_greedy_logprobs_match_transformers(arch, qwen3_dir, qwen2_dir):
    path = qwen3_dir if arch == "qwen3" else qwen2_dir
    assert_greedy_logprobs_match_transformers(engine(path), path, 1e-4)


def test_logprobs_only_where_asked(llm):
    outs = llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=5, logprobs=0, seed=1), SamplingParams(max_tokens=5)],
                        use_tqdm=False)
    assert [list(d) for d in outs[0]["logprobs"]] == [[t] for t in outs[0]["token_ids"]]
    assert all(lp <= 0 for d in outs[0]["logprobs"] for lp in d.values())
    assert "logprobs" not in outs[1]


# ---- seeds ---------------------------------------------------------------------------------------------

def test_seeded_request_is_the_same_alone_and_in_other_batches(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], seeded, use_tqdm=False)[0]["token_ids"]
    others = [SamplingParams(temperature=0.8, max_tokens=30), SamplingParams(temperature=0, max_tokens=10),
              SamplingParams(temperature=1.2, min_p=0.1, seed=9, max_tokens=20)]
    batch = llm.generate(PROMPTS[2:] + [PROMPTS[1]] + PROMPTS[:1], others[:2] + [seeded] + others[2:],
                         use_tqdm=False)
    assert batch[2]["token_ids"] == alone
    assert llm.generate([PROMPTS[1]] * 3, seeded, use_tqdm=False)[1]["token_ids"] == alone


def test_unseeded_requests_differ_across_runs(llm):
    sp = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    first, second = (llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0]["token_ids"] for _ in range(2))
    assert first != second


# ---- chat ----------------------------------------------------------------------------------------------

def templated(llm, conversation) -> list[int]:
    ids = llm.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return ids["input_ids"] if hasattr(ids, "keys") else ids    # transformers 5 returns a BatchEncoding


def test_chat_applies_the_template(llm):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, 世界 😀"}]
    sp = SamplingParams(temperature=0, max_tokens=6)
    one = llm.chat(conversation, sp, use_tqdm=False)
    assert len(one) == 1 and one[0]["prompt_token_ids"] == templated(llm, conversation)
    assert one[0]["token_ids"] == llm.generate([templated(llm, conversation)], sp, use_tqdm=False)[0]["token_ids"]
    two = llm.chat([conversation, conversation[1:]], sp, use_tqdm=False)
    assert [o["prompt_token_ids"] for o in two] == [templated(llm, conversation), templated(llm, conversation[1:])]
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"content": "no role"}], use_tqdm=False)


# ---- streaming -----------------------------------------------------------------------------------------

def test_streamed_text_equals_final_text(llm):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True) for i in range(len(PROMPTS))]
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    pieces = {i: [] for i in range(len(PROMPTS))}
    token_ids = {i: [] for i in range(len(PROMPTS))}
    finished = []
    for out in llm.stream(PROMPTS, params):
        assert isinstance(out, StreamOutput) and out.index not in finished
        pieces[out.index].append(out.new_text)
        token_ids[out.index] += out.new_token_ids
        if out.finished:
            finished.append(out.index)
            assert out.finish_reason == "length"
    assert sorted(finished) == list(range(len(PROMPTS)))
    for i, out in enumerate(final):
        assert token_ids[i] == out["token_ids"]
        assert "".join(pieces[i]) == out["text"] == decode(llm, out["token_ids"])
    # The random completions split characters over tokens: a token-by-token decode would differ.
    assert any("".join(decode(llm, [t]) for t in o["token_ids"]) != o["text"] for o in final)


@pytest.mark.parametrize("how", ["break", "raise"])
def test_leaving_a_stream_early_frees_every_block(llm, how):
    sp = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    with pytest.raises(RuntimeError) if how == "raise" else nullcontext():
        for i, _ in enumerate(llm.stream(PROMPTS, sp)):
            if i == 6:
                if how == "raise":
                    raise RuntimeError("consumer failed")
                break
    manager = llm.scheduler.block_manager
    assert llm.scheduler.is_finished() and len(manager.free_block_ids) == len(manager.blocks)
    assert len(greedy(llm, PROMPTS[0], max_tokens=3)["token_ids"]) == 3     # the engine is still usable


def test_stream_validates_before_running(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.stream(PROMPTS, SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate(PROMPTS, SamplingParams(logprobs=10**6), use_tqdm=False)


# ---- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("temperature", -0.1, ">= 0"), ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_k", -2, "-1, 0"),
    ("min_p", 1.1, "[0, 1]"), ("max_tokens", 0, ">= 1"), ("min_tokens", -1, "[0, max_tokens"),
    ("min_tokens", 100, "[0, max_tokens=64]"), ("logprobs", -1, ">= 0"), ("seed", 1.5, "integer"),
    ("stop", [""], "non-empty"), ("stop_token_ids", [-1], ">= 0"), ("top_k", 2.0, "-1, 0"),
])
def test_out_of_range_values_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field) and allowed in str(info.value)


def test_sampling_params_defaults_are_off():
    sp = SamplingParams(stop="x")
    assert sp.stop == ["x"] and sp.stop_token_ids == [] and not sp.needs_sampler_extras
    assert SamplingParams(top_k=-1).needs_sampler_extras is False
    assert SamplingParams(temperature=0, top_p=0.5).needs_sampler_extras is False       # greedy ignores filters


# ---- CUDA ----------------------------------------------------------------------------------------------

def _kernels_present() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(f"nanovllm.kernels.paged_attention_{name}") for name in ("triton", "flash"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", pytest.param("auto", marks=pytest.mark.skipif(
    not _kernels_present(), reason="no GPU attention kernels in this tree"))])
def test_sampling_controls_on_cuda(qwen3_dir, backend):
    """The same controls on the GPU: warm-up through the filtering path, CUDA graphs with backend "auto",
    the compiled fast path next to the filtering one, seeds, logprobs and stop strings."""
    llm = LLM(qwen3_dir, device="cuda", attention_backend=backend, **SMALL)
    assert_greedy_logprobs_match_transformers(llm, qwen3_dir, 2e-3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, seed=7, max_tokens=24, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], seeded, use_tqdm=False)[0]["token_ids"]
    mixed = [SamplingParams(temperature=0.8, max_tokens=30), SamplingParams(temperature=0, max_tokens=10), seeded]
    batch = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]    # the seeded prompt last, next to two others
    assert llm.generate(batch, mixed[:2] + [seeded], use_tqdm=False)[2]["token_ids"] == alone
    stop = spanning_stop(llm, greedy(llm, PROMPTS[0], max_tokens=48)["token_ids"])
    sp = SamplingParams(temperature=0, max_tokens=48, stop=stop)
    final = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0]
    assert final["finish_reason"] == "stop" and stop not in final["text"]
    assert "".join(s.new_text for s in llm.stream([PROMPTS[0]], sp)) == final["text"]
    manager = llm.scheduler.block_manager
    assert len(manager.free_block_ids) == len(manager.blocks)
