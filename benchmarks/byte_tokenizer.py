"""Give a shipped config a tokenizer, for benchmarks that run random weights and still detokenize (the server's).

    python benchmarks/byte_tokenizer.py nanovllm/configs/qwen3-0.6b /tmp/qwen3-0.6b-tok
    python -m nanovllm.serve /tmp/qwen3-0.6b-tok --load-format dummy

DIR gets the config's config.json and a byte-level BPE tokenizer with the config's vocabulary size: every id is one
to three bytes (the 256 bytes, then pairs, then triples), as a real byte-level vocabulary's ids are, so the text of a
random completion costs what a real one does to detokenize (invalid UTF-8 included). No merges: prompts here are
token ids, so nothing needs to encode well."""
import argparse
import itertools
import json
import os
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def write(config_dir: str, out_dir: str):
    with open(os.path.join(config_dir, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    alphabet = byte_alphabet()
    words = itertools.chain(alphabet, map("".join, itertools.product(alphabet, repeat=2)),
                            map("".join, itertools.product(alphabet, repeat=3)))
    vocab = {word: i for i, word in zip(range(vocab_size - 1), words)}
    vocab["<|endoftext|>"] = vocab_size - 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(config_dir, "config.json"), out_dir)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(out_dir)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config_dir", help="a directory with config.json (a shipped one: nanovllm/configs/NAME)")
    p.add_argument("out_dir")
    args = p.parse_args()
    write(args.config_dir, args.out_dir)
