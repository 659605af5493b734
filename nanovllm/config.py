import json
import os
from dataclasses import dataclass, field

import torch

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM")
ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class ModelConfig:
    """The architecture fields the engine needs, read straight from config.json.

    Reading the JSON ourselves (instead of through transformers' config classes) lets checkpoints written
    by transformers 4.x (top-level `rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) load
    the same way under either transformers version.
    """
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
        with open(path) as f:
            raw = json.load(f)
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else raw.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} in {path} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"RoPE scaling {rope_type!r} in {path} is not supported (only plain RoPE)")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise ValueError(f"dtype {dtype_name!r} in {path} is not supported; use one of {list(_DTYPES)}")
        heads = raw["num_attention_heads"]
        qwen3 = arch == "Qwen3ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", not qwen3),
            qk_norm=qwen3,
            dtype=_DTYPES[dtype_name],
            eos_token_ids=_eos_ids(model_dir, raw),
        )


def _eos_ids(model_dir: str, raw: dict) -> tuple[int, ...]:
    """generation_config.json's eos ids when present (what transformers' generate stops on), else config.json's."""
    eos = raw.get("eos_token_id")
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


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
    attention_backend: str = "auto"
    load_format: str = "auto"
    kv_cache_dtype: str = "auto"
    cpu_kvcache_space_gib: float = 1.0
    hf_config: ModelConfig = field(init=False)

    def __post_init__(self):
        self.model = os.path.expanduser(str(self.model))
        positive = ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "kvcache_block_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 8:
            raise ValueError(f"tensor_parallel_size must be an integer between 1 and 8, got {tp!r}")
        if self.num_kvcache_blocks == 0 or self.num_kvcache_blocks < -1:
            raise ValueError(f"num_kvcache_blocks must be -1 (size from memory) or positive, got {self.num_kvcache_blocks}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.cpu_kvcache_space_gib <= 0:
            raise ValueError(f"cpu_kvcache_space_gib must be positive, got {self.cpu_kvcache_space_gib}")
        self.hf_config = ModelConfig.from_model_dir(self.model)
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        self._check_tensor_parallel()

    def _check_tensor_parallel(self):
        """Refuse a split the model or the machine cannot take, before any worker process is spawned."""
        tp, hf = self.tensor_parallel_size, self.hf_config
        for what, n in (("attention heads", hf.num_attention_heads), ("KV heads", hf.num_key_value_heads),
                        ("vocab size", hf.vocab_size), ("intermediate size", hf.intermediate_size)):
            if n % tp:
                raise ValueError(f"tensor_parallel_size={tp} must divide the model's {what} ({n})")
        if self.device == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs (one per rank), "
                             f"but torch sees {torch.cuda.device_count()}")
