"""Bad input is refused with a clear error before any work, and config.json formats of transformers 4 and 5 load."""
import json
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import ModelConfig
from nanovllm.engine import llm_engine
from nanovllm.engine.executor import Executor
from nanovllm.utils.loader import load_tokenizer
from tests.tiny_checkpoint import build_tiny_checkpoint
from tests.conftest import all_free, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir, device="cpu", kvcache_block_size=16, max_model_len=64)


@pytest.mark.parametrize("prompts, message", [
    ([[]], "empty prompt"),
    ([""], "empty prompt"),
    ([list(range(3, 68))], "more than max_model_len"),
    ([[5, 384]], "outside the vocabulary"),
    ([[5, -1]], "outside the vocabulary"),
    ([[5, 6.0]], "list of token ids"),
    ([[5, True]], "got a bool among its ids"),
    ([[np.int64(5), 6.0]], "got a float among its ids"),
    ("hello", "must be a list"),
])
def test_bad_prompts_raise_before_any_work(llm, prompts, message):
    good = [5, 6, 7]
    with pytest.raises(ValueError, match=message):
        llm.generate([good] + list(prompts) if isinstance(prompts, list) else prompts, GREEDY, use_tqdm=False)
    assert all_free(llm)        # the valid prompt next to the bad one was not queued either
    assert llm.generate([good], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(llm.config.model, good, 5)


def test_numpy_integer_ids_are_token_ids(llm):
    expected = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]
    out = llm.generate([[np.int32(5), 6, np.int64(7)]], GREEDY, use_tqdm=False)[0]
    assert out["token_ids"] == expected["token_ids"] and out["prompt_token_ids"] == [5, 6, 7]
    assert all(type(t) is int for t in out["prompt_token_ids"])


def test_mismatched_sampling_params_list(llm):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([[1], [2]], [GREEDY], use_tqdm=False)
    assert all_free(llm)


def test_add_request_with_n_samples_is_refused_and_the_engine_still_runs(llm):
    """step() reports one completion per id, so n > 1 belongs to generate, chat and stream."""
    with pytest.raises(ValueError, match="add_request runs one sample, got n=2; use generate"):
        llm.add_request([5, 6, 7], SamplingParams(temperature=0.8, max_tokens=5, n=2))
    assert all_free(llm) and llm.is_finished()
    seq_id = llm.add_request([5, 6, 7], GREEDY)
    finished = []
    while not llm.is_finished():
        finished += llm.step().finished
    assert finished == [(seq_id, hf_greedy(llm.config.model, [5, 6, 7], 5))]


