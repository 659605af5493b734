import json
import math
import os
from dataclasses import dataclass, field

import torch

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_field(name: str, value, types, ok, allowed: str):
    """Refuse `value` unless it is of `types` and passes `ok` (None: any value), naming the field and what it
    must be. The type is checked before `ok` compares, and a bool is no number here (True would pass as 1)."""
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool) or (ok and not ok(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _positive(v) -> bool:
    return v >= 1


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


def _positive_int(raw: dict, key: str, path: str, default: int | None = None) -> int:
    """config.json's `key`; a missing or null key takes `default`, and a key without one must be there."""
    if key not in raw and default is None:
        raise ValueError(f"{path} lacks the required key {key!r}; use the config.json of this checkpoint")
    value = default if raw.get(key) is None else raw[key]
    check_field(f"{key!r} in {path}", value, int, _positive, "a positive integer")
    return value


@dataclass(slots=True)
class ModelConfig:
    """The architecture fields the engine needs, read straight from config.json rather than through transformers'
    config classes, so that checkpoints of transformers 4.x (top-level `rope_theta`, `torch_dtype`) and 5.x
    (`rope_parameters`, `dtype`) load the same way under either transformers version."""
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
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool      # Qwen2 has a bias on q/k/v
    qk_norm: bool             # Qwen3 normalises q and k per head
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise ValueError(f"model directory {model_dir!r} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"model directory {model_dir!r} has no config.json")
        raw = _read_json(path)
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else raw.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} in {path} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if raw.get("use_sliding_window"):     # Qwen2.5/Qwen3 carry a sliding_window size but switch it off
            raise ValueError(f"use_sliding_window=true in {path} is not supported (nano-vllm runs full attention "
                             f"only); use a checkpoint without sliding-window attention")
        # Both keys are checked: a checkpoint may carry transformers 5's rope_parameters next to an old rope_scaling.
        for key in ("rope_parameters", "rope_scaling"):
            section = raw.get(key) or {}
            kind = section.get("rope_type", section.get("type", "default")) if isinstance(section, dict) else section
            if kind != "default":
                raise ValueError(f"RoPE scaling {kind!r} ({key} in {path}) is not supported (only plain RoPE)")
        rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise ValueError(f"dtype {dtype_name!r} in {path} is not supported; use one of {list(_DTYPES)}")
        sizes = {key: _positive_int(raw, key, path) for key in
                 ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers")}
        heads, qwen3 = sizes["num_attention_heads"], arch == "Qwen3ForCausalLM"
        return cls(
            architecture=arch, **sizes,
            num_key_value_heads=_positive_int(raw, "num_key_value_heads", path, heads),
            head_dim=_positive_int(raw, "head_dim", path, sizes["hidden_size"] // heads),
            max_position_embeddings=_positive_int(raw, "max_position_embeddings", path, 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", not qwen3), qk_norm=qwen3,
            dtype=_DTYPES[dtype_name], eos_token_ids=_eos_ids(model_dir, raw))


def _eos_ids(model_dir: str, raw: dict) -> tuple[int, ...]:
    """generation_config.json's eos ids when present (what transformers' generate stops on), else config.json's."""
    eos = raw.get("eos_token_id")
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = _read_json(gen_path).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


# Config's options: name, accepted types, test of the value (None: any), what to pass.
_OPTIONS = (
    ("model", (str, os.PathLike), None, "the checkpoint's directory (a str or os.PathLike)"),
    ("max_num_batched_tokens", int, _positive, "a positive integer"),
    ("max_num_seqs", int, _positive, "a positive integer"),
    ("max_model_len", int, _positive, "a positive integer"),
    ("kvcache_block_size", int, _positive, "a positive integer"),
    ("gpu_memory_utilization", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("tensor_parallel_size", int, lambda v: 1 <= v <= 8, "an integer between 1 and 8"),
    ("enforce_eager", bool, None, "True or False"),
    ("num_kvcache_blocks", int, lambda v: v == -1 or v >= 1, "-1 (size from memory) or a positive integer"),
    ("device", str, lambda v: v in ("auto", "cuda", "cpu"), "'auto', 'cuda' or 'cpu'"),
    ("load_format", str, lambda v: v in ("auto", "dummy"), "'auto' or 'dummy'"),
    ("cpu_kvcache_space_gib", (int, float), lambda v: 0 < v < math.inf, "a positive, finite number of GiB"),
    ("kv_cache_dtype", str, lambda v: v in ("auto", "fp8"), "'auto' (the model's dtype) or 'fp8' (float8_e4m3fn)"),
    ("overlap_scheduling", bool, None, "True or False"),
)


@dataclass(slots=True)
class Config:
    """Engine configuration; every field can be passed to `LLM(model, **fields)`."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    device: str = "auto"
    attention_backend: str = "auto"   # a name of layers/attention_backends.py's BACKENDS, checked there
    load_format: str = "auto"
    cpu_kvcache_space_gib: float = 1.0
    kv_cache_dtype: str = "auto"      # vLLM's name: "auto" is the model's dtype, "fp8" float8_e4m3fn
    overlap_scheduling: bool = True   # schedule step N+1 while step N runs (vLLM's async_scheduling)
    model_config: ModelConfig = field(init=False)   # the checkpoint's architecture

    def __post_init__(self):
        for name, types, ok, allowed in _OPTIONS:
            check_field(name, getattr(self, name), types, ok, allowed)
        self.model = os.path.expanduser(os.fspath(self.model))
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU")
        self.model_config = ModelConfig.from_model_dir(self.model)
        self.max_model_len = min(self.max_model_len, self.model_config.max_position_embeddings)
        # Refuse a tensor-parallel split the model or the machine cannot take, before any worker is spawned.
        # The vocabulary needs no check: each rank's share is padded (VocabParallelEmbedding).
        tp, model = self.tensor_parallel_size, self.model_config
        for what, n in (("attention heads", model.num_attention_heads), ("KV heads", model.num_key_value_heads),
                        ("intermediate size", model.intermediate_size)):
            if n % tp:
                raise ValueError(f"tensor_parallel_size={tp} must divide the model's {what} ({n})")
        if self.device == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs (one per rank), "
                             f"but torch sees {torch.cuda.device_count()}")
