import glob
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import suppress

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.utils.gguf_loader import gguf_tokenizer


def copy_shard(target: torch.Tensor, shard: torch.Tensor):
    if target.shape != shard.shape:
        raise ValueError(f"expected a tensor of shape {tuple(target.shape)}, got {tuple(shard.shape)}")
    target.data.copy_(shard)


def safetensors_weights(path: str) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file, tensor name, tensor) for every tensor of every *.safetensors file in `path`."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r} (pass load_format='dummy' for random weights)")
    for file in files:
        try:    # opening reads the header and checks that the file holds all the data it lists
            f = safe_open(file, "pt", "cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
        with f:
            for name in f.keys():
                yield file, name, f.get_tensor(name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def tokenizer_class(model_dir: str):
    """The class that AutoTokenizer would pick for `model_dir` (the one tokenizer_config.json names, its fast variant
    first), imported alone: importing AutoTokenizer pulls in the auto-model machinery, generation, torch.fx and sympy
    (11-14 s on the H100 machine, against ~1 s for the class). AutoTokenizer remains the fallback for anything else."""
    import transformers
    name = None
    with suppress(OSError, ValueError, AttributeError), open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        name = json.load(f).get("tokenizer_class")
    if isinstance(name, str) and name.isidentifier():
        for candidate in ([name] if name.endswith("Fast") else [name + "Fast", name]):
            # AttributeError: not in this transformers version; ImportError: it needs a missing package.
            with suppress(AttributeError, ImportError):
                return getattr(transformers, candidate)
    from transformers import AutoTokenizer
    return AutoTokenizer


def load_tokenizer(model_dir: str, gguf_file: str | None = None):
    """The checkpoint's transformers tokenizer (a GGUF file's from its metadata), or None when the directory ships
    none (token-id prompts only)."""
    if gguf_file is not None:
        return gguf_tokenizer(gguf_file)
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if not present:
        return None
    try:
        return tokenizer_class(model_dir).from_pretrained(model_dir)
    except Exception as e:      # a broken file surfaces as a JSON, Unicode, Key or tokenizers error, among others
        raise ValueError(f"the tokenizer in {model_dir!r} ({', '.join(present)}) does not load ({type(e).__name__}: "
                         f"{e}); re-download the tokenizer files, or remove them to run on token ids only") from e


def dummy_weights(config, device: torch.device) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Random values under the published tensor names and shapes of `config` (a ModelConfig; vLLM's
    load_format='dummy'), seeded by name so that every rank takes its shard of one full tensor; small uniform values
    keep activations finite; norm weights are 1."""
    h, d, m = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield "dummy", name, torch.ones(shape, device=device, dtype=config.dtype)
            continue
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        yield "dummy", name, torch.empty(shape, device=device, dtype=config.dtype).uniform_(-0.05, 0.05, generator=gen)


def load_model(model: nn.Module, weights: Iterator[tuple[str, str, torch.Tensor]], source: str):
    """Copy checkpoint tensors into `model`, renamed by its `checkpoint_names` (see Qwen3ForCausalLM). Every tensor
    must land on a parameter of the right shape and every parameter must be filled, else a ValueError names it."""
    renames = getattr(model, "checkpoint_names", {})
    params = dict(model.named_parameters())     # a tied weight appears once, under its first name
    loaded: dict[str, set] = {name: set() for name in params}
    for file, name, tensor in weights:
        if (name.startswith("lm_head.") and "lm_head.weight" not in params) or name.endswith("rotary_emb.inv_freq"):
            continue    # tied to the embedding, loaded under its own name; old Llamas' RoPE buffers (recomputed)
        target, shard_id = name, None
        for ckpt_part, (our_part, sid) in renames.items():
            if f".{ckpt_part}." in name:
                target, shard_id = name.replace(f".{ckpt_part}.", f".{our_part}."), sid
                break
        if (param := params.get(target)) is None:
            raise ValueError(f"checkpoint tensor {name!r} in {file} matches no parameter of the model "
                             f"(does config.json belong to this checkpoint?)")
        loader = getattr(param, "weight_loader", copy_shard)
        try:
            loader(param, tensor) if shard_id is None else loader(param, tensor, shard_id)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint tensor {name!r} in {file} does not fit the model: {e}") from None
        loaded[target].add(shard_id)
    # A packed parameter must get every shard routed to it; any other, its one tensor. What is missing is named as
    # the checkpoint names it.
    missing = []
    for name, shards in loaded.items():
        expected = {sid: name.replace(f".{ours}.", f".{ckpt}.") for ckpt, (ours, sid) in renames.items()
                    if f".{ours}." in name} or {None: name}
        missing += [expected[sid] for sid in sorted(expected.keys() - shards, key=str)]
    if missing:
        raise ValueError(f"checkpoint {source!r} lacks tensors for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
