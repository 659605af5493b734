"""The Llama family (Llama 2/3/3.1/3.2, TinyLlama, SmolLM) and Mistral next to Qwen: greedy tokens equal transformers'
on tiny random float32 checkpoints (odd head counts, tied embeddings, RoPE scaling), `dtype=`, and checkpoints as
they come: old buffers, missing or odd `architectures`, every config field's type and range checked at load."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from tests.conftest import all_free, hf_greedy
from tests.tiny_checkpoint import build_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CASES = {
    "llama": dict(arch="llama"),
    "llama-odd-heads-tied": dict(arch="llama", num_attention_heads=3, num_key_value_heads=1, hidden_size=48,
                                 tie_word_embeddings=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral": dict(arch="mistral"),
    "smollm2-heads": dict(arch="llama", num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=144,
                          tie_word_embeddings=True),
    "tinyllama-heads": dict(arch="llama", num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                            hidden_size=128),
}
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", params=list(CASES))
def case_dir(request, tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), seed=7, **CASES[request.param])


def test_greedy_matches_transformers(case_dir):
    """Prompts past the llama3 scaling's original 64 positions and over several blocks, chunked and batched."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (1, 17, 70, 150)]
    llm = LLM(case_dir, device="cpu", kvcache_block_size=16, max_num_batched_tokens=64, max_model_len=512)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(case_dir, prompt, GREEDY.max_tokens)
    assert all_free(llm)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_greedy_matches_transformers_on_cuda(case_dir, enforce_eager):
    """float32 through the Triton kernels, eagerly and with CUDA graphs."""
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (1, 17, 70, 150)]
    llm = LLM(case_dir, device="cuda", attention_backend="triton", kvcache_block_size=16, max_model_len=512,
              max_num_batched_tokens=64, enforce_eager=enforce_eager, num_kvcache_blocks=64)
    assert (llm.executor.runner.graphs is None) == enforce_eager
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(case_dir, prompt, GREEDY.max_tokens, device="cuda")
    llm.exit()


