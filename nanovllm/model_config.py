import json
import math
import os
from dataclasses import dataclass

import torch

from nanovllm.utils.gguf_loader import find_gguf, gguf_config

# Hugging Face architecture -> model_type. Llama and Mistral are Qwen2's decoder without the q/k/v bias.
ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                 "MistralForCausalLM": "mistral"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROPE_TYPES = ("default", "linear", "llama3")


def check_field(name: str, value, types, ok, allowed: str):
    """Refuse `value` unless it is of `types` and passes `ok` (None: any value), naming the field and what it
    must be. The type is checked before `ok` compares, and a bool is no number here (True would pass as 1)."""
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool) or (ok and not ok(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _read_json(path: str) -> dict:
    """The JSON object in `path`; a broken file (often a partial download) is named rather than a bare JSON error."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:     # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(raw).__name__}; re-download it")
    return raw


@dataclass(slots=True)
class ModelConfig:
    """The architecture fields the engine needs, read from config.json (or a GGUF file's metadata) and checked field by
    field at load, so that a wrong type or range is named there rather than failing in the middle of a generate; read
    straight rather than through transformers' config classes, so that checkpoints of transformers 4.x (top-level
    `rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) load the same way under either version."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None     # {"rope_type": "linear" or "llama3", ...} as Hugging Face writes it
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool      # Qwen2 has a bias on q/k/v
    qk_norm: bool             # Qwen3 normalises q and k per head
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    gguf_file: str | None     # the weights and tokenizer come from this GGUF file, else from the directory

    @classmethod
    def load(cls, model: str, dtype: str = "auto") -> "ModelConfig":
        """From a checkpoint directory, a .gguf file or a directory holding one; `dtype` "auto" is the checkpoint's."""
        if gguf_file := find_gguf(model):
            raw, source, generation = gguf_config(gguf_file), gguf_file, {}
        elif not os.path.isdir(model):
            raise ValueError(f"model directory {model!r} does not exist")
        elif not os.path.isfile(source := os.path.join(model, "config.json")):
            raise ValueError(f"model directory {model!r} has no config.json")
        else:
            raw = _read_json(source)
            path = os.path.join(model, "generation_config.json")
            generation = _read_json(path) if os.path.isfile(path) else {}
        return cls.from_dict(raw, source, dtype, generation, gguf_file)

    @classmethod
    def from_dict(cls, raw: dict, source: str, dtype: str, generation: dict, gguf_file: str | None) -> "ModelConfig":
        def field(key, types, ok, allowed, default=None):
            """raw[key], or `default` where it is missing or null; a key without a default must be there."""
            if key not in raw and default is None:
                raise ValueError(f"{source} lacks the required key {key!r}; use the config of this checkpoint")
            value = default if raw.get(key) is None else raw[key]
            check_field(f"{key!r} in {source}", value, types, ok, allowed)
            return value

        def positive(key, default=None):
            return field(key, int, lambda v: v >= 1, "a positive integer", default)

        arch = _architecture(raw, source)
        # Qwen2.5/Qwen3 carry a sliding_window size but switch it off; Mistral's is on whenever it is set.
        window = "use_sliding_window=true" if raw.get("use_sliding_window") else (
            f"sliding_window={raw.get('sliding_window')}" if arch == "MistralForCausalLM" and raw.get("sliding_window")
            else None)
        if window:
            raise ValueError(f"{window} in {source} is not supported (nano-vllm runs full attention only); "
                             f"use a checkpoint without sliding-window attention")
        if raw.get("mlp_bias") or raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: only SwiGLU MLPs without bias (hidden_act 'silu', no mlp_bias) are supported")
        sizes = {key: positive(key) for key in
                 ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers")}
        heads, vocab = sizes["num_attention_heads"], sizes["vocab_size"]
        rope = raw.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0)) if isinstance(rope, dict) else None
        check_field(f"rope_theta in {source}", rope_theta, (int, float), lambda v: 0 < v < math.inf,
                    "a positive number")
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32" if dtype == "auto" else dtype
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype {dtype_name!r} ({source if dtype == 'auto' else 'LLM(dtype=...)'}) is not "
                             f"supported; use one of {list(DTYPES)}")
        # What transformers' generate stops on: generation_config.json's eos when it has one, else config.json's.
        eos = _token_ids(raw.get("eos_token_id"), f"eos_token_id in {source}", vocab)
        if "eos_token_id" in generation:
            eos = _token_ids(generation["eos_token_id"], f"eos_token_id in {source}'s generation_config.json", vocab)
        return cls(
            architecture=arch, **sizes,
            num_key_value_heads=positive("num_key_value_heads", heads),
            head_dim=positive("head_dim", sizes["hidden_size"] // heads),
            max_position_embeddings=positive("max_position_embeddings", 4096),
            rms_norm_eps=field("rms_norm_eps", (int, float), lambda v: 0 < v < 1, "a number in (0, 1)", 1e-6),
            rope_theta=float(rope_theta), rope_scaling=_rope_scaling(raw, source),
            tie_word_embeddings=field("tie_word_embeddings", bool, None, "true or false", False),
            attention_bias=field("attention_bias", bool, None, "true or false", arch == "Qwen2ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM", dtype=DTYPES[dtype_name], eos_token_ids=tuple(eos),
            gguf_file=gguf_file)


def _token_ids(value, name: str, vocab: int) -> list[int]:
    ids = [] if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    check_field(name, ids, list, lambda v: all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in v), f"a token id or a list of token ids in [0, {vocab})")
    return ids


def _architecture(raw: dict, source: str) -> str:
    archs = raw.get("architectures")
    if archs is not None and not isinstance(archs, list):
        raise ValueError(f"'architectures' in {source} must be a list of names, got {archs!r}")
    by_type = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
    arch = archs[0] if archs else by_type.get(raw.get("model_type"), f"model_type {raw.get('model_type')!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} in {source} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _rope_scaling(raw: dict, source: str) -> dict | None:
    """RoPE scaling: none, "linear" or Llama 3.1's "llama3" (with their parameters checked); any other is refused.
    Both keys are read: a checkpoint may carry transformers 5's rope_parameters next to an old rope_scaling."""
    scaling = None
    for key in ("rope_parameters", "rope_scaling"):
        section = raw.get(key) or {}
        kind = section.get("rope_type", section.get("type", "default")) if isinstance(section, dict) else section
        if kind not in ROPE_TYPES:
            raise ValueError(f"RoPE scaling {kind!r} ({key} in {source}) is not supported; "
                             f"supported: {', '.join(ROPE_TYPES)}")
        if kind != "default":
            scaling = {**section, "rope_type": kind}
    if scaling is not None:
        llama3 = scaling["rope_type"] == "llama3"
        llama3_keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if llama3 else ()
        for key in ("factor", *llama3_keys):
            check_field(f"the RoPE scaling {key} in {source}", scaling.get(key), (int, float),
                        lambda v: 0 < v < math.inf, "a positive number")
        if llama3 and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
            raise ValueError(f"low_freq_factor must be below high_freq_factor in {source}'s RoPE scaling")
    return scaling