def test_generate_empty_list(llm):
    assert llm.generate([], GREEDY) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"), (dict(max_tokens=2.5), "max_tokens"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_misspelt_keyword_is_a_type_error(qwen3_dir):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(qwen3_dir, max_num_seq=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(tensor_parallel_size=9), "tensor_parallel_size"), (dict(device="tpu"), "device"),
    (dict(attention_backend="xformers"), "attention_backend"), (dict(num_kvcache_blocks=0), "num_kvcache_blocks"),
])
def test_bad_config_values(qwen3_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(qwen3_dir, device=kwargs.pop("device", "cpu"), **kwargs)


def test_gpu_backend_on_cpu_is_refused(qwen3_dir):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        LLM(qwen3_dir, device="cpu", attention_backend="triton")


def test_text_prompt_without_tokenizer(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "m"), with_tokenizer=False)
    llm = LLM(path, device="cpu", kvcache_block_size=16)
    assert llm.tokenizer is None
    with pytest.raises(ValueError, match="need a tokenizer"):
        llm.generate(["hi"], GREEDY, use_tqdm=False)
    assert len(llm.generate([[5, 6]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 5
    assert all_free(llm)


def test_missing_model_dir_and_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))


def test_home_is_expanded(qwen3_dir, monkeypatch):
    home, name = os.path.split(qwen3_dir)
    monkeypatch.setenv("HOME", home)
    assert LLM(f"~/{name}", device="cpu", kvcache_block_size=16).config.model == qwen3_dir


def test_sequence_stops_at_max_model_len(llm):
    out = llm.generate([list(range(3, 60))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out["token_ids"]) == 64 - 57
    assert all_free(llm)


def test_small_cache_lowers_max_model_len_with_a_warning(qwen3_dir):
    with pytest.warns(UserWarning, match="lowering max_model_len to 48"):
        llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=3, max_model_len=100)
    assert llm.max_model_len == 48
    with pytest.raises(ValueError, match="max_model_len=48"):     # a prompt that could never fit the cache
        llm.generate([list(range(3, 53))], GREEDY, use_tqdm=False)
    assert all_free(llm)


def test_cache_budget_too_small_for_one_block(qwen3_dir):
    with pytest.raises(ValueError, match="cpu_kvcache_space_gib"):
        LLM(qwen3_dir, device="cpu", cpu_kvcache_space_gib=1e-9)


def rewrite_config_as_transformers_4(path: str):
    """Rewrite config.json the way transformers 4.51 published Qwen3: top-level rope_theta and torch_dtype."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    rope = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    raw["rope_scaling"] = None
    raw["torch_dtype"] = raw.pop("dtype", raw.get("torch_dtype", "float32"))
    with open(file, "w") as f:
        json.dump(raw, f, indent=2)


def test_transformers_4_and_5_config_formats(tmp_path):
    v5 = build_tiny_checkpoint(str(tmp_path / "v5"), seed=3)
    with open(os.path.join(v5, "config.json")) as f:
        raw = json.load(f)
    raw["rope_parameters"]["rope_theta"] = 500.0        # not the default, so a wrong reader is caught
    with open(os.path.join(v5, "config.json"), "w") as f:
        json.dump(raw, f)
    v4 = str(tmp_path / "v4")
    shutil.copytree(v5, v4)
    rewrite_config_as_transformers_4(v4)
    with open(os.path.join(v4, "config.json")) as f:
        raw4 = json.load(f)
    assert "rope_parameters" not in raw4 and raw4["rope_theta"] == 500.0 and raw4["torch_dtype"] == "float32"
    for path in (v4, v5):
        cfg = ModelConfig.load(path)
        assert cfg.rope_theta == 500.0 and cfg.dtype == torch.float32
    prompt = list(range(10, 50))
    expected = hf_greedy(v5, prompt, 8)
    for path in (v4, v5):
        out = LLM(path, device="cpu", kvcache_block_size=16).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert out[0]["token_ids"] == expected


def test_checkpoint_dtype_is_used(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "bf16"))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    llm = LLM(path, device="cpu", kvcache_block_size=16)
    assert llm.executor.runner.model.lm_head.weight.dtype == torch.bfloat16
    assert llm.executor.runner.kv_cache.dtype == torch.bfloat16
    assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 5


def test_unsupported_architecture_is_named(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "llama"))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Qwen3ForCausalLM"):
        LLM(path, device="cpu")


def test_mismatched_weights_name_the_tensor(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "bad"))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["intermediate_size"] = 96
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*does not fit.*shape"):
        LLM(path, device="cpu")


# ---- bad files and bad option types (issue #12, items 5 and 7) ----------------------------------------

def broken_copy(src, tmp_path, file, content: bytes):
    """A copy of the checkpoint `src` with `file` overwritten by `content`; returns (directory, file's path)."""
    path = str(tmp_path / "broken")
    shutil.copytree(src, path)
    with open(os.path.join(path, file), "wb") as f:
        f.write(content)
    return path, os.path.join(path, file)


def config_copy(src, tmp_path, change: dict, drop=()):
    """A copy of `src` whose config.json has `change` applied and the keys in `drop` removed."""
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    raw = {k: v for k, v in (raw | change).items() if k not in drop}
    return broken_copy(src, tmp_path, "config.json", json.dumps(raw).encode())


@pytest.mark.parametrize("change, drop, message", [
    ({}, ("hidden_size",), "lacks the required key 'hidden_size'"),
    ({}, ("vocab_size",), "lacks the required key 'vocab_size'"),
    ({"vocab_size": None}, (), "'vocab_size' in .* must be a positive integer, got None"),
    ({"num_hidden_layers": 0}, (), "'num_hidden_layers' in .* must be a positive integer, got 0"),
    ({"intermediate_size": "128"}, (), "'intermediate_size' in .* must be a positive integer, got '128'"),
    ({"num_key_value_heads": 2.5}, (), "'num_key_value_heads' in .* got 2.5"),
    ({"head_dim": True}, (), "'head_dim' in .* got True"),
    ({"max_position_embeddings": -1}, (), "'max_position_embeddings' in .* got -1"),
    ({"use_sliding_window": True, "sliding_window": 64}, (), "use_sliding_window=true in .*full attention"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, (), "'yarn' \\(rope_scaling in "),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, (), "'dynamic' \\(rope_scaling in "),
])
def test_bad_config_json_names_the_file_and_key(qwen3_dir, tmp_path, change, drop, message):
    path, file = config_copy(qwen3_dir, tmp_path, change, drop)
    with pytest.raises(ValueError, match=message) as info:
        LLM(path, device="cpu")
    assert file in str(info.value)


@pytest.mark.parametrize("file, content, message", [
    ("config.json", b'{"architectures": ["Qwen3ForCausalLM"], "vocab', "is not valid JSON"),
    ("config.json", b"\x87\xff\x00garbage", "is not valid JSON"),
    ("config.json", b"[1, 2]", "must hold a JSON object, got a list"),
    ("generation_config.json", b'{"eos_token_id": [1,', "is not valid JSON"),
])
def test_unreadable_json_names_the_file(qwen3_dir, tmp_path, file, content, message):
    path, broken = broken_copy(qwen3_dir, tmp_path, file, content)
    with pytest.raises(ValueError, match=message) as info:
        LLM(path, device="cpu")
    assert str(info.value).startswith(broken) and "re-download" in str(info.value)


def test_real_qwen_config_keys_still_load(qwen3_dir, tmp_path):
    """Qwen2.5/Qwen3 publish a sliding_window size with use_sliding_window false, and may carry a default rope_scaling."""
    path, _ = config_copy(qwen3_dir, tmp_path, {"sliding_window": 32768, "use_sliding_window": False,
                                                "rope_scaling": {"rope_type": "default"}, "max_window_layers": 28})
    assert ModelConfig.load(path).hidden_size == 64


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(1000), "truncated"])
def test_broken_safetensors_names_the_file(qwen3_dir, tmp_path, content):
    if content == "truncated":
        with open(os.path.join(qwen3_dir, "model.safetensors"), "rb") as f:
            content = f.read()[:-100]
    path, file = broken_copy(qwen3_dir, tmp_path, "model.safetensors", content)
    with pytest.raises(ValueError, match="is not a readable safetensors file.*re-download") as info:
        LLM(path, device="cpu", kvcache_block_size=16)
    assert file in str(info.value)


