"""Write a tiny random Qwen3 or Qwen2 checkpoint with a byte-level BPE tokenizer, offline, for the tests (the oracle
is transformers on the same files) and example.py. The text is gibberish; the initializer scale is large enough that
the greedy next token changes from step to step and depends on context and position."""
import os

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello, world! nano-vllm is a small inference engine written in Python. ",
    "Paged attention keeps the key and value cache in fixed-size blocks, shared between prompts. ",
    "Les modèles de langue prédisent le prochain jeton. 语言模型预测下一个词。 😀🚀 ",
    "introduce yourself; list all prime numbers within 100: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29. ",
]


def build_tokenizer(path: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_checkpoint(path: str, arch: str = "qwen3", seed: int = 0, vocab_size: int = 384,
                          tie_word_embeddings: bool = False, with_tokenizer: bool = True,
                          init_scale: float = 0.5, **config) -> str:
    """Save a 2-layer float32 model (4 query heads, 2 KV heads, head_dim 16, unless `config` says otherwise) of
    arch "qwen3", "qwen2", "llama" or "mistral" and its tokenizer to `path`."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    os.makedirs(path, exist_ok=True)
    eos_id = SPECIAL_TOKENS.index("<|im_end|>")
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie_word_embeddings, initializer_range=init_scale, rope_theta=10000.0,
                  bos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"), eos_token_id=eos_id) | config
    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {list(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    if arch != "qwen2":
        common.setdefault("head_dim", 16)
    if arch == "mistral":
        common.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    model_cls(config_cls(**common)).float().eval().save_pretrained(path)
    if with_tokenizer:
        build_tokenizer(path, vocab_size)
    return path