def test_rope_scaling_tables_equal_transformers():
    """Our cos/sin tables under "linear" and "llama3" against transformers' rotary embedding of the same config."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    positions = torch.arange(300)
    for scaling in (LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}):
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=10000.0,
                             rope_scaling=dict(scaling), max_position_embeddings=2048)
        cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
        ours = RotaryEmbedding(16, 2048, 10000.0, scaling)
        # transformers' attention_scaling is 1 for both types: its tables are cos/sin of the angles, duplicated
        torch.testing.assert_close(ours.cos[positions], cos[0, :, :8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.sin[positions], sin[0, :, :8], atol=1e-5, rtol=1e-5)


def test_dtype_option(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", dtype="bfloat16", kvcache_block_size=16)
    assert llm.executor.runner.model.lm_head.weight.dtype == torch.bfloat16
    assert llm.executor.runner.kv_cache.dtype == torch.bfloat16
    assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]["token_ids"]) == GREEDY.max_tokens
    with pytest.raises(ValueError, match=r"dtype must be 'auto' \(the checkpoint's\) or one of"):
        LLM(qwen3_dir, device="cpu", dtype="fp16")


def test_the_layers_share_one_rotary_table(qwen3_dir):
    """A cos/sin table per layer would cost Qwen3-0.6B 28 x 21 MB of memory the KV cache can use."""
    model = LLM(qwen3_dir, device="cpu", kvcache_block_size=16).executor.runner.model
    tables = {layer.self_attn.attn.rotary_emb.cos.data_ptr() for layer in model.model.layers}
    assert len(model.model.layers) > 1 and len(tables) == 1


# ---- checkpoints as they come --------------------------------------------------------------------------------

def edited_checkpoint(tmp_path, source, edit_config=None, edit_weights=None) -> str:
    """A copy of `source` with its config.json and/or its weights changed."""
    path = str(tmp_path / "edited")
    os.makedirs(path)
    for name in os.listdir(source):
        if name != "model.safetensors":
            with open(os.path.join(source, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
                dst.write(src.read())
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file(edit_weights(weights) if edit_weights else weights, os.path.join(path, "model.safetensors"))
    if edit_config:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        edit_config(config)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), arch="llama", seed=7)


def test_old_rotary_buffers_are_ignored(llama_dir, tmp_path):
    def add_inv_freq(weights):
        return weights | {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}
    path = edited_checkpoint(tmp_path, llama_dir, edit_weights=add_inv_freq)
    out = LLM(path, device="cpu", kvcache_block_size=16).generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]
    assert out["token_ids"] == hf_greedy(llama_dir, [5, 6, 7], GREEDY.max_tokens)


@pytest.mark.parametrize("architectures", [None, []])
def test_missing_architectures_fall_back_to_model_type(qwen3_dir, tmp_path, architectures):
    def edit(config):
        config["architectures"] = architectures
    path = edited_checkpoint(tmp_path, qwen3_dir, edit_config=edit)
    llm = LLM(path, device="cpu", kvcache_block_size=16)
    assert llm.config.model_config.architecture == "Qwen3ForCausalLM"
    assert llm.generate([[5, 6]], GREEDY, use_tqdm=False)[0]["token_ids"] == hf_greedy(qwen3_dir, [5, 6], 10)


@pytest.mark.parametrize("key, value, message", [
    ("architectures", {"0": "LlamaForCausalLM"}, "'architectures' in .* must be a list"),
    ("architectures", ["GPT2LMHeadModel"], "architecture 'GPT2LMHeadModel' .* not supported"),
    ("rms_norm_eps", "1e-6", "'rms_norm_eps' .* must be a number in \\(0, 1\\), got '1e-6'"),
    ("rope_theta", -1, "rope_theta .* must be a positive number, got -1"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' .* must be true or false, got 'false'"),
    ("eos_token_id", [2, 99999], "eos_token_id .* must be a token id or a list of token ids in \\[0, 384\\)"),
    ("eos_token_id", "2", "eos_token_id .* must be a token id or a list of token ids"),
    ("hidden_size", 0, "'hidden_size' .* must be a positive integer"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "RoPE scaling 'yarn' .* not supported"),
    ("rope_scaling", {"rope_type": "linear"}, "RoPE scaling factor .* must be a positive number, got None"),
    ("mlp_bias", True, "only SwiGLU MLPs without bias"),
])
def test_bad_config_fields_are_named_at_load(llama_dir, tmp_path, key, value, message):
    def edit(config):
        config[key] = value
        if key in ("rope_scaling", "rope_theta"):    # as transformers 4 wrote them, without rope_parameters
            config.pop("rope_parameters", None)
    path = edited_checkpoint(tmp_path, llama_dir, edit_config=edit)
    with pytest.raises(ValueError, match=message):
        LLM(path, device="cpu", kvcache_block_size=16)


def test_a_tensor_missing_from_a_packed_weight_is_named_as_the_checkpoint_names_it(llama_dir, tmp_path):
    def drop_k_proj(weights):
        return {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    path = edited_checkpoint(tmp_path, llama_dir, edit_weights=drop_k_proj)
    with pytest.raises(ValueError, match=r"lacks tensors for: model\.layers\.1\.self_attn\.k_proj\.weight$"):
        LLM(path, device="cpu", kvcache_block_size=16)

    def drop_norm(weights):
        return {k: v for k, v in weights.items() if k != "model.layers.0.input_layernorm.weight"}
    path = edited_checkpoint(tmp_path / "norm", llama_dir, edit_weights=drop_norm)
    with pytest.raises(ValueError, match=r"lacks tensors for: model\.layers\.0\.input_layernorm\.weight$"):
        LLM(path, device="cpu", kvcache_block_size=16)