@pytest.mark.parametrize("content", [b"\x87\xff garbage \x00", b'{"version": "1.0", "truncation": null, "add', b"[]"])
def test_broken_tokenizer_names_the_directory(qwen3_dir, tmp_path, content, monkeypatch):
    """The tokenizer loads beside the model (llm_engine.py): its error still comes out, after the executor that was
    built meanwhile has been stopped."""
    path, _ = broken_copy(qwen3_dir, tmp_path, "tokenizer.json", content)
    exits = []
    real_exit = Executor.exit
    monkeypatch.setattr(Executor, "exit", lambda self: exits.append(self) or real_exit(self))
    with pytest.raises(ValueError, match="tokenizer.json") as info:
        LLM(path, device="cpu", kvcache_block_size=16)
    message = str(info.value)
    assert repr(path) in message and "re-download the tokenizer files, or remove them" in message
    assert len(exits) == 1


def test_the_tokenizer_loads_on_another_thread_while_the_model_loads(qwen3_dir, monkeypatch):
    threads = []
    monkeypatch.setattr(llm_engine, "load_tokenizer",
                        lambda *args: threads.append(threading.current_thread()) or load_tokenizer(*args))
    llm = LLM(qwen3_dir, device="cpu", kvcache_block_size=16)
    assert threads and threads[0] is not threading.main_thread() and llm.tokenizer is not None


@pytest.mark.parametrize("option, value, allowed", [
    ("gpu_memory_utilization", "0.5", "a number in (0, 1]"),
    ("gpu_memory_utilization", True, "a number in (0, 1]"),
    ("cpu_kvcache_space_gib", float("nan"), "finite"),
    ("cpu_kvcache_space_gib", float("inf"), "finite"),
    ("num_kvcache_blocks", 2.5, "-1 (size from memory) or a positive integer"),
    ("num_kvcache_blocks", True, "-1 (size from memory) or a positive integer"),
    ("max_num_seqs", True, "a positive integer"),
    ("enforce_eager", "yes", "True or False"),
    ("enforce_eager", 1, "True or False"),
    ("device", None, "'auto', 'cuda' or 'cpu'"),
    ("attention_backend", 3, "'flash_attn'"),
    ("load_format", ..., "'auto' or 'dummy'"),
    ("kv_cache_dtype", "fp16", "'auto' (the model's dtype) or 'fp8'"),
    ("kv_cache_dtype", None, "'auto' (the model's dtype) or 'fp8'"),
    ("model", 123, "the checkpoint's directory"),
])
def test_bad_option_types_name_the_option_and_allowed_values(qwen3_dir, option, value, allowed):
    kwargs = {"device": "cpu", option: value}
    model = kwargs.pop("model", qwen3_dir)
    with pytest.raises((TypeError, ValueError)) as info:
        LLM(model, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{option} must be") and allowed in message and message.endswith(f"got {value!r}")


def test_kv_cache_dtype_and_path_like_model(qwen3_dir):
    from pathlib import Path
    from nanovllm.config import Config
    assert Config(qwen3_dir, device="cpu").kv_cache_dtype == "auto"
    config = Config(Path(qwen3_dir), device="cpu", kv_cache_dtype="fp8")
    assert config.kv_cache_dtype == "fp8" and config.model == qwen3_dir


@pytest.mark.parametrize("field, value, allowed", [
    ("temperature", "0", ">= 0"), ("temperature", float("nan"), ">= 0"), ("top_p", float("nan"), "(0, 1]"),
    ("min_p", float("nan"), "[0, 1]"), ("top_k", "5", "-1, 0"), ("max_tokens", "5", ">= 1"),
    ("stop_token_ids", 5, "a list of token ids"), ("stop_token_ids", 0, "a list of token ids"),
    ("stop_token_ids", [True], "a list of token ids"), ("stop", 5, "a string or a list"),
    ("seed", 1.5, "None or an integer"), ("logprobs", True, "None or an integer"),
    ("skip_special_tokens", "no", "True or False"), ("ignore_eos", 1, "True or False"),
    ("include_stop_str_in_output", "x", "True or False"),
])
def test_sampling_params_types_name_the_field(field, value, allowed):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be") and allowed in message and message.endswith(f"got {value!r}")


def test_sampling_params_accept_tuples():
    sp = SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2))
    assert sp.stop == ["a", "b"] and sp.stop_token_ids == [1, 2]
