import math
import os
from dataclasses import dataclass, field

import torch

from nanovllm.model_config import DTYPES, ModelConfig, check_field


def _positive(v) -> bool:
    return v >= 1


# Config's options: name, accepted types, test of the value (None: any), what to pass.
_OPTIONS = (
    ("model", (str, os.PathLike), None, "the checkpoint's directory or .gguf file (a str or os.PathLike)"),
    ("dtype", str, lambda v: v == "auto" or v in DTYPES, f"'auto' (the checkpoint's) or one of {list(DTYPES)}"),
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
    dtype: str = "auto"               # of weights and activations: "auto" is the checkpoint's
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
        self.model_config = ModelConfig.load(self.model, self.dtype)
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
