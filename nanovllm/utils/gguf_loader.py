"""GGUF checkpoints (llama.cpp's one-file format) turned into what a Hugging Face checkpoint directory gives: a
config.json-like dict, the weights dequantized under transformers' names and layout, and a fast tokenizer. The file is
read with `gguf`, llama.cpp's own Python reader, so that the format stays llama.cpp's business; nothing here computes
on quantized blocks: the engine gets plain tensors and loads a .gguf like any other checkpoint."""
import functools
import math
import os
import re
from collections.abc import Iterator

import numpy as np
import torch

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp's tensor names (less ".weight"/".bias"), whole or after "blk.{i}.", and transformers' for them
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
                 "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# How text is cut into words before BPE, by tokenizer.ggml.pre (Llama 3 and Qwen2 families); any other name gets
# GPT-2's byte-level regex, as in transformers' GGUF loader, whose encodings ours equal
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {**dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"), _SPLIT % "{1,3}"),
                        **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _SPLIT % "")}
CONTROL, USER_DEFINED = 3, 4    # tokenizer.ggml.token_type values


def find_gguf(model: str) -> str | None:
    """The .gguf file that `model` names (the file itself, or a directory's only .gguf); None for neither."""
    model = os.fspath(model)
    if os.path.isfile(model):
        return model if model.lower().endswith(".gguf") else None
    found = sorted(f for f in (os.listdir(model) if os.path.isdir(model) else [])
                   if f.lower().endswith(".gguf") and os.path.isfile(os.path.join(model, f)))
    if len(found) > 1:
        raise ValueError(f"{model!r} holds several .gguf files ({', '.join(found)}); pass the path of the one to load")
    return os.path.join(model, found[0]) if found else None


def _open(path: str):
    """(reader, metadata dict), parsed once for config, weights and tokenizer together (a vocabulary's strings take
    the reader a while); keyed by size and mtime too, so that a rewritten file is read anew."""
    stat = os.stat(path)
    return _read(os.path.realpath(path), (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=1)
def _read(path: str, _stamp: tuple):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"loading {path} needs llama.cpp's GGUF reader: pip install gguf") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")

    class PlainArrayReader(gguf.GGUFReader):
        """The reader over a plain-array view of its memory map: each slice of an np.memmap is another memmap
        object, and the reader slices the file some 250k times (a vocabulary's strings, the weights' blocks)."""
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.memmap):
            self._plain = mapped.view(np.ndarray)

    try:    # a length or offset past the end of the file fails somewhere in numpy (ValueError, IndexError, ...)
        reader = PlainArrayReader(path)
        return reader, {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__} in the GGUF reader: {e}); "
                         f"re-download it") from None


def gguf_config(path: str) -> dict:
    """A config.json-like dict, in Hugging Face names, from the file's metadata."""
    reader, meta = _open(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def key(name: str, default=None):
        if (value := meta.get(f"{arch}.{name}", default)) is None:
            raise ValueError(f"{path} lacks the metadata key '{arch}.{name}'; re-convert or re-download it")
        return value
    tensors = {t.name: t for t in reader.tensors}
    heads, hidden, eos = key("attention.head_count"), key("embedding_length"), _eos_token_ids(meta)
    return {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu", "dtype": "float32",
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))), "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"), "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_theta": key("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(path, arch, meta, tensors.get("rope_freqs.weight")),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,     # llama.cpp writes the head only when untied
        "attention_bias": "blk.0.attn_q.bias" in tensors,           # Qwen2's q/k/v biases
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
    }


def _rope_scaling(path: str, arch: str, meta: dict, rope_freqs) -> dict | None:
    """HF's rope_scaling. The converter writes Llama 3.1's scaling as per-frequency factors (a rope_freqs tensor),
    not as metadata: Meta's parameters are rebuilt from the largest factor and must give all the others."""
    if rope_freqs is not None:
        got = np.asarray(rope_freqs.data, dtype=np.float64)
        scaling = {"rope_type": "llama3", "factor": float(got.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        base, dim = meta.get(f"{arch}.rope.freq_base", 10000.0), 2 * len(got)
        smooth = np.clip((8192 / (2 * math.pi * base ** (np.arange(0, dim, 2) / dim)) - 1) / (4 - 1), 0, 1)
        if not np.allclose(got, 1 / ((1 - smooth) / scaling["factor"] + smooth), rtol=1e-4):
            raise ValueError(f"{path}: rope_freqs.weight holds RoPE factors other than Llama 3.1's; not supported")
        return scaling
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    return None if kind == "none" else {"rope_type": kind, "factor": meta.get(f"{arch}.rope.scaling.factor"),
                                        **({"original_max_position_embeddings": original} if original else {})}


def _eos_token_ids(meta: dict) -> list[int]:
    """The ids to stop on, the end-of-turn token first. A chat model ends its turn with a token that is often not the
    file's eos (Llama 3: <|eot_id|>, eos <|end_of_text|>), and a chat user needs generation to stop there, as llama.cpp
    does (transformers' GGUF loader takes eos_token_id alone): the file's eot_token_id, else the control token that
    the chat template writes right after an assistant's message."""
    eos, eot = meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")
    tokens, template = meta.get("tokenizer.ggml.tokens", []), meta.get("tokenizer.chat_template")
    if eot is None and template:
        mark = "NANOVLLM-END-OF-MESSAGE"
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
                messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}],
                add_generation_prompt=False, bos_token="", eos_token=tokens[eos] if eos is not None else "")
        except Exception:   # a template that needs more than the usual chat variables: the file's eos alone
            text = ""
        after, kinds = text.partition(mark)[2].lstrip(), meta.get("tokenizer.ggml.token_type", [])
        ends = [(len(t), i) for i, (t, k) in enumerate(zip(tokens, kinds)) if k == CONTROL and after.startswith(t)]
        eot = max(ends)[1] if ends else None
    return list(dict.fromkeys(i for i in (eot, eos) if i is not None))


def _hf_name(path: str, name: str) -> str | None:
    """transformers' name for a llama.cpp tensor; None for rope_freqs, which gguf_config reads as rope_scaling."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", name)
    table = LAYER_TENSORS if m and m[1] else GLOBAL_TENSORS
    if m and m[2] in table:
        return f"model.layers.{m[1]}.{table[m[2]]}.{m[3]}" if m[1] else f"{table[m[2]]}.{m[3]}"
    if name == "rope_freqs.weight":
        return None
    raise ValueError(f"{path}: tensor {name!r} has no Hugging Face counterpart that nano-vllm knows")


def gguf_weights(path: str, dtype: torch.dtype) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(path, Hugging Face tensor name, tensor) for every tensor, dequantized to `dtype` on the CPU, shaped [out, in].
    llama.cpp's converter interleaves llama's q/k rows per head (its rope rotates adjacent pairs, transformers' the two
    halves of a head): undone here. Qwen2/Qwen3 are stored as they are."""
    import gguf
    config = gguf_config(path)
    reader, _ = _open(path)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        if (name := _hf_name(path, tensor.name)) is None:
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, "
                             f"which the installed gguf package cannot dequantize") from None
        weight = torch.from_numpy(array if array.flags.writeable else np.array(array))  # F32: the file's memory map
        if config["model_type"] == "llama" and (n := heads.get(name.split(".")[-2])):
            # rows stored as (head, half, 2) become (head, 2, half); the copy below makes them contiguous
            weight = weight.view(n, weight.shape[0] // n // 2, 2, *weight.shape[1:]).transpose(1, 2)
        yield path, name, weight.to(dtype, memory_format=torch.contiguous_format).reshape(array.shape)


def gguf_tokenizer(path: str):
    """A transformers fast tokenizer from the file's byte-level BPE vocabulary and merges, built with the tokenizers
    library and PreTrainedTokenizerFast, not AutoTokenizer, whose import pulls in the auto-model machinery."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    _, meta = _open(path)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
                         f"(only 'gpt2', byte-level BPE, as Llama 3, SmolLM2 and Qwen files have)")
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    byte_level, alphabet = pre_tokenizers.ByteLevel(False, use_regex=False), set(pre_tokenizers.ByteLevel.alphabet())
    # a token outside GPT-2's byte alphabet (some added ones are stored as plain text) is spelled in it, as BPE sees
    # it; such a token marked control is llama.cpp's mislabel and stays out of the special tokens, as in
    # transformers. Control tokens (<|im_end|>) match whole and are special; user-defined ones (<think>) match whole.
    spell = lambda t: t if set(t) <= alphabet else "".join(p for p, _ in byte_level.pre_tokenize_str(t))  # noqa: E731
    vocab = {spell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, kinds)
                                if kind == CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, kinds)
                        if kind == USER_DEFINED and t in vocab])
    token = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    eos = _eos_token_ids(meta)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=tokens[eos[0]] if eos else None, unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token", False),
        add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False))
